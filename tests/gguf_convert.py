"""GGUF files written by llama.cpp's own tools: its ``convert_hf_to_gguf.py`` (from the
llama-cpp-python sdist the Makefile unpacks into ``build/``) and its quantizer
(``llama_cpp.llama_model_quantize``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_SRC = ROOT / "build" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"

# llama.cpp's file types (llama.h: enum llama_ftype)
FTYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "Q6_K": 18}


def converter() -> Path:
    script = LLAMA_SRC / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise RuntimeError(f"{script} is missing: `make install-test` downloads and unpacks the llama-cpp-python sdist")
    return script


def convert(checkpoint: Path, out: Path, outtype: str = "f32") -> Path:
    """``checkpoint`` (a transformers ``save_pretrained`` directory) as a GGUF, by llama.cpp's
    converter, run with this Python and the sdist's own gguf-py (it may need a newer gguf)."""
    env = dict(os.environ, PYTHONPATH=str(LLAMA_SRC / "gguf-py"))
    out.parent.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([sys.executable, str(converter()), str(checkpoint), "--outfile", str(out),
                          "--outtype", outtype], capture_output=True, text=True, env=env, timeout=600)
    if res.returncode != 0 or not out.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return out


def convert_many(jobs: list[tuple[Path, Path, str, bool]]) -> list[Path]:
    """Several conversions, ``(checkpoint, out, outtype, mmproj)`` each (``mmproj``: the vision and
    audio projector, ``--mmproj``), in one process: the converter's imports (torch, transformers)
    are paid once."""
    code = (
        "import json, runpy, sys\n"
        "script = sys.argv[1]\n"
        "main = runpy.run_path(script, run_name='convert_hf_to_gguf')['main']\n"
        "for args in json.loads(sys.argv[2]):\n"
        "    sys.argv = [script] + args\n"
        "    main()\n"
    )
    args = [[str(ckpt), "--outfile", str(out), "--outtype", outtype] + (["--mmproj"] if mmproj else [])
            for ckpt, out, outtype, mmproj in jobs]
    for _, out, _, _ in jobs:
        out.parent.mkdir(parents=True, exist_ok=True)
    # the converter imports its `conversion` package from its own folder
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(LLAMA_SRC / "gguf-py"), str(LLAMA_SRC)]))
    res = subprocess.run([sys.executable, "-c", code, str(converter()), json.dumps(args)], capture_output=True,
                         text=True, env=env, timeout=600)
    missing = [str(out) for _, out, _, _ in jobs if not out.is_file()]
    if res.returncode != 0 or missing:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({res.returncode}; not written: {missing}):\n{res.stderr[-3000:]}")
    return [out for _, out, _, _ in jobs]


def quantize(src: Path, out: Path, ftype: str) -> Path:
    """``src`` quantized by llama.cpp (``llama_model_quantize``) to ``ftype`` (a key of FTYPES), in
    a subprocess: the quantizer prints to the process's stderr."""
    code = (
        "import sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        f"p.ftype = {FTYPES[ftype]}\n"
        "p.nthread = 2\n"
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(src), str(out)], capture_output=True, text=True, timeout=600)
    if res.returncode != 0 or not out.is_file():
        raise RuntimeError(f"llama_model_quantize to {ftype} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return out


def llama_cpp_logits(path: Path, ids: list[int]):
    """llama.cpp's logits at every position of ``ids`` (teacher-forced), F32 KV cache."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=max(512, len(ids) + 8), n_batch=512, n_threads=2, n_threads_batch=2,
                logits_all=True, verbose=False, type_k=0, type_v=0)
    try:
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)]).copy()
    finally:
        llm.close()
