"""A decoder layer in two numba calls for a few positions (quantized weights): a decode step, or
a verification's handful of drafted positions.

A decode step of a small model is dominated by per-operation overhead when every norm, rope and
projection is its own Python-level call (the 270M runs ~15 operations per layer, 18 layers). Here
a layer is two compiled calls around the KV-cache update and the attention (serial code calling
the parallel product kernels):

* :func:`attention_inputs`: RMSNorm, the q/k/v projections in one parallel pass over all their
  rows, per-head q/k norms, RoPE and the weight-free v norm;
* :func:`attention_output_and_mlp`: the output projection, both sandwich norms and residuals,
  gate and up products on one quantization of the activations and GELU-tanh, the down projection, the layer scalar.

A quantized matrix is passed as the kernel tuple of :func:`gemma4_nb.kernels.ops.kernel_weight`. Norm weights
arrive with the family's offset already added (Gemma 3's ``1 + w``); a norm without weight is an
array of ones.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .cpu_numba import (BLOCK_ROWS, block_scratch, blocked, gate_up_gelu, gemm, product_blocks,
                        quantize_activations_fine, rope_in_place, row_all_positions)

_OPTS = dict(parallel=True, fastmath=True, cache=True, nogil=True)
_SERIAL = dict(fastmath=True, cache=True, nogil=True)


@njit(inline="always", fastmath=True)
def rms_into(src, dst, w, eps):
    """``dst = src * rsqrt(mean(src^2) + eps) * w`` over a 1-D slice."""
    ss = np.float32(0.0)
    for i in range(src.shape[0]):
        ss += src[i] * src[i]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(src.shape[0]) + np.float32(eps))
    for i in range(src.shape[0]):
        dst[i] = src[i] * inv * w[i]


@njit(**_OPTS)
def _qkv_rows(ya, wq, wk, wv, n_k, n_v, qf, raw_k, raw_v):
    """The rows of the q, k and v projections in one parallel pass, every position at once
    (``qf`` ``[T, Hq * D]``, ``raw_k``/``raw_v`` ``[T, Hkv * D]``)."""
    n_q = qf.shape[1]
    if blocked(wq) and (n_k == 0 or blocked(wk)) and (n_v == 0 or blocked(wv)):
        bq, bk, bv = n_q // BLOCK_ROWS, n_k // BLOCK_ROWS, n_v // BLOCK_ROWS
        for b in prange(bq + bk + bv):  # a block of one matrix per job
            if b < bq:
                product_blocks(ya, wq, b, b + 1, qf, 0, block_scratch(qf))
            elif b < bq + bk:
                product_blocks(ya, wk, b - bq, b - bq + 1, raw_k, 0, block_scratch(raw_k))
            else:
                product_blocks(ya, wv, b - bq - bk, b - bq - bk + 1, raw_v, 0, block_scratch(raw_v))
        return
    for r in prange(n_q + n_k + n_v):
        if r < n_q:
            row_all_positions(ya, wq, r, qf, r)
        elif r < n_q + n_k:
            row_all_positions(ya, wk, r - n_q, raw_k, r - n_q)
        else:
            row_all_positions(ya, wv, r - n_q - n_k, raw_v, r - n_q - n_k)


# The two layer functions are serial code around parallel product kernels, not one parallel
# function: with the prange loops inlined between serial sections numba's parallel code ran the
# products at about half the speed of the same kernels called this way (measured on the 12B
# shape's output projection + MLP: 10-16 ms against 5.7 ms).

@njit(**_SERIAL)
def attention_inputs(x, in_norm, eps, wq, wk, wv, q_norm, k_norm, cos, sin, kv_mode, v_norm, q_out, k_out, v_out):
    """``x`` ``[T, hidden]`` -> ``q_out`` ``[T, Hq, D]``, ``k_out``/``v_out`` ``[T, Hkv, D]``
    (``cos``/``sin`` ``[T, pairs]``).

    ``kv_mode``: 0 the layer reads another layer's K/V (only q is computed); 1 separate K and V
    projections (K normed and rotated; V through the weight-free norm when ``v_norm``); 2 K=V
    (V is the weight-free norm of the raw k projection, K is rebuilt from V by the cache's reader,
    so ``k_out`` is left alone)."""
    t_n, hq, d = q_out.shape
    hkv, dk = v_out.shape[1], v_out.shape[2]
    y = np.empty((t_n, x.shape[1]), dtype=np.float32)
    for t in range(t_n):
        rms_into(x[t], y[t], in_norm, eps)
    ya = quantize_activations_fine(y)
    n_k = hkv * dk if kv_mode > 0 else 0
    n_v = hkv * dk if kv_mode == 1 else 0
    raw_k = np.empty((t_n, hkv * dk), dtype=np.float32)
    raw_v = np.empty((t_n, hkv * dk), dtype=np.float32)
    _qkv_rows(ya, wq, wk, wv, n_k, n_v, q_out.reshape(t_n, hq * d), raw_k, raw_v)
    ones = np.ones(dk, dtype=np.float32)
    for t in range(t_n):
        for h in range(hq):
            rms_into(q_out[t, h], q_out[t, h], q_norm, eps)
            rope_in_place(q_out[t, h], cos[t], sin[t])
        for h in range(hkv if kv_mode > 0 else 0):
            if kv_mode == 2:
                rms_into(raw_k[t, h * dk:(h + 1) * dk], v_out[t, h], ones, eps)
                continue
            rms_into(raw_k[t, h * dk:(h + 1) * dk], k_out[t, h], k_norm, eps)
            rope_in_place(k_out[t, h], cos[t], sin[t])
            if v_norm:
                rms_into(raw_v[t, h * dk:(h + 1) * dk], v_out[t, h], ones, eps)
            else:
                v_out[t, h, :] = raw_v[t, h * dk:(h + 1) * dk]


@njit(**_SERIAL)
def attention_output_and_mlp(x, attn, wo, post_attn_norm, pre_ffn_norm, wg, wu, wd, post_ffn_norm,
                             layer_scalar, eps, out):
    """``out = (h + post_ffn_norm(mlp(pre_ffn_norm(h)))) * layer_scalar`` with
    ``h = x + post_attn_norm(attn @ wo^T)``; ``x``, ``out`` ``[T, hidden]``, ``attn`` ``[T, Hq * D]``."""
    t_n, hidden = x.shape
    o = np.empty((t_n, hidden), dtype=np.float32)
    gemm(attn, wo, o)
    h = np.empty((t_n, hidden), dtype=np.float32)
    y = np.empty((t_n, hidden), dtype=np.float32)
    for t in range(t_n):
        rms_into(o[t], h[t], post_attn_norm, eps)
        for i in range(hidden):
            h[t, i] += x[t, i]
        rms_into(h[t], y[t], pre_ffn_norm, eps)
    act = np.empty((t_n, wg[0].shape[0]), dtype=np.float32)
    gate_up_gelu(y, wg, wu, act)
    m = np.empty((t_n, hidden), dtype=np.float32)
    gemm(act, wd, m)
    for t in range(t_n):
        rms_into(m[t], out[t], post_ffn_norm, eps)
        for i in range(hidden):
            out[t, i] = (out[t, i] + h[t, i]) * layer_scalar
