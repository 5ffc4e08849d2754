"""llama.cpp's side of a comparison (llama-cpp-python, the ``bench`` extra): speed and top-1
agreement on the same GGUF and the same token ids."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .workload import AGREEMENT_TEXT, run


class LlamaCppSession:
    """llama-cpp-python on a GGUF: a warm-up, a timed prefill of ``ids[depth:]`` after ``depth``
    untimed tokens (``prefill_s``), then greedy decode steps one :meth:`step` at a time."""

    def __init__(self, gguf: Path, ids: list[int], depth: int, decode: int, threads: int) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise SystemExit("--compare llama.cpp needs llama-cpp-python: pip install 'gemma4-nb[bench]'") from None
        import numpy as np

        self._np = np
        self.llm = Llama(model_path=str(gguf), n_ctx=len(ids) + decode + 16, n_threads=threads,
                         n_threads_batch=threads, n_batch=512, n_ubatch=512, verbose=False)
        self.llm.eval(ids[:16])
        self.llm.reset()
        if depth:
            self.llm.eval(ids[:depth])
        t = time.perf_counter()
        self.llm.eval(ids[depth:])
        self.prefill_s = time.perf_counter() - t
        self.n_vocab = self.llm.n_vocab()

    def step(self) -> None:
        """One greedy step on the last position's logits (llama.cpp keeps only those)."""
        last = self._np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))
        self.llm.eval([int(self._np.argmax(last))])

    def close(self) -> None:
        del self.llm


def llama_cpp_speed(gguf: Path, ids: list[int], depth: int, decode: int, threads: int) -> dict:
    """llama-cpp-python on the same GGUF and tokens: prefill of ``ids[depth:]`` after ``depth``
    untimed tokens, then ``decode`` greedy steps, with ``threads`` threads."""
    run = LlamaCppSession(gguf, ids, depth, decode, threads)
    t = time.perf_counter()
    for _ in range(decode):
        run.step()
    decode_s = time.perf_counter() - t
    run.close()
    prompt = len(ids) - depth
    return {"ttft_s": run.prefill_s, "prefill_tok_s": prompt / run.prefill_s, "decode_tok_s": decode / decode_s}


def interleaved_speed(net, gguf: Path, ids: list[int], depth: int, decode: int, threads: int,
                      kv_dtype: str | None = None) -> tuple[dict, dict]:
    """Both engines prefilled (each timed), then their decode steps alternating one by one (which
    goes first alternating too), each step timed: on a shared machine whose load comes and goes in
    bursts of seconds, both see the same bursts. Each engine's decode tok/s is from its median
    step (``decode_mean_tok_s``: from its mean). Our peak memory is taken before llama.cpp loads
    (the process's peak, so a second repeat's includes the first's llama.cpp weights). Returns
    ``(ours, llama.cpp's)`` rows."""
    import numpy as np

    from .workload import greedy_step, peak_rss, prefilled

    prefill_s, tok, prefix = prefilled(net, ids, depth, kv_dtype=kv_dtype)
    peak = peak_rss()  # before llama.cpp maps its weights into this process
    theirs = LlamaCppSession(gguf, ids, depth, decode, threads)
    state = {"tok": tok}

    def ours() -> None:
        state["tok"] = greedy_step(net, state["tok"], prefix.kv)

    times = {ours: [], theirs.step: []}
    for i in range(decode):
        for step in ((ours, theirs.step) if i % 2 == 0 else (theirs.step, ours)):
            t = time.perf_counter()
            step()
            times[step].append(time.perf_counter() - t)
    theirs.close()
    prompt = len(ids) - depth

    def row(engine, prefill, steps):
        steps = np.asarray(steps)
        return {"engine": engine, "ttft_s": prefill, "prefill_tok_s": prompt / prefill,
                "decode_tok_s": 1 / float(np.median(steps)), "decode_mean_tok_s": 1 / float(steps.mean())}

    mine = row("gemma4-nb", prefill_s, times[ours])
    mine["peak_rss_gib"] = peak / 2**30
    return mine, row("llama.cpp", theirs.prefill_s, times[theirs.step])


def f32_gguf(src, dst) -> None:
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

    from ..runtime.model import load
    from ..runtime.resolve import resolve_model

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
        f32_gguf(gguf, f32)
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
