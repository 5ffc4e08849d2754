"""Plain-torch reference of the fused CPU kernels' 8-bit activations.

The kernels quantize the activations of every product of at most ``ops.integer_batch(K)`` positions
per group of 32, in two int8 parts (``d = max|x| / 127``, then the remainder with ``d / 254``;
round half to even; see kernels/simd.py), one part for int4 weights; the reference products here
do the same, so the kernels can be held to tight tolerances.
"""

from __future__ import annotations

import torch


def fake_quant_activations(x: torch.Tensor, fine: bool = True) -> torch.Tensor:
    """``x`` as the kernels' products see it: quantized per group of 32 in two int8 parts and back
    (``fine=False``: the first part only, as the head's screen quantizes it)."""
    g = x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    d = g.abs().amax(-1, keepdim=True) / 127.0
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.where(d > 0, torch.round(g / safe), torch.zeros_like(g)).clamp(-127, 127)
    if not fine:
        return (q * d).reshape(x.shape).to(x.dtype)
    r = g - q * d
    d2 = d / 254.0
    q2 = torch.where(d2 > 0, torch.round(r / torch.where(d2 > 0, d2, torch.ones_like(d2))), torch.zeros_like(g))
    return (q * d + q2.clamp(-127, 127) * d2).reshape(x.shape).to(x.dtype)


def weight_format(weight) -> str | None:
    """``"int8"``/``"int4"`` of a QWeight, or of a tensor made by :func:`dequantized`."""
    return getattr(weight, "fmt", None) or getattr(weight, "_quant_fmt", None)


def dequantized(weight) -> torch.Tensor:
    """A QWeight's fp32 values, remembering its format (the activations its products take)."""
    t = weight.dequantize()
    t._quant_fmt = weight.fmt
    return t


def fake_quant_for(x: torch.Tensor, weight) -> torch.Tensor:
    """``x`` as a product with ``weight`` sees it: two parts, one part for int4 rows (see
    ``cpu_numba.row_dot``)."""
    return fake_quant_activations(x, fine=weight_format(weight) != "int4")


def quantized_activation_linear(monkeypatch) -> None:
    """Make the torch reference path's products quantize their activations where the fused path
    does (at most ``ops.integer_batch(K)`` positions), so a dequantized twin (weights from :func:`dequantized`)
    is an exact oracle."""
    from gemma4_nb.kernels import ops, torch_ops

    plain, plain_head = torch_ops.linear, ops.head_logits

    def head_logits(hidden, head, cap):
        if isinstance(head, torch.Tensor) and hidden.reshape(-1, hidden.shape[-1]).shape[0] <= \
                ops.integer_batch(hidden.shape[-1], weight_format(head) or "int8"):
            return torch_ops.softcap(plain(fake_quant_for(hidden, head), head).float(), cap)
        return plain_head(hidden, head, cap)

    monkeypatch.setattr(ops, "head_logits", head_logits)

    def linear(x, weight):
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        if rows <= ops.integer_batch(x.shape[-1], weight_format(weight) or "int8") and x.shape[-1] % 32 == 0:
            x = fake_quant_for(x, weight)
        return plain(x, weight)

    monkeypatch.setattr(torch_ops, "linear", linear)
