"""The numba CPU kernels against plain torch on dequantized weights.

The products quantize their activations to int8 per group of 32 (see kernels/simd.py); the
reference multiplies the same quantized activations (``quant_reference.fake_quant_activations``).
Tolerances: products accumulate in fp32 in a different order than torch's GEMM, so results are
compared with ``atol = 1e-4 * max|reference|`` (about 100 fp32 ulps of the largest output);
attention, whose outputs are convex combinations of V rows, with ``atol = 1e-5``.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from quant_reference import fake_quant_activations as fq  # noqa: E402
from quant_reference import fake_quant_for  # noqa: E402

from gemma4_nb.kernels import cpu_numba as nb  # noqa: E402
from gemma4_nb.kernels import ops  # noqa: E402
from gemma4_nb.kernels import torch_ops as ref  # noqa: E402
from gemma4_nb.kernels.qweight import matrix_bytes, quantize_weight, to_planes  # noqa: E402
from gemma4_nb.kernels.simd import WIDE  # noqa: E402


def close(got, want, rel=1e-4):
    got, want = torch.as_tensor(got).float(), torch.as_tensor(want).float()
    tol = rel * float(want.abs().max()) + 1e-6
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= tol, float((got - want).abs().max())


@pytest.fixture(scope="module")
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantize_round_trip_error(fmt, gen):
    w = torch.randn(64, 256, generator=gen)
    back = quantize_weight(w, fmt).dequantize()
    rel = float((back - w).norm() / w.norm())
    # uniform rounding on 255 (int8) or 16 (int4) levels per group of 32 Gaussian weights
    assert rel < (0.01 if fmt == "int8" else 0.1)
    assert rel > 0  # it really quantized


@pytest.mark.parametrize("cols", [256, 3840, 640, 96])
def test_int4_size_and_layout(cols, gen):
    """int4 takes 4.625 bits a weight when the width is a multiple of 256 (at most 4.75 bits for the
    widths of Gemma 4 12B), a partial last super-block otherwise; the per-group view the GPU reads
    dequantizes to the same weight."""
    w = torch.randn(8, cols, generator=gen) * 0.02
    qw = quantize_weight(w, "int4")
    assert qw.nbytes == matrix_bytes("int4", (8, cols))
    if cols % 256 == 0:
        assert qw.nbytes * 8 / w.numel() == 4.625
    assert qw.nbytes * 8 / w.numel() <= (4.75 if cols >= 640 else 6.0)
    torch.testing.assert_close(qw.per_group().dequantize(), qw.dequantize(), atol=0, rtol=0)
    assert float((qw.dequantize() - w).norm() / w.norm()) < 0.1


def q4k_like(gen, rows: int = 16, blocks: int = 4) -> torch.Tensor:
    """Weights with GGUF Q4_K's structure: per super-block of 256 an fp16 ``d`` and ``dmin``, per
    group of 32 a 6-bit scale and minimum, ``w = d * sc * q - dmin * m``; each group spans 12 steps
    (0 and 12 present), as a fitted block does."""
    d = (torch.rand(rows, blocks, 1, 1, generator=gen) * 1e-3 + 1e-4).half().float()
    dmin = (torch.rand(rows, blocks, 1, 1, generator=gen) * 1e-3 + 1e-4).half().float()
    sc = torch.randint(1, 64, (rows, blocks, 8, 1), generator=gen).float()
    m = torch.randint(0, 64, (rows, blocks, 8, 1), generator=gen).float()
    q = torch.randint(0, 13, (rows, blocks, 8, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 12
    return (d * sc * q - dmin * m).reshape(rows, blocks * 256)


def test_search_reproduces_block_quantized_weights(gen):
    """GGUF-style blocks (Q5_0-like codes in int8, Q4_K blocks in int4) come back exactly."""
    d = torch.rand(32, 8, 1, generator=gen) + 0.1
    q5 = torch.randint(-16, 16, (32, 8, 32), generator=gen).float()
    q5[..., 0] = -16  # the extreme present, as Q5_0 makes it
    w5 = (q5 * d).reshape(32, 256)
    assert float((quantize_weight(w5, "int8", search=True).dequantize() - w5).abs().max()) < 1e-5  # up to fp32 rounding
    assert float((quantize_weight(w5, "int8", search=False).dequantize() - w5).abs().max()) > 1e-3
    w4 = q4k_like(gen)
    exact = 1e-6 * float(w4.abs().max())  # fp32 rounding of d * sc * q - dmin * m
    assert float((quantize_weight(w4, "int4", search=True).dequantize() - w4).abs().max()) < exact
    assert float((quantize_weight(w4, "int4", search=False).dequantize() - w4).abs().max()) > 100 * exact


def test_blocks_of_a_real_gguf_map_without_loss():
    """Every Q4_K and Q8_0 tensor of the embedded 270M's GGUF (llama.cpp's own quantizer wrote it)
    becomes int4 / int8 from its bytes with the values gguf-py dequantizes, exactly; the scale
    search on those values (the path for files converted elsewhere) reproduces a Q4_K tensor up to
    fp32 rounding."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader
    from gguf.quants import dequantize as gguf_dequantize

    from gemma4_nb.kernels.qweight import from_q4_k, from_q8_0
    from gemma4_nb.runtime.resolve import embedded_model

    reader = GGUFReader(str(embedded_model()))
    seen = set()
    for t in reader.tensors:
        if t.tensor_type not in (T.Q4_K, T.Q8_0):
            continue
        shape = tuple(int(d) for d in reversed(t.shape))
        raw = np.asarray(t.data).reshape(shape[0], -1)
        w = torch.from_numpy(gguf_dequantize(raw, t.tensor_type).astype(np.float32))
        mapped = (from_q4_k if t.tensor_type == T.Q4_K else from_q8_0)(raw, shape)
        assert torch.equal(mapped.dequantize(), w), t.name
        if t.tensor_type == T.Q4_K and T.Q4_K not in seen:
            back = quantize_weight(w[:512], "int4", search=True).dequantize()
            assert float((back - w[:512]).abs().max()) <= 1e-6 * float(w.abs().max()), t.name
        seen.add(t.tensor_type)
    assert seen == {T.Q4_K, T.Q8_0}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("t", [1, 3, 7, 40])  # 7: four rows at once, then three one by one
def test_quantized_linear(fmt, t, gen, monkeypatch):
    w = quantize_weight(torch.randn(200, 320, generator=gen), fmt)
    x = torch.randn(t, 320, generator=gen)
    monkeypatch.setenv(ops.PREFILL_ENV, "fp32")  # t=40: dequantized blocks and torch's GEMM, exact
    want = (fake_quant_for(x, w) if t <= ops.integer_batch(320) else x) @ w.dequantize().t()
    close(ops.linear(x, w), want)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_bf16_prefill_products(fmt, gen, monkeypatch):
    """Prefill-sized products in bf16 (forced with ``$GEMMA4_NB_PREFILL=bf16``, whatever the CPU):
    activations and the dequantized weight rounded to bf16, fp32 accumulation, the output rounded
    to bf16. The dequantizer's bf16 rounding is torch's (nearest even)."""
    w = quantize_weight(torch.randn(300, 320, generator=gen) * 0.02, fmt)
    x = torch.randn(40, 320, generator=gen)
    monkeypatch.setenv(ops.PREFILL_ENV, "bf16")
    assert ops.prefill_dtype() == torch.bfloat16
    for _, _, block in ops.dequantized_blocks(w, torch.bfloat16):
        assert torch.equal(block, w.dequantize().bfloat16())
    got = ops.linear(x, w)
    want = x.bfloat16().float() @ w.dequantize().bfloat16().float().t()
    # bf16 output rounding: half a unit of the 8-bit mantissa, relative to each output
    assert float(((got - want).abs() / want.abs().clamp_min(1e-3)).max()) <= 2 ** -8
    monkeypatch.setenv(ops.PREFILL_ENV, "fp32")
    exact = ops.linear(x, w)
    assert float((got - exact).abs().max()) <= 2e-2 * float(exact.abs().max())  # bf16 vs fp32
    assert ops.prefill_dtype("int4") == ops.prefill_dtype("int8") == torch.float32
    monkeypatch.delenv(ops.PREFILL_ENV)  # the default: int4 in bf16 where the CPU has native bf16
    assert ops.prefill_dtype("int8") == torch.float32
    assert ops.prefill_dtype("int4") == (torch.bfloat16 if ops.native_bf16() else torch.float32)
    monkeypatch.setattr(ops, "native_bf16", lambda: False)
    assert ops.prefill_dtype("int4") == torch.float32
    monkeypatch.setenv(ops.PREFILL_ENV, f"bfloat-{fmt}")  # a misspelt value: a warning naming it (once), then auto
    with pytest.warns(UserWarning, match=f"GEMMA4_NB_PREFILL='bfloat-{fmt}' is not a prefill dtype: use auto, bf16 or fp32"):
        assert ops.prefill_dtype("int4") == torch.float32


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_fused_gate_up_gelu(fmt, gen):
    gate, up = (quantize_weight(torch.randn(160, 64, generator=gen), fmt) for _ in range(2))
    down = quantize_weight(torch.randn(64, 160, generator=gen), fmt)
    x = torch.randn(2, 64, generator=gen)
    xq = fake_quant_for(x, gate)
    h = ref.gelu_tanh(xq @ gate.dequantize().t()) * (xq @ up.dequantize().t())
    close(ops.gated_mlp(x, gate, up, down), fake_quant_for(h, down) @ down.dequantize().t())


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("cap", [None, 30.0])
def test_fused_head_topk(fmt, cap, gen):
    head = quantize_weight(torch.randn(5000, 64, generator=gen), fmt)
    h = torch.randn(64, generator=gen)
    logits = ref.softcap(fake_quant_for(h[None], head) @ head.dequantize().t(), cap)[0]
    close(ops.head_logits(h[None], head, cap)[0], logits)  # the full logits, same activations
    vals, ids = ops.head_topk(h, head, cap, 8)
    want_vals, want_ids = torch.topk(logits, 8)
    assert torch.equal(ids, want_ids)
    close(vals, want_vals)


def test_nibble_planes_hold_the_int8_codes(gen):
    from gemma4_nb.kernels.qweight import to_planes

    w = quantize_weight(torch.randn(70, 96, generator=gen), "int8")
    p = to_planes(w)
    assert p.planes and p.codes.shape == (70, 48) and p.nbytes > w.nbytes  # + the row bounds
    assert torch.equal(p.int8_codes(), w.codes)
    assert torch.equal(p.dequantize(), w.dequantize())
    assert torch.equal(p[torch.tensor([3, 69])], w.dequantize()[[3, 69]])
    x = torch.randn(2, 96, generator=gen)
    close(ops.linear(x, p), fq(x) @ w.dequantize().t())


@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("first_pass", ["screen", "columns", "full"])
def test_screened_head_is_exact(k, cap, first_pass, gen):
    """The head of nibble planes (pass 1: estimates from the high plane, the same with learned
    exact columns, or from both planes with one-part activations; pass 2: exact values of the rows
    the error bound cannot exclude) returns exactly the plain head's top-k, including near-ties:
    rows that differ only in their low nibbles, the case the screen cannot tell apart."""
    from gemma4_nb.kernels.cpu_numba import ScreenPolicy
    from gemma4_nb.kernels.qweight import to_planes

    base = torch.randn(6000, 128, generator=gen) * 0.05
    base[1000:1100] = base[7] + 0.002 * torch.randn(100, 128, generator=gen)  # 100 near-copies of row 7
    w = quantize_weight(base, "int8")
    p = to_planes(w)
    policy = p.__dict__["_screen_policy"] = ScreenPolicy()
    policy.skip = 0 if first_pass != "full" else 10**9
    policy.LEARN_CALLS = 2 if first_pass == "columns" else 10**9
    for scale in (0.1, 1.0, 30.0):
        for row in (None, 7):
            h = torch.randn(128, generator=gen) * scale if row is None else w.dequantize()[row] * scale
            h[[5, 40, 99]] = torch.tensor([4.0, -5.0, 6.0]) * h.abs().max()  # outlier columns, as in real hidden states
            want_vals, want_ids = ops.head_topk(h, w, cap, k)
            got_vals, got_ids = ops.head_topk(h, p, cap, k)
            assert torch.equal(got_ids, want_ids)
            close(got_vals, want_vals, rel=1e-5)
    assert (policy.full > 0) == (first_pass == "full")
    learned = set(policy.cols.tolist())
    assert learned >= {5, 40, 99} if first_pass == "columns" else not learned


@pytest.mark.parametrize("first_pass", ["screen", "columns"])
def test_screen_reads_fp16_scales_when_they_are_exact(first_pass, gen):
    """A head whose scales are all fp16 values (a GGUF Q8_0 head) is screened with them as fp16
    bits, half the bytes: the same estimates bit for bit as with the fp32 scales, so the same
    exact top-k. A head with any other scale keeps its fp32 scales for the screen. Rows of 21
    groups: two whole octets, two pairs and one group alone, each reading its scales its own way."""
    import dataclasses

    from gemma4_nb.kernels.cpu_numba import EXACT_COLUMNS, ScreenPolicy

    w = quantize_weight(torch.randn(3000, 672, generator=gen) * 0.05, "int8")
    assert not ScreenPolicy().screen_scales(ops.kernel_weight(to_planes(w))).dtype == np.uint16
    w16 = dataclasses.replace(w, scales=w.scales.half().float())
    p = to_planes(w16)
    policy = p.__dict__["_screen_policy"] = ScreenPolicy()
    policy.LEARN_CALLS = 1 if first_pass == "columns" else 10**9
    kw = ops.kernel_weight(p)
    for scale in (0.3, 3.0):
        h = torch.randn(2, 672, generator=gen) * scale
        h[:, [9, 100]] *= 8  # outlier columns, as in real hidden states
        vals, ids = ops.head_topk_rows(h, p, 30.0, 4)
        want = torch.topk(ref.softcap(fake_quant_for(h, w16) @ w16.dequantize().t(), 30.0), 4)
        assert torch.equal(ids, want.indices)
        close(vals, want.values, rel=1e-5)
    half = policy.screen_scales(kw)
    assert half.dtype == np.uint16 and half.nbytes * 2 == kw[1].nbytes
    x = h.numpy()
    cols, col_err = (policy.cols, policy.col_err) if first_pass == "columns" else (
        np.empty(0, dtype=np.int64), np.zeros((1, EXACT_COLUMNS), dtype=np.float32))
    assert len(cols) == (EXACT_COLUMNS if first_pass == "columns" else 0)
    got = []
    for scales in (half, kw[1]):
        est = np.empty((2, 3000), dtype=np.float32)
        pv, pi = np.empty((2, 8, 4), dtype=np.float32), np.empty((2, 8, 4), dtype=np.int64)
        nb._head_screen(x, kw, 4, 8, False, est, pv, pi, cols, col_err, scales)
        got.append(est)
    assert np.array_equal(got[0], got[1])


@pytest.mark.skipif(not WIDE, reason="the sixteen-row screen needs 512-bit VNNI (other machines run the row screen)")
@pytest.mark.parametrize("k", [352, 640])
@pytest.mark.parametrize("half_scales", [False, True])
def test_screen_of_sixteen_rows_against_float64(k, half_scales, gen):
    """The screen sixteen rows to a vector (kernels/simd_screen.py) against the same estimate in
    float64 from the arrays it reads: ``sum_g scale * (xd * (16 high) . xq - 120.5 xs)`` plus the
    exact columns' share, for 1 to 9 positions (tiles of four and the rest), rows past the last
    whole block, fp32 or fp16 scales. The bound is the fp32 rounding of sums of that size:
    1e-5 of the sum of the terms' magnitudes. It also equals the row screen's estimate (the
    kernel a single position runs) to the same bound."""
    from gemma4_nb.kernels.cpu_numba import EXACT_COLUMNS

    n = 16 * 7 + 5
    w = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, "int8")
    if half_scales:
        w = dataclasses.replace(w, scales=w.scales.half().float())
    high, scales, low, _ = ops.kernel_weight(to_planes(w))
    table = scales.astype(np.float16).view(np.uint16) if half_scales else scales
    u = np.concatenate([(high & 15).astype(np.float64), (high >> 4).astype(np.float64)], axis=1)
    g_n = k // 32
    # the nibble plane's byte i of a group holds weights i and 16 + i
    u = (16 * u).reshape(n, 2, g_n, 16).transpose(0, 2, 1, 3).reshape(n, g_n, 32) - 120.5
    col_err = torch.randn(n, EXACT_COLUMNS, generator=gen).numpy() * 0.01
    for t_n in (1, 2, 3, 4, 5, 8, 9):
        x = (torch.randn(t_n, k, generator=gen) * 2).numpy()
        xq, xd, xs = nb.quantize_activations(x)
        x_col = torch.randn(t_n, EXACT_COLUMNS, generator=gen).numpy()
        prod = np.einsum("ngi,tgi->tng", u, xq.astype(np.float64).reshape(t_n, g_n, 32))
        terms = scales.astype(np.float64)[None] * xd[:, None, :g_n]
        for use_cols in (False, True):
            want = (terms * prod).sum(-1)
            mag = (np.abs(terms) * np.einsum("ngi,tgi->tng", np.abs(u), np.abs(xq.astype(np.float64))
                                             .reshape(t_n, g_n, 32))).sum(-1)
            if use_cols:
                want = want + x_col.astype(np.float64) @ col_err.astype(np.float64).T
                mag = mag + np.abs(x_col) @ np.abs(col_err).T
            got = np.empty((t_n, n), dtype=np.float32)
            nb._estimates_blocks((xq, xd, xs), high, low, table, use_cols, col_err, x_col, got)
            assert np.all(np.abs(got - want) <= 1e-5 * mag + 1e-30), (t_n, use_cols)
            rows = np.empty((t_n, n), dtype=np.float32)
            nb._estimates_screen((xq, xd, xs), high, low, table, 4, use_cols, col_err, x_col, rows)
            assert np.all(np.abs(got - rows) <= 1e-5 * mag + 1e-30), (t_n, use_cols)


@pytest.mark.parametrize("layout,first_pass", [("int4", None), ("int8", None), ("planes", "screen"),
                                               ("planes", "columns"), ("planes", "full")])
def test_head_topk_of_several_positions(layout, first_pass, gen):
    """A verification's positions through the head at once (each row read once for all of them:
    1 to 7 positions, the blocks of 4 and 2 and the single remainder) give every position exactly
    its own top-k, as one position at a time does."""
    from gemma4_nb.kernels.cpu_numba import ScreenPolicy
    from gemma4_nb.kernels.qweight import to_planes

    w = quantize_weight(torch.randn(4000, 96, generator=gen) * 0.05, "int4" if layout == "int4" else "int8")
    p = to_planes(w) if layout == "planes" else w
    if layout == "planes":
        policy = p.__dict__["_screen_policy"] = ScreenPolicy()
        policy.skip = 0 if first_pass != "full" else 10**9
        policy.LEARN_CALLS = 1 if first_pass == "columns" else 10**9
    for t in range(1, 8):
        h = torch.randn(t, 96, generator=gen) * 3
        h[:, [5, 40]] *= 8  # outlier columns, as in real hidden states
        vals, ids = ops.head_topk_rows(h, p, 30.0, 5)
        assert vals.shape == ids.shape == (t, 5)
        logits = ref.softcap(fake_quant_for(h, w) @ w.dequantize().t(), 30.0)
        for i in range(t):
            one_vals, one_ids = ops.head_topk(h[i], p, 30.0, 5)
            assert torch.equal(ids[i], one_ids)
            close(vals[i], one_vals, rel=1e-6)
            assert torch.equal(ids[i], torch.topk(logits[i], 5).indices)


def test_screen_columns_norms(gen):
    """The screen's side data for exact columns against torch: its errors there, and per row the
    norm of its error outside them and the norm of its row with them exact."""
    from gemma4_nb.kernels import cpu_numba
    from gemma4_nb.kernels.qweight import to_planes

    w = quantize_weight(torch.randn(50, 96, generator=gen), "int8")
    p = to_planes(w)
    cols = np.array([0, 17, 31, 32, 95], dtype=np.int64)
    col_err = np.empty((50, cpu_numba.EXACT_COLUMNS), dtype=np.float32)
    err = np.empty((50, 2), dtype=np.float32)
    cpu_numba.screen_columns(p.codes.numpy(), p.low.numpy(), p.scales.numpy(), cols, col_err, err)
    c = w.codes.long()
    s = w.scales.double().repeat_interleave(32, dim=1)
    screen = (16 * (c >> 4) + 7.5) * s
    exact = c * s
    mask = torch.zeros(96, dtype=torch.bool)
    mask[cols] = True
    close(col_err[:, :5], (exact - screen)[:, cols], rel=1e-6)
    assert not col_err[:, 5:].any()
    close(err[:, 0], (exact - screen)[:, ~mask].norm(dim=1), rel=1e-5)
    close(err[:, 1], torch.where(mask, exact, screen).norm(dim=1), rel=1e-5)


def test_exact_columns_shrink_pass_2(gen):
    """With the columns that hold most of the activations' energy computed exactly, pass 2
    rescores far fewer rows (same answers: see test_screened_head_is_exact)."""
    from gemma4_nb.kernels.cpu_numba import ScreenPolicy
    from gemma4_nb.kernels.qweight import to_planes

    p = to_planes(quantize_weight(torch.randn(20000, 256, generator=gen) * 0.05, "int8"))
    hs = [torch.randn(256, generator=gen) for _ in range(24)]
    for h in hs:
        h[[3, 70, 71, 200]] *= 12
    rescored = {}
    for learn in (10**9, 4):
        policy = p.__dict__["_screen_policy"] = ScreenPolicy()
        policy.LEARN_CALLS = learn
        for i, h in enumerate(hs):
            if i == 8:
                policy.rescored = 0  # count the last 16 calls
            ops.head_topk(h, p, None, 1)
        rescored[learn] = policy.rescored
    assert rescored[4] < 0.5 * rescored[10**9], rescored


def test_screen_policy_backs_off_on_flat_logits():
    from gemma4_nb.kernels.cpu_numba import ScreenPolicy

    policy = ScreenPolicy()
    assert policy.use_screen()
    policy.observe(900, 1000, screened=True)  # nearly every row had to be computed exactly
    assert [policy.use_screen() for _ in range(ScreenPolicy.BACKOFF)] == [False] * ScreenPolicy.BACKOFF
    assert policy.use_screen()  # tried again
    policy.observe(10, 1000, screened=True)
    assert policy.use_screen()


@pytest.mark.parametrize("window,cap,groups", [(None, None, 4), (7, None, 2), (None, 50.0, 1), (33, 20.0, 8)])
def test_decode_attention(window, cap, groups, gen):
    hkv, tk, d = 2, 150, 32
    q = torch.randn(hkv * groups, 1, d, generator=gen)
    k = torch.randn(hkv, tk, d, generator=gen)
    v = torch.randn(hkv, tk, d, generator=gen)
    q_pos, k_pos = range(tk + 9, tk + 10), range(10, tk + 10)  # the last key is the query's own
    want = ref.attention(q, k, v, q_pos, k_pos, window, 0.3, cap)
    got = ops.attention(q, k, v, q_pos, k_pos, window, 0.3, cap, fused=True)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < 1e-5


@pytest.mark.parametrize("window", [None, 40])
def test_decode_attention_of_several_positions_is_each_alone_bit_for_bit(window, gen):
    """A verification's positions attend in one call; each gets the bits it gets alone (a decode
    step), and the reference's values."""
    hkv, groups, tk, d, t_n = 2, 3, 200, 32, 5
    q = torch.randn(hkv * groups, t_n, d, generator=gen)
    k = torch.randn(hkv, tk, d, generator=gen)
    v = torch.randn(hkv, tk, d, generator=gen)
    k_pos = range(10, tk + 10)
    q_pos = range(tk + 10 - t_n, tk + 10)  # the last t_n keys are the queries' own
    many = ops.attention(q, k, v, q_pos, k_pos, window, 0.3, None, fused=True)
    for t in range(t_n):
        one = ops.attention(q[:, t:t + 1], k[:, :tk - t_n + t + 1], v[:, :tk - t_n + t + 1],
                            range(q_pos[t], q_pos[t] + 1), range(10, q_pos[t] + 1), window, 0.3, None, fused=True)
        assert torch.equal(many[t:t + 1], one)
    want = ref.attention(q, k, v, q_pos, k_pos, window, 0.3, None)
    assert float((many - want).abs().max()) < 1e-5


def _sliding_and_k_eq_v_config():
    """Two layers: a sliding one with K and V (2 KV heads), a K=V full one (1 KV head)."""
    from gemma4_nb.devtools.tiny import tiny_config
    from gemma4_nb.runtime.config import parse_config

    return parse_config(tiny_config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                    global_head_dim=128, attention_k_eq_v=True, sliding_window=24,
                                    layer_types=["sliding_attention", "full_attention"]))


def _rope_tables(pairs: int, positions: int = 400):
    freqs = (torch.arange(positions, dtype=torch.float64)[:, None]
             * (0.5 ** torch.arange(pairs, dtype=torch.float64))[None])
    return freqs.cos().float(), freqs.sin().float()


def test_attention_rebuilds_the_keys_of_a_k_eq_v_layer_from_the_chunked_cache(gen):
    """A K=V layer stores only V; the fused attention rebuilds each key as rope(v * key norm
    weight) inside the kernel, reading the cache's chunks (a partial rotation, as Gemma 4's full
    layers have). A decode step and a verification's positions
    against the reference over keys rebuilt in float64; each verification position gets the bits
    of a decode step alone."""
    from gemma4_nb.runtime.kv_cache import KVCache

    cfg = _sliding_and_k_eq_v_config()
    spec = cfg.layers[1]
    assert spec.k_eq_v and spec.num_kv_heads == 1
    cache = KVCache(cfg, chunk=8, max_rollback=4)
    d, pairs = spec.head_dim, 16  # a quarter of the pairs rotated
    cos, sin = _rope_tables(pairs)
    kw = (1.0 + torch.rand(d, generator=gen)).contiguous()
    checked = 0
    for step in range(40):
        t = 30 if step == 0 else (3 if step % 5 == 4 else 1)
        q_pos = cache.begin(t)
        for s in cfg.layers:
            v = torch.randn(s.num_kv_heads, t, s.head_dim, generator=gen)
            k = None if s.k_eq_v else torch.randn(s.num_kv_heads, t, s.head_dim, generator=gen)
            cache.update(s.index, k, v, gather=False)
        if step % 3 == 0 or t > 1:
            view = cache.chunk_view(spec.index)
            assert view is not None and view[0] is None
            _, v_all, k_pos = cache.read(spec.index)
            keys = ref.apply_rope(v_all.double() * kw.double(), cos[k_pos.start:k_pos.stop].double(),
                                  sin[k_pos.start:k_pos.stop].double(), seq_dim=1)
            q = torch.randn(cfg.num_heads, t, d, generator=gen) / 4
            got = ops.attention_chunks(q, view, 0.3, None, None, (kw, cos[view[6].start:view[6].stop],
                                                                   sin[view[6].start:view[6].stop]))
            want = ref.attention(q.double(), keys, v_all.double(), q_pos, k_pos, None, 0.3, None)
            assert float((got.double() - want).abs().max()) < 1e-5 * float(want.abs().max()) + 1e-6
            for i in range(t if t > 1 else 0):  # each position alone: the cache as a decode step sees it
                first, last = view[6].start, q_pos.start + i
                own = view[:5] + (view[5] - (t - 1 - i), range(first, last + 1))
                alone = ops.attention_chunks(q[:, i:i + 1], own, 0.3, None, None,
                                             (kw, cos[first:last + 1], sin[first:last + 1]))
                assert torch.equal(alone[0], got[i])
            checked += 1
        cache.commit()
    assert checked > 10


@pytest.mark.parametrize("layer", [0, 1], ids=["sliding", "full-k-eq-v"])
def test_attention_reads_an_int8_cache_as_stored(layer, gen):
    """An int8 KV cache's rows go into the fused attention as stored, each with its scale (no
    dequantized copy): against the reference over the cache's own dequantized K/V (float64), on a
    sliding layer with K and V and on a K=V full layer; a verification's positions each get the
    bits of a decode step alone."""
    from gemma4_nb.runtime.kv_cache import KVCache

    cfg = _sliding_and_k_eq_v_config()
    spec = cfg.layers[layer]
    cache = KVCache(cfg, chunk=8, max_rollback=4, kv_dtype="int8")
    d, pairs = spec.head_dim, spec.head_dim // 2
    cos, sin = _rope_tables(pairs)
    kw = (1.0 + torch.rand(d, generator=gen)).contiguous()
    checked = 0
    for step in range(30):
        t = 20 if step == 0 else (3 if step % 4 == 3 else 1)
        q_pos = cache.begin(t)
        for s in cfg.layers:
            v = torch.randn(s.num_kv_heads, t, s.head_dim, generator=gen)
            k = None if s.k_eq_v else torch.randn(s.num_kv_heads, t, s.head_dim, generator=gen)
            cache.update(s.index, k, v, gather=False)
        view = cache.chunk_view(spec.index)
        assert view.v_data.dtype == torch.int8 and view.v_scale is not None
        k_all, v_all, k_pos = cache.read(spec.index)  # dequantized
        keys_from = None
        if spec.k_eq_v:
            k_all = ref.apply_rope(v_all.double() * kw.double(), cos[k_pos.start:k_pos.stop].double(),
                                   sin[k_pos.start:k_pos.stop].double(), seq_dim=1)
            keys_from = (kw, cos[view.keys.start:view.keys.stop], sin[view.keys.start:view.keys.stop])
        q = torch.randn(cfg.num_heads, t, d, generator=gen) / 4
        got = ops.attention_chunks(q, view, 0.3, None, spec.window, keys_from)
        want = ref.attention(q.double(), k_all.double(), v_all.double(), q_pos, k_pos, spec.window, 0.3, None)
        assert float((got.double() - want).abs().max()) < 1e-5 * float(want.abs().max()) + 1e-6
        for i in range(t if t > 1 else 0):  # each position alone: the cache as a decode step sees it
            last = q_pos.start + i
            own = view._replace(n=view.n - (t - 1 - i), keys=range(view.keys.start, last + 1))
            own_from = None if keys_from is None else (kw, cos[own.keys.start:last + 1], sin[own.keys.start:last + 1])
            alone = ops.attention_chunks(q[:, i:i + 1], own, 0.3, None, spec.window, own_from)
            assert torch.equal(alone[0], got[i])
        checked += 1
        cache.commit()
    assert checked == 30


def test_decode_attention_splits_agree(gen):
    q, k, v = torch.randn(4, 16, generator=gen), torch.randn(1, 300, 16, generator=gen), torch.randn(1, 300, 16, generator=gen)
    one = nb.decode_attention(q.numpy(), k.numpy(), v.numpy(), 5, 290, 0.25, None, splits=1)
    many = nb.decode_attention(q.numpy(), k.numpy(), v.numpy(), 5, 290, 0.25, None, splits=7)
    s = (q @ k[0, 5:290].t()) * 0.25
    want = torch.softmax(s, -1) @ v[0, 5:290]
    assert np.abs(one - many).max() < 1e-5
    assert float((torch.from_numpy(many) - want).abs().max()) < 1e-5
    assert not math.isnan(float(many.sum()))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (2, 224), (1, 640)])
def test_row_dot_intrinsics(fmt, shape, gen):
    """The vector intrinsics against numpy in float64, one row at a time and every row (1 to 20
    groups: the unrolled blocks of 4 groups, the remainder loop, and both)."""
    t, k = shape
    w = quantize_weight(torch.randn(37, k, generator=gen), fmt)
    x = torch.randn(t, k, generator=gen)
    out = np.empty((t, 37), dtype=np.float32)
    nb.gemm(x.numpy(), ops.kernel_weight(w), out)
    want = fake_quant_for(x, w).double() @ w.dequantize().double().t()
    close(out, want, rel=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("k", [768, 800, 3840, 640, 960])
def test_products_of_several_positions_are_each_alone_bit_for_bit(fmt, k, gen):
    """Rows of whole super-blocks (int4's four-group blocks on 512-bit VNNI), with a group, half a
    super-block (640) or half and two groups (960) left over: 1 to 5 positions (pairs and an odd last one) give each position
    the bits it gets alone, and the reference's values."""
    w = quantize_weight(torch.randn(45, k, generator=gen), fmt)
    x = torch.randn(5, k, generator=gen)
    kw = ops.kernel_weight(w)
    alone = np.empty((5, 45), dtype=np.float32)
    for t in range(5):
        nb.gemm(x[t:t + 1].numpy(), kw, alone[t:t + 1])
    for t_n in (2, 3, 5):
        out = np.empty((t_n, 45), dtype=np.float32)
        nb.gemm(x[:t_n].numpy(), kw, out)
        assert np.array_equal(out, alone[:t_n])
    want = fake_quant_for(x, w).double() @ w.dequantize().double().t()
    close(alone, want, rel=1e-5)


@pytest.mark.skipif(not WIDE, reason="the sixteen-row block kernels need 512-bit VNNI (other machines keep the rows)")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("k", [256, 640, 1024, 2048, 352])
def test_block_products_of_several_positions_are_each_alone_bit_for_bit(fmt, k, gen):
    """A layer's matrix with its codes in sixteen-row blocks (``kernel_weight(w, blocks=True)``):
    whole super-blocks (256, 1024, 2048: the 270M's widths), two and a half (640) and one and
    three eighths (352); 1 to 9 positions (tiles of four or two and the rest) give each position the
    bits it gets alone, and the reference's values (float64) within fp32 rounding of the sums'
    magnitude. The rows' copy is the blocks'; the products of the rows' tuple agree with them."""
    w = quantize_weight(torch.randn(48, k, generator=gen), fmt)
    kw = ops.kernel_weight(w, blocks=True)
    assert nb.blocked(kw) and not nb.blocked(ops.kernel_weight(w))
    x = torch.randn(9, k, generator=gen)
    alone = np.empty((9, 48), dtype=np.float32)
    for t in range(9):
        nb.gemm(x[t:t + 1].numpy(), kw, alone[t:t + 1])
    for t_n in (2, 3, 4, 5, 8, 9):
        out = np.empty((t_n, 48), dtype=np.float32)
        nb.gemm(x[:t_n].numpy(), kw, out)
        assert np.array_equal(out, alone[:t_n]), t_n
    xq, wd = fake_quant_for(x, w).double(), w.dequantize().double()
    want = xq @ wd.t()
    magnitude = xq.abs() @ wd.abs().t()  # the sums' terms' size: what fp32 rounding scales with
    assert ((torch.from_numpy(alone).double() - want).abs() <= 1e-5 * magnitude + 1e-30).all()
    rows = np.empty((9, 48), dtype=np.float32)
    nb.gemm(x.numpy(), ops.kernel_weight(w), rows)
    assert ((torch.from_numpy(rows).double() - torch.from_numpy(alone).double()).abs() <= 2e-5 * magnitude).all()


def test_block_codes_layout():
    """``block_codes``: group ``g`` of block ``b`` is vectors of 64 bytes whose 4-byte lane ``j``
    is row ``16 b + j``'s bytes; int8 codes plus 128, then the group's sixteen scales."""
    from gemma4_nb.kernels.simd_blocks import block_codes

    codes = np.random.default_rng(0).integers(0, 256, size=(32, 64), dtype=np.uint8)
    b4 = block_codes(codes, int4=True)  # 4 groups of 16 bytes a row
    assert b4.shape == (2, 16 * 64)
    for b, g, q, j in ((0, 0, 0, 0), (1, 3, 2, 7), (0, 2, 3, 15)):
        at = g * 256 + q * 64 + 4 * j
        assert np.array_equal(b4[b, at:at + 4], codes[16 * b + j, 16 * g + 4 * q:16 * g + 4 * q + 4])
    scales = np.random.default_rng(1).random((32, 2), dtype=np.float32)
    b8 = block_codes(codes, int4=False, scales=scales)  # 2 groups of 32 bytes a row, then 16 scales
    assert b8.shape == (2, 2 * (512 + 64))
    for b, g, q, j in ((0, 1, 7, 3), (1, 0, 5, 15)):
        at = g * 576 + q * 64 + 4 * j
        assert np.array_equal(b8[b, at:at + 4], codes[16 * b + j, 32 * g + 4 * q:32 * g + 4 * q + 4] ^ 0x80)
        assert b8[b, g * 576 + 512:g * 576 + 576].view(np.float32)[j] == scales[16 * b + j, g]


# an x86-64 CPU without AVX-512 or VNNI, as numba's code generator takes it
HASWELL = ("haswell", "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+lzcnt,+movbe,+popcnt,+sse,+sse2,"
                      "+sse3,+sse4.1,+sse4.2,+ssse3,+xsave")


@pytest.mark.parametrize("flags, cpu", [(("HAS_VNNI", "WIDE"), HASWELL), (("WIDE",), None)],
                         ids=["no-vnni", "vnni-256"])
def test_products_without_vnni(flags, cpu, tmp_path):
    """Machines without AVX-VNNI run the same integer sums in fp32 arithmetic, and machines with
    256-bit VNNI only (AVX-VNNI) one group per instruction instead of two (kernels/simd.py):
    compiled that way in a fresh process (its own numba cache), every layout's product, a layer's
    matrix (no sixteen-row blocks there) in the fused q/k/v kernel, and the screened head still
    match the reference. Without VNNI the code is compiled for a CPU without AVX-512 (haswell's
    features, not this machine's), so an AVX-512 instruction left in a kernel fails its compile."""
    code = f"""
import numpy as np, torch
from gemma4_nb.kernels import simd
for name in {flags!r}:  # before any kernel compiles
    setattr(simd, name, False)
from gemma4_nb.kernels import cpu_decode, cpu_numba as nb, ops
from gemma4_nb.kernels.qweight import quantize_weight, to_planes
from quant_reference import fake_quant_for
g = torch.Generator().manual_seed(5)
worst = 0.0
for fmt in ("int8", "int4", "planes"):
    w = quantize_weight(torch.randn(300, 352, generator=g), "int4" if fmt == "int4" else "int8")
    w = to_planes(w) if fmt == "planes" else w
    x = torch.randn(2, 352, generator=g)
    want = fake_quant_for(x, w) @ w.dequantize().t()
    worst = max(worst, float((ops.linear(x, w) - want).abs().max() / want.abs().max()))
for fmt in ("int8", "int4"):
    wl = quantize_weight(torch.randn(64, 256, generator=g), fmt)
    kw = ops.kernel_weight(wl, blocks=True)
    assert not nb.blocked(kw)
    x = torch.randn(3, 256, generator=g)
    q, k, v = (np.empty((3, 64), dtype=np.float32) for _ in range(3))
    cpu_decode._qkv_rows(nb.quantize_activations_fine(x.numpy()), kw, kw, kw, 64, 64, q, k, v)
    want = fake_quant_for(x, wl) @ wl.dequantize().t()
    worst = max(worst, max(float((torch.from_numpy(a) - want).abs().max() / want.abs().max()) for a in (q, k, v)))
h = torch.randn(352, generator=g)
_, ids = ops.head_topk(h, w, None, 5)
assert torch.equal(ids, (fake_quant_for(h[None], w) @ w.dequantize().t())[0].topk(5).indices)
hs = torch.randn(3, 352, generator=g)  # a verification's positions: the row screen, by pairs
_, ids = ops.head_topk_rows(hs, w, None, 5)
assert torch.equal(ids, (fake_quant_for(hs, w) @ w.dequantize().t()).topk(5).indices)
print(worst)
"""
    env = {**__import__("os").environ, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(Path(__file__).parent)}
    if cpu:
        env["NUMBA_CPU_NAME"], env["NUMBA_CPU_FEATURES"] = cpu
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    assert float(out.stdout.split()[-1]) < 1e-5


def test_threading_layer_is_tbb_or_work_queue():
    """Never OpenMP by default (see cpu_numba._choose_threading_layer)."""
    import numba

    ops.linear(torch.randn(1, 64), quantize_weight(torch.randn(8, 64), "int8"))
    assert numba.threading_layer() in ("tbb", "workqueue")


def test_threads_follow_torch():
    import numba

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ops.linear(torch.randn(1, 64), quantize_weight(torch.randn(8, 64), "int8"))
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_compiled_kernels_are_cached_on_disk():
    """A fresh process loads every kernel from numba's on-disk cache instead of compiling it."""
    code = ("import time; from gemma4_nb.kernels import warmup as nb; nb.warm_up(); "
            "print(sum(len(k.stats.cache_misses) for k in nb.all_kernels()), "
            "sum(len(k.stats.cache_hits) for k in nb.all_kernels()))")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)  # fills the cache
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    misses, hits = int(out[0]), int(out[1])
    from gemma4_nb.kernels import warmup

    assert misses == 0 and hits >= len(warmup.all_kernels())


def test_kernel_cache_follows_every_source_of_the_folder(tmp_path):
    """numba checks a cached function against its own file only; with kernels/numba_cache.py a
    change in a file it merely calls into (as cpu_numba calls simd's intrinsics) recompiles it
    instead of running the stale machine code."""
    pkg = tmp_path / "stampedpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "from gemma4_nb.kernels import numba_cache\n"
        "numba_cache.install(Path(__file__).parent)\n")
    (pkg / "helper.py").write_text("from numba import njit\n\n@njit\ndef value():\n    return 1\n")
    (pkg / "main.py").write_text("from numba import njit\nfrom .helper import value\n\n"
                                 "@njit(cache=True)\ndef twice():\n    return 2 * value()\n")
    code = "import stampedpkg.main as m; print(m.twice(), len(m.twice.stats.cache_hits))"
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}

    def run():
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
        return out.stdout.split()

    assert run() == ["2", "0"]  # compiled
    assert run() == ["2", "1"]  # loaded from the on-disk cache
    (pkg / "helper.py").write_text("from numba import njit\n\n@njit\ndef value():\n    return 5\n")
    assert run() == ["10", "0"]  # main.py unchanged, but the folder changed: recompiled


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("heads,width", [(7, 40), (4, 256), (3, 16), (1, 9)])
def test_attention_block_intrinsics(heads, width, int8, gen):
    """The register-tiled scores and values of a block of keys (kernels/simd_float.py) against
    float64: every tile shape (4, 2 and 1 query heads; 4 and 1 keys; 4 and 1 column vectors), a
    scalar tail where the width is not a multiple of 16, and int8 rows with a scale each."""
    from numba import njit

    from gemma4_nb.kernels.simd_float import block_scores, block_values

    @njit
    def scores_and_values(q, lo, hi, rows, scales, first, nb, h, scale, p, a):
        block_scores(q, lo, hi, rows, scales, first, nb, h, scale, p)
        block_values(a, lo, hi, p, nb, rows, scales, first, h)

    hkv, block = 3, 32
    rows = torch.randn(20, hkv, width, generator=gen).numpy()
    scales = np.ones((20, hkv), dtype=np.float32)
    values = rows.astype(np.float64)
    if int8:
        scales = (0.5 + torch.rand(20, hkv, generator=gen)).numpy() / 40
        rows = torch.randint(-127, 128, (20, hkv, width), generator=gen, dtype=torch.int8).numpy()
        values = rows.astype(np.float64) * scales[..., None]
    for n_keys in (1, 2, 5, 9):
        q = torch.randn(heads + 2, width, generator=gen).numpy()
        a = torch.randn(heads + 2, width, generator=gen).numpy()
        p = np.full((heads + 2, block), 7.0, dtype=np.float32)
        a0, first, h = a.astype(np.float64), 6, 1
        scores_and_values(q, 1, 1 + heads, rows, scales, first, n_keys, h, 0.5, p, a)
        keys = values[first:first + n_keys, h]
        want_p = 0.5 * q[1:1 + heads].astype(np.float64) @ keys.T
        close(p[1:1 + heads, :n_keys], want_p, rel=1e-5)
        assert (p[:, n_keys:] == 7.0).all() and (p[0] == 7.0).all() and (p[-1] == 7.0).all()  # nothing else written
        want_a = a0.copy()
        want_a[1:1 + heads] += p[1:1 + heads, :n_keys].astype(np.float64) @ keys
        close(a, want_a, rel=1e-5)


def test_exp_fast():
    """The attention's vectorizable exp against float64 over the softmax's range, and 0 below its
    floor (no subnormal weights)."""
    from numba import njit

    from gemma4_nb.kernels.cpu_numba import exp_fast

    @njit(fastmath=True)
    def exps(x, out):
        for i in range(x.shape[0]):
            out[i] = exp_fast(x[i])

    x = np.linspace(-64.0, 20.0, 200001).astype(np.float32)
    out = np.empty_like(x)
    exps(x, out)
    want = np.exp(x.astype(np.float64))
    assert float((np.abs(out - want) / want).max()) < 4e-7
    exps(np.array([-64.01, -87.5, -200.0, -1e30], dtype=np.float32), out[:4])
    assert (out[:4] == 0.0).all()


@pytest.mark.parametrize("fmt", ["int8", "int4", "planes"])
def test_embedding_rows_equal_the_dequantized_rows(fmt, gen):
    """A decode step's embedding lookup (one numba call) gives the torch reference's values bit
    for bit: the table's rows dequantized (int4 from its super-blocks, int8 from nibble planes
    too), times the embedding scale, repeated and out-of-order ids included."""
    w = quantize_weight(torch.randn(300, 640, generator=gen), "int4" if fmt == "int4" else "int8")
    w = to_planes(w) if fmt == "planes" else w
    ids = torch.tensor([7, 0, 299, 7, 123])
    scale = torch.tensor(640 ** 0.5).to(torch.float32)
    got = ops.embedding(w, ids, float(scale))
    assert torch.equal(got, w[ids] * scale)
