"""Fused CPU kernels in numba for int8/int4 weights (layouts: :mod:`gemma4_nb.quant`).

Every kernel is ``njit(parallel=True, fastmath=True, cache=True)``: compiled on first use and
cached on disk next to this file (or in ``$NUMBA_CACHE_DIR``), so a restarted kernel loads the
machine code instead of compiling again. Arguments are plain numpy arrays (fp32 activations);
the thin wrappers in :mod:`gemma4_nb.kernels.ops` convert from torch without copying.

* ``gemm_int8`` / ``gemm_int4``: ``out[t, n] = sum_k x[t, k] * W[n, k]`` with the dequantization
  fused into the dot product; parallel over output rows, each weight row read once for all ``t``
  (matrix-vector at decode, small matrix-matrix for speculative verification).
* ``rms_gemm_*``: RMSNorm of ``x`` fused into the projection that follows.
* ``gate_up_gelu_*``: ``gelu_tanh(x W_gate^T) * (x W_up^T)`` in one pass over both matrices.
* ``decode_attention``: one query position, grouped-query attention with an online softmax; each
  K/V row is read once for all query heads sharing it; the key range is split across threads and
  the partial softmaxes merged (flash-decoding).
* ``head_topk_*``: the vocabulary head fused with top-k selection (softcap is monotonic, so it is
  applied to the k winners only): the logits are never materialized.
* ``dequant_rows_*``: rows of a weight to fp32 (prefill multiplies in blocks with torch's GEMM).
"""

from __future__ import annotations

import os

import numba
import numpy as np
from numba import njit, prange

# numba's default OpenMP layer keeps its threads spinning after every parallel region; between the
# ~100 kernel calls of a decode step they then compete with the interpreter and torch for the
# cores (measured on 2 shared cores: a 270M decode step's layers took 1.9 s with OpenMP, 0.33 s with
# the work queue). The work queue layer sleeps instead. It must not be entered by two threads at
# once, which the runtime never does (one generation at a time). NUMBA_THREADING_LAYER overrides.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

_OPTS = dict(parallel=True, fastmath=True, cache=True, nogil=True)
# fastmath lets LLVM assume no infinities, so "minus infinity" is a finite sentinel here
NEG = np.float32(-3.0e38)


# -- matrix products ---------------------------------------------------------------------------

@njit(inline="always", fastmath=True)
def _int8_row_dot(x, t, codes, scales, n):
    """Row ``n`` of an int8 weight (a scale per 32) dotted with ``x[t]``. One flat loop: LLVM
    vectorizes it (a nested 32-step loop gets unrolled instead, 4x slower)."""
    a = np.float32(0.0)
    for k in range(x.shape[1]):
        a += x[t, k] * np.float32(codes[n, k]) * scales[n, k >> 5]
    return a


@njit(**_OPTS)
def gemm_int8(x, codes, scales, out):
    t_n = x.shape[0]
    for n in prange(codes.shape[0]):
        for t in range(t_n):
            out[t, n] = _int8_row_dot(x, t, codes, scales, n)


@njit(inline="always", fastmath=True)
def _int4_inputs(x):
    """``x`` split into the halves that meet the low and the high nibbles (weight ``j`` and
    ``j + 16`` of each group), and its sum per group (for the minimums)."""
    t_n, k_n = x.shape
    g_n = k_n // 32
    xlo = np.empty((t_n, k_n // 2), dtype=np.float32)
    xhi = np.empty((t_n, k_n // 2), dtype=np.float32)
    xs = np.empty((t_n, g_n), dtype=np.float32)
    for t in range(t_n):
        for g in range(g_n):
            a = np.float32(0.0)
            for j in range(16):
                xlo[t, g * 16 + j] = x[t, g * 32 + j]
                xhi[t, g * 16 + j] = x[t, g * 32 + 16 + j]
                a += x[t, g * 32 + j] + x[t, g * 32 + 16 + j]
            xs[t, g] = a
    return xlo, xhi, xs


@njit(inline="always", fastmath=True)
def _int4_row_dot(xlo, xhi, xs, t, codes, scales, mins, n):
    """Row ``n`` of an int4 weight dotted with ``x[t]``: sum_g d_g sum_j q_j x_j + m_g sum_j x_j.
    Low and high nibbles in two flat loops (the row is in L1 for the second): 2-3x faster than
    one loop doing both, which LLVM does not vectorize as well."""
    a = np.float32(0.0)
    for b in range(codes.shape[1]):
        a += xlo[t, b] * np.float32(np.int32(codes[n, b]) & 15) * scales[n, b >> 4]
    h = np.float32(0.0)
    for b in range(codes.shape[1]):
        h += xhi[t, b] * np.float32(np.int32(codes[n, b]) >> 4) * scales[n, b >> 4]
    m = np.float32(0.0)
    for g in range(scales.shape[1]):
        m += mins[n, g] * xs[t, g]
    return a + h + m


@njit(**_OPTS)
def gemm_int4(x, codes, scales, mins, out):
    xlo, xhi, xs = _int4_inputs(x)
    t_n = x.shape[0]
    for n in prange(codes.shape[0]):
        for t in range(t_n):
            out[t, n] = _int4_row_dot(xlo, xhi, xs, t, codes, scales, mins, n)


@njit(inline="always", fastmath=True)
def _rms_rows(x, norm_w, offset, eps):
    t_n, k_n = x.shape
    y = np.empty((t_n, k_n), dtype=np.float32)
    for t in range(t_n):
        ss = np.float32(0.0)
        for k in range(k_n):
            ss += x[t, k] * x[t, k]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(k_n) + np.float32(eps))
        for k in range(k_n):
            y[t, k] = x[t, k] * inv * (norm_w[k] + np.float32(offset))
    return y


@njit(**_OPTS)
def rms_gemm_int8(x, norm_w, offset, eps, codes, scales, out):
    y = _rms_rows(x, norm_w, offset, eps)
    for n in prange(codes.shape[0]):
        for t in range(y.shape[0]):
            out[t, n] = _int8_row_dot(y, t, codes, scales, n)


@njit(**_OPTS)
def rms_gemm_int4(x, norm_w, offset, eps, codes, scales, mins, out):
    y = _rms_rows(x, norm_w, offset, eps)
    ylo, yhi, ys = _int4_inputs(y)
    for n in prange(codes.shape[0]):
        for t in range(y.shape[0]):
            out[t, n] = _int4_row_dot(ylo, yhi, ys, t, codes, scales, mins, n)


@njit(inline="always", fastmath=True)
def _gelu_tanh(g):
    c = np.float32(0.7978845608028654)  # sqrt(2 / pi)
    return np.float32(0.5) * g * (np.float32(1.0) + np.tanh(c * (g + np.float32(0.044715) * g * g * g)))


@njit(**_OPTS)
def gate_up_gelu_int8(x, gate_c, gate_s, up_c, up_s, out):
    for n in prange(gate_c.shape[0]):
        for t in range(x.shape[0]):
            a = _int8_row_dot(x, t, gate_c, gate_s, n)
            b = _int8_row_dot(x, t, up_c, up_s, n)
            out[t, n] = _gelu_tanh(a) * b


@njit(**_OPTS)
def gate_up_gelu_int4(x, gate_c, gate_s, gate_m, up_c, up_s, up_m, out):
    xlo, xhi, xs = _int4_inputs(x)
    for n in prange(gate_c.shape[0]):
        for t in range(x.shape[0]):
            a = _int4_row_dot(xlo, xhi, xs, t, gate_c, gate_s, gate_m, n)
            b = _int4_row_dot(xlo, xhi, xs, t, up_c, up_s, up_m, n)
            out[t, n] = _gelu_tanh(a) * b


@njit(**_OPTS)
def dequant_rows_int8(codes, scales, r0, out):
    for i in prange(out.shape[0]):
        for k in range(out.shape[1]):
            out[i, k] = np.float32(codes[r0 + i, k]) * scales[r0 + i, k // 32]


@njit(**_OPTS)
def dequant_rows_int4(codes, scales, mins, r0, out):
    for i in prange(out.shape[0]):
        n = r0 + i
        for g in range(scales.shape[1]):
            d = scales[n, g]
            m = mins[n, g]
            for j in range(16):
                b = codes[n, g * 16 + j]
                out[i, g * 32 + j] = np.float32(b & 15) * d + m
                out[i, g * 32 + 16 + j] = np.float32(b >> 4) * d + m


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


@njit(parallel=True, cache=True)
def quantize_int4_rows(w, search, codes, scales, mins):
    """Asymmetric int4, a scale and a minimum per 32 (like Q4_1): ``w = q * scale + min``,
    ``q`` in 0..15. ``search`` also tries the grids whose span covers 8..14 steps and keeps the
    least squared error, which reproduces GGUF Q4_K blocks exactly."""
    rows, cols = w.shape
    for r in prange(rows):
        for g in range(cols // 32):
            base = g * 32
            lo = w[r, base]
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
            scales[r, g] = best_s
            mins[r, g] = lo
            inv = np.float32(0.0) if best_s == 0 else np.float32(1.0) / best_s
            for j in range(16):
                a = min(15.0, max(0.0, np.round((w[r, base + j] - lo) * inv)))
                b = min(15.0, max(0.0, np.round((w[r, base + 16 + j] - lo) * inv)))
                codes[r, g * 16 + j] = np.uint8(a) | (np.uint8(b) << 4)


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
def _head_topk_int8(x, codes, scales, k, parts, part_vals, part_idx):
    n_rows = codes.shape[0]
    per = (n_rows + parts - 1) // parts
    for p in prange(parts):
        vals = np.full(k, NEG, dtype=np.float32)
        idx = np.zeros(k, dtype=np.int64)
        for n in range(p * per, min(n_rows, p * per + per)):
            _push(vals, idx, _int8_row_dot(x, 0, codes, scales, n), n)
        part_vals[p, :] = vals
        part_idx[p, :] = idx


@njit(**_OPTS)
def _head_topk_int4(x, codes, scales, mins, k, parts, part_vals, part_idx):
    n_rows = codes.shape[0]
    per = (n_rows + parts - 1) // parts
    xlo, xhi, xs = _int4_inputs(x)
    for p in prange(parts):
        vals = np.full(k, NEG, dtype=np.float32)
        idx = np.zeros(k, dtype=np.int64)
        for n in range(p * per, min(n_rows, p * per + per)):
            _push(vals, idx, _int4_row_dot(xlo, xhi, xs, 0, codes, scales, mins, n), n)
        part_vals[p, :] = vals
        part_idx[p, :] = idx


def head_topk(x, codes, scales, mins, fmt: str, k: int, cap: float | None, parts: int = 64):
    """Top-``k`` (values, ids) of ``softcap(x @ W^T)`` for one position ``x`` ``[1, hidden]``."""
    parts = max(1, min(parts, codes.shape[0] // max(k, 1)))
    part_vals = np.empty((parts, k), dtype=np.float32)
    part_idx = np.empty((parts, k), dtype=np.int64)
    if fmt == "int4":
        _head_topk_int4(x, codes, scales, mins, k, parts, part_vals, part_idx)
    else:
        _head_topk_int8(x, codes, scales, k, parts, part_vals, part_idx)
    flat_v, flat_i = part_vals.ravel(), part_idx.ravel()
    order = np.argsort(-flat_v, kind="stable")[:k]
    vals, ids = flat_v[order], flat_i[order]
    if cap is not None:
        vals = (np.tanh(vals / cap) * cap).astype(np.float32)
    return vals, ids


# -- decode attention --------------------------------------------------------------------------

@njit(**_OPTS)
def _decode_attention_parts(q, k, v, lo, hi, scale, cap, splits, m_out, l_out, acc_out):
    """q ``[Hq, D]``; k, v ``[Hkv, Tk, Dv]``; keys ``lo..hi-1`` visible. Writes per (kv head,
    split) the running max, sum and unnormalized output of each query head in the group."""
    hq, d = q.shape
    hkv, tk, dv = v.shape
    groups = hq // hkv
    span = hi - lo
    per = (span + splits - 1) // splits
    for job in prange(hkv * splits):
        h = job // splits
        sp = job % splits
        a = lo + sp * per
        b = min(hi, a + per)
        for g in range(groups):
            m_out[h, sp, g] = NEG
            l_out[h, sp, g] = 0.0
            for j in range(dv):
                acc_out[h, sp, g, j] = 0.0
        for t in range(a, b):
            for g in range(groups):
                qh = h * groups + g
                s = np.float32(0.0)
                for j in range(d):
                    s += q[qh, j] * k[h, t, j]
                s *= scale
                if cap > 0:
                    s = np.tanh(s / cap) * cap
                m_old = m_out[h, sp, g]
                if s > m_old:
                    c = np.exp(m_old - s)
                    l_out[h, sp, g] = l_out[h, sp, g] * c + 1.0
                    for j in range(dv):
                        acc_out[h, sp, g, j] = acc_out[h, sp, g, j] * c + v[h, t, j]
                    m_out[h, sp, g] = s
                else:
                    p = np.exp(s - m_old)
                    l_out[h, sp, g] += p
                    for j in range(dv):
                        acc_out[h, sp, g, j] += p * v[h, t, j]


@njit(**_OPTS)
def _decode_attention_chunks(q, kd, vd, ks, vs, skip, n, scale, cap, splits, m_out, l_out, acc_out):
    """As :func:`_decode_attention_parts`, reading K/V straight from the cache's chunk pools:
    key ``i`` (0..n-1) is row ``(skip + i) % chunk`` of chunk ``ks[(skip + i) // chunk]``."""
    hq, d = q.shape
    chunk = kd.shape[1]
    hkv = kd.shape[2]
    dv = vd.shape[3]
    groups = hq // hkv
    per = (n + splits - 1) // splits
    for job in prange(hkv * splits):
        h = job // splits
        sp = job % splits
        a = sp * per
        b = min(n, a + per)
        for g in range(groups):
            m_out[h, sp, g] = NEG
            l_out[h, sp, g] = 0.0
            for j in range(dv):
                acc_out[h, sp, g, j] = 0.0
        for i in range(a, b):
            c = (skip + i) // chunk
            off = (skip + i) % chunk
            kc = ks[c]
            vc = vs[c]
            for g in range(groups):
                qh = h * groups + g
                s = np.float32(0.0)
                for j in range(d):
                    s += q[qh, j] * kd[kc, off, h, j]
                s *= scale
                if cap > 0:
                    s = np.tanh(s / cap) * cap
                m_old = m_out[h, sp, g]
                if s > m_old:
                    cr = np.exp(m_old - s)
                    l_out[h, sp, g] = l_out[h, sp, g] * cr + 1.0
                    for j in range(dv):
                        acc_out[h, sp, g, j] = acc_out[h, sp, g, j] * cr + vd[vc, off, h, j]
                    m_out[h, sp, g] = s
                else:
                    p = np.exp(s - m_old)
                    l_out[h, sp, g] += p
                    for j in range(dv):
                        acc_out[h, sp, g, j] += p * vd[vc, off, h, j]


def decode_attention_chunks(q, kd, vd, ks, vs, skip: int, n: int, scale: float, cap: float | None, splits: int = 0):
    """Decode attention over a chunked cache (see :meth:`KVCache.chunk_view`). Returns ``[Hq, Dv]``."""
    hkv, dv = kd.shape[2], vd.shape[3]
    if splits <= 0:
        splits = max(1, min(16, n // 64))
    groups = q.shape[0] // hkv
    m = np.empty((hkv, splits, groups), dtype=np.float32)
    l = np.empty((hkv, splits, groups), dtype=np.float32)
    acc = np.empty((hkv, splits, groups, dv), dtype=np.float32)
    _decode_attention_chunks(q, kd, vd, ks, vs, skip, n, np.float32(scale), np.float32(cap or 0.0), splits, m, l, acc)
    out = np.empty((q.shape[0], dv), dtype=np.float32)
    _merge_parts(m, l, acc, out)
    return out


@njit(**_OPTS)
def _merge_parts(m_in, l_in, acc_in, out):
    hkv, splits, groups, dv = acc_in.shape
    for h in prange(hkv):
        for g in range(groups):
            m = NEG
            for sp in range(splits):
                m = max(m, m_in[h, sp, g])
            total = np.float32(0.0)
            for j in range(dv):
                out[h * groups + g, j] = 0.0
            for sp in range(splits):
                if l_in[h, sp, g] == 0.0:
                    continue
                c = np.exp(m_in[h, sp, g] - m)
                total += l_in[h, sp, g] * c
                for j in range(dv):
                    out[h * groups + g, j] += acc_in[h, sp, g, j] * c
            for j in range(dv):
                out[h * groups + g, j] /= total


def decode_attention(q, k, v, lo: int, hi: int, scale: float, cap: float | None, splits: int = 0):
    """Attention of one query position over keys ``lo..hi-1`` of ``k``/``v`` (row indices).

    ``q``: ``[Hq, D]`` fp32; ``k``, ``v``: ``[Hkv, Tk, D]`` fp32. Returns ``[Hq, Dv]``."""
    hkv, _, dv = v.shape
    span = max(hi - lo, 1)
    if splits <= 0:
        splits = max(1, min(16, span // 64))
    groups = q.shape[0] // hkv
    m = np.empty((hkv, splits, groups), dtype=np.float32)
    l = np.empty((hkv, splits, groups), dtype=np.float32)
    acc = np.empty((hkv, splits, groups, dv), dtype=np.float32)
    _decode_attention_parts(q, k, v, lo, hi, np.float32(scale), np.float32(cap or 0.0), splits, m, l, acc)
    out = np.empty((q.shape[0], dv), dtype=np.float32)
    _merge_parts(m, l, acc, out)
    return out


ALL_KERNELS = (quantize_int8_rows, quantize_int4_rows, gemm_int8, gemm_int4, rms_gemm_int8, rms_gemm_int4, gate_up_gelu_int8, gate_up_gelu_int4,
               dequant_rows_int8, dequant_rows_int4, _head_topk_int8, _head_topk_int4, _decode_attention_parts, _decode_attention_chunks, _merge_parts)


def warm_up() -> float:
    """Compile (or load from the on-disk cache) every kernel on small inputs; returns seconds."""
    import time

    t0 = time.perf_counter()
    x = np.ones((1, 64), dtype=np.float32)
    c8 = np.ones((4, 64), dtype=np.int8)
    s8 = np.ones((4, 2), dtype=np.float32)
    c4 = np.full((4, 32), 0x98, dtype=np.uint8)
    s4 = np.ones((4, 2), dtype=np.float32)
    m4 = np.zeros((4, 2), dtype=np.float32)
    out = np.empty((1, 4), dtype=np.float32)
    nw = np.ones(64, dtype=np.float32)
    gemm_int8(x, c8, s8, out)
    gemm_int4(x, c4, s4, m4, out)
    rms_gemm_int8(x, nw, 0.0, 1e-6, c8, s8, out)
    rms_gemm_int4(x, nw, 0.0, 1e-6, c4, s4, m4, out)
    gate_up_gelu_int8(x, c8, s8, c8, s8, out)
    gate_up_gelu_int4(x, c4, s4, m4, c4, s4, m4, out)
    dequant_rows_int8(c8, s8, 0, np.empty((2, 64), dtype=np.float32))
    dequant_rows_int4(c4, s4, m4, 0, np.empty((2, 64), dtype=np.float32))
    quantize_int8_rows(np.ones((2, 64), dtype=np.float32), True, np.empty((2, 64), dtype=np.int8), np.empty((2, 2), dtype=np.float32))
    quantize_int4_rows(np.ones((2, 64), dtype=np.float32), True, np.empty((2, 32), dtype=np.uint8),
                       np.empty((2, 2), dtype=np.float32), np.empty((2, 2), dtype=np.float32))
    head_topk(x, c8, s8, None, "int8", 2, 30.0, parts=2)
    head_topk(x, c4, s4, m4, "int4", 2, None, parts=2)
    kv = np.ones((1, 8, 64), dtype=np.float32)
    decode_attention(np.ones((2, 64), dtype=np.float32), kv, kv, 0, 8, 0.1, None, splits=2)
    pool = np.ones((2, 4, 1, 64), dtype=np.float32)
    sl = np.array([1, 0], dtype=np.int64)
    decode_attention_chunks(np.ones((2, 64), dtype=np.float32), pool, pool, sl, sl, 1, 6, 0.1, None, splits=2)
    return time.perf_counter() - t0



@njit(parallel=True, fastmath=True, cache=True)
def read_sum(a, parts):
    """Sum of a large fp32 array, read once in ``parts`` parallel strips: a memory-read benchmark."""
    n = a.shape[0]
    per = (n + parts - 1) // parts
    sums = np.zeros(parts, dtype=np.float32)
    for p in prange(parts):
        s = np.float32(0.0)
        for i in range(p * per, min(n, p * per + per)):
            s += a[i]
        sums[p] = s
    return sums.sum()


def measure_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of ``repeats`` parallel reads of an ``nbytes`` array
    (far larger than the caches), with numba's current thread count."""
    import time

    a = np.ones(nbytes // 4, dtype=np.float32)
    read_sum(a[:1024], 2)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        read_sum(a, 64)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best
