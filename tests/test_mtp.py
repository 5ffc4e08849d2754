"""Gemma 4's MTP assistant drafter against transformers' own (the reference), on tiny random pairs.

transformers 5.23 writes both checkpoints. Its ``kv_sharing_modes`` raises for a decoder whose
every layer reuses K/V -- exactly the assistant -- so building one needs that property to say
"reuse" for all layers, which is what the assistant's config means by setting
``num_kv_shared_layers = num_hidden_layers``. The target needs KV-shared layers for transformers
to hand its K/V to the assistant (only then does it mark the last layer of each type "store").
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from conftest import randomize_

import gemma4_nb
from gemma4_nb.errors import ConfigError, ModelNotFoundError
from gemma4_nb.runtime.mtp import MTPDrafter
from gemma4_nb.runtime.speculative import DraftContext, PromptLookupDrafter

PAIRS = {
    # K=V full layers (the drafter's full layer reads K rebuilt from the stored V), plain head
    "kv": dict(
        target=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                    num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
                    num_kv_shared_layers=2, final_logit_softcapping=30.0, max_position_embeddings=512,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                 "sliding_attention", "sliding_attention", "full_attention"]),
        assistant=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                       attention_k_eq_v=True, sliding_window=8, use_double_wide_mlp=True),
        ordered=False,
    ),
    # separate K and V, one KV head, the centroid-masked draft head
    "centroids": dict(
        target=dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=5,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=24, global_head_dim=48,
                    attention_k_eq_v=False, sliding_window=6, num_kv_shared_layers=1,
                    final_logit_softcapping=None, max_position_embeddings=512,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                 "sliding_attention", "full_attention"]),
        assistant=dict(hidden_size=40, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=24, global_head_dim=48, sliding_window=6),
        ordered=True,
    ),
}


def _allow_all_shared_layers():
    from transformers import Gemma4UnifiedTextConfig

    original = Gemma4UnifiedTextConfig.kv_sharing_modes

    def modes(self):
        if self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return original.fget(self)

    mp = pytest.MonkeyPatch()
    mp.setattr(Gemma4UnifiedTextConfig, "kv_sharing_modes", property(modes))
    return mp


def make_pair(root, name, tokenizer_dir, seed):
    from transformers import (
        Gemma4UnifiedAssistantConfig,
        Gemma4UnifiedAssistantForCausalLM,
        Gemma4UnifiedConfig,
        Gemma4UnifiedForConditionalGeneration,
        Gemma4UnifiedTextConfig,
    )

    spec = PAIRS[name]
    target_dir, assistant_dir = root / f"{name}-target", root / f"{name}-target-assistant"
    torch.manual_seed(seed)
    target = Gemma4UnifiedForConditionalGeneration(
        Gemma4UnifiedConfig(text_config=dict(spec["target"]), vision_config=None, audio_config=None)).eval()
    randomize_(target, seed)
    target.save_pretrained(target_dir)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, target_dir / f.name)

    text = Gemma4UnifiedTextConfig(vocab_size=spec["target"]["vocab_size"], max_position_embeddings=512,
                                   layer_types=["sliding_attention"] * 3 + ["full_attention"], **spec["assistant"])
    mp = _allow_all_shared_layers()
    try:
        cfg = Gemma4UnifiedAssistantConfig(
            text_config=text, backbone_hidden_size=spec["target"]["hidden_size"],
            use_ordered_embeddings=spec["ordered"], num_centroids=16, centroid_intermediate_top_k=4)
        assistant = Gemma4UnifiedAssistantForCausalLM(cfg).eval()
        randomize_(assistant, seed + 1)
        if spec["ordered"]:
            order = torch.randperm(cfg.text_config.vocab_size, generator=torch.Generator().manual_seed(seed))
            assistant.masked_embedding.token_ordering.copy_(order)
        assistant.save_pretrained(assistant_dir)
    finally:
        mp.undo()
    return target_dir, assistant_dir, target, assistant


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("mtp")
    return {name: make_pair(root, name, tokenizer_dir, seed=100 + i) for i, name in enumerate(PAIRS)}


def _reference_candidates(target, assistant, prompt: list[int], k: int, dtype=torch.float64):
    """Drafts and draft logits of transformers' MTP candidate generator right after the prompt,
    computed in ``dtype`` (fp64: the reference's own rounding out of the comparison)."""
    from transformers import GenerationConfig
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

    target, assistant = copy.deepcopy(target).to(dtype), copy.deepcopy(assistant).to(dtype)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = target(input_ids=ids, use_cache=True, output_hidden_states=True, return_shared_kv_states=True)
    first = int(out.logits[0, -1].argmax())
    assistant.generation_config.num_assistant_tokens = k
    gen = SinglePositionMultiTokenCandidateGenerator(assistant, target.get_input_embeddings(),
                                                     GenerationConfig(max_length=512))
    seq = torch.tensor([prompt + [first]])
    candidates, logits = gen.get_candidates(seq, {"attention_mask": torch.ones_like(seq)}, out,
                                            is_first_iteration=False, n_last_matches=0)
    return first, candidates[0, len(prompt) + 1 :].tolist(), logits[0]


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("length", [3, 9, 10, 41])  # shorter than the window, at its edges, past it
def test_drafts_and_logits_match_transformers(pairs, name, length):
    target_dir, assistant_dir, target, assistant = pairs[name]
    model = gemma4_nb.load(target_dir, device="cpu", dtype="fp32", progress=False, drafting="mtp",
                           assistant=assistant_dir)
    assert isinstance(model.drafter, MTPDrafter)
    prompt = [2] + torch.randint(30, 512, (length - 1,), generator=torch.Generator().manual_seed(length)).tolist()
    first, ref_drafts, ref_logits = _reference_candidates(target, assistant, prompt, k=4)

    cache = model.net.new_cache(chunk=4)  # the drafter's K/V reads cross chunk boundaries
    out = model.net.forward(torch.tensor(prompt), cache)
    assert int(out.logits[-1].argmax()) == first
    steps = list(model.drafter.steps(first, DraftContext(model.net, cache, out.hidden[-1]), 4))
    assert [t for _, t in steps] == ref_drafts
    got = torch.stack([logits for logits, _ in steps]).double()
    # The reference runs in fp64, so the difference is this runtime's fp32 rounding alone, which
    # scales with the logits' magnitude: bounded relative to it, not by a fixed 1e-4. Measured
    # 0.4e-6 to 8e-6 of the largest logit over these cases (the 4 draft steps feed each other).
    err, scale = float((got - ref_logits).abs().max()), float(ref_logits.abs().max())
    assert err <= 3e-5 * scale, f"largest difference {err:.3g} for logits up to {scale:.3g}"


@pytest.mark.parametrize("name,chunk", [("kv", 4), ("centroids", 8)])
def test_greedy_with_mtp_is_identical_to_plain_and_to_transformers_assisted(pairs, name, chunk):
    target_dir, assistant_dir, target, assistant = pairs[name]
    mtp = gemma4_nb.load(target_dir, device="cpu", dtype="fp32", progress=False, kv_chunk=chunk)
    assert isinstance(mtp.drafter, MTPDrafter)  # found next to the target: <name>-assistant
    plain = gemma4_nb.load(target_dir, device="cpu", dtype="fp32", progress=False, drafting=None)
    mtp.stop_token_ids = plain.stop_token_ids = frozenset()  # random weights love <eos>: run all 24 tokens
    assistant.generation_config.num_assistant_tokens = 4
    for seed in range(3):
        prompt = [2] + torch.randint(30, 512, (6 + 7 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        want = _greedy_ids(plain, prompt, 24)
        got = _greedy_ids(mtp, prompt, 24)
        assert got == want and len(got) == 24
        stats = mtp.last_usage.drafting
        assert stats.proposed > 0 and stats.steps > 0
        with torch.no_grad():
            ref = target.generate(torch.tensor([prompt]), assistant_model=assistant, max_new_tokens=24,
                                  do_sample=False, eos_token_id=None)
        assert ref[0, len(prompt):].tolist() == got


def test_quantized_target_drafts_with_an_int8_assistant(pairs):
    """Beside int8/int4 weights on the CPU the assistant is int8 too, and greedy output with its
    drafts is the plain quantized model's."""
    from gemma4_nb.kernels.qweight import QWeight

    target_dir, assistant_dir, _, _ = pairs["kv"]
    for quant in ("int8", "int4"):
        mtp = gemma4_nb.load(target_dir, quant=quant, progress=False, kv_chunk=4)
        assert isinstance(mtp.drafter, MTPDrafter)
        assert isinstance(mtp.drafter.net.layer_weights[0]["q_proj"], QWeight)
        plain = gemma4_nb.load(target_dir, quant=quant, progress=False, drafting=None)
        mtp.stop_token_ids = plain.stop_token_ids = frozenset()
        prompt = [2] + list(range(40, 52))
        assert _greedy_ids(mtp, prompt, 20) == _greedy_ids(plain, prompt, 20)
        assert mtp.last_usage.drafting.proposed > 0


def _greedy_ids(model, prompt, n):
    stream = model.generate(prompt, max_new_tokens=n, temperature=0, stream=True)
    for _ in stream:
        pass
    return stream.token_ids


def test_sampling_with_mtp_runs_and_reports_statistics(pairs):
    target_dir, assistant_dir, _, _ = pairs["kv"]
    model = gemma4_nb.load(target_dir, device="cpu", dtype="fp32", progress=False, kv_chunk=4)
    prompt = [2] + list(range(40, 60))
    a = model.generate(prompt, max_new_tokens=20, temperature=1.0, seed=3)
    b = model.generate(prompt, max_new_tokens=20, temperature=1.0, seed=3)
    assert a == b  # the seed fixes the drafts' accept/reject draws too
    stats = model.last_usage.drafting
    assert stats.steps > 0 and len(stats.acceptance_per_position) > 0
    assert stats.draft_seconds > 0 and stats.verify_seconds > 0
    assert model.generate(prompt, max_new_tokens=5, temperature=0, draft=False)
    assert model.last_usage.drafting is None


def test_assistant_discovery_and_refusals(pairs, tmp_path, monkeypatch):
    target_dir, assistant_dir, _, _ = pairs["kv"]
    other_dir = pairs["centroids"][1]
    load = dict(device="cpu", dtype="fp32", progress=False)

    # an assistant/ folder inside the target's directory
    inner = tmp_path / "model"
    shutil.copytree(target_dir, inner)
    shutil.copytree(assistant_dir, inner / "assistant")
    assert isinstance(gemma4_nb.load(inner, **load).drafter, MTPDrafter)
    # $GEMMA4_NB_ASSISTANT
    bare = tmp_path / "bare"
    shutil.copytree(target_dir, bare)
    assert isinstance(gemma4_nb.load(bare, **load).drafter, PromptLookupDrafter)
    monkeypatch.setenv("GEMMA4_NB_ASSISTANT", str(assistant_dir))
    assert isinstance(gemma4_nb.load(bare, **load).drafter, MTPDrafter)
    monkeypatch.delenv("GEMMA4_NB_ASSISTANT")
    # drafting='prompt_lookup' and None ignore an assistant that is there
    assert isinstance(gemma4_nb.load(target_dir, drafting="prompt_lookup", **load).drafter, PromptLookupDrafter)
    assert gemma4_nb.load(target_dir, drafting=None, **load).drafter is None

    with pytest.raises(ModelNotFoundError, match="needs the model's MTP assistant"):
        gemma4_nb.load(bare, drafting="mtp", **load)
    with pytest.raises(ConfigError, match="backbone hidden size 48 != target hidden size 64"):
        gemma4_nb.load(target_dir, assistant=other_dir, **load)
    with pytest.raises(ConfigError, match="not an MTP assistant"):
        gemma4_nb.load(target_dir, assistant=bare, **load)
    with pytest.raises(Exception, match="drafting 'medusa' is not supported"):
        gemma4_nb.load(target_dir, drafting="medusa", **load)


def test_cli_drafting_options(pairs, tmp_path, capsys):
    from gemma4_nb.cli import main

    target_dir, assistant_dir, _, _ = pairs["kv"]
    args = ["generate", "--model", str(target_dir), "--raw", "--max-new-tokens", "6", "--temperature", "0", "--dtype", "fp32"]
    assert main(args + ["--drafting", "mtp", "--assistant", str(assistant_dir), "Hello"]) == 0
    with_mtp = capsys.readouterr().out
    assert main(args + ["--drafting", "off", "Hello"]) == 0
    assert capsys.readouterr().out == with_mtp  # same greedy text with and without drafting
    bare = tmp_path / "bare"
    shutil.copytree(target_dir, bare)
    args[2] = str(bare)
    assert main(args + ["--drafting", "mtp", "Hello"]) == 2
    err = capsys.readouterr().err
    assert "needs the model's MTP assistant" in err and "Traceback" not in err


def test_assistant_found_in_the_hugging_face_cache(pairs, tmp_path, monkeypatch):
    """A target loaded by repo id finds `<repo>-assistant` in the same cache, with no download."""
    import huggingface_hub.constants

    target_dir, assistant_dir, _, _ = pairs["centroids"]
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    for name, src in (("gemma-4-tiny-it", target_dir), ("gemma-4-tiny-it-assistant", assistant_dir)):
        repo = cache / f"models--google--{name}"
        shutil.copytree(src, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model = gemma4_nb.load("google/gemma-4-tiny-it", device="cpu", dtype="fp32", progress=False)
    assert isinstance(model.drafter, MTPDrafter)
    assert model.drafter.source.parent.parent.name == "models--google--gemma-4-tiny-it-assistant"
    assert repr(model.drafter).startswith("<MTPDrafter google/gemma-4-tiny-it-assistant: 4 layers")
    by_repo = gemma4_nb.load(target_dir, device="cpu", dtype="fp32", progress=False, drafting="mtp",
                             assistant="google/gemma-4-tiny-it-assistant")
    assert by_repo.drafter.source == model.drafter.source


def test_mtp_over_a_quantized_target_is_lossless(pairs):
    """The assistant reads K/V written by the fused int8 path; output equals the same model undrafted."""
    target_dir, assistant_dir, _, _ = pairs["kv"]
    mtp = gemma4_nb.load(target_dir, progress=False, quant="int8", kv_chunk=4)
    assert isinstance(mtp.drafter, MTPDrafter)
    plain = gemma4_nb.load(target_dir, progress=False, quant="int8", drafting=None)
    mtp.stop_token_ids = plain.stop_token_ids = frozenset()
    prompt = [2] + list(range(100, 130))
    assert _greedy_ids(mtp, prompt, 20) == _greedy_ids(plain, prompt, 20)
    assert mtp.last_usage.drafting.proposed > 0
