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


class RopePair(tuple):
    """``(cos, sin)`` of some positions, as :meth:`RopeTable.get` returns them; the fused CPU kernels
    keep the pair's numpy views on it (``arrays``), made once for every layer that shares it."""

    arrays = None


class RopeTable:
    """cos/sin of ``position * inv_freq`` for the rotated pairs only, computed once per position
    (fp32 math, stored in the model dtype as the reference casts them) and grown by doubling."""

    def __init__(self, inv_freq: torch.Tensor, rotated_pairs: int, dtype: torch.dtype, device) -> None:
        self.inv_freq = inv_freq[:rotated_pairs].to(device=device, dtype=torch.float32)
        self.dtype, self.device = dtype, device
        self.cos = self.sin = torch.empty((0, rotated_pairs), dtype=dtype, device=device)

    def get(self, span: range) -> tuple[torch.Tensor, torch.Tensor]:
        if span.stop > self.cos.shape[0]:
            n = max(span.stop, 2 * self.cos.shape[0], 256)
            freqs = torch.arange(n, device=self.device, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
            self.cos, self.sin = freqs.cos().to(self.dtype), freqs.sin().to(self.dtype)
        return RopePair((self.cos[span.start : span.stop], self.sin[span.start : span.stop]))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_dim: int = 0) -> torch.Tensor:
    """Rotate-half RoPE (dim j pairs with j + d/2) on ``x`` of shape ``[T, heads, head_dim]``
    (``seq_dim=0``) or ``[heads, T, head_dim]`` (``seq_dim=1``). ``cos``/``sin``: ``[T, pairs]``
    for the first ``pairs`` frequencies; the dims of the other pairs pass through unchanged."""
    half, pairs = x.shape[-1] // 2, cos.shape[-1]
    if seq_dim == 0:
        cos, sin = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., :pairs], x[..., half : half + pairs]
    r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if pairs == half:
        return torch.cat((r1, r2), dim=-1)
    return torch.cat((r1, x[..., pairs:half], r2, x[..., half + pairs :]), dim=-1)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
                   blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean ``[Tq, Tk]`` mask: key visible if ``k <= q`` and, with a window, ``q - window < k``.

    ``blocks`` (``[Tq]``, the block id of each query position, -1 outside blocks) also makes keys
    of this forward visible when they belong to the query's block (an image attends to itself
    both ways); the window still applies."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if blocks is not None:
        offset = k_pos - q_pos[0]
        current = (offset >= 0) & (offset < len(q_pos))
        k_blocks = torch.full_like(k_pos, -1)
        k_blocks[current] = blocks[offset[current]]
        allowed |= (blocks[:, None] == k_blocks[None, :]) & (blocks[:, None] >= 0)
    if window is not None:
        allowed &= k_pos[None, :] > (q_pos[:, None] - window)
    return allowed


# Scores of one block are at most this many elements (fp32): bounds prefill memory at any depth.
SCORE_BLOCK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 27}


def score_block_elements(device_type: str) -> int:
    return SCORE_BLOCK_ELEMENTS.get(device_type, SCORE_BLOCK_ELEMENTS["cpu"])


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None,
    scale: float,
    cap: float | None = None,
    blocks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (optionally sliding-window) grouped-query attention.

    ``q``: ``[Hq, Tq, D]``; ``k``, ``v``: ``[Hkv, Tk, D]``; ``q_pos``/``k_pos``: absolute positions
    (tensors or ``range``s).
    ``cap`` soft-caps the scores (Gemma 2 style); ``blocks``: see :func:`attention_mask`.
    Scores and softmax in fp32. Keys are processed in
    blocks with an online softmax, so memory stays bounded however long the context.
    Returns ``[Tq, Hq, D]``.
    """
    hq, tq, d = q.shape
    hkv, tk = k.shape[0], k.shape[1]
    q_pos = torch.arange(q_pos.start, q_pos.stop, device=q.device) if isinstance(q_pos, range) else q_pos
    k_pos = torch.arange(k_pos.start, k_pos.stop, device=q.device) if isinstance(k_pos, range) else k_pos
    groups = hq // hkv
    qg = q.reshape(hkv, groups * tq, d).float()  # query heads sharing a KV head side by side
    block = max(1, score_block_elements(q.device.type) // (hq * tq))
    if block >= tk:
        scores = softcap(torch.matmul(qg, k.float().transpose(1, 2)) * scale, cap).view(hkv, groups, tq, tk)
        scores = scores.masked_fill(~attention_mask(q_pos, k_pos, window, blocks), -math.inf)
        probs = torch.softmax(scores, dim=-1).to(v.dtype).view(hkv, groups * tq, tk)
        return torch.matmul(probs, v).view(hq, tq, v.shape[2]).transpose(0, 1)
    m = torch.full((hkv, groups, tq, 1), -math.inf, device=q.device)
    l = torch.zeros((hkv, groups, tq, 1), device=q.device)
    acc = torch.zeros((hkv, groups * tq, v.shape[2]), device=q.device)
    for start in range(0, tk, block):
        kb, vb, pb = k[:, start : start + block], v[:, start : start + block], k_pos[start : start + block]
        mask = attention_mask(q_pos, pb, window, blocks)
        if not bool(mask.any()):
            continue
        s = softcap(torch.matmul(qg, kb.float().transpose(1, 2)) * scale, cap).view(hkv, groups, tq, -1)
        s = s.masked_fill(~mask, -math.inf)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe)
        correction = torch.exp(m - m_safe)
        l = l * correction + p.sum(-1, keepdim=True)
        acc = acc * correction.view(hkv, groups * tq, 1) + torch.matmul(p.view(hkv, groups * tq, -1), vb.float())
        m = m_new
    out = (acc / l.view(hkv, groups * tq, 1)).to(v.dtype)
    return out.view(hq, tq, v.shape[2]).transpose(0, 1)


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
