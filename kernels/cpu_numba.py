"""Fused CPU kernels in numba for int8/int4 weights (layouts: :mod:`.qweight`).

Every kernel is ``njit(parallel=True, fastmath=True, cache=True)``: compiled on first use and
cached on disk next to this file (or in ``$NUMBA_CACHE_DIR``), so a restarted kernel loads the
machine code instead of compiling again. Arguments are plain numpy arrays (fp32 activations);
the thin wrappers in :mod:`gemma4_nb.kernels.ops` convert from torch without copying.

A quantized matrix arrives as a tuple ``w = (codes as uint8, scales, low, kind)`` (see
:func:`gemma4_nb.kernels.ops.kernel_weight`); one compiled kernel serves int8 and int4 rows (the
row dot products are the vector intrinsics of :mod:`.simd`).

* ``gemm``: ``out[t, n] = sum_k x[t, k] * W[n, k]`` on activations quantized in int8 (two parts;
  one for int4 weights),
  through ``gemm_quantized``: parallel over output rows, each weight row
  read once for all ``t`` (matrix-vector at decode, small matrix-matrix for verification).
* ``gate_up_gelu``: ``gelu_tanh(x W_gate^T) * (x W_up^T)`` on one quantization of the activations.
* ``decode_attention_positions`` (``decode_attention`` / ``decode_attention_chunks``: one query
  position): grouped-query attention
  with an online softmax over K/V read in place from the cache's chunks; each K/V row is read once
  for all query heads sharing it; the key range is split across threads and the partial softmaxes
  merged (flash-decoding).
* ``head_topk``: the vocabulary head fused with top-k selection (softcap is monotonic, so it is
  applied to the k winners only): the logits are never materialized.
* ``dequant_rows_*``: rows of a weight to fp32 (prefill multiplies in blocks with torch's GEMM).

RMSNorm fused into the projections that follow it, and the rest of a decode layer, are in
:mod:`.cpu_decode`.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .layout import SUPER_SCALE
from .simd import (PREFETCH, WIDE, dot2_int4, dot2_int8, dot2_planes, dot2_screen, dot4_planes, dot8,
                   dot_int4, dot_int8, dot_planes, dot_screen, first_part, prefetch_row)
from .simd_float import block_scores, block_values, pow2
from .simd_blocks import ROWS as BLOCK_ROWS, block_int4, block_int8, scratch_bytes as block_scratch_bytes
from .simd_screen import ROWS as SCREEN_ROWS, scratch_bytes, screen_block


def _choose_threading_layer() -> None:
    """TBB when it can be loaded, else numba's work queue; ``NUMBA_THREADING_LAYER`` overrides.

    A decode step launches ~90 parallel regions of a few to a few hundred microseconds, so the
    launch cost matters (measured on a 2-core Zen 4 VM, an empty region: work queue 18-27 us,
    TBB 1.4 us, OpenMP 1.7 us; a 270M decode step: 28-30 ms / 23 ms / 21-22 ms). OpenMP is not
    used: numba's OpenMP runtime is a second copy beside the one torch bundles, and llama.cpp's,
    and their threads spin after every region, so alternating torch and numba work (prefill) or
    sharing the cores with another engine (measured: a 512-token prefill at 70 tok/s instead of
    1,100) can collapse. TBB's workers stay responsive without that. The ``tbb`` wheel puts
    ``libtbb.so.12`` in ``<prefix>/lib``, outside the loader's search path, so it is loaded here by
    its full path first (numba's TBB pool then finds it by name)."""
    if "NUMBA_THREADING_LAYER" in os.environ:
        return
    import ctypes
    import sys

    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        lib = os.path.join(prefix, "lib", "libtbb.so.12")
        if os.path.exists(lib):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                from numba.np.ufunc import tbbpool  # noqa: F401  (checks the version numba needs)
            except (OSError, ImportError):
                break
            numba.config.THREADING_LAYER = "tbb"
            return
    # The work queue sleeps between regions (no spinning); it must not be entered by two threads
    # at once, which the runtime never does (one generation at a time).
    numba.config.THREADING_LAYER = "workqueue"


_choose_threading_layer()

_OPTS = dict(parallel=True, fastmath=True, cache=True, nogil=True)
# fastmath lets LLVM assume no infinities, so "minus infinity" is a finite sentinel here
RESCORE_AHEAD = 4  # rows prefetched ahead in the head's pass 2 (measured 2-8: alike; none: +25%)
# keys an attention job scores before it rescales and adds their values (one max and one
# rescale per block instead of per key)
ATTENTION_BLOCK = 32
# the screen runs sixteen rows at a time (_estimates_blocks) from this many positions, for rows of
# at most SCREEN_BLOCKS_WIDTH weights: a block's scratch then stays in L1 (the 270M's 640: 11.5 KB).
# The 12B's rows of 3840 (69 KB) measured slower by blocks at 2 and 4 positions (an eighth of its
# head: 8.8 against 4.3 ms, 9.5 against 7.7) and faster only at 8 (12.2 against 15.3)
SCREEN_BLOCKS_FROM = 2
SCREEN_BLOCKS_WIDTH = 2048
# a layer's int8/int4 products run sixteen rows at a time (simd_blocks, codes stored in that order
# at load: ops.kernel_weight) for rows of at most this many weights: the 270M's (640-2048), whose
# matrices sit in the cache, so that their arithmetic sets the time. Wider rows (the 12B's
# 3840-15360) keep the row kernels, which stream them at the memory's rate.
BLOCK_WIDTH = 2048
BLOCKS_PER_JOB = 4  # blocks of sixteen rows a parallel job takes (one scratch buffer each)
EXACT_COLUMNS = 8  # columns the screened head computes exactly (see ScreenPolicy): simd.dot8's width
NEG = np.float32(-3.0e38)
EXP_FLOOR = np.float32(-64.0)  # exp_fast below this: 0


# -- matrix products ---------------------------------------------------------------------------
# A quantized matrix reaches these kernels as ``w = (codes as uint8, scales, low, kind)`` (see
# :func:`gemma4_nb.kernels.ops.kernel_weight`); the row dot products are the vector intrinsics of
# :mod:`.simd`.

INT8, INT4, INT8_PLANES = 8, 4, 2  # the ``kind`` of a kernel weight tuple



@njit(inline="always", fastmath=True)
def row_dot(xa, t, w, n):
    """Row ``n`` of quantized matrix ``w`` dotted with activation row ``t`` (``xa`` from
    :func:`quantize_activations_fine`, or :func:`quantize_activations`). An int4 row takes the
    first part of the activations only: its own rounding (1/30 of a group's range) is 8x coarser
    than one part's (1/254), and the second part cost the 12B shape 20% of its speed (the int8
    layouts, whose rounding is as fine as one part's, keep both)."""
    codes, scales, low, kind = w
    if kind == INT4:
        return dot_int4(first_part(xa), t, codes, scales, n)
    if kind == INT8_PLANES:
        return dot_planes(xa, t, codes, low, scales, n)
    return dot_int8(xa, t, codes, scales, n)


@njit(inline="always", fastmath=True)
def row_dot2(xa, t, w, n):
    """:func:`row_dot` for activation rows ``t`` and ``t + 1`` (a pair)."""
    codes, scales, low, kind = w
    if kind == INT4:
        return dot2_int4(first_part(xa), t, codes, scales, n)
    if kind == INT8_PLANES:
        return dot2_planes(xa, t, codes, low, scales, n)
    return dot2_int8(xa, t, codes, scales, n)


@njit(inline="always")
def _prefetch_weight_row(w, n):
    """Every byte :func:`row_dot` will read of row ``n`` (a hint)."""
    codes, scales, low, kind = w
    prefetch_row(codes, n)
    prefetch_row(scales, n)
    if kind == INT8_PLANES:
        prefetch_row(low, n)


@njit(inline="always")
def padded_groups(g_n):
    """Columns of the activations' per-group arrays: ``g_n`` groups padded with zeros to whole
    octets, so the products read a partial super-block's eight scales as one vector (see
    :mod:`.simd`)."""
    return (g_n + 7) // 8 * 8


# Not fastmath (and not inlined into the fastmath kernels): the rounding of ``x / d`` is exactly
# IEEE's, as in the plain-torch reference the tests compare with.
@njit(cache=True, nogil=True)
def quantize_activations(x):
    """fp32 activations ``[T, K]`` -> ``(xq, xd, xs)``: per group of 32, int8 ``xq`` with
    ``xd = max|x| / 127`` (round half to even) and ``xs`` the group's sum of ``xd * xq`` (as
    llama.cpp's Q8 activations). The products then run on integer dot products (:mod:`.simd`)."""
    t_n, k_n = x.shape
    g_n = k_n // 32
    xq = np.empty((t_n, k_n), dtype=np.int8)
    xd = np.zeros((t_n, padded_groups(g_n)), dtype=np.float32)
    xs = np.zeros((t_n, padded_groups(g_n)), dtype=np.float32)
    for t in range(t_n):
        for g in range(g_n):
            amax = np.float32(0.0)
            for j in range(32):
                amax = max(amax, abs(x[t, g * 32 + j]))
            d = amax / np.float32(127.0)
            total = 0
            for j in range(32):
                q = 0 if d == 0 else min(127, max(-127, int(np.round(x[t, g * 32 + j] / d))))
                xq[t, g * 32 + j] = q
                total += q
            xd[t, g] = d
            xs[t, g] = np.float32(total) * d
    return xq, xd, xs


@njit(cache=True, nogil=True)
def quantize_activations_fine(x):
    """As :func:`quantize_activations`, plus a second int8 part ``xq2`` quantizing the remainder
    ``x - xd * xq`` with ``xd2 = xd / 254`` (about 15 bits in all): ``(xq, xq2, xd, xd2, xs, xs1)``,
    ``xs`` the group sums of both parts, ``xs1`` of the first (see :func:`.simd.first_part`)."""
    xq, xd, xs1 = quantize_activations(x)
    t_n, k_n = x.shape
    g_n = k_n // 32
    xq2 = np.empty((t_n, k_n), dtype=np.int8)
    xd2 = np.zeros((t_n, padded_groups(g_n)), dtype=np.float32)
    xs = np.zeros((t_n, padded_groups(g_n)), dtype=np.float32)
    for t in range(t_n):
        for g in range(g_n):
            d = xd[t, g]
            d2 = d / np.float32(254.0)
            total = np.float32(0.0)
            for j in range(32):
                q = np.float32(xq[t, g * 32 + j])
                r = x[t, g * 32 + j] - q * d
                q2 = 0 if d2 == 0 else min(127, max(-127, int(np.round(r / d2))))
                xq2[t, g * 32 + j] = q2
                total += q * d + np.float32(q2) * d2
            xd2[t, g] = d2
            xs[t, g] = total
    return xq, xq2, xd, xd2, xs, xs1


@njit(inline="always")
def blocked(w):
    """Whether ``w`` carries its codes in sixteen-row blocks (in the tuple's ``low`` slot, from
    :func:`gemma4_nb.kernels.ops.kernel_weight`): then every product with it, for one position as
    for several, runs :mod:`.simd_blocks`, so a verification's positions get a decode step's bits.
    ``WIDE`` first: a constant, so that elsewhere the block kernels' 512-bit VNNI is never compiled."""
    codes, scales, low, kind = w
    return WIDE and kind != INT8_PLANES and low.shape[1] >= codes.shape[1] * BLOCK_ROWS


@njit(inline="always")
def product_blocks(xa, w, b0, b1, out, col, scratch):
    """``out[t, col + 16 b + j]`` for the rows of blocks ``b0 .. b1 - 1`` of a :func:`blocked`
    ``w`` and every position ``t``."""
    codes, scales, low, kind = w
    for b in range(b0, b1):
        if kind == INT4:
            block_int4(first_part(xa), low, scales, b, scratch, out, col + b * BLOCK_ROWS)
        else:
            block_int8(xa, low, scales, b, scratch, out, col + b * BLOCK_ROWS)


@njit(inline="always")
def block_scratch(out):
    """A scratch buffer for :func:`product_blocks` into ``out`` ``[T, N]`` (one per job)."""
    return np.empty(block_scratch_bytes(out.shape[0]), dtype=np.uint8)


@njit(**_OPTS)
def gemm_quantized(xa, w, out):
    """``out[t, n] = sum_k x[t, k] * W[n, k]`` for activations already quantized (``xa`` from
    :func:`quantize_activations` or :func:`quantize_activations_fine`): parallel over output rows,
    each row of ``W`` read once for every ``t`` (matrix-vector at decode, small matrix-matrix for
    verification); sixteen rows at a time where :func:`blocked`."""
    if blocked(w):
        blocks = out.shape[1] // BLOCK_ROWS
        for c in prange((blocks + BLOCKS_PER_JOB - 1) // BLOCKS_PER_JOB):
            product_blocks(xa, w, c * BLOCKS_PER_JOB, min(blocks, (c + 1) * BLOCKS_PER_JOB), out, 0,
                           block_scratch(out))
        return
    for n in prange(out.shape[1]):
        row_all_positions(xa, w, n, out, n)


@njit(inline="always", fastmath=True)
def row_all_positions(xa, w, n, out, col):
    """``out[t, col]`` = row ``n`` of ``w`` dotted with every activation row ``t``, positions by
    pairs (the row's groups read and unpacked once per pair). Pairs, not fours: CPU time per weight
    per position at 2 and 4 positions, one thread, ``4096 x 3840`` (AMD EPYC, AVX512-VNNI): int8
    0.017 and 0.026 ns, int4 0.013 and 0.019 ns (the four-position kernel's registers spill); the
    Intel Xeon measured int8 0.030/0.034, int4 0.025/0.023."""
    t_n = out.shape[0]
    t = 0
    while t + 2 <= t_n:
        out[t, col], out[t + 1, col] = row_dot2(xa, t, w, n)
        t += 2
    if t < t_n:
        out[t, col] = row_dot(xa, t, w, n)


@njit(fastmath=True, cache=True, nogil=True)
def gemm(x, w, out):
    """``out = x @ W^T`` with the activations quantized in two int8 parts (the first only against
    int4 rows; see :mod:`.simd`)."""
    gemm_quantized(quantize_activations_fine(x), w, out)


@njit(inline="always", fastmath=True)
def gelu_tanh(g):
    """``0.5 g (1 + tanh(y))`` written as ``g / (1 + exp(-2y))`` (the same function): one ``exp``
    instead of ``tanh``, which took 4x as long (libm). ``y`` is clamped where the result is 0 in
    fp32 anyway, so ``exp`` never overflows (fastmath assumes no infinities)."""
    c = np.float32(0.7978845608028654)  # sqrt(2 / pi)
    y = c * (g + np.float32(0.044715) * g * g * g)
    return g / (np.float32(1.0) + np.exp(np.float32(-2.0) * max(y, np.float32(-40.0))))


@njit(**_OPTS)
def _gelu_times(g, u, out):
    for t in prange(out.shape[0]):
        for n in range(out.shape[1]):
            out[t, n] = gelu_tanh(g[t, n]) * u[t, n]


@njit(fastmath=True, cache=True, nogil=True)
def gate_up_gelu(x, wg, wu, out):
    """``gelu_tanh(x W_gate^T) * (x W_up^T)``: both products on the same quantized activations,
    then GELU and the product in one pass."""
    xa = quantize_activations_fine(x)
    g = np.empty_like(out)
    u = np.empty_like(out)
    gemm_quantized(xa, wg, g)
    gemm_quantized(xa, wu, u)
    _gelu_times(g, u, out)


def _store_row(row, out, i):
    """fp32 ``row`` into row ``i`` of ``out``: fp32, or bf16 bits (uint16, rounded to nearest even).
    In ``@njit`` code (the variant is chosen when ``out``'s type is known)."""


@overload(_store_row, inline="always")
def _store_row_typed(row, out, i):
    if out.dtype == types.float32:
        def store_fp32(row, out, i):
            out[i, :] = row
        return store_fp32

    def store_bf16(row, out, i):
        bits = row.view(np.uint32)
        for k in range(bits.shape[0]):
            b = bits[k]
            out[i, k] = np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    return store_bf16


@njit(**_OPTS)
def dequant_rows_int8(codes, scales, r0, out):
    """Rows ``r0:r0 + len(out)`` of an int8 weight into ``out`` (fp32, or uint16 bf16 bits)."""
    for i in prange(out.shape[0]):
        row = np.empty(out.shape[1], dtype=np.float32)
        for k in range(out.shape[1]):
            row[k] = np.float32(codes[r0 + i, k]) * scales[r0 + i, k // 32]
        _store_row(row, out, i)


@njit(inline="always")
def half_to_float(lo, hi):
    """The fp16 value of the little-endian bytes ``lo``, ``hi``."""
    bits = np.int64(lo) | (np.int64(hi) << 8)
    exp = (bits >> 10) & 31
    frac = np.float32(bits & 1023)
    if exp == 0:
        v = frac * np.float32(2.0 ** -24)
    elif exp == 31:
        v = np.float32(np.inf)
    else:
        v = (np.float32(1024.0) + frac) * np.float32(2.0 ** (exp - 25))
    return -v if bits & 32768 else v


@njit(inline="always")
def int4_group_scale(meta, n, g):
    """Group ``g``'s ``(scale, min)`` of row ``n`` from its super-block (``w = q * scale + min``)."""
    base = (g // 8) * 20
    d = half_to_float(meta[n, base], meta[n, base + 1]) / np.float32(SUPER_SCALE)
    dmin = half_to_float(meta[n, base + 2], meta[n, base + 3]) / np.float32(SUPER_SCALE)
    return d * np.float32(meta[n, base + 4 + g % 8]), -dmin * np.float32(meta[n, base + 12 + g % 8])


@njit(cache=True, nogil=True)
def embed_rows(w, ids, factor, out):
    """Rows ``ids`` of a quantized matrix, dequantized and times ``factor`` (the embedding scale),
    into ``out`` ``[len(ids), K]``: the embedding lookup of a decode step without the torch calls
    of :meth:`QWeight.dequantize` (about 0.4 ms a step on the 270M). Not fastmath, so the values
    are the reference's bit for bit (no fused multiply-add)."""
    codes, scales, low, kind = w
    meta = scales.view(np.uint8)  # int4: the super-block bytes, viewed as fp32 in the kernel tuple
    f = np.float32(factor)
    for i in range(ids.shape[0]):
        n = ids[i]
        for g in range(out.shape[1] // 32):
            if kind == INT4:
                d, m = int4_group_scale(meta, n, g)
                for j in range(16):
                    b = codes[n, g * 16 + j]
                    out[i, g * 32 + j] = (np.float32(b & 15) * d + m) * f
                    out[i, g * 32 + 16 + j] = (np.float32(b >> 4) * d + m) * f
                continue
            d = scales[n, g]
            for j in range(32):
                if kind == INT8_PLANES:  # the code is (high - 8) * 16 + low, nibbles as int4's
                    k = g * 16 + j % 16
                    hi = (codes[n, k] >> 4) if j >= 16 else (codes[n, k] & 15)
                    lo = (low[n, k] >> 4) if j >= 16 else (low[n, k] & 15)
                    c = (np.int32(hi) - 8) * 16 + np.int32(lo)
                else:
                    c = np.int32(np.int8(codes[n, g * 32 + j]))
                out[i, g * 32 + j] = (np.float32(c) * d) * f


@njit(**_OPTS)
def dequant_rows_int4(codes, meta, r0, out):
    """Rows ``r0:r0 + len(out)`` of an int4 weight into ``out`` (fp32, or uint16 bf16 bits)."""
    for i in prange(out.shape[0]):
        n = r0 + i
        row = np.empty(out.shape[1], dtype=np.float32)
        for g in range(out.shape[1] // 32):
            d, m = int4_group_scale(meta, n, g)
            for j in range(16):
                b = codes[n, g * 16 + j]
                row[g * 32 + j] = np.float32(b & 15) * d + m
                row[g * 32 + 16 + j] = np.float32(b >> 4) * d + m
        _store_row(row, out, i)


@njit(parallel=True, cache=True)
def split_int8_planes(codes, scales, high, low, row_err):
    """int8 codes -> the nibble planes of :func:`gemma4_nb.kernels.qweight.to_planes`, and per row the two
    norms the screened head's error bounds need: ``row_err[n, 0] = |S_n - W_n|`` (the low nibbles'
    distance from 7.5, scaled), ``row_err[n, 1] = |S_n|`` (the screen's estimate of the row,
    ``(16 * (high - 8) + 7.5) * scale``) and ``row_err[n, 2] = |W_n|``."""
    for n in prange(codes.shape[0]):
        e = 0.0
        r = 0.0
        wn = 0.0
        for g in range(scales.shape[1]):
            s = np.float64(scales[n, g])
            for j in range(16):
                c0 = np.int64(codes[n, g * 32 + j])
                c1 = np.int64(codes[n, g * 32 + 16 + j])
                l0, l1 = c0 & 15, c1 & 15
                high[n, g * 16 + j] = np.uint8(((c0 >> 4) + 8) | (((c1 >> 4) + 8) << 4))
                low[n, g * 16 + j] = np.uint8(l0 | (l1 << 4))
                e += ((l0 - 7.5) * s) ** 2 + ((l1 - 7.5) * s) ** 2
                r += ((16 * (c0 >> 4) + 7.5) * s) ** 2 + ((16 * (c1 >> 4) + 7.5) * s) ** 2
                wn += (c0 * s) ** 2 + (c1 * s) ** 2
        row_err[n, 0] = np.float32(np.sqrt(e) * (1.0 + 1e-6))
        row_err[n, 1] = np.float32(np.sqrt(r) * (1.0 + 1e-6))
        row_err[n, 2] = np.float32(np.sqrt(wn) * (1.0 + 1e-6))


@njit(parallel=True, cache=True)
def screen_columns(high, low, scales, cols, col_err, screen_err):
    """For the screened head's exact columns ``cols``: the screen's error there,
    ``col_err[n, i] = W[n, cols[i]] - S[n, cols[i]]`` (``[N, EXACT_COLUMNS]``, zero past
    ``len(cols)``), and the bounds' norms without them, ``screen_err[n] = (|S_n - W_n| outside
    cols, |S_n| with cols exact)`` (see :func:`split_int8_planes` for the layout and the norms)."""
    for n in prange(high.shape[0]):
        e = 0.0  # sum over the row of ((low - 7.5) * s)^2, then without cols
        r = 0.0  # sum of ((16 * high + 7.5) * s)^2, then with cols exact
        for g in range(scales.shape[1]):
            ie = 0  # the same per group in integers: (2 low - 15)^2 and (32 high + 15)^2, 4x
            ir_ = 0
            for b in range(g * 16, g * 16 + 16):
                h, lo = np.int64(high[n, b]), np.int64(low[n, b])
                ir_ += (32 * ((h & 15) - 8) + 15) ** 2 + (32 * ((h >> 4) - 8) + 15) ** 2
                ie += (2 * (lo & 15) - 15) ** 2 + (2 * (lo >> 4) - 15) ** 2
            s2 = np.float64(scales[n, g]) ** 2 / 4.0
            e += ie * s2
            r += ir_ * s2
        col_err[n, :] = 0.0
        for i in range(cols.shape[0]):
            j = cols[i]
            b = (j // 32) * 16 + (j % 32) % 16
            hi = np.int64((high[n, b] >> 4) if j % 32 >= 16 else (high[n, b] & 15)) - 8
            lo = np.int64((low[n, b] >> 4) if j % 32 >= 16 else (low[n, b] & 15))
            s = np.float64(scales[n, j // 32])
            col_err[n, i] = np.float32((lo - 7.5) * s)
            e -= ((lo - 7.5) * s) ** 2
            r += ((16 * hi + lo) * s) ** 2 - ((16 * hi + 7.5) * s) ** 2
        e = max(e, 0.0)
        r = max(r, 0.0)
        screen_err[n, 0] = np.float32(np.sqrt(e) * (1.0 + 1e-6))
        screen_err[n, 1] = np.float32(np.sqrt(r) * (1.0 + 1e-6))


# -- quantizers -------------------------------------------------------------------------------

INT8_DIVISORS = np.array([127, 128, 120, 124, 126, 112, 125, 123, 122, 121, 119, 118, 117, 116, 115, 114, 113],
                         dtype=np.float32)


@njit(parallel=True, cache=True)
def quantize_int8_rows(w, search, codes, scales):
    """Symmetric int8, a scale per 32: ``scale = max|w| / D``. ``search`` tries every divisor
    ``D`` in ``INT8_DIVISORS`` and keeps the least squared error (stopping at an exact one), which
    reproduces weights that are already block-quantized (GGUF Q8_0, Q5_0) exactly."""
    rows, cols = w.shape
    n_try = INT8_DIVISORS.shape[0] if search else 1
    for r in prange(rows):
        for g in range(cols // 32):
            base = g * 32
            amax = np.float32(0.0)
            for j in range(32):
                amax = max(amax, abs(w[r, base + j]))
            if amax == 0:
                scales[r, g] = 0.0
                for j in range(32):
                    codes[r, base + j] = 0
                continue
            best_s = amax / INT8_DIVISORS[0]
            best_e = np.inf
            for i in range(n_try):
                s = amax / INT8_DIVISORS[i]
                e = np.float32(0.0)
                for j in range(32):
                    c = min(127.0, max(-128.0, np.round(w[r, base + j] / s)))
                    d = c * s - w[r, base + j]
                    e += d * d
                if e < best_e:
                    best_e, best_s = e, s
                if e == 0:
                    break
            scales[r, g] = best_s
            for j in range(32):
                codes[r, base + j] = np.int8(min(127.0, max(-128.0, np.round(w[r, base + j] / best_s))))


@njit(inline="always")
def _fp16_grid(x):
    """``x`` (> 0) rounded to the nearest fp16 value (the largest finite one above its range)."""
    x = min(np.float64(x), 65504.0)
    step = max(2.0 ** (np.floor(np.log2(x)) - 10.0), 2.0 ** -24)
    return np.float32(np.round(x / step) * step)


@njit(inline="always")
def _super_scale(values, search):
    """A super-block's scale ``d`` (on the fp16 grid once multiplied by ``SUPER_SCALE``) for
    its groups' ``values`` (>= 0), with codes ``round(v / d)`` in 0..255: ``max / 255``; with
    ``search``, the largest ``max / c`` (c <= 255) that represents every value exactly, when one
    does (GGUF Q4_K's 6-bit sub-scales times an fp16 ``d``)."""
    top = values.max()
    if top <= 0:
        return np.float32(0.0)
    first = 255 if search else 0
    for c in range(first, 0, -1):
        d = _fp16_grid(top / c * SUPER_SCALE) / np.float32(SUPER_SCALE)
        exact = True
        for v in values:
            q = v / d
            if q > 255.5 or abs(q - np.round(q)) > 1e-4 * max(q, 1.0):
                exact = False
                break
        if exact:
            return np.float32(d)
    return _fp16_grid(top / 255 * SUPER_SCALE) / np.float32(SUPER_SCALE)


@njit(parallel=True, cache=True)
def quantize_int4_rows(w, search, codes, meta):
    """Asymmetric int4 in super-blocks (like Q4_K): per group of 32 a scale and a minimum
    (``w = q * scale + min``, ``q`` in 0..15, ``min <= 0``), each stored as an 8-bit multiple of
    its super-block's fp16 ``d`` / ``dmin`` (bytes: see :mod:`.qweight`); the codes are then
    rounded with the stored scales. ``search`` tries the grids whose span covers 8..14 steps per
    group and exact super-block scales, which reproduces GGUF Q4_K blocks."""
    rows, cols = w.shape
    groups = cols // 32
    n_super = (groups + 7) // 8
    for r in prange(rows):
        scales = np.zeros(n_super * 8, dtype=np.float32)
        lows = np.zeros(n_super * 8, dtype=np.float32)
        for g in range(groups):
            base = g * 32
            lo = np.float32(0.0)
            hi = w[r, base]
            for j in range(32):
                lo = min(lo, w[r, base + j])
                hi = max(hi, w[r, base + j])
            best_s = (hi - lo) / np.float32(15.0)
            if hi > lo and search:
                best_e = np.inf
                for k in range(15, 7, -1):
                    s = (hi - lo) / np.float32(k)
                    e = np.float32(0.0)
                    for j in range(32):
                        c = min(15.0, max(0.0, np.round((w[r, base + j] - lo) / s)))
                        d = c * s + lo - w[r, base + j]
                        e += d * d
                    if e < best_e:
                        best_e, best_s = e, s
                    if e == 0:
                        break
            scales[g] = max(best_s, np.float32(0.0))
            lows[g] = -lo
        for sb in range(n_super):
            d = _super_scale(scales[sb * 8:sb * 8 + 8], search)
            dmin = _super_scale(lows[sb * 8:sb * 8 + 8], search)
            _write_half(meta, r, sb * 20, d * np.float32(SUPER_SCALE))
            _write_half(meta, r, sb * 20 + 2, dmin * np.float32(SUPER_SCALE))
            for j in range(8):
                g = sb * 8 + j
                sc = 0 if d == 0 else min(255, int(np.round(scales[g] / d)))
                mn = 0 if dmin == 0 else min(255, int(np.round(lows[g] / dmin)))
                meta[r, sb * 20 + 4 + j] = sc
                meta[r, sb * 20 + 12 + j] = mn
                if g >= groups:
                    continue
                step = d * np.float32(sc)
                low = -dmin * np.float32(mn)
                inv = np.float32(0.0) if step == 0 else np.float32(1.0) / step
                base = g * 32
                for i in range(16):
                    a = min(15.0, max(0.0, np.round((w[r, base + i] - low) * inv)))
                    b = min(15.0, max(0.0, np.round((w[r, base + 16 + i] - low) * inv)))
                    codes[r, g * 16 + i] = np.uint8(a) | (np.uint8(b) << 4)


@njit(inline="always")
def _write_half(meta, r, at, x):
    """Store ``x`` (on the fp16 grid, >= 0, or 0) as fp16 bytes at ``meta[r, at:at + 2]``."""
    x = np.float64(x)
    if x == 0:
        meta[r, at] = 0
        meta[r, at + 1] = 0
        return
    e = int(np.floor(np.log2(x)))
    if e < -14:  # subnormal
        frac = int(np.round(x / 2.0 ** -24))
        bits = frac
    else:
        frac = int(np.round(x / 2.0 ** (e - 10))) - 1024
        if frac == 1024:
            frac, e = 0, e + 1
        bits = ((e + 15) << 10) | frac
    meta[r, at] = bits & 255
    meta[r, at + 1] = bits >> 8


# -- vocabulary head with top-k ----------------------------------------------------------------

@njit(inline="always")
def _push(vals, idx, v, i):
    """Insert (v, i) into a descending top-k list if it beats the last entry."""
    k = vals.shape[0]
    if v <= vals[k - 1]:
        return
    p = k - 1
    while p > 0 and vals[p - 1] < v:
        vals[p] = vals[p - 1]
        idx[p] = idx[p - 1]
        p -= 1
    vals[p] = v
    idx[p] = i


@njit(**_OPTS)
def _head_topk(x, w, k, parts, part_vals, part_idx):
    """Each part's top-k rows for every position ``t`` of ``x`` ``[T, hidden]`` (exact values)."""
    n_rows = w[0].shape[0]
    t_n = x.shape[0]
    per = (n_rows + parts - 1) // parts
    xa = quantize_activations_fine(x)
    for p in prange(parts):
        vals = np.full((t_n, k), NEG, dtype=np.float32)
        idx = np.zeros((t_n, k), dtype=np.int64)
        for n in range(p * per, min(n_rows, p * per + per)):
            for t in range(t_n):
                _push(vals[t], idx[t], row_dot(xa, t, w, n), n)
        part_vals[:, p, :] = vals
        part_idx[:, p, :] = idx


@njit(inline="always")
def _estimate(v, t, n, use_cols, col_err, x_col, estimates):
    """Record row ``n``'s estimate ``v`` for position ``t`` (plus the exact columns' share)."""
    if use_cols:
        v += dot8(col_err, n, x_col[t])
    estimates[t, n] = v


@njit(**_OPTS)
def _estimates_screen(xa, codes, low, scales, parts, use_cols, col_err, x_col, estimates):
    """Pass 1's estimates from the high plane (one function per pass: with the choice inside the
    row loop, the loop ran 30% slower). Positions go by pairs, each row read once for all of them:
    four at a time ran slower than two (the four-row kernel's registers spill)."""
    n_rows, t_n = codes.shape[0], estimates.shape[0]
    per = (n_rows + parts - 1) // parts
    for p in prange(parts):
        for n in range(p * per, min(n_rows, p * per + per)):
            t = 0
            while t + 2 <= t_n:
                e0, e1 = dot2_screen(xa, t, codes, low, scales, n)
                _estimate(e0, t, n, use_cols, col_err, x_col, estimates)
                _estimate(e1, t + 1, n, use_cols, col_err, x_col, estimates)
                t += 2
            if t < t_n:
                _estimate(dot_screen(xa, t, codes, low, scales, n), t, n, use_cols, col_err, x_col, estimates)


@njit(**_OPTS)
def _estimates_blocks(xa, codes, low, scales, use_cols, col_err, x_col, estimates):
    """:func:`_estimates_screen` sixteen rows at a time, the rows in the vector lanes
    (:func:`.simd_screen.screen_block`; 512-bit VNNI only): a block is transposed once for every
    position, then each position costs per group eight ``vpdpbusd`` for sixteen rows (the 270M's
    8-position screen: 41-62 ms by the row kernel, 18-24 ms so). Rows past the last whole block go
    one by one."""
    n_rows, t_n = codes.shape[0], estimates.shape[0]
    blocks = n_rows // SCREEN_ROWS
    chunks = max(1, min(blocks, 64))
    per = (blocks + chunks - 1) // chunks
    size = scratch_bytes(codes.shape[1] * 2 // 32)
    for c in prange(chunks):
        scratch = np.empty(size, dtype=np.uint8)
        for b in range(c * per, min(blocks, c * per + per)):
            screen_block(xa, codes, scales, b * SCREEN_ROWS, scratch, use_cols, col_err, x_col, estimates)
    for n in range(blocks * SCREEN_ROWS, n_rows):
        for t in range(t_n):
            _estimate(dot_screen(xa, t, codes, low, scales, n), t, n, use_cols, col_err, x_col, estimates)


@njit(**_OPTS)
def _estimates_full(xa, codes, low, scales, parts, estimates):
    """Pass 1's estimates from both planes (the exact weights, one-part activations)."""
    n_rows, t_n = codes.shape[0], estimates.shape[0]
    per = (n_rows + parts - 1) // parts
    for p in prange(parts):
        for n in range(p * per, min(n_rows, p * per + per)):
            t = 0
            while t + 4 <= t_n:
                estimates[t, n], estimates[t + 1, n], estimates[t + 2, n], estimates[t + 3, n] = \
                    dot4_planes(xa, t, codes, low, scales, n)
                t += 4
            if t + 2 <= t_n:
                estimates[t, n], estimates[t + 1, n] = dot2_planes(xa, t, codes, low, scales, n)
                t += 2
            if t < t_n:
                estimates[t, n] = dot_planes(xa, t, codes, low, scales, n)


@njit(fastmath=True, cache=True, nogil=True)
def _head_screen(x, w, k, parts, full, estimates, part_vals, part_idx, cols, col_err, screen_scales):
    """Pass 1 of the screened head, for every position ``t`` of ``x`` ``[T, hidden]`` at once (each
    row's bytes read once for all): every row's estimate, and each part's top-k of the estimates.
    The estimate multiplies one-part activations with the high nibble plane alone (half the bytes)
    or, with ``full``, with both planes (the exact weights). The screen takes the exact weights in
    the columns ``cols`` (the activations' largest, learned by :class:`ScreenPolicy`; at most
    ``EXACT_COLUMNS``), whose screen errors ``col_err[n, i] = W[n, cols[i]] - S[n, cols[i]]`` are
    stored aside: the error bound then covers the other columns only. The top-k are taken in a
    second sweep over the estimates (a contiguous fp32 row per position): kept in the product
    loop, their bookkeeping cost as much as the products of a verification's positions.
    ``screen_scales``: the scales the screen reads, ``w``'s own or the same values as fp16 bits
    (see :meth:`ScreenPolicy.screen_scales`). Two positions or more on 512-bit VNNI screen sixteen
    rows at a time (:func:`_estimates_blocks`) where the rows are short enough (``SCREEN_BLOCKS_WIDTH``)."""
    codes, scales, low, kind = w
    t_n = x.shape[0]
    xa = quantize_activations(x)
    use_cols = cols.shape[0] > 0 and not full
    x_col = np.zeros((t_n, EXACT_COLUMNS), dtype=np.float32)  # the one-part activations there
    for t in range(t_n):
        for i in range(cols.shape[0]):
            x_col[t, i] = np.float32(xa[0][t, cols[i]]) * xa[1][t, cols[i] // 32]
    if full:
        _estimates_full(xa, codes, low, scales, parts, estimates)
    elif WIDE and t_n >= SCREEN_BLOCKS_FROM and 2 * codes.shape[1] <= SCREEN_BLOCKS_WIDTH:
        _estimates_blocks(xa, codes, low, screen_scales, use_cols, col_err, x_col, estimates)
    else:
        _estimates_screen(xa, codes, low, screen_scales, parts, use_cols, col_err, x_col, estimates)
    _part_topk(estimates, k, parts, part_vals, part_idx)


@njit(**_OPTS)
def _part_topk(estimates, k, parts, part_vals, part_idx):
    """Each part's top-k of the estimates ``[T, rows]``, for every position."""
    t_n, n_rows = estimates.shape
    per = (n_rows + parts - 1) // parts
    for q in prange(parts * t_n):
        p, t = q // t_n, q % t_n
        vals = np.full(k, NEG, dtype=np.float32)
        idx = np.zeros(k, dtype=np.int64)
        row = estimates[t]
        for n in range(p * per, min(n_rows, p * per + per)):
            _push(vals, idx, row[n], n)
        part_vals[t, p, :] = vals
        part_idx[t, p, :] = idx


@njit(**_OPTS)
def _head_rescore(x, w, row_err, k, parts, full, estimates, threshold, part_vals, part_idx, part_count,
                  cols, screen_err):
    """Pass 2, for every position ``t``: the exact value (two-part activations ``x2``) of every row
    whose estimate (screen weights ``S``, or with ``full`` the weights ``W``, times one-part
    activations ``x1``) plus its error bound reaches ``threshold[t]``:
    ``|S x1 - W x2| <= |S| |x1 - x2| + |(S - W) x2|`` with ``|(S - W) x2| <= |S - W| |x2|``
    (Cauchy-Schwarz), and ``|W x1 - W x2| <= |W| |x1 - x2|``. ``row_err[n]`` holds ``|S_n - W_n|``,
    ``|S_n|`` and ``|W_n|``. Where the screen took the exact weights in columns ``cols``, ``S - W``
    is zero there: ``screen_err[n]`` holds ``|S_n - W_n|`` over the other columns and ``|S_n|``
    (with those columns exact), and ``|x2|`` is taken over the other columns too (``screen_err`` is
    ``row_err`` when ``cols`` is empty). Each part's exact top-k per position."""
    n_rows = w[0].shape[0]
    t_n = x.shape[0]
    per = (n_rows + parts - 1) // parts
    xa = quantize_activations_fine(x)
    xq, xq2, xd, xd2, _, _ = xa
    c_q, c_d, _ = quantize_activations(x)
    norm = np.zeros(t_n, dtype=np.float32)  # |x2| outside the exact columns
    gap = np.zeros(t_n, dtype=np.float32)  # |x1 - x2|
    exact_col = np.zeros(x.shape[1], dtype=np.bool_)
    if not full:
        for i in range(cols.shape[0]):
            exact_col[cols[i]] = True
    for t in range(t_n):
        for i in range(x.shape[1]):
            v = np.float32(xq[t, i]) * xd[t, i // 32] + np.float32(xq2[t, i]) * xd2[t, i // 32]
            if not exact_col[i]:
                norm[t] += v * v
            e = np.float32(c_q[t, i]) * c_d[t, i // 32] - v
            gap[t] += e * e
        norm[t] = np.sqrt(norm[t]) * np.float32(1.0001)
        gap[t] = np.sqrt(gap[t]) * np.float32(1.0001)
    for p in prange(parts):
        lo, hi = p * per, min(n_rows, p * per + per)
        rows = np.empty(max(0, hi - lo), dtype=np.int64)
        total = 0
        for t in range(t_n):
            vals = np.full(k, NEG, dtype=np.float32)
            idx = np.zeros(k, dtype=np.int64)
            c = 0
            for n in range(lo, hi):
                bound = gap[t] * row_err[n, 2] if full else norm[t] * screen_err[n, 0] + gap[t] * screen_err[n, 1]
                if estimates[t, n] + bound >= threshold[t]:
                    rows[c] = n
                    c += 1
            # the rows are scattered: fetch a few rows ahead (without, the loop waited on memory
            # latency, ~5 GB/s)
            for i in range(min(c, RESCORE_AHEAD)):
                _prefetch_weight_row(w, rows[i])
            for i in range(c):
                if i + RESCORE_AHEAD < c:
                    _prefetch_weight_row(w, rows[i + RESCORE_AHEAD])
                _push(vals, idx, row_dot(xa, t, w, rows[i]), rows[i])
            part_vals[t, p, :] = vals
            part_idx[t, p, :] = idx
            total += c
        part_count[p] = total


@njit(cache=True, fastmath=True)
def _exact_rows(x, w, ids, out):
    """``out[t, i]``: the exact value of row ``ids[t, i]`` for position ``t``."""
    xa = quantize_activations_fine(x)
    for t in range(ids.shape[0]):
        for i in range(ids.shape[1]):
            out[t, i] = row_dot(xa, t, w, ids[t, i])


@njit(cache=True, nogil=True)
def _merge_top(part_vals, part_idx, vals, ids):
    """Per position ``t``, the best ``k`` of every part's top-k into ``vals``/``ids`` ``[T, k]``,
    ties to the earlier part (a stable sort of the parts' lists, flattened in order)."""
    for t in range(part_vals.shape[0]):
        vals[t, :] = NEG
        ids[t, :] = 0
        for p in range(part_vals.shape[1]):
            for i in range(part_vals.shape[2]):
                _push(vals[t], ids[t], part_vals[t, p, i], part_idx[t, p, i])


def _top(part_vals, part_idx, k):
    """Per position, the best ``k`` of every part's top-k: ``(vals [T, k], ids [T, k])``."""
    vals = np.empty((part_vals.shape[0], k), dtype=np.float32)
    ids = np.empty((part_vals.shape[0], k), dtype=np.int64)
    _merge_top(part_vals, part_idx, vals, ids)
    return vals, ids


@njit(cache=True, nogil=True)
def _screened_topk(x, w, row_err, k, parts, full, estimates, cols, col_err, screen_err, screen_scales,
                   part_vals, part_idx, vals, ids):
    """Both passes of the screened head (see :func:`head_topk`) in one compiled call: pass 1, the
    exact values of each position's best estimates, the threshold (their k-th best, less a slack
    for the fp32 rounding of both sums: ~1e-6 relative, 1e-3 is far above it), pass 2, and the
    merge of the parts' exact top-k into ``vals``/``ids`` ``[T, k]``. Returns the rows pass 2
    computed exactly, over all positions."""
    t_n = x.shape[0]
    _head_screen(x, w, k, parts, full, estimates, part_vals, part_idx, cols, col_err, screen_scales)
    _merge_top(part_vals, part_idx, vals, ids)
    exact = np.empty(ids.shape, dtype=np.float32)
    _exact_rows(x, w, ids, exact)
    threshold = np.empty(t_n, dtype=np.float32)
    for t in range(t_n):
        kth = np.float64(np.min(exact[t]))  # the k-th best of the k
        threshold[t] = np.float32(kth - 1e-3 * (abs(kth) + 1.0))
    part_count = np.empty(parts, dtype=np.int64)
    _head_rescore(x, w, row_err, k, parts, full, estimates, threshold, part_vals, part_idx, part_count,
                  cols, screen_err)
    _merge_top(part_vals, part_idx, vals, ids)
    return part_count.sum()


_NO_COLUMNS = (np.empty(0, dtype=np.int64), np.zeros((1, EXACT_COLUMNS), dtype=np.float32))


class ScreenPolicy:
    """How the head of nibble planes runs its first pass, learned from the calls so far.

    The screen (high plane only) pays off when the logits are peaked (few rows within the error
    bound of the k-th best: the usual case for text); when they are flat (e.g. random tokens) nearly
    every row needs its exact value, and the full pass (both planes, one-part activations, a bound
    ~100x tighter) is cheaper. After a screen that had to compute more than ``MAX_FRACTION`` of the
    rows exactly, the next ``BACKOFF`` calls use the full pass, then the screen is tried again.

    The bound is Cauchy-Schwarz over the columns, and a model's final hidden states put most of
    their energy in a few columns (the 270M: 8 of 640 columns hold about half of it, the same
    columns from token to token). So after ``LEARN_CALLS`` calls the policy takes the
    ``EXACT_COLUMNS`` columns of largest mean square and stores the screen's errors there aside
    (:func:`screen_columns`): the screen is exact there, and its bound shrinks to the rest (on the
    270M: from ~7% of the rows rescored to well under 1%). Which columns only affects speed; the
    result stays exact."""

    MAX_FRACTION = 0.2
    BACKOFF = 16
    LEARN_CALLS = 8

    def __init__(self) -> None:
        self.skip = 0
        self.screened = self.full = 0  # calls, for statistics
        self.rescored = 0  # rows computed exactly by pass 2, over all screened calls
        self._energy = None
        self._calls = 0
        self.cols, self.col_err = _NO_COLUMNS
        self.screen_err = None
        self.screen_scale_table = None  # what the screen reads as scales, once chosen (screen_scales)

    def screen_scales(self, w):
        """The scales the screen reads: when every scale of the head is an fp16 value (a GGUF
        Q8_0 head, as the embedded 270M's), a copy as fp16 bits, made once: the same values in
        half the bytes (10.5 of the 113 MB the 270M's screen reads); else the head's fp32 scales."""
        if self.screen_scale_table is None:
            scales = w[1]
            with np.errstate(over="ignore"):  # a scale beyond fp16's range: not exact, kept fp32
                half = scales.astype(np.float16)
            exact = bool(np.array_equal(half.astype(np.float32), scales))
            self.screen_scale_table = half.view(np.uint16) if exact else scales
        return self.screen_scale_table

    def use_screen(self) -> bool:
        if self.skip > 0:
            self.skip -= 1
            self.full += 1
            return False
        self.screened += 1
        return True

    def columns(self, x, w, row_err):
        """``(cols, col_err, screen_err)`` for this call (:func:`_head_screen`); learns from ``x``."""
        if self.screen_err is None:
            sq = np.square(x.astype(np.float64)).sum(0)
            self._energy = sq if self._energy is None else self._energy + sq
            self._calls += 1
            if self._calls >= self.LEARN_CALLS and x.shape[1] > EXACT_COLUMNS:
                cols = np.sort(np.argsort(-self._energy, kind="stable")[:EXACT_COLUMNS]).astype(np.int64)
                codes, scales, low, _ = w
                col_err = np.empty((codes.shape[0], EXACT_COLUMNS), dtype=np.float32)
                screen_err = np.empty((codes.shape[0], 2), dtype=np.float32)
                screen_columns(codes, low, scales, cols, col_err, screen_err)
                self.cols, self.col_err, self.screen_err = cols, col_err, screen_err
        return self.cols, self.col_err, (row_err if self.screen_err is None else self.screen_err)

    def observe(self, exact_rows: int, n_rows: int, screened: bool) -> None:
        if screened:
            self.rescored += exact_rows
            if exact_rows > self.MAX_FRACTION * n_rows:
                self.skip = self.BACKOFF


def head_topk(x, w, k: int, cap: float | None, parts: int = 64, row_err=None, policy: ScreenPolicy | None = None):
    """Top-``k`` ``(values [T, k], ids [T, k])`` of ``softcap(x @ W^T)`` for each position of ``x``
    ``[T, hidden]``, the activations quantized in int8 parts as every product's (see :mod:`.simd`).

    A head in the nibble-plane layout (``row_err`` given) runs two passes: pass 1 estimates every
    row cheaply for every position (one-part activations; the high plane only, or both planes, see
    :class:`ScreenPolicy`; each row read once for all positions), the exact values of each
    position's best estimates set its threshold (the k-th best of them), and pass 2 computes
    exactly only the rows whose estimate plus error bound reaches it. Every other row is provably
    below the k-th best exact value, so the result is exactly the top-k of the full product.
    ``policy`` (kept per head) chooses the first pass and the screen's exact columns."""
    n_rows = w[0].shape[0]
    t_n = x.shape[0]
    parts = max(1, min(parts, n_rows // max(k, 1)))
    part_vals = np.empty((t_n, parts, k), dtype=np.float32)
    part_idx = np.empty((t_n, parts, k), dtype=np.int64)
    if row_err is not None:
        screen = policy is None or policy.use_screen()
        cols, col_err, screen_err = policy.columns(x, w, row_err) if policy is not None else (*_NO_COLUMNS, row_err)
        estimates = np.empty((t_n, n_rows), dtype=np.float32)
        vals = np.empty((t_n, k), dtype=np.float32)
        ids = np.empty((t_n, k), dtype=np.int64)
        screen_scales = w[1] if policy is None else policy.screen_scales(w)
        rescored = _screened_topk(np.ascontiguousarray(x, dtype=np.float32), w, row_err, k, parts, not screen,
                                  estimates, cols, col_err, screen_err, screen_scales, part_vals, part_idx, vals, ids)
        if policy is not None:
            policy.observe(int(rescored) // t_n, n_rows, screen)
    else:
        _head_topk(x, w, k, parts, part_vals, part_idx)
        vals, ids = _top(part_vals, part_idx, k)
    if cap is not None:
        vals = (np.tanh(vals / cap) * cap).astype(np.float32)
    return vals, ids


# -- decode attention --------------------------------------------------------------------------

@njit(inline="always")
def _split_count(n, splits):
    """Key ranges for ``n`` keys: ``splits`` when given (> 0), else one per 64 keys (1 to 16)."""
    return splits if splits > 0 else max(1, min(16, n // 64))


@njit(inline="always", fastmath=True)
def rope_in_place(x, cos, sin):
    """Rotate-half RoPE of one head ``x`` (dim ``j`` pairs with ``j + d/2``) for the first
    ``len(cos)`` pairs; the other dims pass through."""
    half = x.shape[0] // 2
    for j in range(cos.shape[0]):
        a = x[j]
        b = x[half + j]
        x[j] = a * cos[j] - b * sin[j]
        x[half + j] = b * cos[j] + a * sin[j]


def _is_int8(arr):
    """Whether ``arr`` holds int8 (a constant of the compiled code)."""
    return arr.dtype == np.int8


@overload(_is_int8)
def _is_int8_typed(arr):
    value = arr.dtype == types.int8
    return lambda arr: value


@njit(inline="always", fastmath=True)
def exp_fast(ex_x):
    """``exp`` of fp32 in arithmetic the loop vectorizer turns into vector code (numba's ``np.exp``
    is a libm call per element, about 6 ns): Cody-Waite reduction by ln 2 and Cephes' degree-6
    polynomial, relative error below 3e-7. Inputs below ``EXP_FLOOR`` give 0: a softmax weight
    under 1.6e-28 of the block's largest adds nothing at fp32 precision, and one near fp32's
    smallest normal number, times an int8 row's scale, made subnormal products that ran the
    int8 attention 3x slower (Intel's microcode assists)."""
    if ex_x < EXP_FLOOR:
        return np.float32(0.0)
    ex_x = min(ex_x, np.float32(88.0))
    ex_n = np.floor(ex_x * np.float32(1.4426950408889634) + np.float32(0.5))
    ex_f = ex_x - ex_n * np.float32(0.693359375)
    ex_f = ex_f - ex_n * np.float32(-2.12194440e-4)
    ex_p = np.float32(1.9875691500e-4)
    ex_p = ex_p * ex_f + np.float32(1.3981999507e-3)
    ex_p = ex_p * ex_f + np.float32(8.3334519073e-3)
    ex_p = ex_p * ex_f + np.float32(4.1665795894e-2)
    ex_p = ex_p * ex_f + np.float32(1.6666665459e-1)
    ex_p = ex_p * ex_f + np.float32(5.0000001201e-1)
    ex_p = ex_p * ex_f * ex_f + ex_f + np.float32(1.0)
    return ex_p * pow2(ex_n)


@njit(**_OPTS)
def _decode_attention(q, kd, vd, ksc, vsc, ks, vs, skips, ns, scale, cap, splits, kw, kcos, ksin, rope_rows, out):
    """Query positions ``q`` ``[T, Hq, D]`` over keys stored in chunks: query ``t``'s key ``i``
    (0..ns[t]-1) is row ``(skip[t] + i) % chunk`` of chunk ``ks[(skips[t] + i) // chunk]`` of ``kd``
    ``[chunks, chunk, Hkv, D]`` (V likewise). Each query's keys are split in ranges
    (:func:`_split_count`, from its own number of keys; flash-decoding). A job takes one range for
    every KV head, so it reads the range's K and V rows in storage order (a key's heads are
    contiguous; one head's keys are ``Hkv * D`` apart, a stride the prefetchers followed at a third
    of the memory's rate), and keeps a running max, sum and unnormalized output for every query
    head (each K/V row read once for the query heads of its group). Keys go by blocks of
    ``ATTENTION_BLOCK``: their scores, one rescale, then their values. The parts are merged into
    ``out`` ``[T, Hq, Dv]``. All positions' jobs run in one parallel loop (a verification's
    positions in one call), and a job computes the same bits whatever the other positions are: a
    position's output is the one a decode step alone would get.

    A K=V layer (``kw`` not empty) stores only V; each key is rebuilt from its value row as the
    model defines it, ``rope(v * kw)`` (rotate-half over the first ``kcos.shape[1]`` pairs), with
    query ``t``'s key ``i`` at row ``rope_rows[t] + i`` of the cos/sin tables ``kcos``/``ksin``:
    once per key for all query heads, instead of a gathered copy of every key each step.

    An int8 cache (``kd``/``vd`` int8) stores each row's scale in ``ksc``/``vsc`` ``[chunks,
    chunk, Hkv]``: a key's scale multiplies its score, a value's scale its softmax weight (fp32
    rows ignore them: any ``[1, 1, 1]`` array)."""
    t_n, hq, d = q.shape
    chunk = kd.shape[1]
    hkv = kd.shape[2]
    dv = vd.shape[3]
    groups = hq // hkv
    quantized = _is_int8(kd)
    parts = np.empty(t_n, dtype=np.int64)
    s_max = 1
    jobs = 0
    for t in range(t_n):
        parts[t] = _split_count(ns[t], splits)
        s_max = max(s_max, parts[t])
        jobs += parts[t]
    job_t = np.empty(jobs, dtype=np.int64)  # job -> (position, its key range)
    job_r = np.empty(jobs, dtype=np.int64)
    j = 0
    for t in range(t_n):
        for r in range(parts[t]):
            job_t[j] = t
            job_r[j] = r
            j += 1
    m_p = np.empty((t_n, s_max, hq), dtype=np.float32)
    l_p = np.empty((t_n, s_max, hq), dtype=np.float32)
    acc = np.empty((t_n, s_max, hq, dv), dtype=np.float32)
    for job in prange(jobs):
        t = job_t[job]
        sp = job_r[job]
        n = ns[t]
        skip = skips[t]
        per = (n + parts[t] - 1) // parts[t]
        m = np.full(hq, NEG, dtype=np.float32)
        l_sum = np.zeros(hq, dtype=np.float32)
        a = np.zeros((hq, dv), dtype=np.float32)
        p = np.empty((hq, ATTENTION_BLOCK), dtype=np.float32)
        rebuilt = np.empty((ATTENTION_BLOCK, hkv, d), dtype=np.float32)
        i = sp * per
        end = min(n, sp * per + per)
        while i < end:  # a block of keys of one chunk: scores, one rescale, then the values
            c = (skip + i) // chunk
            off = (skip + i) % chunk
            nb = min(ATTENTION_BLOCK, end - i, chunk - off)
            kc = ks[c]
            vc = vs[c]
            kq = ksc[min(kc, ksc.shape[0] - 1)]  # this chunk's row scales (int8 rows)
            vq = vsc[min(vc, vsc.shape[0] - 1)]
            if kw.shape[0] > 0:  # K=V: the block's keys from their value rows
                for b in range(nb):
                    row = rope_rows[t] + i + b
                    for h in range(hkv):
                        krow = kd[kc, off + b, h]
                        kr = rebuilt[b, h]
                        row_scale = kq[off + b, h] if quantized else np.float32(1.0)
                        for j in range(d):
                            kr[j] = krow[j] * row_scale * kw[j]
                        rope_in_place(kr, kcos[row], ksin[row])
                for h in range(hkv):
                    block_scores(q[t], h * groups, (h + 1) * groups, rebuilt, kq, 0, nb, h, scale, p)
            else:
                for h in range(hkv):
                    block_scores(q[t], h * groups, (h + 1) * groups, kd[kc], kq, off, nb, h, scale, p)
            if cap > 0:
                for qh in range(hq):
                    for b in range(nb):
                        p[qh, b] = np.tanh(p[qh, b] / cap) * cap
            for qh in range(hq):
                top = m[qh]
                for b in range(nb):
                    top = max(top, p[qh, b])
                if top > m[qh]:  # a new maximum: rescale what is accumulated
                    r = np.exp(m[qh] - top)
                    l_sum[qh] *= r
                    for j in range(dv):
                        a[qh, j] *= r
                    m[qh] = top
                for b in range(nb):
                    e = exp_fast(p[qh, b] - top)
                    p[qh, b] = e
                    l_sum[qh] += e
            for h in range(hkv):
                block_values(a, h * groups, (h + 1) * groups, p, nb, vd[vc], vq, off, h)
            i += nb
        m_p[t, sp] = m
        l_p[t, sp] = l_sum
        acc[t, sp] = a
    for t in range(t_n):
        for qh in range(hq):
            top = NEG
            for sp in range(parts[t]):
                top = max(top, m_p[t, sp, qh])
            total = np.float32(0.0)
            o = out[t, qh]
            o[:] = 0.0
            for sp in range(parts[t]):
                if l_p[t, sp, qh] == 0.0:
                    continue
                r = np.exp(m_p[t, sp, qh] - top)
                total += l_p[t, sp, qh] * r
                for j in range(dv):
                    o[j] += acc[t, sp, qh, j] * r
            for j in range(dv):
                o[j] /= total


_NO_KEYS_FROM = (np.zeros(0, dtype=np.float32), np.zeros((1, 1), dtype=np.float32),
                 np.zeros((1, 1), dtype=np.float32))
_NO_SCALES = np.ones((1, 1, 1), dtype=np.float32)


def decode_attention_positions(q, kd, vd, ks, vs, skips, ns, scale: float, cap: float | None, splits: int = 0,
                               keys_from=None, scales=None):
    """Decode attention of several query positions ``q`` ``[T, Hq, D]`` over a chunked cache (see
    :meth:`KVCache.chunk_view`), query ``t`` over the ``ns[t]`` keys from row ``skips[t]``, in one
    call (``splits``: key ranges, 0 for the default). ``keys_from``: for a K=V layer (``kd`` is then
    ``vd``), ``(kw, cos, sin, rows)``: the key norm's weight and the RoPE tables of the keys, query
    ``t``'s first key at table row ``rows[t]``. An int8 cache (``kd``/``vd`` int8) passes its rows'
    scales, ``scales = (k_scales, v_scales)``, each ``[chunks, chunk, Hkv]``. Returns ``[T, Hq,
    Dv]``."""
    out = np.empty((q.shape[0], q.shape[1], vd.shape[3]), dtype=np.float32)
    if keys_from is None:
        kw, kcos, ksin = _NO_KEYS_FROM
        rows = np.zeros(q.shape[0], dtype=np.int64)
    else:
        kw, kcos, ksin, rows = keys_from
        rows = np.asarray(rows, dtype=np.int64)
    ksc, vsc = (_NO_SCALES, _NO_SCALES) if scales is None else scales
    if (kd.dtype == np.int8) != (scales is not None):
        raise ValueError("int8 K/V rows come with their scales, and only they do")
    _decode_attention(q, kd, vd, ksc, vsc, ks, vs, np.asarray(skips, dtype=np.int64), np.asarray(ns, dtype=np.int64),
                      np.float32(scale), np.float32(cap or 0.0), splits, kw, kcos, ksin, rows, out)
    return out


def decode_attention_chunks(q, kd, vd, ks, vs, skip: int, n: int, scale: float, cap: float | None, splits: int = 0):
    """Decode attention of one query ``q`` ``[Hq, D]`` over a chunked cache. Returns ``[Hq, Dv]``."""
    return decode_attention_positions(q[None], kd, vd, ks, vs, [skip], [n], scale, cap, splits)[0]


_ONE_CHUNK = np.zeros(1, dtype=np.int64)


def decode_attention_rows(q, k, v, los, his, scale: float, cap: float | None, splits: int = 0):
    """Query positions ``q`` ``[T, Hq, D]`` over contiguous ``k``/``v`` ``[Hkv, Tk, D]`` (fp32), query
    ``t`` over keys ``los[t] .. his[t] - 1``: the same kernel, reading them as one chunk. Returns
    ``[T, Hq, Dv]``."""
    kd = np.ascontiguousarray(k.transpose(1, 0, 2))[None]  # [1, Tk, Hkv, D]: one chunk's layout
    vd = np.ascontiguousarray(v.transpose(1, 0, 2))[None]
    ns = [max(hi - lo, 0) for lo, hi in zip(los, his)]
    return decode_attention_positions(q, kd, vd, _ONE_CHUNK, _ONE_CHUNK, los, ns, scale, cap, splits)


def decode_attention(q, k, v, lo: int, hi: int, scale: float, cap: float | None, splits: int = 0):
    """:func:`decode_attention_rows` of one query position ``q`` ``[Hq, D]``. Returns ``[Hq, Dv]``."""
    return decode_attention_rows(q[None], k, v, [lo], [hi], scale, cap, splits)[0]


def compiled_kernels() -> tuple:
    """This module's compiled kernels that Python calls directly (see :mod:`.warmup`)."""
    return (quantize_int8_rows, quantize_int4_rows, split_int8_planes, screen_columns, gemm, gate_up_gelu, embed_rows,
            dequant_rows_int8, dequant_rows_int4, _head_topk, _merge_top, _screened_topk, _decode_attention)


@njit(parallel=True, fastmath=True, cache=True)
def read_sum(lines, parts):
    """Sum of a large fp32 array viewed as 64-byte lines ``[n, 16]``, read once in ``parts``
    parallel strips, each fetching ahead as the kernels do (``simd.PREFETCH``): a memory-read
    benchmark. (A plain loop let the hardware prefetcher set the pace and measured 8-10% less than
    the decode kernels then reached.)"""
    n = lines.shape[0]
    per = (n + parts - 1) // parts
    ahead = PREFETCH // 64
    sums = np.zeros(parts, dtype=np.float32)
    for p in prange(parts):
        acc = np.zeros(16, dtype=np.float32)
        for i in range(p * per, min(n, p * per + per)):
            prefetch_row(lines, min(i + ahead, n - 1))
            for j in range(16):
                acc[j] += lines[i, j]
        sums[p] = acc.sum()
    return sums.sum()


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of ``repeats`` parallel reads of an ``nbytes`` array
    (far larger than the caches), with numba's current thread count."""
    import time

    a = np.ones((nbytes // 64, 16), dtype=np.float32)
    read_sum(a[:64], 2)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        read_sum(a, 64)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best
