"""Speculative decoding with prompt lookup: lossless, and distribution-preserving when sampling."""

from __future__ import annotations

import pytest
import torch

import gemma4_nb
from gemma4_nb.kernels import ops
from gemma4_nb.runtime.sampling import SamplingParams
from gemma4_nb.runtime.speculative import DraftStats, PromptLookupDrafter, accept_or_resample


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    d = PromptLookupDrafter(max_ngram=3)
    assert d.propose([5, 6, 7, 8, 9, 1, 6, 7], k=3) == [8, 9, 1]  # "6 7" seen before, followed by 8 9 1
    assert d.propose([1, 2, 3, 4], k=3) == []  # nothing repeats
    assert d.propose([4, 9, 4, 9, 4], k=2) == [9, 4]  # the most recent match
    assert d.propose([3, 5, 8, 1, 2, 5], k=2) == []  # one matching token is not enough by default
    assert PromptLookupDrafter(min_ngram=1).propose([3, 5, 8, 1, 2, 5], k=2) == [8, 1]


class NoisyDrafter:
    """Mostly wrong guesses: exercises rejection and cache rollback on every step."""

    cost_aware = False

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def propose(self, tokens, k, target=None):
        guess = torch.randint(30, 512, (k,), generator=self.gen).tolist()
        return [tokens[-1]] + guess[1:] if len(tokens) % 2 else guess  # sometimes right at position 0


@pytest.mark.parametrize("variant,chunk,drafter", [("a", 4, "lookup"), ("c", 8, "lookup"), ("b", 16, "lookup"),
                                                   ("a", 4, "noisy"), ("c", 8, "noisy")])
def test_greedy_with_drafting_is_identical_to_without(variant, chunk, drafter, hf_checkpoints):
    path, _ = hf_checkpoints[variant]
    plain = gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False, drafting=None)
    spec = gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False, kv_chunk=chunk)
    if drafter == "noisy":
        spec.drafter = NoisyDrafter(ord(variant))
    total = DraftStats()
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        base = torch.randint(30, 512, (12,), generator=gen).tolist()
        prompt = [2] + base * 4  # repeated text: prompt lookup finds matches
        expected = plain.generate(prompt, max_new_tokens=48, temperature=0)
        got = spec.generate(prompt, max_new_tokens=48, temperature=0)
        assert got == expected
        stats = spec.last_usage.drafting
        total.proposed += stats.proposed
        total.accepted += stats.accepted
        assert spec.last_usage.generated_tokens == plain.last_usage.generated_tokens
    assert total.proposed > 0
    if drafter == "noisy":  # rejections (and rollbacks across chunk and window boundaries) happened
        assert total.accepted < total.proposed / 2, (total.accepted, total.proposed)
    else:  # prompt lookup on repeated text: most drafts accepted
        assert total.accepted > total.proposed / 2, (total.accepted, total.proposed)


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("variant", ["a", "c"])
def test_verification_forward_is_decode_steps_bit_for_bit(variant, quant, hf_checkpoints):
    """On quantized CPU weights a forward of a few positions (a verification) computes each
    position exactly as a decode step of its own would: the same kernels, the same order of every
    sum. So drafted greedy decoding is plain greedy decoding, never off by a near-tie. Covers
    sliding windows shorter than the drafts, K=V layers and shared-KV layers. (Variants whose
    widths are all multiples of 32, as every real Gemma's are: a layer with another width runs
    the unfused torch path, which promises the tolerance of the reference, not the bits.)"""
    path, _ = hf_checkpoints[variant]
    net = gemma4_nb.load(path, device="cpu", dtype="fp32", quant=quant, progress=False, drafting=None).net
    assert all(a.ok for a in (ops.DecodeLayerArgs(net.cfg, s, net.layer_weights[s.index]) for s in net.cfg.layers))
    ids = torch.tensor([2] + list(range(40, 80)))
    cache = net.new_cache(chunk=8)
    net.forward(ids[:20], cache, logits=False)
    for t in (2, 5, 8):
        n = cache.length
        several = net.forward(ids[n : n + t], cache, outputs="all", logits=False).hidden
        cache.truncate(n)
        steps = torch.cat([net.forward(ids[i : i + 1], cache, logits=False).hidden for i in range(n, n + t)])
        assert torch.equal(several, steps), (t, (several - steps).abs().max().item())
        assert torch.equal(net.top_k_rows(several, 3)[1], torch.stack([net.top_k(h, 3)[1] for h in steps]))


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_greedy_with_drafting_on_quantized_weights_is_identical(quant, hf_checkpoints):
    path, _ = hf_checkpoints["c"]
    plain = gemma4_nb.load(path, device="cpu", dtype="fp32", quant=quant, progress=False, drafting=None)
    spec = gemma4_nb.load(path, device="cpu", dtype="fp32", quant=quant, progress=False, drafting="prompt_lookup")
    spec.drafter = NoisyDrafter(7)
    for seed in range(3):
        base = torch.randint(30, 512, (10,), generator=torch.Generator().manual_seed(seed)).tolist()
        prompt = [2] + base * 4
        assert spec.generate(prompt, max_new_tokens=40, temperature=0) == \
            plain.generate(prompt, max_new_tokens=40, temperature=0)


def test_drafting_can_be_turned_off_per_call(hf_checkpoints):
    path, _ = hf_checkpoints["a"]
    model = gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False)
    prompt = [2] + list(range(40, 52)) * 4
    model.generate(prompt, max_new_tokens=16, temperature=0, draft=False)
    assert model.last_usage.drafting is None
    model.generate(prompt, max_new_tokens=16, temperature=0)
    assert model.last_usage.drafting is not None


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4)])
@pytest.mark.parametrize("draft", [0, 3])
def test_rejection_sampling_preserves_the_target_distribution(params, draft):
    """200,000 samples over a 6-token vocabulary: every probability within 0.006 of the target
    (the standard error is at most 0.0011, so the bound is over 5 sigma)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    target = torch.softmax(__import__("gemma4_nb.runtime.sampling", fromlist=["x"]).filter_logits(logits, params), -1)
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    counts = torch.zeros(6)
    accepted = 0
    for _ in range(n):
        ok, tok = accept_or_resample(logits, draft, params, gen)
        counts[tok] += 1
        accepted += ok
    assert (counts / n - target).abs().max().item() < 0.006
    assert abs(accepted / n - float(target[draft])) < 0.006  # accepted with probability p(draft)


def test_sampling_with_drafting_runs_and_is_reproducible(hf_checkpoints):
    path, _ = hf_checkpoints["a"]
    model = gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False, kv_chunk=4)
    prompt = [2] + list(range(60, 70)) * 5
    a = model.generate(prompt, max_new_tokens=40, temperature=1.0, seed=3)
    b = model.generate(prompt, max_new_tokens=40, temperature=1.0, seed=3)
    assert a == b and model.last_usage.generated_tokens > 0


def _simulate(policy, accept_rate: float, draft: float, c0: float, c1: float, rounds: int = 300) -> int:
    """Feed a policy rounds with geometric acceptance and a linear verify cost; return its final k."""
    gen = torch.Generator().manual_seed(0)
    policy.history = []
    for _ in range(rounds):
        k = policy.k
        policy.history.append(k)
        accepted = 0
        while accepted < k and torch.rand((), generator=gen).item() < accept_rate:
            accepted += 1
        policy.update(k, accepted, k * draft, c0 + c1 * (k + 1))
    return policy.k


def test_cost_aware_draft_length_follows_the_costs():
    from gemma4_nb.runtime.speculative import CostAwareK, expected_tokens

    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-12
    # verification bound by reading the weights (flat cost), cheap drafts, good acceptance: long drafts
    assert _simulate(CostAwareK(4), 0.85, draft=0.01, c0=1.0, c1=0.02) >= 7
    # verification bound by arithmetic (cost grows with every token), fair acceptance: short drafts
    assert _simulate(CostAwareK(4), 0.7, draft=0.02, c0=0.3, c1=0.3) in (1, 2)
    # ... and where no draft length beats a plain step, drafting pauses (k = 0) and is retried
    policy = CostAwareK(4)
    _simulate(policy, 0.6, draft=0.08, c0=0.1, c1=0.9)
    assert policy.history[-100:].count(0) > 50 and 1 in policy.history[-100:]
    # drafts rarely accepted on a flat cost: the shortest drafts (or none)
    assert _simulate(CostAwareK(4), 0.05, draft=0.05, c0=1.0, c1=0.05) in (0, 1)


def test_cost_estimates_ignore_the_first_forward_and_spikes():
    from gemma4_nb.runtime.speculative import CostAwareK

    policy = CostAwareK(4)
    policy.update(4, 4, 0.0, 5.0)  # the first forward of 5 tokens: cold, 50x a warm one
    assert policy.verify_cost(5) is None
    for cost in (0.1, 0.1, 3.0, 0.1):  # one spike among warm forwards
        policy.update(4, 4, 0.0, cost)
    for _ in range(2):
        policy.update(0, 0, 0.0, 0.05)
    for _ in range(4):
        policy.update(0, 0, 0.0, 0.04)
    assert policy.verify_cost(5) == 0.1 and policy.verify_cost(1) == 0.04
    assert abs(policy.verify_cost(3) - (0.04 + 0.06 * 2 / 4)) < 1e-9  # the line through the lengths measured


def test_paused_drafting_resumes_when_the_text_starts_copying():
    """While paused, prompt lookup's proposals are checked against the plain steps' tokens: once
    they come true, drafting resumes at once (not after the pause runs out)."""
    from gemma4_nb.runtime.speculative import CostAwareK

    policy = CostAwareK(2, pause=1000)
    for _ in range(3):  # warm costs: a plain step 1.0, a 3-token forward 2.0
        policy.update(0, 0, 0.0, 1.0)
        policy.update(2, 0, 0.0, 2.0)
    assert policy.k == 0  # rejected drafts: paused
    policy.shadow(8, 1)
    assert policy.k == 0  # still not copying
    for _ in range(6):
        policy.shadow(8, 8)
    assert policy.k >= 1, policy.k  # resumed at the best length for what was measured so far
    k = policy.k
    policy.shadow(8, 8)  # ignored while drafting runs
    assert policy.k == k
    for _ in range(4):  # drafts keep landing: longer ones pay (a 3-token forward costs 2 steps)
        policy.update(policy.k, policy.k, 0.0, 1.0 + 0.5 * policy.k)
    assert policy.k > k, (policy.k, k)


def test_draft_statistics_estimate_the_speedup_from_plain_steps():
    stats = DraftStats()
    stats.record(4, 4, draft_seconds=0.0, forward_seconds=1.0)  # 5 tokens in 1 s
    stats.record(4, 1, draft_seconds=0.0, forward_seconds=1.0)  # 2 tokens in 1 s
    assert stats.speedup is None  # no plain step to compare with yet
    stats.record(0, 0, forward_seconds=0.8)  # a plain step: 1 token in 0.8 s
    assert stats.steps == 2 and stats.plain_steps == 1
    assert abs(stats.speedup - (7 / 2) * 0.8) < 1e-9
    assert stats.acceptance_per_position == [1.0, 0.5, 0.5, 0.5]
    assert abs(stats.mean_accepted_length - 3.5) < 1e-9
