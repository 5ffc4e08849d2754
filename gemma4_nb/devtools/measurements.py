"""Single-purpose measurements behind docs/benchmarks.md: load time, long context, media
preprocessing, notebook-context building, drafting, verification cost, MTP draft cost, load
memory, inline completion latency. ``python -m gemma4_nb.bench --load-time | --long-context N |
--preprocess | --context | --draft | --verify-cost | --mtp-cost | --load-memory F | --completion``
runs them (``--completion`` also as ``gemma4-nb bench --completion``)."""

from __future__ import annotations

import time

import torch

from ..errors import Gemma4Error
from ..runtime.checkpoint import expected_tensors
from ..runtime.config import parse_config
from ..runtime.decoder import GemmaModel
from .shapes import random_assistant, random_model, random_quantized_model
from .tiny import tiny_config
from .workload import REWRITE_PROMPTS, sync


def load_time() -> None:
    """First (repacking) and cached load of the embedded GGUF, in fresh processes."""
    import os
    import subprocess
    import sys
    import tempfile

    code = ("import time; t = time.perf_counter(); import gemma4_nb; t1 = time.perf_counter(); "
            "gemma4_nb.load(progress=False); print(f'{time.perf_counter() - t1:.2f} {t1 - t:.2f}')")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, GEMMA4_NB_CACHE=cache)
        env.pop("GEMMA4_NB_MODEL", None)
        for label in ("first load (repacks the GGUF, builds tokenizer)", "cached load", "cached load"):
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            load_s, import_s = out.stdout.split()
            print(f"{label:<46} {float(load_s):6.2f} s   (import gemma4_nb {float(import_s):.2f} s)")


def long_context(total: int = 262144, depths=(1024, 8192, 32768, 131072, 262144), chunk: int = 2048,
                 decode_steps: int = 8, device: str = "cpu") -> None:
    """Fill the whole context of a tiny model: memory per layer type, prefill and decode times."""
    from ..runtime.generation import prefill
    from ..runtime.kv_cache import PrefixCache
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


def drafting_speed(model_ref: str | None, new_tokens: int = 128, quant: str | None = None, repeat: int = 1) -> None:
    """Greedy decode speed with and without prompt-lookup drafting, side by side, same outputs
    (``quant``: int8/int4 weights; ``repeat``: runs of each, plain and drafted alternating so the
    machine's noise falls on both alike; the best of each is compared, and the range of the
    per-pair ratios printed)."""
    from ..runtime.model import load

    model = load(model_ref, device="cpu", dtype="fp32", quant=quant, progress=False, drafting="prompt_lookup")
    print(f"model: {model.source.name}   weights: {quant or 'fp32'}   threads: {torch.get_num_threads()}   "
          f"{new_tokens} greedy tokens per prompt, best of {repeat}, plain and drafted alternating")

    def run(prompt: str, draft: bool):
        model.reset()
        text = model.generate(prompt, max_new_tokens=new_tokens, temperature=0, draft=draft)
        return text, model.last_usage

    rows = []
    for i, prompt in enumerate(REWRITE_PROMPTS):
        pairs = [(run(prompt, False), run(prompt, True)) for _ in range(repeat)]
        (plain, u0), _ = max(pairs, key=lambda p: p[0][1].decode_tokens_per_second)
        _, (spec, u1) = max(pairs, key=lambda p: p[1][1].decode_tokens_per_second)
        ratios = [b[1].decode_tokens_per_second / a[1].decode_tokens_per_second for a, b in pairs]
        identical = all(a[0] == b[0] for a, b in pairs)
        d = u1.drafting
        rows.append((u0.decode_tokens_per_second, u1.decode_tokens_per_second))
        print(f"prompt {i + 1}: plain {u0.decode_tokens_per_second:6.1f} tok/s | drafting {u1.decode_tokens_per_second:6.1f} tok/s"
              f" | speedup {u1.decode_tokens_per_second / u0.decode_tokens_per_second:4.2f}x (pairs {min(ratios):.2f}-"
              f"{max(ratios):.2f}x) | accepted {d.accepted}/{d.proposed} ({d.acceptance * 100:.0f}%), "
              f"{d.mean_accepted_length:.2f} tokens/forward | identical: {identical}")
    mean0 = sum(r[0] for r in rows) / len(rows)
    mean1 = sum(r[1] for r in rows) / len(rows)
    print(f"mean: plain {mean0:.1f} tok/s, drafting {mean1:.1f} tok/s, speedup {mean1 / mean0:.2f}x")


def verification_cost(model_ref: str | None, quant: str | None = None, sizes=(1, 2, 3, 4, 5, 6, 8),
                      repeats: int = 12) -> None:
    """What a verification forward costs against a plain decode step, on a loaded model (the
    embedded 270M unless ``model_ref``): after a code prompt, a forward of ``t`` positions
    (layers), then each position's top-1 (the head), ``t`` in ``sizes``, all sizes in turn
    ``repeats`` times (the first two rounds not counted); medians. Prompt-lookup drafting pays when
    ``t`` positions cost well under ``t`` plain steps."""
    import statistics

    from ..runtime.model import load

    model = load(model_ref, device="cpu", dtype="fp32", quant=quant, progress=False)
    net = model.net
    cache = net.new_cache()
    net.forward(torch.tensor(model.encode(REWRITE_PROMPTS[0] * 2)), cache, logits=False)
    n = cache.length
    ids = torch.tensor(model.encode(REWRITE_PROMPTS[1]))[: max(sizes)]
    times: dict[int, list] = {t: [] for t in sizes}
    for rep in range(repeats + 2):
        for t in sizes:
            t0 = time.perf_counter()
            hidden = net.forward(ids[:t], cache, outputs="all", logits=False).hidden
            t1 = time.perf_counter()
            net.top_k(hidden[0], 1) if t == 1 else net.top_k_rows(hidden, 1)
            t2 = time.perf_counter()
            cache.truncate(n)
            if rep >= 2:
                times[t].append((t1 - t0, t2 - t1))
    print(f"model: {model.source.name}   weights: {quant or 'fp32'}   threads: {torch.get_num_threads()}   "
          f"context {n} tokens, medians of {repeats}")
    plain = None
    for t, pairs in times.items():
        layers = statistics.median(a for a, _ in pairs) * 1e3
        head = statistics.median(b for _, b in pairs) * 1e3
        plain = plain or layers + head
        print(f"{t} position{'s' if t > 1 else ' '}: layers {layers:6.2f} ms  head {head:6.2f} ms  "
              f"= {(layers + head) / plain:4.2f} plain steps")


def mtp_cost(layers: int, context: int, ks=(1, 2, 3, 4, 6), device: str = "cpu", dtype=torch.bfloat16,
             repeats: int = 7, full_layers: int = 48, quant: str | None = None) -> None:
    """Cost of one MTP draft step and of a k-token verify relative to one plain decode step, on the
    12B shape with random weights (``quant``: int8/int4 weights, computing in fp32 on the CPU, the
    assistant int8, as the runtime does); the speedup at an acceptance rate follows.

    The target is built with ``layers`` of its 48 layers (memory); every figure is scaled to 48
    layers from the measured per-layer time, plus the measured vocabulary head: the top-1 for a plain
    step and of every position of a verification (the screened head, with quantized weights), all
    logits for a verification otherwise."""
    from ..runtime.speculative import DraftContext

    dev = torch.device(device)
    if quant:
        dtype = torch.float32
        target = random_quantized_model("gemma4-12b", quant, layers=layers)
    else:
        target = random_model("gemma4-12b", device, dtype, layers=layers)
    drafters = {"plain head": random_assistant(target, False, dtype, "int8" if quant else None),
                "centroid head": random_assistant(target, True, dtype, "int8" if quant else None)}
    cache = target.new_cache()
    ids = torch.randint(10, target.cfg.vocab_size, (context + 16,))
    for start in range(0, context, 512):
        target.forward(ids[start : min(start + 512, context)], cache, logits=False)
    n = cache.length

    def forward(t: int):
        def fn():
            target.forward(ids[n : n + t], cache, outputs="all", logits=False)
            cache.truncate(n)
        return fn

    hidden = torch.randn(8, target.cfg.hidden_size, device=dev, dtype=dtype)
    ctx = DraftContext(target, cache, torch.randn(target.cfg.hidden_size, device=dev, dtype=dtype))
    k_max = max(ks)
    sizes = [1] + [k + 1 for k in ks]
    tasks = {("forward", t): forward(t) for t in sizes}
    # a verification's head: with quantized CPU weights (greedy) the top-1 of every position, each
    # head row read once for all of them; otherwise every logit
    fused = getattr(target, "fused", False)
    head = (lambda t: target.top_k_rows(hidden[:t], 1)) if fused else (lambda t: target.logits(hidden[:t]))
    tasks.update({("head", t): (lambda t=t: head(t)) for t in sizes})
    tasks[("top1", 1)] = lambda: target.top_k(hidden[0], 1)
    tasks.update({("draft", name): (lambda d=d: d.propose([int(ids[n])], k_max, ctx)) for name, d in drafters.items()})
    times: dict = {key: [] for key in tasks}
    for fn in tasks.values():  # warm up
        fn()
    for _ in range(repeats):  # interleaved, so a noisy neighbour slows every figure alike
        for key, fn in tasks.items():
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times[key].append(time.perf_counter() - t0)
    med = {key: sorted(v)[len(v) // 2] for key, v in times.items()}

    def layers_part(t: int) -> float:
        return med[("forward", t)] * full_layers / layers

    plain = layers_part(1) + med[("top1", 1)]
    verify = {k: layers_part(k + 1) + med[("head", k + 1)] for k in ks}
    draft = {name: med[("draft", name)] / k_max for name in drafters}
    weights = quant or str(dtype).replace("torch.", "")
    print(f"12B shape, random {weights} weights, {device}, {torch.get_num_threads()} threads, context {context}; "
          f"target measured with {layers} layers, scaled to {full_layers}")
    print(f"plain decode step (top-1 from the head): {plain * 1000:.1f} ms")
    for name, t in draft.items():
        print(f"one draft step ({name}): {t * 1000:.2f} ms = {t / plain:.3f} x plain step")
    for k, t in verify.items():
        print(f"verify k={k} ({k + 1} tokens, {'top-1 of each' if fused else 'all logits'}): {t * 1000:.1f} ms "
              f"= {t / plain:.3f} x plain step")
    print("expected speedup = E[tokens per round] * plain / (k * draft + verify_k), "
          "E[tokens] = (1 - a^(k+1)) / (1 - a) for per-draft acceptance a")
    best_draft = min(draft.values())
    for a in (0.5, 0.6, 0.7, 0.8, 0.9):
        row = []
        for k, t in verify.items():
            tokens = (1 - a ** (k + 1)) / (1 - a)
            row.append(f"k={k}: {tokens * plain / (k * best_draft + t):.2f}x")
        print(f"acceptance {a:.1f}: " + "  ".join(row))


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


def gguf_load_memory(gguf_path, quant: str | None = None) -> None:
    """A GGUF loaded twice in fresh processes with an empty cache: the first load repacks its
    weights (or reads them, for a float file), the second memory-maps the cached result. Prints
    each one's time and peak RSS beside the file's size (the goal: peak <= file + 1.5 GB): while
    loading (the packed weights are memory-mapped, so pages come in as they are read) and once every
    weight has been read (what a forward pass makes resident)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    code = ("import json, resource, sys, time; t0 = time.perf_counter(); import torch, gemma4_nb; "
            "from gemma4_nb.runtime.quant import weights_nbytes; t = time.perf_counter(); "
            "m = gemma4_nb.load(sys.argv[1], quant=sys.argv[2] or None, device='cpu', progress=False); "
            "s = time.perf_counter() - t; peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024; "
            # every weight's pages read once, 16 MB at a time (what a forward pass makes resident)
            "parts = [p for w in m.net.weights.values() for p in ((w.codes, w.scales, w.mins, w.low, w.row_err) "
            "if hasattr(w, 'fmt') else (w,)) if p is not None]; "
            "[int(b[i:i + 2**24].sum(dtype=torch.int64)) for p in parts for b in [p.contiguous().view(-1).view(torch.uint8)] "
            "for i in range(0, b.numel(), 2**24)]; "
            "print(json.dumps({'peak': peak, 'used': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "
            "'weights': weights_nbytes(m.net.weights), 'load_s': s, 'import_s': t - t0, 'quant': m.quant}))")
    path = Path(gguf_path)
    gib = 2**30
    print(f"model: {path.name} ({path.stat().st_size / gib:.2f} GiB)   quant: {quant or 'the file own format'}")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, GEMMA4_NB_CACHE=cache)
        for label in ("first load (repacks once)", "second load (cached)"):
            out = subprocess.run([sys.executable, "-c", code, str(path), quant or ""], env=env, capture_output=True,
                                 text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {label:<28} {r['load_s']:7.1f} s   peak RSS {r['peak'] / gib:5.2f} GiB while loading, "
                  f"{r['used'] / gib:5.2f} GiB once every weight was read   weights {r['weights'] / gib:.2f} GiB as "
                  f"{r['quant']}   (import {r['import_s']:.1f} s)")


def completion_latency(requests: int = 12, threads: int | None = None, max_new_tokens: int | None = None,
                       model: str | None = None) -> dict:
    """Latency of inline completions (``notebook/completion.py``'s completer, its own model: the
    embedded Gemma 3 270M unless ``model`` names another) on ``threads`` threads (None: torch's
    setting, as in the kernel), as a user typing in a cell asks for them: the cells above the
    same, the current cell one character longer each time, every completion ``max_new_tokens``
    long (no stop string). The first request (with the model's load), then the median and the
    slowest of the rest."""
    import statistics

    from ..notebook.completion import MAX_NEW_TOKENS, Completer, completion_prompt
    from ..notebook.copilot import Settings

    if requests < 2:
        raise Gemma4Error("--requests must be at least 2: the first request loads the model, the median is of the rest")
    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS
    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    completer = Completer(Settings(completion_model=model))
    above = ["import pandas as pd\nimport numpy as np",
             "sales = pd.DataFrame({'region': ['north', 'south', 'north'], 'revenue': [10.0, 20.0, 5.0]})",
             "def total(df, column):\n    return df[column].sum()"]
    line = "by_region = sales.groupby('region')['revenue'].sum()\nprint(by_region.sort_values("
    times, tokens = [], []
    for i in range(requests):
        prefix = line[: max(1, len(line) - requests + i + 1)]
        t0 = time.perf_counter()
        backend = completer._backend()  # loads the model on the first request, as in the kernel
        reply = backend.complete_text(completion_prompt(above, prefix), stop=[], max_new_tokens=max_new_tokens,
                                      temperature=0, draft=None)  # as Completer.complete
        times.append(time.perf_counter() - t0)
        tokens.append(reply.usage.generated_tokens if reply.usage is not None else None)
    return {"first_s": round(times[0], 3), "median_s": round(statistics.median(times[1:]), 3),
            "max_s": round(max(times[1:]), 3), "generated_tokens": tokens[1:], "threads": threads,
            "requests": requests, "max_new_tokens": max_new_tokens}
