"""The torch kernels against straightforward formulations."""

from __future__ import annotations

import math

import pytest
import torch

from gemma4_nb.kernels import torch_ops as ops


def naive_attention(q, k, v, q_pos, k_pos, window, scale, cap):
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0).float(), v.repeat_interleave(groups, 0).float()
    s = q.float() @ k.transpose(1, 2) * scale
    if cap:
        s = torch.tanh(s / cap) * cap
    visible = (k_pos[None, :] <= q_pos[:, None]) & ((k_pos[None, :] > q_pos[:, None] - window) if window else True)
    s = s.masked_fill(~visible, -math.inf)
    return (s.softmax(-1) @ v).transpose(0, 1)


@pytest.mark.parametrize("window,cap", [(None, None), (5, None), (None, 20.0), (7, 50.0)])
def test_blockwise_attention_equals_single_pass(window, cap, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(6, 9, 16, generator=gen)
    k = torch.randn(2, 40, 16, generator=gen)
    v = torch.randn(2, 40, 16, generator=gen)
    q_pos, k_pos = torch.arange(31, 40), torch.arange(0, 40)
    expected = naive_attention(q, k, v, q_pos, k_pos, window, 0.25, cap)
    single = ops.attention(q, k, v, q_pos, k_pos, window, 0.25, cap)
    monkeypatch.setitem(ops.SCORE_BLOCK_ELEMENTS, "cpu", 6 * 9 * 3)  # blocks of 3 keys: many fully masked
    blocked = ops.attention(q, k, v, range(31, 40), range(0, 40), window, 0.25, cap)
    assert torch.allclose(single, expected, atol=1e-5)
    assert torch.allclose(blocked, expected, atol=1e-5)


@pytest.mark.parametrize("pairs", [8, 2])
def test_partial_rope_equals_full_table_with_zero_frequencies(pairs):
    dim = 16
    inv = torch.cat([1.0 / (10000 ** (torch.arange(0, 2 * pairs, 2).float() / dim)), torch.zeros(dim // 2 - pairs)])
    table = ops.RopeTable(inv, pairs, torch.float32, "cpu")
    x = torch.randn(5, 3, dim)
    cos, sin = table.get(range(100, 105))
    freqs = torch.arange(100, 105).float()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], -1)
    rotated = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], -1)
    expected = x * emb.cos()[:, None] + rotated * emb.sin()[:, None]
    assert torch.allclose(ops.apply_rope(x, cos, sin), expected, atol=1e-6)
    assert torch.allclose(ops.apply_rope(x.transpose(0, 1), cos, sin, seq_dim=1), expected.transpose(0, 1), atol=1e-6)
