"""The runtime on a CUDA GPU (skipped where PyTorch sees none, as in CI)."""

from __future__ import annotations

import pytest
import torch

import gemma4_nb
from gemma4_nb.runtime.generation import GenerationRequest, Usage, generate_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_default_is_bf16_and_matches_cpu(hf_checkpoints):
    path, ref = hf_checkpoints["b"]
    gpu = gemma4_nb.load(path, progress=False)
    assert gpu.net.device.type == "cuda" and gpu.net.dtype == torch.bfloat16
    gpu32 = gemma4_nb.load(path, device="cuda", dtype="fp32", progress=False)
    ids = [2] + list(range(40, 120))
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids])).logits[0].float()
    got32 = gpu32.net.forward(torch.tensor(ids), gpu32.net.new_cache(), outputs="all").logits.cpu()
    assert (got32 - expected).abs().max().item() <= 1e-3
    got16 = gpu.net.forward(torch.tensor(ids), gpu.net.new_cache(), outputs="all").logits.cpu()
    agree = (got16.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"bf16 top-1 agreement {agree:.2f}"


def test_cuda_greedy_generation_matches_cpu(hf_checkpoints):
    path, _ = hf_checkpoints["a"]
    cpu = gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False)
    gpu = gemma4_nb.load(path, device="cuda", dtype="fp32", progress=False)
    req = GenerationRequest(prompt_ids=[2] + list(range(50, 114)), max_new_tokens=32)
    assert list(generate_ids(gpu.net, req, gpu.max_context, Usage())) == list(
        generate_ids(cpu.net, req, cpu.max_context, Usage()))


def test_cuda_chunked_cache_with_pinned_offload(hf_checkpoints):
    path, _ = hf_checkpoints["a"]
    gpu = gemma4_nb.load(path, device="cuda", dtype="fp32", progress=False)
    net = gpu.net
    ids = torch.tensor([2] + list(range(40, 139)))
    full = net.forward(ids, net.new_cache(chunk=1024), outputs="all").logits
    cache = net.new_cache(chunk=8, offload_after=16)
    steps = [net.forward(ids[:10], cache, outputs="all").logits]
    for i in range(10, len(ids)):
        steps.append(net.forward(ids[i : i + 1], cache).logits)
    assert (torch.cat(steps) - full).abs().max().item() <= 1e-4
    host = [p for k, p in cache.pools.items() if k[0] == "host"]
    assert host and all(p.data.is_pinned() for p in host) and cache.memory()["full_offloaded"] > 0


def test_cuda_load_refuses_nonfinite_weights_checked_on_the_gpu(hf_checkpoints, fresh_copy):
    """On CUDA the finite check runs on the GPU copy (tests/test_bad_weights.py covers the CPU)."""
    from test_bad_weights import LAYER, poison

    from gemma4_nb.errors import CheckpointError

    path = fresh_copy(hf_checkpoints["b"][0])
    poison(path, LAYER + "mlp.up_proj.weight", float("nan"))
    with pytest.raises(CheckpointError, match=r"mlp\.up_proj\.weight holds 1 non-finite values \(1 NaN"):
        gemma4_nb.load(path, device="cuda", progress=False)
