"""The runtime against transformers 5.23 (the specification) on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

import gemma4_nb
from gemma4_nb.runtime.generation import GenerationRequest, Usage, generate_ids

VARIANTS = ["a", "b", "c"]


def prompt_ids(n: int, seed: int, vocab: int = 512) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(30, vocab, (n - 1,), generator=gen).tolist()


@pytest.fixture(scope="module")
def loaded(hf_checkpoints):
    return {name: gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False) for name, (path, _) in hf_checkpoints.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_logits_match_transformers(variant, hf_checkpoints, loaded):
    _, ref = hf_checkpoints[variant]
    model = loaded[variant]
    ids = prompt_ids(80, seed=1)
    assert len(ids) > 64 and model.config.layers[0].window < len(ids)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids])).logits[0].float()
    got = model.net.forward(torch.tensor(ids), model.net.new_cache(), outputs="all").logits
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, f"max |logit difference| {diff:.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_incremental_decode_equals_full_forward(variant, loaded):
    net = loaded[variant].net
    ids = torch.tensor(prompt_ids(72, seed=2))
    full = net.forward(ids, net.new_cache(), outputs="all").logits
    cache = net.new_cache()
    steps = [net.forward(ids[:20], cache, outputs="all").logits]
    for i in range(20, len(ids)):
        steps.append(net.forward(ids[i : i + 1], cache).logits)
    incremental = torch.cat(steps)
    assert cache.length == len(ids)
    diff = (incremental - full).abs().max().item()
    assert diff <= 1e-4, f"max |logit difference| {diff:.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_match_transformers_generate(variant, hf_checkpoints, loaded):
    _, ref = hf_checkpoints[variant]
    model = loaded[variant]
    ids = prompt_ids(64, seed=3)
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    expected = out[0, len(ids):].tolist()
    req = GenerationRequest(prompt_ids=ids, max_new_tokens=32)  # no stop tokens, like eos_token_id=None
    got = list(generate_ids(model.net, req, model.max_context, Usage()))
    assert got == expected


def test_bf16_forward_close_to_fp32(hf_checkpoints):
    path, _ = hf_checkpoints["a"]
    m32 = gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False)
    m16 = gemma4_nb.load(path, device="cpu", dtype="bf16", progress=False)
    assert m16.net.dtype == torch.bfloat16
    ids = torch.tensor(prompt_ids(40, seed=4))
    l32 = m32.net.forward(ids, m32.net.new_cache(), outputs="all").logits
    l16 = m16.net.forward(ids, m16.net.new_cache(), outputs="all").logits
    agree = (l32.argmax(-1) == l16.argmax(-1)).float().mean().item()
    assert agree >= 0.9, f"bf16 top-1 agreement {agree:.2f}"


def test_bare_text_checkpoint_matches_transformers(tmp_path, tokenizer_dir):
    """`gemma4_unified_text` (Gemma4UnifiedForCausalLM) checkpoints load with their own prefix."""
    import shutil

    from conftest import VARIANTS, randomize_
    from transformers import Gemma4UnifiedForCausalLM, Gemma4UnifiedTextConfig

    ref = Gemma4UnifiedForCausalLM(Gemma4UnifiedTextConfig(**VARIANTS["a"]["text"])).eval()
    randomize_(ref, seed=11)
    ref.save_pretrained(tmp_path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    model = gemma4_nb.load(tmp_path, device="cpu", dtype="fp32", progress=False)
    assert model.config.model_type == "gemma4_unified_text"
    ids = prompt_ids(70, seed=5)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids])).logits[0]
    got = model.net.forward(torch.tensor(ids), model.net.new_cache(), outputs="all").logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_soft_tokens_replace_embeddings(loaded):
    """The embedding step takes overrides (how image and audio embeddings enter the decoder)."""
    from gemma4_nb.runtime.decoder import SoftTokens

    net = loaded["a"].net
    ids = torch.tensor(prompt_ids(20, seed=6))
    mask = torch.zeros(20, dtype=torch.bool)
    mask[5:9] = True
    plain = net.forward(ids, net.new_cache(), outputs="all").logits
    same = SoftTokens(mask, net.embed(ids)[mask])
    assert torch.allclose(net.forward(ids, net.new_cache(), soft=same, outputs="all").logits, plain, atol=1e-6)
    placeholder = torch.where(mask, 100_000, ids)  # out-of-vocabulary placeholder ids are fine
    other = SoftTokens(mask, torch.randn(4, net.cfg.hidden_size))
    changed = net.forward(placeholder, net.new_cache(), soft=other, outputs="all").logits
    assert torch.allclose(changed[:5], plain[:5], atol=1e-6)  # causal: earlier positions unaffected
    assert not torch.allclose(changed[5:], plain[5:], atol=1e-3)
