"""Kernels of the CUDA path: attention at head_dim 512 and weight-only int8/int4 matrix products.

:mod:`.ops` sends a call here when its tensors are on a CUDA device; the CPU path never comes here.
Everything except the Triton kernel is plain torch and runs on any device, so the tests check
this module's math on the CPU against :mod:`.torch_ops` (the oracle).

Attention (:func:`attention`)
    ``F.scaled_dot_product_attention`` over the K/V the chunked cache gathers. SDPA's flash
    backend stops at head_dim 256; the memory-efficient backend takes head_dim 512 and a mask, so
    on CUDA the call is restricted to flash, memory-efficient, then math (the last only if
    neither fits; it is slow but exact). Grouped-query heads are folded into the query rows
    (``[kv_heads, groups * queries, dim]``) as the reference does, so K/V are never repeated per
    query head. The boolean mask (causal, sliding window, image blocks) is built per block of
    queries from the key range that block can see, and dropped when every key is visible (every
    decode step), so a decode step runs SDPA without a mask. SDPA has no score soft-cap: with a
    cap (Gemma 2-style; Gemma 3 and 4 have none) the call goes to the reference kernel.

Weight-only quantized matmul (:func:`qlinear`) for :class:`~gemma4_nb.kernels.qweight.QWeight`
    * up to :data:`TRITON_MAX_ROWS` activation rows (decode, drafts): a Triton kernel that reads
      the int8/int4 codes and their group scales (and int4 minimums) and dequantizes them in
      registers, accumulating in fp32 (no dequantized copy of the weight is ever written);
    * more rows (prefill: compute-bound), or Triton missing, or ``GEMMA4_NB_CUDA_QMM=torch``:
      blocks of rows are dequantized to the activation dtype and multiplied with cuBLAS.
    Weights arrive with a scale (and int4 minimum) per group (:meth:`QWeight.per_group`, which
    ``QWeight.to("cuda")`` applies), read as whatever float dtype they hold and converted to fp32.

Triton is imported lazily: this module imports on a machine without it. The kernel also runs in
Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1`` before Triton is imported), which is
how the tests check it without a GPU.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from . import torch_ops as _ref
from .qweight import GROUP

MASK_BLOCK_ELEMENTS = 1 << 26  # boolean mask elements of one block of queries (64 MiB)
DEQUANT_BLOCK_ELEMENTS = 1 << 24  # weight elements dequantized at a time on the torch path
TRITON_MAX_ROWS = 16  # activation rows up to which the fused Triton kernel runs


# -- attention ---------------------------------------------------------------------------------

def sdpa_backends(device: torch.device):
    """The SDPA backends allowed on ``device`` (a context manager)."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _positions(p, device) -> tuple[torch.Tensor, range | None]:
    if isinstance(p, range):
        return torch.arange(p.start, p.stop, device=device), p
    return p, None


def query_block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
                     blocks: torch.Tensor | None, forward_start: int, q_index: slice) -> torch.Tensor:
    """Rows ``q_index`` of :func:`torch_ops.attention_mask` for the forward's queries starting at
    position ``forward_start`` (``blocks``: the whole forward's block ids), against keys ``k_pos``;
    ``q_pos`` are the positions of those rows. Equal to slicing the full mask, without building it."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if blocks is not None:
        offset = k_pos - forward_start
        current = (offset >= 0) & (offset < blocks.shape[0])
        k_blocks = torch.full_like(k_pos, -1)
        k_blocks[current] = blocks[offset[current]]
        qb = blocks[q_index]
        allowed |= (qb[:, None] == k_blocks[None, :]) & (qb[:, None] >= 0)
    if window is not None:
        allowed &= k_pos[None, :] > (q_pos[:, None] - window)
    return allowed


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos, k_pos, window: int | None,
              scale: float, cap: float | None = None, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as :func:`torch_ops.attention` (``q``: ``[Hq, Tq, D]``, ``k``/``v``:
    ``[Hkv, Tk, D]``, returns ``[Tq, Hq, Dv]`` in ``v.dtype``), computed with SDPA."""
    if cap is not None:
        return _ref.attention(q, k, v, q_pos, k_pos, window, scale, cap, blocks)
    hq, tq, d = q.shape
    hkv, tk, dv = k.shape[0], k.shape[1], v.shape[2]
    groups = hq // hkv
    qp, q_range = _positions(q_pos, q.device)
    kp, k_range = _positions(k_pos, q.device)
    forward_start = int(qp[0]) if q_range is None else q_range.start
    out = torch.empty((tq, hq, dv), dtype=v.dtype, device=q.device)
    rows = max(1, MASK_BLOCK_ELEMENTS // (groups * max(tk, 1)))
    for s in range(0, tq, rows):
        e = min(tq, s + rows)
        tb = e - s
        lo, hi = 0, tk
        if q_range is not None and k_range is not None:
            # keys this block of queries can see: from the first query's window to the last query
            # (or to the forward's end: image blocks look ahead within the forward)
            first, last = q_range.start + s, q_range.start + e - 1
            if window is not None:
                lo = min(tk, max(0, first - window + 1 - k_range.start))
            if blocks is None:
                hi = max(lo, min(tk, last - k_range.start + 1))
            all_visible = (blocks is None and k_range.start + hi - 1 <= first
                           and (window is None or k_range.start + lo > last - window))
        else:
            all_visible = False
        mask = None
        if not all_visible:
            m = query_block_mask(qp[s:e], kp[lo:hi], window, blocks, forward_start, slice(s, e))
            mask = m.repeat(groups, 1)[None, None]  # the same rows for every query head of a group
        qg = q[:, s:e].reshape(hkv, groups * tb, d).to(v.dtype)
        with sdpa_backends(q.device):
            o = F.scaled_dot_product_attention(qg[None], k[None, :, lo:hi].to(v.dtype), v[None, :, lo:hi],
                                               attn_mask=mask, scale=scale)
        out[s:e] = o[0].reshape(hq, tb, dv).transpose(0, 1)
    return out


def attention_chunks(q: torch.Tensor, view, scale: float, cap: float | None = None) -> torch.Tensor:
    """One query position (``q``: ``[Hq, 1, D]``) over a chunked cache's storage (``view`` from
    :meth:`KVCache.chunk_view`): the visible rows are gathered from the chunks and attended with
    :func:`attention`. Returns ``[1, Hq, Dv]``."""
    kd, vd, ks, vs, skip, n, positions = view[:7]
    if len(view) > 7 and view[8] is not None:
        raise ValueError("an int8 cache's chunk view: gather it with KVCache.read")
    if kd is None:
        raise ValueError("a K=V layer's chunk view has no keys; gather them with KVCache.read")
    ks, vs = ks.to(kd.device), vs.to(vd.device)
    k = kd.index_select(0, ks).flatten(0, 1)[skip : skip + n].transpose(0, 1)
    v = vd.index_select(0, vs).flatten(0, 1)[skip : skip + n].transpose(0, 1)
    last = positions.stop - 1
    return attention(q, k, v, range(last, last + 1), positions, None, scale, cap)


# -- weight-only quantized matmul --------------------------------------------------------------

def dequantize_rows(w, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``r0:r1`` of a QWeight as a ``dtype`` matrix (fp32 math, scales converted to fp32)."""
    codes = w.codes[r0:r1]
    scales, mins = w.group_scales(slice(r0, r1))
    scales = scales.float()
    rows, groups = scales.shape
    if w.fmt == "int8":
        out = codes.float().view(rows, groups, GROUP) * scales[..., None]
    else:
        q = torch.cat(((codes & 15).view(rows, groups, 16), (codes >> 4).view(rows, groups, 16)), dim=-1).float()
        out = q * scales[..., None] + mins.float()[..., None]
    return out.reshape(rows, groups * GROUP).to(dtype)


def dequant_linear(x: torch.Tensor, w) -> torch.Tensor:
    """``x @ W.T`` for a QWeight ``W``: dequantized a block of rows at a time into ``x.dtype``
    (fp32 scales and accumulation in the GEMM's own precision). Any device."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    y = torch.empty((x2.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
    rows = max(1, DEQUANT_BLOCK_ELEMENTS // w.shape[1])
    for r0 in range(0, w.shape[0], rows):
        r1 = min(w.shape[0], r0 + rows)
        y[:, r0:r1] = F.linear(x2, dequantize_rows(w, r0, r1, x.dtype))
    return y.reshape(*lead, w.shape[0])


_KERNELS: dict[str, object] = {}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _qmm_kernel():
    """The Triton kernel, built on first use."""
    if "qmm" in _KERNELS:
        return _KERNELS["qmm"]
    import triton
    import triton.language as tl

    @triton.jit
    def qmm(x_ptr, c_ptr, s_ptr, m_ptr, y_ptr, M, N, K, stride_xm, stride_cn, stride_sn, stride_ym,
            INT4: tl.constexpr, IEEE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # y[m, n] = sum_k x[m, k] * w[n, k], w dequantized from its codes in registers
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            g = kk // 32
            wmask = n_ok[:, None] & k_ok[None, :]
            s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=wmask, other=0.0).to(tl.float32)
            if INT4:
                j = kk % 32  # weight j of its group: byte j % 16, low nibble for j < 16
                c = tl.load(c_ptr + rn[:, None] * stride_cn + (g * 16 + j % 16)[None, :], mask=wmask, other=0)
                q = (c.to(tl.int32) >> ((j // 16) * 4)[None, :]) & 15
                mn = tl.load(m_ptr + rn[:, None] * stride_sn + g[None, :], mask=wmask, other=0.0).to(tl.float32)
                w = q.to(tl.float32) * s + mn
            else:
                c = tl.load(c_ptr + rn[:, None] * stride_cn + kk[None, :], mask=wmask, other=0)
                w = c.to(tl.float32) * s
            if IEEE:
                acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    _KERNELS["qmm"] = qmm
    return qmm


def triton_qlinear(x: torch.Tensor, w, *, block_n: int = 32, block_k: int = 128) -> torch.Tensor:
    """``x @ W.T`` for a QWeight ``W`` with the fused-dequantization Triton kernel (fp32
    accumulation; fp32 activations multiply in IEEE fp32, bf16/fp16 ones on tensor cores).
    With ``TRITON_INTERPRET=1`` set before Triton is first imported, it runs in Triton's
    interpreter on CPU tensors (how the tests check it without a GPU)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m, n = x2.shape[0], w.shape[0]
    if k != w.shape[1] or k % GROUP or block_k % GROUP:
        raise ValueError(f"cannot multiply a [{m}, {k}] activation by a {w.fmt} weight of shape {w.shape}")
    codes, scales = w.codes.contiguous(), w.scales.contiguous()
    mins = w.mins.contiguous() if w.mins is not None else scales  # unused for int8
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = 16  # tl.dot's smallest tile; decode's single row is masked
    grid = (triton_cdiv(n, block_n), triton_cdiv(m, block_m))
    _qmm_kernel()[grid](x2, codes, scales, mins, y, m, n, k, x2.stride(0), codes.stride(0), scales.stride(0),
                        y.stride(0), INT4=w.fmt == "int4", IEEE=x.dtype == torch.float32,
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.reshape(*lead, n)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def qmm_mode() -> str:
    """``GEMMA4_NB_CUDA_QMM``: ``triton`` (the default, when Triton imports) or ``torch``."""
    mode = os.environ.get("GEMMA4_NB_CUDA_QMM", "triton").strip().lower()
    return "triton" if mode == "triton" and triton_available() else "torch"


def qlinear(x: torch.Tensor, w) -> torch.Tensor:
    """``x @ W.T`` for a QWeight on CUDA: the fused Triton kernel for up to
    :data:`TRITON_MAX_ROWS` rows, dequantized blocks and cuBLAS above (see the module docstring)."""
    rows = math.prod(x.shape[:-1])
    if rows <= TRITON_MAX_ROWS and x.is_cuda and qmm_mode() == "triton":
        return triton_qlinear(x, w)
    return dequant_linear(x, w)
