"""The ``gemma4-nb`` command line."""

from __future__ import annotations

import argparse
import sys

from .errors import Gemma4Error
from .runtime.chat_template import PLAIN_STOPS, plain_prompt
from .runtime.weight_choice import QUANT_SETTINGS


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory, .gguf file, Hugging Face repo id, ollama:<name>[:<tag>] or "
                                   "lmstudio:<publisher>/<repo> (default: $GEMMA4_NB_MODEL; `gemma4-nb models` lists them)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="weight dtype (default: bf16 on CUDA, fp32 on CPU if it fits)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-context", type=int, help="longest prompt plus reply, in tokens")
    p.add_argument("--download", action="store_true", help="download a repo id that is not in the local cache")
    p.add_argument("--drafting", choices=["auto", "mtp", "prompt_lookup", "off"], default="auto",
                   help="speculative decoding (output unchanged): the MTP assistant when found, else prompt lookup")
    p.add_argument("--assistant", help="the MTP assistant's directory or repo id (default: found next to the model)")
    p.add_argument("--quant", type=str.lower, choices=QUANT_SETTINGS,
                   help="weight format (default: $GEMMA4_NB_QUANT, else auto: the widest that fits in memory; a GGUF "
                        "keeps its own); int8/int4 are quantized while loading")


def _cmd_generate(args) -> int:
    from .runtime.model import load

    model = load(args.model, dtype=args.dtype, device=args.device, max_context=args.max_context,
                 download=args.download, drafting=None if args.drafting == "off" else args.drafting,
                 assistant=args.assistant, quant=args.quant)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    seed=args.seed, stop=args.stop or None, max_new_tokens=args.max_new_tokens, stream=True)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    if args.raw or not model.tokenizer.chat_template:
        stream = model.generate(args.prompt, **sampling)
    elif model.tokenizer.base_model:  # not instruction-tuned: a plain Question/Answer prompt
        sampling["stop"] = (sampling["stop"] or []) + PLAIN_STOPS
        stream = model.generate(plain_prompt(messages, preamble=args.system or ""), **sampling)
    else:
        stream = model.chat(messages, **sampling)
    try:
        for delta in stream:
            sys.stdout.write(delta)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.usage.finish_reason = "interrupted"
    sys.stdout.write("\n")
    u = stream.usage
    print(
        f"\nprompt tokens: {u.prompt_tokens}  generated tokens: {u.generated_tokens}  "
        f"prefill: {u.prefill_tokens_per_second:.1f} tok/s  decode: {u.decode_tokens_per_second:.1f} tok/s  "
        f"(finish: {u.finish_reason})",
        file=sys.stderr,
    )
    return 0


def _cmd_bench(args) -> int:
    from .devtools.bench import bench_command
    from .devtools.shapes import SHAPES

    if args.shape and args.shape not in SHAPES:
        raise Gemma4Error(f"unknown shape {args.shape!r}; use one of {sorted(SHAPES)}")
    if args.shape and args.model:
        raise Gemma4Error("give --model or --shape, not both")
    if args.completion:
        return _bench_completion(args)
    if args.notebook:
        from .devtools.bench_notebook import notebook_bench

        notebook_bench(model=args.model, shape=args.shape, quant=args.quant, threads=args.threads,
                       max_new_tokens=args.max_new_tokens, repeat=args.repeat, think=args.think, warm=not args.no_warm)
        return 0
    bench_command(model=args.model, shape=args.shape, quant=args.quant, dtype=args.dtype, device=args.device,
                  threads=args.threads, prompt=args.prompt, decode=args.decode, depth=args.depth,
                  compare=args.compare, bandwidth=args.bandwidth, repeat=args.repeat, cuda_graphs=args.cuda_graphs,
                  tokens=args.tokens, kv=args.kv, interleave=args.interleave)
    return 0


def _bench_completion(args) -> int:
    """``gemma4-nb bench --completion``: inline completion latency (devtools/measurements.py)."""
    import json

    from .devtools.measurements import completion_latency

    if args.shape:
        raise Gemma4Error("--completion measures a real completion model: give --model (or nothing: the embedded "
                          "Gemma 3 270M), not --shape")
    r = completion_latency(requests=args.requests, threads=args.threads, max_new_tokens=args.max_new_tokens,
                           model=args.model)
    print(f"inline completion, {r['max_new_tokens']} tokens, {r['threads']} threads: first request (with the "
          f"model's load) {r['first_s']:.2f} s; median of the next {r['requests'] - 1} {r['median_s']:.3f} s; "
          f"slowest {r['max_s']:.3f} s")
    print(json.dumps(r))
    return 0


def _cmd_models(args) -> int:
    from .runtime.local_stores import list_local_models

    found = list_local_models()
    if not found:
        print("no models found in the Hugging Face cache, Ollama's store or LM Studio's folders")
        return 0
    def size(n: int) -> str:
        return next(f"{n / 2**e:.1f} {unit}" for e, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B"))
                    if n >= 2**e or e == 0)

    rows = [(m.ref, size(m.size), m.format + (" + projector" if m.projector else ""), str(m.path))
            for m in found]
    widths = [max(len(r[i]) for r in rows + [("model", "size", "format", "")]) for i in range(3)]
    print(f"{'model':<{widths[0]}}  {'size':>{widths[1]}}  {'format':<{widths[2]}}  path")
    for ref, size, fmt, path in rows:
        print(f"{ref:<{widths[0]}}  {size:>{widths[1]}}  {fmt:<{widths[2]}}  {path}")
    return 0


def _cmd_tiny(args) -> int:
    from .devtools.tiny import write_tiny_checkpoint

    print(write_tiny_checkpoint(args.out_dir, args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma4-nb", description="Gemma 4 in your notebook kernel")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a reply to a prompt")
    _add_model_args(gen)
    gen.add_argument("prompt", help="the prompt (a user message, or raw text with --raw)")
    gen.add_argument("--raw", action="store_true", help="continue the text as is, without the chat template")
    gen.add_argument("--system", help="system message (chat mode)")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, help="0 for greedy (default: the checkpoint's setting)")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--min-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.set_defaults(func=_cmd_generate)

    b = sub.add_parser("bench", help="prefill/decode speed, time to first token and peak memory (like llama-bench)")
    b.add_argument("--model", help="model directory, .gguf or repo id (default: the embedded Gemma 3 270M)")
    b.add_argument("--shape", help="instead of a model: random weights in a named shape (gemma4-12b)")
    b.add_argument("--quant", choices=["int8", "int4"],
                   help="weight format (default: unquantized with --shape; with --model what load() picks)")
    b.add_argument("--dtype", choices=["bf16", "fp32"], help="unquantized weight / activation dtype")
    b.add_argument("--kv", choices=["int8"], help="the KV cache's dtype (default: the activations')")
    b.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    b.add_argument("--threads", type=int, help="CPU threads (default: torch's setting)")
    b.add_argument("--prompt", type=int, default=512, help="prompt tokens to prefill (timed)")
    b.add_argument("--decode", type=int, default=64, help="greedy decode steps (timed)")
    b.add_argument("--depth", type=int, default=0, help="context tokens already in the cache before the prompt")
    b.add_argument("--repeat", type=int, default=1, help="repeat the measurement (side by side with --compare)")
    b.add_argument("--tokens", choices=["text", "random"], default="text",
                   help="prompt: English text (Python's help topics; default) or random token ids")
    b.add_argument("--compare", choices=["llama.cpp", "transformers"],
                   help="llama-cpp-python on the same GGUF, or transformers' generate on the same weights, in the same run")
    b.add_argument("--interleave", action="store_true",
                   help="with --compare llama.cpp: decode steps of the two engines alternating one by one, each "
                        "engine's tok/s from its median step (a shared machine's load bursts then hit both alike)")
    b.add_argument("--bandwidth", action="store_true", help="measure memory bandwidth; print decode's roofline fraction")
    b.add_argument("--notebook", action="store_true",
                   help="a scripted notebook session in a real kernel: per question, prompt tokens, tokens reused "
                        "from the cache, time to first token, total time")
    b.add_argument("--completion", action="store_true",
                   help="inline completion latency: completions as a user typing in a cell asks for them (the "
                        "completion model: the embedded Gemma 3 270M, or --model); first request, median, slowest")
    b.add_argument("--requests", type=int, default=12, help="--completion: requests (the first loads the model)")
    b.add_argument("--max-new-tokens", type=int,
                   help="--notebook: new tokens per request at most (default 24; 8 with --shape); --completion: "
                        "tokens per completion (default 24)")
    b.add_argument("--think", type=float, default=2.0,
                   help="--notebook: seconds from the kernel going idle to each question (the user typing; default 2)")
    b.add_argument("--no-warm", action="store_true",
                   help="--notebook: do not prefill the next question's start while the kernel is idle")
    b.add_argument("--cuda-graphs", action="store_true",
                   help="decode with static-shape steps replayed as CUDA graphs (experimental; eager on the CPU)")
    b.set_defaults(func=_cmd_bench)

    models = sub.add_parser("models", help="the models on this machine (Hugging Face cache, Ollama, LM Studio): "
                                           "what to pass to --model / load(), size, format")
    models.set_defaults(func=_cmd_models)

    tiny = sub.add_parser("tiny", help="write a tiny random Gemma 4 checkpoint (for smoke tests)")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Gemma4Error as exc:
        print(f"gemma4-nb: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
