"""Plain PyTorch kernels: the reference path on every device and the oracle for fused kernels.

Each function is small and exact about dtypes: norms and softmax run in fp32 and cast back, as
the Gemma reference does, so the same code gives parity in fp32 and sensible numerics in bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 0.0) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * (offset + weight)`` in fp32, cast back to ``x.dtype``.

    ``weight=None`` is the weight-free norm (Gemma 4's ``v_norm`` and audio embedder).
    ``offset`` is 0 for Gemma 4 (plain ``w``) and 1 for Gemma 3 (``1 + w``).
    """
    xf = x.float()
    out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        out = out * (weight.float() + offset)
    return out.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables of shape ``[T, head_dim]`` for rotate-half RoPE (zero frequencies pass through)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(device=positions.device, dtype=torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on ``x`` of shape ``[T, heads, head_dim]`` (dim j pairs with j + d/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean ``[Tq, Tk]`` mask: key visible if ``k <= q`` and, with a window, ``q - window < k``."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > (q_pos[:, None] - window)
    return allowed


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    cap: float | None = None,
) -> torch.Tensor:
    """Grouped-query attention.

    ``q``: ``[Hq, Tq, D]``; ``k``, ``v``: ``[Hkv, Tk, D]``; ``mask``: boolean ``[Tq, Tk]`` or None
    (all visible). ``cap`` soft-caps the scores (Gemma 2 style). Scores and softmax in fp32.
    Returns ``[Tq, Hq, D]``.
    """
    hq, hkv = q.shape[0], k.shape[0]
    groups = hq // hkv
    qg = q.reshape(hkv, groups * q.shape[1], q.shape[2])  # heads sharing a KV head side by side
    scores = torch.matmul(qg.float(), k.float().transpose(1, 2)) * scale  # [Hkv, G*Tq, Tk]
    scores = softcap(scores, cap).view(hkv, groups, q.shape[1], k.shape[1])
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(hkv, groups * q.shape[1], k.shape[1])
    out = torch.matmul(probs, v).view(hq, q.shape[1], v.shape[2])
    return out.transpose(0, 1)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for a ``[out, in]`` weight (checkpoint layout)."""
    return F.linear(x, weight)


def gated_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down(gelu_tanh(gate(x)) * up(x))``."""
    return linear(gelu_tanh(linear(x, gate)) * linear(x, up), down)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap
