"""Every compiled CPU kernel at once: compiled, or loaded from numba's on-disk cache.

Otherwise each kernel compiles on the first call that reaches it. :func:`warm_up` runs each on
tiny inputs with the argument types the runtime passes (the benchmarks call it before timing, so
compilation is reported apart); :func:`all_kernels` lists the ones Python calls (the on-disk
cache test counts their hits).
"""

from __future__ import annotations

import time

import numpy as np

from . import cpu_decode
from . import cpu_numba as nb


def all_kernels() -> tuple:
    """Every compiled kernel of the CPU path that Python calls directly (kernels only called from
    other kernels are compiled and cached with them)."""
    return nb.compiled_kernels() + (cpu_decode.attention_inputs, cpu_decode.attention_output_and_mlp)


def warm_up() -> float:
    """Compile (or load from the on-disk cache) every kernel on small inputs, with the argument
    types the runtime passes; returns seconds."""
    t0 = time.perf_counter()
    f32 = np.float32
    x = np.ones((1, 64), dtype=f32)
    no_low = np.zeros((1, 1), dtype=np.uint8)
    w8 = (np.ones((64, 64), dtype=np.uint8), np.ones((64, 2), dtype=f32), no_low, nb.INT8)
    meta = np.zeros((64, 20), dtype=np.uint8)  # one int4 super-block per row
    w4 = (np.full((64, 32), 0x98, dtype=np.uint8), meta.view(f32), no_low, nb.INT4)
    high, low, err = np.empty((64, 32), dtype=np.uint8), np.empty((64, 32), dtype=np.uint8), np.empty((64, 3), dtype=f32)
    nb.split_int8_planes(np.ones((64, 64), dtype=np.int8), w8[1], high, low, err)
    w2 = (high, w8[1], low, nb.INT8_PLANES)
    out = np.empty((1, 64), dtype=f32)
    for w in (w8, w4, w2):
        nb.gemm(x, w, out)
        nb.gate_up_gelu(x, w, w, out)
        nb.head_topk(x, w, 2, 30.0, parts=2)
        nb.embed_rows(w, np.zeros(1, dtype=np.int64), 1.0, out)
    nb.head_topk(x, w2, 2, 30.0, parts=2, row_err=err)
    policy = nb.ScreenPolicy()
    policy.LEARN_CALLS = 1  # the screen with exact columns (nb.screen_columns) too
    nb.head_topk(x, w2, 2, 30.0, parts=2, row_err=err, policy=policy)
    for out_type in (f32, np.uint16):  # fp32, or bf16 bits (prefill)
        nb.dequant_rows_int8(w8[0].view(np.int8), w8[1], 0, np.empty((2, 64), dtype=out_type))
        nb.dequant_rows_int4(w4[0], meta, 0, np.empty((2, 64), dtype=out_type))
    nb.quantize_int8_rows(np.ones((2, 64), dtype=f32), True, np.empty((2, 64), dtype=np.int8), np.empty((2, 2), dtype=f32))
    nb.quantize_int4_rows(np.ones((2, 64), dtype=f32), True, np.empty((2, 32), dtype=np.uint8), meta[:2])
    kv = np.ones((1, 8, 32), dtype=f32)
    nb.decode_attention(np.ones((2, 32), dtype=f32), kv, kv, 0, 8, 0.1, None, splits=2)
    pool = np.ones((2, 4, 1, 32), dtype=f32)
    sl = np.array([1, 0], dtype=np.int64)
    nb.decode_attention_chunks(np.ones((2, 32), dtype=f32), pool, pool, sl, sl, 1, 6, 0.1, None, splits=2)
    ones64, ones32, cs = np.ones(64, dtype=f32), np.ones(32, dtype=f32), np.ones((1, 16), dtype=f32)
    q, k, v = np.empty((1, 2, 32), dtype=f32), np.empty((1, 1, 32), dtype=f32), np.empty((1, 1, 32), dtype=f32)
    cpu_decode.attention_inputs(x, ones64, 1e-6, w8, w4, w8, ones32, ones32, cs, cs, 1, True, q, k, v)
    cpu_decode.attention_output_and_mlp(x, x, w8, ones64, ones64, w4, w8, w8, ones64, 1.0, 1e-6, out)
    return time.perf_counter() - t0
