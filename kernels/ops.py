"""The ops the model calls: the torch reference kernels, with quantized weights and fused CPU
kernels behind the same calls.

A weight is either a tensor (the torch path, any device) or a :class:`~gemma4_nb.quant.QWeight`:

* on the CPU, a QWeight runs the numba kernels of :mod:`.cpu_numba` (dequantization fused into the
  matrix-vector or small matrix-matrix product; gate/up/GELU fused; the head fused with top-k);
  a prompt of more than ``SMALL_BATCH`` positions dequantizes blocks of rows and multiplies them
  with torch's GEMM (compute-bound, so the dequantization is a small extra);
* on CUDA, :mod:`.gpu` runs it (a fused-dequantization Triton kernel for decode-sized batches,
  dequantized blocks and cuBLAS for prefill), and attention runs SDPA (head_dim 512 included);
* elsewhere, a QWeight is dequantized block by block and multiplied with torch.

``fused=True`` (set by the model when its weights are quantized on the CPU) also sends a decode
step's attention to the numba kernel; fp32/bf16 models keep the torch reference everywhere.
"""

from __future__ import annotations

import numpy as np
import torch

from ..quant import QWeight
from . import gpu as _gpu
from . import torch_ops as _ref
from .torch_ops import (RopeTable, apply_rope, attention_mask, gelu_tanh, rms_norm,  # noqa: F401
                        score_block_elements, softcap)

SMALL_BATCH = 16  # up to this many positions: numba products; above: dequantized blocks + torch GEMM
DEQUANT_BLOCK_ELEMENTS = 1 << 22  # fp32 elements of one dequantized block (16 MiB)

_threads = None


def _nb():
    """The numba kernels, with numba's thread count following torch's (the runtime's setting)."""
    global _threads
    from . import cpu_numba
    import numba

    want = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if want != _threads:
        numba.set_num_threads(want)
        _threads = want
    return cpu_numba


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def fused_cpu(weight) -> bool:
    return isinstance(weight, QWeight) and weight.device.type == "cpu" and numba_available()


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float32).contiguous().numpy()


def dequantized_blocks(w: QWeight):
    """``(r0, r1, fp32 rows)`` blocks of a quantized weight."""
    rows = max(1, DEQUANT_BLOCK_ELEMENTS // w.shape[1])
    on_cpu = fused_cpu(w)
    for r0 in range(0, w.shape[0], rows):
        r1 = min(w.shape[0], r0 + rows)
        if on_cpu:
            out = np.empty((r1 - r0, w.shape[1]), dtype=np.float32)
            if w.fmt == "int4":
                _nb().dequant_rows_int4(w.codes.numpy(), w.scales.numpy(), w.mins.numpy(), r0, out)
            else:
                _nb().dequant_rows_int8(w.codes.numpy(), w.scales.numpy(), r0, out)
            yield r0, r1, torch.from_numpy(out)
        else:
            yield r0, r1, w.dequantize(slice(r0, r1)).float()


def qlinear(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    if x.device.type == "cuda":
        return _gpu.qlinear(x, w)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    t = x2.shape[0]
    if fused_cpu(w) and t <= SMALL_BATCH:
        out = np.empty((t, w.shape[0]), dtype=np.float32)
        if w.fmt == "int4":
            _nb().gemm_int4(_np(x2), w.codes.numpy(), w.scales.numpy(), w.mins.numpy(), out)
        else:
            _nb().gemm_int8(_np(x2), w.codes.numpy(), w.scales.numpy(), out)
        y = torch.from_numpy(out)
    else:
        xf = x2.float()
        y = torch.empty((t, w.shape[0]), dtype=torch.float32, device=x.device)
        for r0, r1, block in dequantized_blocks(w):
            y[:, r0:r1] = xf @ block.t()
    return y.to(x.dtype).reshape(*lead, w.shape[0])


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    """``x @ weight.T`` for a ``[out, in]`` weight, quantized or not."""
    if isinstance(weight, QWeight):
        return qlinear(x, weight)
    return _ref.linear(x, weight)


def gated_mlp(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """``down(gelu_tanh(gate(x)) * up(x))``; gate, up and GELU in one kernel for quantized weights."""
    if not isinstance(gate, QWeight) and not isinstance(down, QWeight):
        return _ref.gated_mlp(x, gate, up, down)
    x2 = x.reshape(-1, x.shape[-1])
    if fused_cpu(gate) and isinstance(up, QWeight) and x2.shape[0] <= SMALL_BATCH and gate.fmt == up.fmt:
        act = np.empty((x2.shape[0], gate.shape[0]), dtype=np.float32)
        if gate.fmt == "int4":
            _nb().gate_up_gelu_int4(_np(x2), gate.codes.numpy(), gate.scales.numpy(), gate.mins.numpy(),
                                    up.codes.numpy(), up.scales.numpy(), up.mins.numpy(), act)
        else:
            _nb().gate_up_gelu_int8(_np(x2), gate.codes.numpy(), gate.scales.numpy(), up.codes.numpy(),
                                    up.scales.numpy(), act)
        h = torch.from_numpy(act).to(x.dtype).reshape(*x.shape[:-1], gate.shape[0])
    else:
        h = gelu_tanh(linear(x, gate)) * linear(x, up)
    return linear(h, down)


def attention(q, k, v, q_pos, k_pos, window, scale, cap=None, blocks=None, *, fused: bool = False):
    """Grouped-query attention (see :func:`torch_ops.attention`). With ``fused`` on the CPU, a
    single query position runs the numba decode kernel (each K/V row read once per KV head)."""
    if fused and q.shape[1] == 1 and blocks is None and q.device.type == "cpu":
        qp = q_pos.start if isinstance(q_pos, range) else int(q_pos[0])
        k0 = k_pos.start if isinstance(k_pos, range) else int(k_pos[0])
        lo = 0 if window is None else max(0, qp - window + 1 - k0)
        hi = min(k.shape[1], qp - k0 + 1)
        out = _nb().decode_attention(_np(q[:, 0]), _np(k), _np(v), lo, hi, scale, cap)
        return torch.from_numpy(out).to(v.dtype).unsqueeze(0)
    if q.device.type == "cuda":
        return _gpu.attention(q, k, v, q_pos, k_pos, window, scale, cap, blocks)
    return _ref.attention(q, k, v, q_pos, k_pos, window, scale, cap, blocks)


def attention_chunks(q, view, scale, cap=None) -> torch.Tensor:
    """One query position (``q``: ``[Hq, 1, D]``) over a chunked cache's storage (``view`` from
    :meth:`KVCache.chunk_view`): no contiguous K/V copy is made. Returns ``[1, Hq, Dv]``."""
    kd, vd, ks, vs, skip, n, _ = view
    out = _nb().decode_attention_chunks(_np(q[:, 0]), kd.numpy(), vd.numpy(), ks.numpy(), vs.numpy(),
                                        skip, n, scale, cap)
    return torch.from_numpy(out).to(vd.dtype).unsqueeze(0)


def head_topk(hidden: torch.Tensor, head, cap: float | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (values, token ids) of the soft-capped logits of one position ``hidden``
    (``[hidden]`` or ``[1, hidden]``). For a quantized head on the CPU the logits are never
    materialized; otherwise they are computed with :func:`linear` and ranked with torch."""
    h = hidden.reshape(1, -1)
    if fused_cpu(head):
        mins = None if head.mins is None else head.mins.numpy()
        vals, ids = _nb().head_topk(_np(h), head.codes.numpy(), head.scales.numpy(), mins, head.fmt, k, cap)
        return torch.from_numpy(vals), torch.from_numpy(ids)
    logits = softcap(linear(h, head).float(), cap)[0]
    vals, ids = torch.topk(logits, k)
    return vals, ids
