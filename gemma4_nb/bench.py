"""Prefill/decode speed of the runtime, on a checkpoint or on random weights of a known shape.

    python -m gemma4_nb.bench --model PATH [--prompt 512] [--decode 64]
    python -m gemma4_nb.bench --shape gemma4-12b --device cuda      # random weights, no download

Prints time to first token, prefill and decode tokens/s, and peak memory.
"""

from __future__ import annotations

import argparse
import time

import torch

from .checkpoint import expected_tensors
from .config import parse_config
from .model import GemmaModel
from .tiny import tiny_config

SHAPES = {
    "gemma4-12b": dict(vocab_size=262144, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                       num_global_key_value_heads=1, sliding_window=1024, max_position_embeddings=262144),
}


def random_model(shape: str, device: str, dtype: torch.dtype) -> GemmaModel:
    cfg = parse_config(tiny_config(**dict(SHAPES[shape])))
    gen = torch.Generator(device=device).manual_seed(0)
    weights = {}
    for name, dims in expected_tensors(cfg).items():
        t = torch.randn(dims, generator=gen, device=device, dtype=dtype)
        weights[name[len(cfg.weight_prefix):] if name.startswith(cfg.weight_prefix) else name] = (
            1 + 0.1 * t if (name.endswith("norm.weight") or name.endswith("layer_scalar")) else t * 0.02)
    return GemmaModel(cfg, weights)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(net: GemmaModel, prompt_len: int, decode: int) -> dict:
    dev = net.device
    ids = torch.randint(10, net.cfg.vocab_size, (prompt_len,), device=dev)
    warm = net.new_cache()
    net.forward(ids[:16], warm)
    net.forward(ids[:1], warm)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cache = net.new_cache()
    _sync(dev)
    t0 = time.perf_counter()
    out = net.forward(ids, cache)
    tok = out.logits[-1].argmax()
    _sync(dev)
    prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(decode):
        tok = net.forward(tok.view(1), cache).logits[-1].argmax()
    _sync(dev)
    dec = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    return {"prompt": prompt_len, "ttft_s": prefill, "prefill_tok_s": prompt_len / prefill,
            "decode_tok_s": decode / dec, "peak_gpu_gib": peak / 2**30 if peak else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gemma4_nb.bench")
    p.add_argument("--model")
    p.add_argument("--shape", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--prompt", type=int, nargs="+", default=[512])
    p.add_argument("--decode", type=int, default=32)
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.shape:
        net = random_model(args.shape, args.device, dtype)
        name = f"{args.shape} (random weights)"
    else:
        from .runtime import load

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
