"""Speed and agreement figures for the runtime.

    gemma4-nb bench [--model X] [--quant int4] [--compare llama.cpp] [--bandwidth]   # user-facing

    python -m gemma4_nb.bench --model PATH [--prompt 512] [--decode 64]
    python -m gemma4_nb.bench --shape gemma4-12b --device cuda      # random weights, no download
    python -m gemma4_nb.bench --load-time                           # embedded GGUF: first and cached load
    python -m gemma4_nb.bench --agreement llama.cpp [--model X.gguf] # top-1 agreement and speed vs llama.cpp
    python -m gemma4_nb.bench --draft                               # prompt-lookup drafting on/off
    python -m gemma4_nb.bench --mtp-cost [--layers 6] [--depth 1024] # MTP draft/verify cost, 12B shape

Prints time to first token, prefill and decode tokens/s, and peak memory. ``--agreement`` needs
the ``bench`` extra (llama-cpp-python).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..runtime.checkpoint import expected_tensors
from ..runtime.config import parse_config
from ..runtime.decoder import GemmaModel
from .tiny import tiny_config

SHAPES = {
    "gemma4-12b": dict(vocab_size=262144, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                       num_global_key_value_heads=1, sliding_window=1024, max_position_embeddings=262144),
}


def random_model(shape: str, device: str, dtype: torch.dtype, layers: int | None = None) -> GemmaModel:
    """The shape with random weights (``layers``: only the first N of its layers)."""
    shape_cfg = dict(SHAPES[shape])
    if layers:
        shape_cfg["num_hidden_layers"] = layers
    cfg = parse_config(tiny_config(**shape_cfg))
    return GemmaModel(cfg, _random_weights(expected_tensors(cfg), cfg.weight_prefix, device, dtype, seed=0))


def _random_weights(expected: dict, prefix: str, device, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors for ``expected`` (checkpoint name -> shape), keyed by runtime name: norms and
    layer scalars near 1, matrices small, a centroid head's token ordering a permutation."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, dims in expected.items():
        key = name[len(prefix):] if name.startswith(prefix) else name
        if name.endswith("token_ordering"):
            weights[key] = torch.randperm(dims[0], generator=gen, device=device)
            continue
        t = torch.randn(dims, generator=gen, device=device, dtype=dtype)
        weights[key] = 1 + 0.1 * t if (name.endswith("norm.weight") or name.endswith("layer_scalar")) else t * 0.02
    return weights


def random_quantized_model(shape: str, fmt: str, seed: int = 0) -> GemmaModel:
    """A model of ``shape`` with random ``fmt`` weights built directly in the quantized layout
    (random codes, scales and minimums): no full-precision copy is ever held, so the 12B shape fits
    in about 9 GiB (int4) on a CPU machine."""
    from ..kernels.qweight import GROUP, QWeight
    from ..runtime.quant import fmt_for

    cfg = parse_config(tiny_config(**dict(SHAPES[shape])))
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, dims in expected_tensors(cfg).items():
        key = name[len(cfg.weight_prefix):] if name.startswith(cfg.weight_prefix) else name
        f = fmt_for(name, dims, fmt)
        if f is None:
            t = torch.randn(dims, generator=gen)
            weights[key] = 1 + 0.1 * t if (name.endswith("norm.weight") or name.endswith("layer_scalar")) else t * 0.02
            continue
        out, inp = dims
        step = 0.02 * 3 / (127 if f == "int8" else 7.5)  # about the spread of 0.02 * randn
        if f == "int8":
            codes = torch.randint(-127, 128, (out, inp), generator=gen, dtype=torch.int8)
            mins = None
        else:
            codes = torch.randint(0, 256, (out, inp // 2), generator=gen, dtype=torch.uint8)
            mins = torch.full((out, inp // GROUP), -7.5 * step)
        scales = torch.full((out, inp // GROUP), step) * (0.5 + torch.rand((out, inp // GROUP), generator=gen))
        weights[key] = QWeight(f, codes, scales, mins, tuple(dims), torch.float32)
    return GemmaModel(cfg, weights)


def on_device(net: GemmaModel, device, dtype: torch.dtype) -> GemmaModel:
    """``net`` with its weights on ``device``: quantized ones keep their codes and compute in
    ``dtype``, floating-point tensors are cast to ``dtype`` (the CUDA path of a random quantized
    model, which is built on the CPU)."""
    from ..kernels.qweight import QWeight

    def moved(t):
        if isinstance(t, QWeight):
            return t.to(device, dtype)
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)

    return GemmaModel(net.cfg, {k: moved(t) for k, t in net.weights.items()})


def decode_bytes(net: GemmaModel, context: int) -> tuple[int, int]:
    """Bytes one decode step reads at ``context`` positions: (weights, KV cache). Every matrix is
    read once (the tied embedding as the head; an untied embedding only by rows, not counted)."""
    from ..kernels.qweight import QWeight

    def nbytes(t):
        if isinstance(t, QWeight) and t.planes:
            # a screened head (qweight.to_planes): pass 1 reads the high plane and the scales (and,
            # once learned, the screen's errors in its exact columns), pass 2 the row bounds and
            # the estimates, plus the rows it rescores (not counted: under 1% of them on text)
            policy = t.__dict__.get("_screen_policy")
            side = (t.row_err,) if policy is None or policy.screen_err is None else (policy.col_err, policy.screen_err)
            return sum(x.nbytes for x in (t.codes, t.scales, *side)) + 8 * t.shape[0]
        return t.nbytes if isinstance(t, QWeight) else t.numel() * t.element_size()

    weights = sum(nbytes(t) for n, t in net.weights.items() if "vision" not in n and "audio" not in n)
    if "lm_head.weight" in net.weights:
        weights -= nbytes(net.weights["embed_tokens.weight"])
    elem = torch.tensor([], dtype=net.dtype).element_size()
    kv = 0
    for spec in net.cfg.layers:
        if spec.owns_kv:
            seen = min(context, spec.window) if spec.window else context
            kv += seen * spec.num_kv_heads * spec.head_dim * elem * (1 if spec.k_eq_v else 2)
    return weights, kv


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _greedy_step(net: GemmaModel, tok: torch.Tensor, cache) -> torch.Tensor:
    """One decode step; the head picks the greedy token itself (fused top-1 when quantized)."""
    hidden = net.forward(tok.view(1), cache, logits=False).hidden
    return net.top_k(hidden[-1], 1)[1][0]


def run(net: GemmaModel, prompt_len: int, decode: int, prefill_chunk: int | None = None,
        ids: list[int] | None = None, depth: int = 0, cuda_graphs: bool = False) -> dict:
    """Time a chunked prefill of ``prompt_len`` random tokens (after ``depth`` untimed context
    tokens), then ``decode`` greedy steps (``cuda_graphs``: with :class:`StaticDecoder`, whose
    graphs are captured before the timing starts; eager on the CPU)."""
    from ..runtime.kv_cache import PrefixCache
    from ..runtime.generation import prefill

    dev = net.device
    chunk = prefill_chunk or (2048 if dev.type == "cuda" else 512)
    if ids is None:
        ids = torch.randint(10, net.cfg.vocab_size, (depth + prompt_len,)).tolist()
    warm = net.new_cache()
    net.forward(torch.tensor(ids[:48]), warm)  # > 16 positions: the prefill path of quantized weights
    net.forward(torch.tensor(ids[:4]), warm)  # small batches: the fused kernels
    _greedy_step(net, torch.tensor(ids[0]), warm)
    del warm
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prefix = PrefixCache(lambda: net.new_cache())
    prefix.prepare(ids + [0])
    if depth:
        prefill(net, ids[:depth], prefix, chunk)
    _sync(dev)
    t0 = time.perf_counter()
    out = prefill(net, ids, prefix, chunk, start=depth)
    tok = out.logits[-1].argmax()
    _sync(dev)
    prefill_s = time.perf_counter() - t0
    step = lambda tok: _greedy_step(net, tok, prefix.kv)  # noqa: E731
    if cuda_graphs:
        from ..runtime.static_decode import StaticDecoder

        static = StaticDecoder(net, depth + prompt_len + decode + 1)
        static.load(prefix.kv)
        static.prepare(static.length + decode)
        step = static.step
        _sync(dev)
    t1 = time.perf_counter()
    for _ in range(decode):
        tok = step(tok)
    _sync(dev)
    dec = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    return {"prompt": prompt_len, "ttft_s": prefill_s, "prefill_tok_s": prompt_len / prefill_s,
            "decode_tok_s": decode / dec, "peak_gpu_gib": peak / 2**30 if peak else None,
            "peak_rss_gib": _peak_rss() / 2**30}


AGREEMENT_TEXT = """\
import pandas as pd
import matplotlib.pyplot as plt

# Load the quarterly sales report and look at its structure.
sales = pd.read_csv("sales_2024.csv", parse_dates=["date"])
print(sales.shape)
print(sales.dtypes)
sales.head()

# Revenue per region and quarter, then the growth from one quarter to the next.
quarterly = (
    sales.assign(quarter=sales["date"].dt.to_period("Q"))
    .groupby(["region", "quarter"], as_index=False)["revenue"]
    .sum()
)
quarterly["growth"] = quarterly.groupby("region")["revenue"].pct_change()
best = quarterly[quarterly["quarter"] == quarterly["quarter"].max()].nlargest(3, "growth")
print(best)

The table shows that the western region grew fastest in the last quarter, while the northern
region, which had led the previous year, fell back. A line chart of revenue per region makes the
turning point easy to see, and a bar chart of the growth rates ranks the regions at a glance.
fig, ax = plt.subplots(figsize=(8, 4))
for region, frame in quarterly.groupby("region"):
    ax.plot(frame["quarter"].astype(str), frame["revenue"], marker="o", label=region)
ax.set_title("Revenue per region")
ax.legend()
plt.show()
"""


def load_time() -> None:
    """First (converting) and cached load of the embedded GGUF, in fresh processes."""
    import os
    import subprocess
    import sys
    import tempfile

    code = ("import time; t = time.perf_counter(); import gemma4_nb; t1 = time.perf_counter(); "
            "gemma4_nb.load(progress=False); print(f'{time.perf_counter() - t1:.2f} {t1 - t:.2f}')")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, GEMMA4_NB_CACHE=cache)
        env.pop("GEMMA4_NB_MODEL", None)
        for label in ("first load (converts GGUF, builds tokenizer)", "cached load", "cached load"):
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            load_s, import_s = out.stdout.split()
            print(f"{label:<46} {float(load_s):6.2f} s   (import gemma4_nb {float(import_s):.2f} s)")


def _f32_gguf(src, dst) -> None:
    """The same model with every tensor dequantized to F32 (llama.cpp then runs it in F32, without
    quantizing activations): separates llama.cpp's arithmetic from differences in the model."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    reader = GGUFReader(str(src))
    writer = GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        data = t.data if t.tensor_type == GGMLQuantizationType.F32 else dequantize(t.data, t.tensor_type)
        writer.add_tensor(t.name, data.astype("float32").reshape([int(d) for d in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def agreement_llama_cpp(model_ref: str | None, threads: int, positions: int = 256, decode: int = 64) -> None:
    """Teacher-forced top-1 agreement with llama.cpp on one GGUF, and both speeds side by side."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: pip install 'gemma4-nb[bench]'") from None
    import tempfile

    import numpy as np

    from ..runtime.resolve import resolve_model
    from ..runtime.model import load

    gguf = resolve_model(model_ref)
    if gguf.suffix != ".gguf":
        raise SystemExit(f"--agreement needs a GGUF model, got {gguf}")
    torch.set_num_threads(threads)
    ours = load(str(gguf), device="cpu", dtype="fp32", progress=False)
    ids = ours.encode(AGREEMENT_TEXT)
    if len(ids) < positions:
        raise SystemExit(f"the agreement text has only {len(ids)} tokens")
    ids = ids[:positions]
    mine = ours.net.forward(torch.tensor(ids), ours.net.new_cache(), outputs="all").logits.numpy()
    top2 = np.sort(mine, -1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]

    def llama(path, **kw):
        return Llama(model_path=str(path), n_ctx=max(1024, positions + decode + 8), n_threads=threads,
                     n_threads_batch=threads, n_batch=512, logits_all=True, verbose=False, **kw)

    print(f"model: {gguf.name}   threads: {threads}   text: {len(ids)} positions, teacher-forced")
    print(f"median top-1/top-2 margin of our logits: {np.median(margin):.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "f32.gguf"
        _f32_gguf(gguf, f32)
        runs = [("llama.cpp, Q4_K_M weights, F16 KV cache (default)", gguf, {}),
                ("llama.cpp, Q4_K_M weights, F32 KV cache", gguf, {"type_k": 0, "type_v": 0}),
                ("llama.cpp, same weights dequantized to F32, F32 KV", f32, {"type_k": 0, "type_v": 0})]
        for label, path, kw in runs:
            llm = llama(path, **kw)
            llm.eval(ids)
            theirs = np.asarray(llm.scores[: len(ids)])
            agree = theirs.argmax(-1) == mine.argmax(-1)
            worst = margin[~agree].max() if (~agree).any() else 0.0
            rel = np.median(np.abs(theirs - mine).mean(-1) / np.abs(mine).mean(-1))
            print(f"  {label:<52} top-1 agreement {agree.mean() * 100:5.1f}%   "
                  f"largest margin at a disagreement {worst:.3f}   median relative |logit diff| {rel * 100:.2f}%")
            del llm

    # speed, side by side in this run: prefill the same prompt, then greedy decode
    llm = llama(gguf)
    t = time.perf_counter(); llm.eval(ids); lc_prefill = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(decode):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    lc_decode = time.perf_counter() - t
    r = run(ours.net, len(ids), decode)
    print(f"\nspeed ({len(ids)}-token prompt, {decode} decode steps)")
    print(f"{'':14}{'prefill tok/s':>15}{'decode tok/s':>15}")
    print(f"{'llama.cpp':14}{len(ids) / lc_prefill:15.1f}{decode / lc_decode:15.1f}")
    print(f"{'gemma4-nb':14}{r['prefill_tok_s']:15.1f}{r['decode_tok_s']:15.1f}")
    print(f"{'ratio':14}{r['prefill_tok_s'] / (len(ids) / lc_prefill):15.2f}{r['decode_tok_s'] / (decode / lc_decode):15.2f}")


def long_context(total: int = 262144, depths=(1024, 8192, 32768, 131072, 262144), chunk: int = 2048,
                 decode_steps: int = 8, device: str = "cpu") -> None:
    """Fill the whole context of a tiny model: memory per layer type, prefill and decode times."""
    from ..runtime.kv_cache import PrefixCache
    from ..runtime.generation import prefill
    from ..runtime.memory import plan_memory

    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=32, global_head_dim=64,
                 num_global_key_value_heads=1, sliding_window=1024, max_position_embeddings=total)
    cfg = parse_config(tiny_config(**shape))
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, dims in expected_tensors(cfg).items():
        t = torch.randn(dims, generator=gen)
        key = name[len(cfg.weight_prefix):] if name.startswith(cfg.weight_prefix) else name
        weights[key] = (1 + 0.1 * t if ("norm" in name or "layer_scalar" in name) else 0.05 * t).to(device)
    net = GemmaModel(cfg, weights)
    print(f"tiny Gemma 4 model: {cfg.num_layers} layers (5 sliding, window 1024; 1 full, K=V, head_dim 64), "
          f"fp32, {device}, {torch.get_num_threads()} threads; prefill chunk {chunk}")
    prefix = PrefixCache(lambda: net.new_cache())
    ids = torch.randint(10, 512, (total,), generator=gen).tolist()
    prefix.prepare(ids + [0])
    done, t_prefill = 0, 0.0
    print(f"{'depth':>8} {'prefill s (cum.)':>17} {'decode ms/token':>16} {'KV sliding':>11} {'KV full':>11} {'planned full':>13}")
    for depth in depths:
        t = time.perf_counter()
        prefill(net, ids[done:depth], prefix, chunk)
        t_prefill += time.perf_counter() - t
        done = depth
        t = time.perf_counter()
        for i in range(decode_steps):
            net.forward(torch.tensor([ids[i]]), prefix.kv)
        step_ms = (time.perf_counter() - t) / decode_steps * 1000
        prefix.kv.truncate(depth)
        mem = prefix.kv.memory()
        plan = plan_memory(cfg, context=depth, weights="fp32", kv="fp32")
        print(f"{depth:>8} {t_prefill:>17.1f} {step_ms:>16.2f} {mem['sliding'] / 2**20:>8.2f} MiB "
              f"{mem['full'] / 2**20:>7.2f} MiB {plan.kv_full / 2**20:>9.2f} MiB")


def preprocessing(repeats: int = 20) -> None:
    """Image and audio preprocessing times (median of ``repeats``)."""
    import io
    import statistics

    import numpy as np
    from PIL import Image

    from ..runtime.multimodal import audio_frames, image_patches

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1000

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:1080, 0:1920]
    img = np.clip(np.stack([x / 7.5, y / 4.2, 128 + 60 * np.sin(x / 30)], -1) + rng.normal(0, 8, (1080, 1920, 3)), 0, 255)
    img = img.astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    png = buf.getvalue()
    clip16 = (0.1 * rng.standard_normal(16000 * 30)).astype(np.float32)
    clip44 = (0.1 * rng.standard_normal(44100 * 30)).astype(np.float32)
    print(f"torch threads: {torch.get_num_threads()}   (median of {repeats} runs)")
    for budget in (280, 1120):
        print(f"1920x1080 image, array -> {budget} soft tokens:    {median_ms(lambda: image_patches(img, budget)):7.1f} ms")
    print(f"1920x1080 image, PNG bytes -> 280 soft tokens: {median_ms(lambda: image_patches(png, 280)):7.1f} ms "
          "(includes PNG decoding)")
    print(f"30 s clip, 16 kHz array -> 750 frames:         {median_ms(lambda: audio_frames(clip16, 16000)):7.1f} ms")
    print(f"30 s clip, 44.1 kHz array (resampled):         {median_ms(lambda: audio_frames(clip44, 44100)):7.1f} ms")


def context_speed(rows: int = 10_000_000, repeats: int = 5) -> None:
    """Notebook-context building for a large DataFrame (no copies: head, dtypes, per-column counts)."""
    import statistics

    import numpy as np
    import pandas as pd

    from ..notebook.context import build_context

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"region": rng.choice(["north", "south", "east", "west"], rows),
                          "revenue": rng.random(rows), "units": rng.integers(0, 100, rows),
                          "date": pd.date_range("2020-01-01", periods=rows, freq="s")})
    frame.loc[::7, "revenue"] = np.nan

    class Shell:
        user_ns = {"sales": frame, "In": [""]}

    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        build_context(Shell())
        times.append(time.perf_counter() - t)
    print(f"context for a {rows:,}-row x 4-column DataFrame ({frame.memory_usage(deep=False).sum() / 2**20:.0f} MiB): "
          f"median {statistics.median(times) * 1000:.1f} ms over {repeats} runs (target <= 200 ms)")


REWRITE_PROMPTS = [
    """# Original
def load_sales(path):
    df = pd.read_csv(path)
    df["revenue"] = df["price"] * df["quantity"]
    df = df[df["revenue"] > 0]
    summary = df.groupby("region")["revenue"].sum().sort_values(ascending=False)
    return summary

# The same function with type hints
def load_sales(path: str) -> pd.Series:
""",
    """# Rewrite with method chaining
sales = pd.read_csv("sales.csv")
sales["quarter"] = pd.to_datetime(sales["date"]).dt.to_period("Q")
sales = sales.dropna(subset=["revenue"])
totals = sales.groupby(["region", "quarter"])["revenue"].sum().reset_index()
totals["growth"] = totals.groupby("region")["revenue"].pct_change()

# Method-chained version
totals = (
    pd.read_csv("sales.csv")
""",
    """import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(8, 4))
for region, frame in totals.groupby("region"):
    ax.plot(frame["quarter"].astype(str), frame["revenue"], marker="o", label=region)
ax.set_title("Revenue per region")
ax.legend()

# The same plot, with growth instead of revenue
fig, ax = plt.subplots(figsize=(8, 4))
""",
]


def drafting_speed(model_ref: str | None, new_tokens: int = 128) -> None:
    """Greedy decode speed with and without prompt-lookup drafting, side by side, same outputs."""
    from ..runtime.model import load

    model = load(model_ref, device="cpu", dtype="fp32", progress=False)
    print(f"model: {model.source.name}   threads: {torch.get_num_threads()}   {new_tokens} greedy tokens per prompt")
    rows = []
    for i, prompt in enumerate(REWRITE_PROMPTS):
        model.reset()
        plain = model.generate(prompt, max_new_tokens=new_tokens, temperature=0, draft=False)
        u0 = model.last_usage
        model.reset()
        spec = model.generate(prompt, max_new_tokens=new_tokens, temperature=0, draft=True)
        u1 = model.last_usage
        d = u1.drafting
        rows.append((u0.decode_tokens_per_second, u1.decode_tokens_per_second))
        print(f"prompt {i + 1}: plain {u0.decode_tokens_per_second:6.1f} tok/s | drafting {u1.decode_tokens_per_second:6.1f} tok/s"
              f" | speedup {u1.decode_tokens_per_second / u0.decode_tokens_per_second:4.2f}x | accepted {d.accepted}/{d.proposed}"
              f" ({d.acceptance * 100:.0f}%), {d.mean_accepted_length:.2f} tokens/forward | identical: {plain == spec}")
    mean0 = sum(r[0] for r in rows) / len(rows)
    mean1 = sum(r[1] for r in rows) / len(rows)
    print(f"mean: plain {mean0:.1f} tok/s, drafting {mean1:.1f} tok/s, speedup {mean1 / mean0:.2f}x")


# google/gemma-4-12B-it-assistant's shape: 4 query-only layers of width 1024 reading the 12B's K/V.
MTP_12B = dict(vocab_size=262144, hidden_size=1024, intermediate_size=8192, num_hidden_layers=4,
               num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
               num_global_key_value_heads=1, sliding_window=1024, max_position_embeddings=262144,
               layer_types=["sliding_attention"] * 3 + ["full_attention"])


def random_assistant(target: GemmaModel, centroids: bool, dtype: torch.dtype):
    from ..runtime.mtp import MTPDrafter, assistant_tensors, check_pair, parse_assistant_config

    data = {"model_type": "gemma4_unified_assistant", "text_config": tiny_config(**MTP_12B)["text_config"],
            "backbone_hidden_size": target.cfg.hidden_size, "use_ordered_embeddings": centroids,
            "num_centroids": 2048, "centroid_intermediate_top_k": 32}
    acfg = parse_assistant_config(data)
    check_pair(acfg, target.cfg, "--mtp-cost")
    weights = _random_weights(assistant_tensors(acfg), acfg.text.weight_prefix, target.device, dtype, seed=1)
    return MTPDrafter(acfg, weights)


def mtp_cost(layers: int, context: int, ks=(1, 2, 3, 4, 6), device: str = "cpu", dtype=torch.bfloat16,
             repeats: int = 7, full_layers: int = 48) -> None:
    """Cost of one MTP draft step and of a k-token verify relative to one plain decode step, on the
    12B shape with random weights; the speedup at an acceptance rate follows from them.

    The target is built with ``layers`` of its 48 layers (memory); every figure is scaled to 48
    layers from the measured per-layer time plus the measured vocabulary head."""
    from ..runtime.mtp import DraftContext

    dev = torch.device(device)
    target = random_model("gemma4-12b", device, dtype, layers=layers)
    drafters = {"plain head": random_assistant(target, False, dtype), "centroid head": random_assistant(target, True, dtype)}
    cache = target.new_cache()
    ids = torch.randint(10, target.cfg.vocab_size, (context + 16,))
    for start in range(0, context, 512):
        target.forward(ids[start : min(start + 512, context)], cache, logits=False)
    n = cache.length

    def forward(t: int):
        def fn():
            target.forward(ids[n : n + t], cache, outputs="all")
            cache.truncate(n)
        return fn

    hidden = torch.randn(8, target.cfg.hidden_size, device=dev, dtype=dtype)
    ctx = DraftContext(target, cache, torch.randn(target.cfg.hidden_size, device=dev, dtype=dtype))
    k_max = max(ks)
    tasks = {("forward", t): forward(t) for t in [1] + [k + 1 for k in ks]}
    tasks.update({("head", t): (lambda t=t: target.logits(hidden[:t])) for t in [1] + [k + 1 for k in ks]})
    tasks.update({("draft", name): (lambda d=d: list(d.steps(int(ids[n]), ctx, k_max))) for name, d in drafters.items()})
    times: dict = {key: [] for key in tasks}
    for fn in tasks.values():  # warm up
        fn()
    for _ in range(repeats):  # interleaved, so a noisy neighbour slows every figure alike
        for key, fn in tasks.items():
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times[key].append(time.perf_counter() - t0)
    med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}

    def scaled(t: int) -> float:
        h = med[("head", t)]
        return h + (med[("forward", t)] - h) * full_layers / layers

    plain = scaled(1)
    verify = {k: scaled(k + 1) for k in ks}
    draft = {name: med[("draft", name)] / k_max for name in drafters}
    print(f"12B shape, random weights, {dtype}, {device}, {torch.get_num_threads()} threads, context {context}; "
          f"target measured with {layers} layers, scaled to {full_layers}")
    print(f"plain decode step: {plain * 1000:.1f} ms")
    for name, t in draft.items():
        print(f"one draft step ({name}): {t * 1000:.2f} ms = {t / plain:.3f} x plain step")
    for k, t in verify.items():
        print(f"verify k={k} ({k + 1} tokens): {t * 1000:.1f} ms = {t / plain:.3f} x plain step")
    print("expected speedup = E[tokens per round] * plain / (k * draft + verify_k), "
          "E[tokens] = (1 - a^(k+1)) / (1 - a) for per-draft acceptance a")
    best_draft = min(draft.values())
    for a in (0.5, 0.6, 0.7, 0.8, 0.9):
        row = []
        for k, t in verify.items():
            tokens = (1 - a ** (k + 1)) / (1 - a)
            row.append(f"k={k}: {tokens * plain / (k * best_draft + t):.2f}x")
        print(f"acceptance {a:.1f}: " + "  ".join(row))


def _llama_cpp_speed(gguf: Path, ids: list[int], depth: int, decode: int, threads: int) -> dict:
    """llama-cpp-python on the same GGUF and tokens: prefill of ``ids[depth:]`` after ``depth``
    untimed tokens, then ``decode`` greedy steps, with ``threads`` threads."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("--compare llama.cpp needs llama-cpp-python: pip install 'gemma4-nb[bench]'") from None
    import numpy as np

    llm = Llama(model_path=str(gguf), n_ctx=len(ids) + decode + 16, n_threads=threads, n_threads_batch=threads,
                n_batch=512, n_ubatch=512, verbose=False)
    llm.eval(ids[:16])
    llm.reset()
    if depth:
        llm.eval(ids[:depth])
    t = time.perf_counter()
    llm.eval(ids[depth:])
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    n_vocab = llm.n_vocab()
    for _ in range(decode):  # greedy on the last position's logits (llama.cpp keeps only those)
        last = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        llm.eval([int(np.argmax(last))])
    decode_s = time.perf_counter() - t
    del llm
    return {"ttft_s": prefill_s, "prefill_tok_s": (len(ids) - depth) / prefill_s, "decode_tok_s": decode / decode_s}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def load_memory(model_ref: str | None, quant: str | None) -> None:
    """Peak RSS of a streaming quantized load (fresh process) against the size of the result."""
    import json
    import subprocess
    import sys

    code = ("import json, resource, sys, time; import gemma4_nb; from gemma4_nb.runtime.quant import weights_nbytes; "
            "t = time.perf_counter(); m = gemma4_nb.load(sys.argv[1] or None, quant=sys.argv[2] or None, "
            "device='cpu', progress=False); s = time.perf_counter() - t; "
            "print(json.dumps({'peak': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "
            "'weights': weights_nbytes(m.net.weights), 'load_s': s, 'largest': max("
            "(t.shape[0] * t.shape[1] if hasattr(t, 'fmt') else t.numel()) for t in m.net.weights.values())}))")
    base = subprocess.run([sys.executable, "-c", "import resource, gemma4_nb, torch, numba; "
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"],
                          capture_output=True, text=True, check=True)
    out = subprocess.run([sys.executable, "-c", code, model_ref or "", quant or ""], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2**30
    print(f"model: {model_ref or 'embedded 270M'}   quant: {quant}   load {r['load_s']:.1f} s")
    print(f"weights after loading {r['weights'] / gib:.3f} GiB; peak RSS of the loading process {r['peak'] / gib:.3f} GiB "
          f"(of which {int(base.stdout) / gib:.3f} GiB is the interpreter with torch and numba imported)")


def text_ids(encode, n: int) -> list[int]:
    """The first ``n`` tokens of natural English text: the help topics every Python ships
    (``pydoc_data``), so the prompt is deterministic and needs no download. Decoding after text
    gives the peaked next-token distributions of real use; random ids give flat ones."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = encode(text[: 8 * n + 1000])
    if len(ids) < n:
        ids = encode(text)
    if len(ids) < n:
        raise SystemExit(f"--tokens text has {len(ids)} tokens; ask for fewer or use --tokens random")
    return ids[:n]


def bench_command(model=None, shape=None, quant=None, dtype=None, device=None, threads=None, prompt=512,
                  decode=64, depth=0, compare=None, bandwidth=False, repeat=1, cuda_graphs=False,
                  tokens="text") -> list[dict]:
    """``gemma4-nb bench``: prefill and decode tokens/s, time to first token and peak memory of
    one model, weight format, context depth and device; optionally llama.cpp on the same GGUF in
    the same run, and the measured memory bandwidth with the roofline fraction of decode."""
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    if shape:
        if quant:
            net = random_quantized_model(shape, quant)
            if device.type == "cuda":
                net = on_device(net, device, {"fp32": torch.float32}.get(dtype, torch.bfloat16))
        else:
            net = random_model(shape, device.type, {"fp32": torch.float32, None: torch.bfloat16}.get(dtype, torch.bfloat16))
        name, gguf = f"{shape} (random weights)", None
        hf_config = tiny_config(**dict(SHAPES[shape]))
        encode, tokens = None, "random"  # random weights: text means nothing to them
    else:
        import json

        from ..runtime.resolve import resolve_model
        from ..runtime.model import load

        src = resolve_model(model)
        gguf = src if src.suffix == ".gguf" else None
        loaded = load(str(src), device=device.type, dtype=dtype, quant=quant, progress=False)
        net, name = loaded.net, src.name
        encode = loaded.encode
        hf_config = json.loads((loaded.model_dir / "config.json").read_text())
    load_s = time.perf_counter() - t0
    fmt = quant or {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[net.dtype]
    compile_s = None
    if net.fused:
        from ..kernels import warmup

        compile_s = warmup.warm_up()
    if tokens == "text":
        ids = text_ids(encode, depth + prompt)
    else:
        ids = torch.randint(10, net.cfg.vocab_size, (depth + prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"model: {name}   weights: {fmt}   device: {device.type}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ' (' + _cpu_name() + ')'}"
          f"   threads: {threads}   torch {torch.__version__}")
    if cuda_graphs:
        print("decode: static-shape steps (gemma4_nb/static_decode.py)"
              + (", replayed as CUDA graphs" if device.type == "cuda" else ", eager (no CUDA)"))
    print(f"prompt: {'English text (Python help topics)' if tokens == 'text' else 'random token ids'}; "
          f"decode: greedy continuation")
    print(f"load: {load_s:.1f} s" + (f"   numba kernels ready in {compile_s:.2f} s (compiled or loaded from the on-disk cache)"
                                      if compile_s is not None else ""))
    rows = []
    for i in range(repeat):
        r = run(net, prompt, decode, ids=ids, depth=depth, cuda_graphs=cuda_graphs)
        r["engine"] = "gemma4-nb"
        rows.append(r)
        if compare == "llama.cpp":
            if gguf is None:
                raise SystemExit("--compare llama.cpp needs a GGUF model (the default embedded model is one)")
            lc = _llama_cpp_speed(gguf, ids, depth, decode, threads)
            lc["engine"] = "llama.cpp"
            rows.append(lc)
    if compare == "transformers":  # after ours: its copy of the weights stays out of our peak memory
        from .bench_transformers import generate_speed, transformers_model

        hf = transformers_model(net, hf_config)
        for i in range(repeat):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            rows.insert(2 * i + 1, generate_speed(hf, ids, decode))
        del hf
    w_bytes, kv_bytes = decode_bytes(net, depth + prompt + decode // 2)
    bw = None
    if bandwidth:
        if device.type == "cuda":
            x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
            y = torch.empty_like(x)
            y.copy_(x)
            torch.cuda.synchronize()
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                y.copy_(x)
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
            bw = 2 * x.numel() / best  # copy: read + write
            del x, y
        else:
            from ..kernels import cpu_numba
            from ..kernels.ops import _nb

            _nb()  # numba threads follow torch's
            bw = cpu_numba.measure_bandwidth()
    hdr = f"{'engine':<13}{'depth':>7}{'prompt':>8}{'TTFT ms':>10}{'prefill tok/s':>15}{'decode tok/s':>14}{'peak mem GiB':>14}"
    if bw:
        hdr += f"{'decode GB/s':>13}{'roofline':>10}"
    print(hdr)
    for r in rows:
        peak = r.get("peak_gpu_gib") or r.get("peak_rss_gib")
        line = (f"{r['engine']:<13}{depth:>7}{prompt:>8}{r['ttft_s'] * 1000:>10.1f}{r['prefill_tok_s']:>15.1f}"
                f"{r['decode_tok_s']:>14.2f}{(f'{peak:.2f}' if peak and r['engine'] != 'llama.cpp' else '-'):>14}")
        if bw and r["engine"] == "gemma4-nb":
            achieved = (w_bytes + kv_bytes) * r["decode_tok_s"]
            line += f"{achieved / 1e9:>13.1f}{achieved / bw * 100:>9.1f}%"
        print(line)
    if compare:
        ours = [r for r in rows if r["engine"] == "gemma4-nb"]
        theirs = [r for r in rows if r["engine"] == compare]
        for key, label in (("prefill_tok_s", "prefill"), ("decode_tok_s", "decode")):
            ratios = [a[key] / b[key] for a, b in zip(ours, theirs)]
            best = max(a[key] for a in ours) / max(b[key] for b in theirs)
            print(f"ratio gemma4-nb / {compare}, {label}: " + ", ".join(f"{x:.2f}x" for x in ratios)
                  + (f"; best of {len(ours)} each: {max(a[key] for a in ours):.1f} / {max(b[key] for b in theirs):.1f}"
                     f" = {best:.2f}x" if len(ours) > 1 else ""))
    if bw and len(rows) > 1:
        best = max(r["decode_tok_s"] for r in rows if r["engine"] == "gemma4-nb")
        print(f"best decode of {repeat}: {best:.2f} tok/s = {(w_bytes + kv_bytes) * best / 1e9:.1f} GB/s = "
              f"{(w_bytes + kv_bytes) * best / bw * 100:.1f}% of the measured bandwidth")
    print(f"bytes read per decode token: weights {w_bytes / 1e9:.3f} GB + KV {kv_bytes / 1e9:.4f} GB"
          + (f"; measured read bandwidth {bw / 1e9:.1f} GB/s" + (" (device copy, read+write)" if device.type == "cuda" else "")
             if bw else ""))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gemma4_nb.bench")
    p.add_argument("--model")
    p.add_argument("--shape", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--prompt", type=int, nargs="+", default=[512])
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--load-time", action="store_true", help="first and cached load of the embedded GGUF")
    p.add_argument("--agreement", choices=["llama.cpp"], help="top-1 agreement and speed against llama.cpp")
    p.add_argument("--long-context", type=int, metavar="TOKENS", help="fill a tiny model's context to TOKENS")
    p.add_argument("--preprocess", action="store_true", help="image and audio preprocessing times")
    p.add_argument("--context", action="store_true", help="notebook context for a 10M-row DataFrame")
    p.add_argument("--draft", action="store_true", help="decode speed with and without prompt-lookup drafting")
    p.add_argument("--mtp-cost", action="store_true",
                   help="12B shape: MTP draft step and k-token verify cost relative to a plain decode step")
    p.add_argument("--layers", type=int, default=6, help="--mtp-cost: target layers actually built (scaled to 48)")
    p.add_argument("--depth", type=int, default=1024, help="--mtp-cost: context length before the measured steps")
    p.add_argument("--load-memory", choices=["int8", "int4", "none"], help="peak RSS of a streaming quantized load")
    args = p.parse_args(argv)
    if args.mtp_cost:
        if args.layers < 6 or args.layers % 6:
            p.error("--layers must be a multiple of 6 (the 12B's 5 sliding + 1 full pattern, so the scaling holds)")
        torch.set_num_threads(args.threads)
        mtp_cost(args.layers, args.depth, device=args.device, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        return 0
    if args.load_memory:
        load_memory(args.model, None if args.load_memory == "none" else args.load_memory)
        return 0
    if args.draft:
        torch.set_num_threads(args.threads)
        drafting_speed(args.model)
        return 0
    if args.context:
        context_speed()
        return 0
    if args.preprocess:
        torch.set_num_threads(args.threads)
        preprocessing()
        return 0
    if args.long_context:
        depths = [d for d in (1024, 8192, 32768, 131072, 262144) if d < args.long_context] + [args.long_context]
        long_context(args.long_context, depths, device=args.device)
        return 0
    if args.load_time:
        load_time()
        return 0
    if args.agreement:
        agreement_llama_cpp(args.model, args.threads)
        return 0
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.shape:
        net = random_model(args.shape, args.device, dtype)
        name = f"{args.shape} (random weights)"
    else:
        from ..runtime.model import load

        net = load(args.model, device=args.device, dtype=args.dtype).net
        name = args.model
    print(f"model: {name}  device: {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'})  "
          f"dtype: {args.dtype}  torch {torch.__version__}")
    for n in args.prompt:
        r = run(net, n, args.decode)
        peak = f"  peak GPU {r['peak_gpu_gib']:.1f} GiB" if r["peak_gpu_gib"] else ""
        print(f"prompt {n:>6}: TTFT {r['ttft_s'] * 1000:8.1f} ms  prefill {r['prefill_tok_s']:9.1f} tok/s  "
              f"decode {r['decode_tok_s']:7.2f} tok/s{peak}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
