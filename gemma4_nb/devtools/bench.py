"""Speed and agreement figures for the runtime.

    gemma4-nb bench [--model X] [--quant int4] [--compare llama.cpp] [--bandwidth]   # user-facing

    python -m gemma4_nb.bench --model PATH [--prompt 512] [--decode 64]
    python -m gemma4_nb.bench --shape gemma4-12b --device cuda      # random weights, no download
    python -m gemma4_nb.bench --load-time                           # embedded GGUF: first and cached load
    python -m gemma4_nb.bench --agreement llama.cpp [--model X.gguf] # top-1 agreement and speed vs llama.cpp
    python -m gemma4_nb.bench --draft                               # prompt-lookup drafting on/off
    python -m gemma4_nb.bench --verify-cost [--quant int4]          # a verification's cost in plain steps
    python -m gemma4_nb.bench --mtp-cost [--layers 6] [--depth 1024] [--quant int4] # MTP draft/verify cost, 12B shape
    python -m gemma4_nb.bench --completion [--requests 12] [--threads 2]  # inline completion latency

Prints time to first token, prefill and decode tokens/s, and peak memory. ``--agreement`` needs
the ``bench`` extra (llama-cpp-python).
"""

from __future__ import annotations

import argparse
import time

import torch

from ..runtime.decoder import GemmaModel
from .bench_llama_cpp import agreement_llama_cpp, interleaved_speed, llama_cpp_speed
from .measurements import (completion_latency, context_speed, drafting_speed, gguf_load_memory, load_memory,
                           load_time, long_context, mtp_cost, preprocessing, verification_cost)
from .shapes import SHAPES, on_device, random_model, random_quantized_model
from .tiny import tiny_config
from .workload import cpu_name, run, text_ids


def decode_bytes(net: GemmaModel, context: int, kv_dtype: str | None = None) -> tuple[int, int]:
    """Bytes one decode step reads at ``context`` positions: (weights, KV cache). Every matrix is
    read once (the tied embedding as the head; an untied embedding only by rows, not counted)."""
    from ..kernels.qweight import QWeight

    def nbytes(t):
        if isinstance(t, QWeight) and t.planes:
            # a screened head (qweight.to_planes): pass 1 reads the high plane and the scales (as
            # fp16 where they are fp16 values; and, once learned, the screen's errors in its exact
            # columns), pass 2 the row bounds and the estimates, plus the rows it rescores (not
            # counted: under 1% of them on text)
            policy = t.__dict__.get("_screen_policy")
            side = (t.row_err,) if policy is None or policy.screen_err is None else (policy.col_err, policy.screen_err)
            scales = t.scales if policy is None or policy.screen_scale_table is None else policy.screen_scale_table
            return sum(x.nbytes for x in (t.codes, scales, *side)) + 8 * t.shape[0]
        return t.nbytes if isinstance(t, QWeight) else t.numel() * t.element_size()

    weights = sum(nbytes(t) for n, t in net.weights.items() if "vision" not in n and "audio" not in n)
    if "lm_head.weight" in net.weights:
        weights -= nbytes(net.weights["embed_tokens.weight"])
    elem = torch.tensor([], dtype=net.dtype).element_size()
    kv = 0
    for spec in net.cfg.layers:
        if spec.owns_kv:
            seen = min(context, spec.window) if spec.window else context
            # int8: a byte a value and an fp32 scale a row
            row = spec.head_dim + 4 if kv_dtype == "int8" else spec.head_dim * elem
            kv += seen * spec.num_kv_heads * row * (1 if spec.k_eq_v else 2)
    return weights, kv


def dtype_name(net: GemmaModel) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[net.dtype]


def bench_command(model=None, shape=None, quant=None, dtype=None, device=None, threads=None, prompt=512,
                  decode=64, depth=0, compare=None, bandwidth=False, repeat=1, cuda_graphs=False,
                  tokens="text", kv=None, interleave=False) -> list[dict]:
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
        if compare == "llama.cpp":  # the same shape in llama.cpp's layout, random too
            from .shape_gguf import LLAMA_TYPES, shape_gguf

            if quant not in LLAMA_TYPES:
                raise SystemExit(f"--shape with --compare llama.cpp needs --quant {' or '.join(LLAMA_TYPES)}")
            t1 = time.perf_counter()
            gguf = shape_gguf(shape, LLAMA_TYPES[quant])
            print(f"llama.cpp's {shape}: {gguf} ({LLAMA_TYPES[quant]}; ready in {time.perf_counter() - t1:.1f} s)")
        hf_config = tiny_config(**dict(SHAPES[shape]))
        encode, tokens = None, "random"  # random weights: text means nothing to them
    else:
        import json

        from ..runtime.local_stores import is_gguf
        from ..runtime.model import load
        from ..runtime.resolve import resolve_model

        src = resolve_model(model)
        gguf = src if is_gguf(src) else None
        loaded = load(str(src), device=device.type, dtype=dtype, quant=quant, progress=False)
        quant = loaded.quant  # what load() chose when none was given
        net, name = loaded.net, src.name
        encode = loaded.encode
        hf_config = json.loads((loaded.model_dir / "config.json").read_text())
    load_s = time.perf_counter() - t0
    fmt = quant or dtype_name(net)
    compile_s = None
    if net.fused:
        from ..kernels import warmup

        compile_s = warmup.warm_up()
    if tokens == "text":
        ids = text_ids(encode, depth + prompt)
    else:
        ids = torch.randint(10, net.cfg.vocab_size, (depth + prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"model: {name}   weights: {fmt}   device: {device.type}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ' (' + cpu_name() + ')'}"
          f"   threads: {threads}   torch {torch.__version__}")
    if cuda_graphs:
        print("decode: static-shape steps (gemma4_nb/static_decode.py)"
              + (", replayed as CUDA graphs" if device.type == "cuda" else ", eager (no CUDA)"))
    print(f"prompt: {'English text (Python help topics)' if tokens == 'text' else 'random token ids'}; "
          f"decode: greedy continuation; KV cache: {kv or dtype_name(net)}"
          + ("; llama.cpp's: f16, its default" if compare == "llama.cpp" else ""))
    print(f"load: {load_s:.1f} s" + (f"   numba kernels ready in {compile_s:.2f} s (compiled or loaded from the on-disk cache)"
                                      if compile_s is not None else ""))
    if interleave and compare != "llama.cpp":
        raise SystemExit("--interleave alternates decode steps with llama.cpp's: it needs --compare llama.cpp")
    if compare == "llama.cpp" and gguf is None:
        raise SystemExit("--compare llama.cpp needs a GGUF model (the default embedded model is one)")
    if interleave:
        print("decode: the two engines' steps alternating one by one, each engine's tok/s from its median step")
    rows = []
    for i in range(repeat):
        if interleave:
            rows.extend(interleaved_speed(net, gguf, ids, depth, decode, threads, kv))
            continue
        r = run(net, prompt, decode, ids=ids, depth=depth, cuda_graphs=cuda_graphs, kv_dtype=kv)
        r["engine"] = "gemma4-nb"
        rows.append(r)
        if compare == "llama.cpp":
            lc = llama_cpp_speed(gguf, ids, depth, decode, threads)
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
    w_bytes, kv_bytes = decode_bytes(net, depth + prompt + decode // 2, kv)
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
            from ..kernels import cpu_numba, ops

            ops.sync_threads()
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
    if interleave:
        ours = [r["decode_mean_tok_s"] for r in rows if r["engine"] == "gemma4-nb"]
        theirs = [r["decode_mean_tok_s"] for r in rows if r["engine"] == "llama.cpp"]
        print("decode from each engine's mean step instead: " + ", ".join(
            f"{a:.1f} / {b:.1f} = {a / b:.2f}x" for a, b in zip(ours, theirs)))
    if bw and len(rows) > 1:
        best = max(r["decode_tok_s"] for r in rows if r["engine"] == "gemma4-nb")
        print(f"best decode of {repeat}: {best:.2f} tok/s = {(w_bytes + kv_bytes) * best / 1e9:.1f} GB/s = "
              f"{(w_bytes + kv_bytes) * best / bw * 100:.1f}% of the measured bandwidth")
    print(f"bytes read per decode token: weights {w_bytes / 1e9:.3f} GB + KV {kv_bytes / 1e9:.4g} GB"
          + (f"; measured read bandwidth {bw / 1e9:.1f} GB/s" + (" (device copy, read+write)" if device.type == "cuda" else "")
             if bw else ""))
    if compare == "llama.cpp":
        from .shape_gguf import weight_bytes_per_token

        print(f"llama.cpp's weights read per decode token: {weight_bytes_per_token(gguf) / 1e9:.3f} GB ({gguf.name})")
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
    p.add_argument("--verify-cost", action="store_true",
                   help="a verification forward of 1-8 positions against a plain decode step (the embedded model)")
    p.add_argument("--mtp-cost", action="store_true",
                   help="12B shape: MTP draft step and k-token verify cost relative to a plain decode step")
    p.add_argument("--layers", type=int, default=6, help="--mtp-cost: target layers actually built (scaled to 48)")
    p.add_argument("--depth", type=int, default=1024, help="--mtp-cost: context length before the measured steps")
    p.add_argument("--load-memory", choices=["int8", "int4", "none"], help="peak RSS of a streaming quantized load")
    p.add_argument("--gguf-load", action="store_true",
                   help="first (repacking) and cached load of a GGUF (--model, or --shape's random GGUF): time, peak RSS")
    p.add_argument("--quant", choices=["int8", "int4"],
                   help="--mtp-cost, --draft, --verify-cost, --gguf-load: quantized weights (CPU)")
    p.add_argument("--repeat", type=int, default=1, help="--draft: the best of this many runs of each")
    p.add_argument("--completion", action="store_true", help="inline completion latency (the embedded model, or --model)")
    p.add_argument("--requests", type=int, default=12, help="--completion: requests (the first loads the model)")
    args = p.parse_args(argv)
    if args.completion:
        import json

        print(json.dumps(completion_latency(args.requests, args.threads, model=args.model), indent=1))
        return 0
    if args.mtp_cost:
        if args.layers < 6 or args.layers % 6:
            p.error("--layers must be a multiple of 6 (the 12B's 5 sliding + 1 full pattern, so the scaling holds)")
        torch.set_num_threads(args.threads)
        mtp_cost(args.layers, args.depth, device=args.device, dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                 quant=args.quant)
        return 0
    if args.load_memory:
        load_memory(args.model, None if args.load_memory == "none" else args.load_memory)
        return 0
    if args.gguf_load:
        from .shape_gguf import shape_gguf

        gguf_load_memory(shape_gguf(args.shape) if args.shape else args.model, args.quant)
        return 0
    if args.verify_cost:
        torch.set_num_threads(args.threads)
        verification_cost(args.model, quant=args.quant)
        return 0
    if args.draft:
        torch.set_num_threads(args.threads)
        drafting_speed(args.model, quant=args.quant, repeat=args.repeat)
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
