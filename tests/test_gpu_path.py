"""The CUDA path's kernels (kernels/gpu.py).

Their math is plain torch except the Triton kernel, so most checks run on the CPU against the
reference kernels (kernels/torch_ops.py). The Triton kernel runs in Triton's CPU interpreter when
Triton is installed. Tests marked ``cuda`` run only where PyTorch sees a GPU.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: Triton kernels run in its CPU interpreter

from gemma4_nb.kernels import gpu
from gemma4_nb.kernels import torch_ops as ref
from gemma4_nb.kernels.qweight import QWeight, dequantize, quantize_weight

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(not gpu.triton_available(),
                                  reason="Triton is not installed (the fused quantized matmul runs in its CPU interpreter when it is)")
interpreted = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="Triton's CPU interpreter is for machines without a GPU")

HQ = 16  # Gemma 4 12B: 16 query heads; 8 KV heads x 256 (sliding), 1 KV head x 512 (full)


def _qkv(d: int, hkv: int, tq: int, tk: int, dtype=torch.float32, seed: int = 0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    # scale 1.0 as Gemma 4 (q and k come out of RMS norms): unit-variance scores keep softmax non-trivial
    q = torch.randn(HQ, tq, d, generator=gen) * d ** -0.25
    k = torch.randn(hkv, tk, d, generator=gen) * d ** -0.25
    v = torch.randn(hkv, tk, d, generator=gen)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def _cache_keys(q_start: int, tq: int, window: int | None) -> range:
    """The key positions the chunked cache hands a forward of ``tq`` queries at ``q_start``."""
    lo = 0 if window is None else max(0, q_start - window + 1)
    return range(lo, q_start + tq)


GEOMETRIES = [(256, 8, 1024), (256, 8, None), (512, 1, None), (512, 1, 1024)]


@pytest.mark.parametrize("d,hkv,window", GEOMETRIES)
@pytest.mark.parametrize("past,tq", [(1300, 1), (1100, 40), (0, 33)], ids=["decode", "prefill-past", "prefill"])
def test_sdpa_attention_matches_reference(d, hkv, window, past, tq):
    q_pos = range(past, past + tq)
    k_pos = _cache_keys(past, tq, window)
    q, k, v = _qkv(d, hkv, tq, len(k_pos))
    want = ref.attention(q, k, v, q_pos, k_pos, window, 1.0)
    got = gpu.attention(q, k, v, q_pos, k_pos, window, 1.0)
    assert got.shape == (tq, HQ, d) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("d,hkv,window", [(256, 8, 1024), (512, 1, None)])
def test_sdpa_attention_bf16_close_to_fp32(d, hkv, window):
    q_pos, k_pos = range(1100, 1124), _cache_keys(1100, 24, window)
    q, k, v = _qkv(d, hkv, 24, len(k_pos))
    exact = ref.attention(q, k, v, q_pos, k_pos, window, 1.0)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    got = gpu.attention(qb, kb, vb, q_pos, k_pos, window, 1.0)
    base = ref.attention(qb, kb, vb, q_pos, k_pos, window, 1.0)
    assert got.dtype == torch.bfloat16
    err, base_err = (got.float() - exact).abs().max().item(), (base.float() - exact).abs().max().item()
    assert err <= max(2 * base_err, 1e-2), (err, base_err)


def _image_blocks(tq: int) -> torch.Tensor:
    blocks = torch.full((tq,), -1, dtype=torch.long)
    blocks[5:21] = 0  # an image of 16 soft tokens
    blocks[30:36] = 1
    return blocks


@pytest.mark.parametrize("window", [None, 12])
def test_sdpa_attention_image_blocks_are_bidirectional(window):
    past, tq = 20, 48
    q_pos, k_pos = range(past, past + tq), _cache_keys(past, tq, window)
    q, k, v = _qkv(256, 8, tq, len(k_pos), seed=1)
    blocks = _image_blocks(tq)
    want = ref.attention(q, k, v, q_pos, k_pos, window, 1.0, blocks=blocks)
    got = gpu.attention(q, k, v, q_pos, k_pos, window, 1.0, blocks=blocks)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # the blocks matter: without them the first image token sees none of its block's later tokens
    assert (gpu.attention(q, k, v, q_pos, k_pos, window, 1.0) - want)[5].abs().max() > 1e-3


def test_sdpa_attention_blocks_of_queries_and_tensor_positions(monkeypatch):
    """Many query blocks (each with its own key range and mask rows), and positions given as
    tensors (no key-range shortcut), give the same result."""
    past, tq, window = 40, 64, 24
    q_pos, k_pos = range(past, past + tq), _cache_keys(past, tq, window)
    q, k, v = _qkv(512, 1, tq, len(k_pos), seed=2)
    blocks = _image_blocks(tq)
    want = ref.attention(q, k, v, q_pos, k_pos, window, 1.0, blocks=blocks)
    monkeypatch.setattr(gpu, "MASK_BLOCK_ELEMENTS", HQ * len(k_pos) * 5)  # 5 queries per block
    got = gpu.attention(q, k, v, q_pos, k_pos, window, 1.0, blocks=blocks)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    qt, kt = torch.arange(past, past + tq), torch.arange(k_pos.start, k_pos.stop)
    torch.testing.assert_close(gpu.attention(q, k, v, qt, kt, window, 1.0, blocks=blocks), want, atol=2e-5, rtol=1e-4)


def test_softcap_goes_to_the_reference():
    q_pos, k_pos = range(10, 18), range(0, 18)
    q, k, v = _qkv(256, 8, 8, 18, seed=3)
    want = ref.attention(q * 8, k * 8, v, q_pos, k_pos, None, 1.0, cap=5.0)
    torch.testing.assert_close(gpu.attention(q * 8, k * 8, v, q_pos, k_pos, None, 1.0, cap=5.0), want)


def test_attention_chunks_reads_the_chunked_cache():
    """Decode steps over a KV cache of small chunks (sliding layer dropped chunks, full layer
    kept all) through chunk_view agree with the reference over the gathered K/V."""
    from gemma4_nb.devtools.tiny import tiny_config
    from gemma4_nb.runtime.config import parse_config
    from gemma4_nb.runtime.kv_cache import KVCache

    cfg = parse_config(tiny_config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=256,
                                   global_head_dim=512, attention_k_eq_v=False, sliding_window=24,
                                   layer_types=["sliding_attention", "full_attention"]))
    cache = KVCache(cfg, chunk=8, max_rollback=4)
    gen = torch.Generator().manual_seed(4)
    for step in range(70):
        t = 20 if step == 0 else 1
        q_pos = cache.begin(t)
        for spec in cfg.layers:
            hkv, d = spec.num_kv_heads, spec.head_dim
            k, v = torch.randn(hkv, t, d, generator=gen) / 4, torch.randn(hkv, t, d, generator=gen)
            k_all, v_all, k_pos = cache.update(spec.index, k, v)
            if t == 1 and step % 7 == 0:
                q = torch.randn(cfg.num_heads, 1, d, generator=gen) / 4
                want = ref.attention(q, k_all, v_all, q_pos, k_pos, spec.window, 1.0)
                got = gpu.attention_chunks(q, cache.chunk_view(spec.index), 1.0)
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        cache.commit()
    assert cache.layers[0].first > 0  # the sliding layer did let chunks go


# -- weight-only quantized matmul --------------------------------------------------------------

def _qweight(fmt: str, out: int = 72, inp: int = 160, seed: int = 5, scale_dtype=torch.float32) -> tuple[QWeight, torch.Tensor]:
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05
    qw = quantize_weight(w, fmt).per_group()  # the layout the GPU kernels read
    qw.scales = qw.scales.to(scale_dtype)
    if qw.mins is not None:
        qw.mins = qw.mins.to(scale_dtype)
    return qw, dequantize(fmt, qw.codes, qw.scales.float(), None if qw.mins is None else qw.mins.float())


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_dequantize_rows_matches_quant_reference(fmt, scale_dtype):
    qw, full = _qweight(fmt, scale_dtype=scale_dtype)
    torch.testing.assert_close(gpu.dequantize_rows(qw, 0, qw.shape[0], torch.float32), full, atol=0, rtol=0)
    torch.testing.assert_close(gpu.dequantize_rows(qw, 13, 40, torch.bfloat16), full[13:40].bfloat16(), atol=0, rtol=0)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_dequant_linear_blocks(fmt, monkeypatch):
    qw, full = _qweight(fmt)
    x = torch.randn(3, 5, qw.shape[1], generator=torch.Generator().manual_seed(6))
    monkeypatch.setattr(gpu, "DEQUANT_BLOCK_ELEMENTS", 20 * qw.shape[1])  # 4 blocks of 20 rows
    got = gpu.dequant_linear(x, qw)
    assert got.shape == (3, 5, qw.shape[0])
    torch.testing.assert_close(got, x @ full.t(), atol=1e-5, rtol=1e-5)
    xb = x.bfloat16()
    torch.testing.assert_close(gpu.dequant_linear(xb, qw).float(), xb.float() @ full.bfloat16().float().t(), atol=2e-2, rtol=2e-2)


@needs_triton
@interpreted
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_triton_qlinear_in_interpreter(fmt, rows):
    """The fused-dequantization Triton kernel, run by Triton's interpreter on the CPU: output
    widths that are not a multiple of the block, and an input width (160) that is not a multiple
    of the K block (64), exercise the masks."""
    qw, full = _qweight(fmt, scale_dtype=torch.float16)
    x = torch.randn(rows, qw.shape[1], generator=torch.Generator().manual_seed(7))
    got = gpu.triton_qlinear(x, qw, block_n=32, block_k=64)
    torch.testing.assert_close(got, x @ full.t(), atol=1e-5, rtol=1e-5)


def test_qlinear_without_triton_uses_dequantized_blocks(monkeypatch):
    monkeypatch.setenv("GEMMA4_NB_CUDA_QMM", "torch")
    assert gpu.qmm_mode() == "torch"
    qw, full = _qweight("int4")
    x = torch.randn(2, qw.shape[1])
    torch.testing.assert_close(gpu.qlinear(x, qw), x @ full.t(), atol=1e-5, rtol=1e-5)


# -- the model through the GPU path's kernels --------------------------------------------------

def _route_ops_to_gpu_kernels(monkeypatch):
    """Send every attention and quantized product of ``ops`` to kernels/gpu.py, as CUDA tensors
    would, while the tensors stay on the CPU (the Triton kernel only where Triton interprets)."""
    from gemma4_nb.kernels import ops

    use_triton = gpu.triton_available() and os.environ.get("TRITON_INTERPRET") == "1"

    def qlinear(x, w):
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        if use_triton and rows <= gpu.TRITON_MAX_ROWS:
            return gpu.triton_qlinear(x, w)
        return gpu.dequant_linear(x, w)

    monkeypatch.setattr(ops, "fused_cpu", lambda w: False)
    monkeypatch.setattr(ops, "qlinear", qlinear)
    monkeypatch.setattr(ops, "attention", lambda q, k, v, qp, kp, window, scale, cap=None, blocks=None, fused=False:
                        gpu.attention(q, k, v, qp, kp, window, scale, cap, blocks))


@pytest.mark.parametrize("variant", ["b", "c"])  # b: K=V full layers; c: separate K/V, shared KV layers
@pytest.mark.parametrize("quant", [None, "int4"])
def test_model_through_gpu_kernels_matches_reference(hf_checkpoints, monkeypatch, variant, quant):
    """A prefill then decode steps of the tiny checkpoints, every attention (sliding windows
    shorter than the prompt, head dims differing by layer type) and every quantized product
    through the GPU path's kernels, against the same weights on the reference path."""
    import gemma4_nb
    from gemma4_nb.runtime.decoder import GemmaModel

    path, _ = hf_checkpoints[variant]
    model = gemma4_nb.load(path, device="cpu", dtype="fp32", quant=quant, progress=False)
    net = model.net
    ids = torch.tensor([2] + list(range(40, 72)))

    def run(net):
        cache = net.new_cache(chunk=8)
        out = [net.forward(ids[:26], cache, outputs="all").logits]
        out += [net.forward(ids[i : i + 1], cache).logits for i in range(26, len(ids))]
        return torch.cat(out)

    # the reference: the same (dequantized) weights through plain torch (the CPU's fused numba
    # kernels quantize activations to int8, which the GPU path does not)
    from gemma4_nb.kernels.qweight import QWeight

    want = run(GemmaModel(net.cfg, {n: w.dequantize() if isinstance(w, QWeight) else w for n, w in net.weights.items()}))
    _route_ops_to_gpu_kernels(monkeypatch)
    got = run(GemmaModel(net.cfg, net.weights))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


# -- on a CUDA GPU -----------------------------------------------------------------------------

@cuda
@pytest.mark.parametrize("d,hkv,window", GEOMETRIES)
@pytest.mark.parametrize("past,tq", [(3000, 1), (1100, 300)], ids=["decode", "prefill"])
def test_cuda_efficient_attention_head_dim_512(d, hkv, window, past, tq, monkeypatch):
    """Only the memory-efficient backend allowed: it must take head_dim 512, the mask and bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q_pos, k_pos = range(past, past + tq), _cache_keys(past, tq, window)
    q, k, v = _qkv(d, hkv, tq, len(k_pos), dtype=torch.bfloat16, device="cuda")
    want = ref.attention(q.float(), k.float(), v.float(), q_pos, k_pos, window, 1.0)
    monkeypatch.setattr(gpu, "sdpa_backends", lambda device: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]))
    got = gpu.attention(q, k, v, q_pos, k_pos, window, 1.0)
    assert (got.float() - want).abs().max().item() < 3e-2


@cuda
@needs_triton
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_qlinear(fmt, dtype):
    qw, full = _qweight(fmt, out=3840, inp=4096)
    qw = qw.to("cuda")
    x = torch.randn(4, 4096, device="cuda").to(dtype)
    got = gpu.triton_qlinear(x, qw)
    want = x.float() @ full.cuda().t()
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    assert (got.float() - want).abs().max().item() <= tol * want.abs().max().item()
    torch.testing.assert_close(gpu.dequant_linear(x, qw).float(), want, atol=tol * want.abs().max().item(), rtol=0)


@cuda
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_cuda_quantized_load_matches_cpu(hf_checkpoints, quant):
    """load(quant=..., device="cuda"): the same codes on the GPU (bf16 activations) as on the CPU."""
    import gemma4_nb

    path, _ = hf_checkpoints["c"]
    cpu = gemma4_nb.load(path, device="cpu", dtype="fp32", quant=quant, progress=False)
    gpu_model = gemma4_nb.load(path, device="cuda", quant=quant, progress=False)
    assert gpu_model.net.device.type == "cuda" and gpu_model.net.dtype == torch.bfloat16
    ids = torch.tensor([2] + list(range(40, 100)))
    want = cpu.net.forward(ids, cpu.net.new_cache(), outputs="all").logits
    got = gpu_model.net.forward(ids, gpu_model.net.new_cache(), outputs="all").logits.cpu()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"bf16-on-GPU vs fp32-on-CPU top-1 agreement {agree:.2f}"
    cache = gpu_model.net.new_cache()
    gpu_model.net.forward(ids[:-1], cache)
    step = gpu_model.net.forward(ids[-1:], cache).logits.cpu()  # decode: the Triton kernel
    assert (step[0] - got[-1]).abs().max().item() < 0.1 * got[-1].abs().max().item()


# -- bench --compare transformers --------------------------------------------------------------

@pytest.mark.parametrize("quant", [None, "int8"])
def test_transformers_baseline_holds_the_same_weights(hf_checkpoints, quant):
    """The benchmark's transformers model is built from gemma4-nb's weights (quantized ones
    dequantized): its logits match ours, and its generate is timed."""
    import json

    import gemma4_nb
    from gemma4_nb.devtools.bench_transformers import generate_speed, transformers_model

    path, _ = hf_checkpoints["c"]
    model = gemma4_nb.load(path, device="cpu", dtype="fp32", quant=quant, progress=False)
    hf = transformers_model(model.net, json.loads((path / "config.json").read_text()))
    ids = [2] + list(range(40, 70))
    want = model.net.forward(torch.tensor(ids), model.net.new_cache(), outputs="all").logits
    with torch.no_grad():
        got = hf(input_ids=torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(got, want, atol=1e-3 if quant else 1e-4, rtol=1e-3)
    r = generate_speed(hf, ids, decode=4)
    assert r["engine"] == "transformers" and r["prompt"] == len(ids)
    assert r["ttft_s"] > 0 and r["decode_tok_s"] > 0


def test_bench_compare_transformers_runs_both_engines(hf_checkpoints, capsys):
    from gemma4_nb.devtools.bench import bench_command

    path, _ = hf_checkpoints["c"]
    rows = bench_command(model=str(path), device="cpu", dtype="fp32", prompt=12, decode=3, compare="transformers",
                         repeat=2)
    assert [r["engine"] for r in rows] == ["gemma4-nb", "transformers"] * 2
    out = capsys.readouterr().out
    assert "ratio gemma4-nb / transformers, decode:" in out and "best of 2 each" in out


def test_gpu_path_imports_neither_transformers_nor_triton():
    """transformers is a test/benchmark dependency, and Triton is optional: importing the package,
    its kernels and its benchmark module pulls in neither."""
    import subprocess
    import sys

    code = ("import sys, gemma4_nb, gemma4_nb.devtools.bench, gemma4_nb.kernels.ops, gemma4_nb.kernels.gpu; "
            "print(sorted(m for m in ('transformers', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@cuda
def test_cuda_bench_quantized_against_transformers(hf_checkpoints, capsys):
    from gemma4_nb.devtools.bench import bench_command

    path, _ = hf_checkpoints["c"]
    rows = bench_command(model=str(path), device="cuda", quant="int4", prompt=64, decode=8, compare="transformers")
    assert [r["engine"] for r in rows] == ["gemma4-nb", "transformers"]
    assert "ratio gemma4-nb / transformers, decode:" in capsys.readouterr().out
