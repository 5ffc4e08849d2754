"""Streaming, stop conditions, sampling and usage figures of the generation loop."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import gemma4_nb
from gemma4_nb.runtime.sampling import Sampler, SamplingParams, filter_logits
from gemma4_nb.runtime.tokenizer import StreamDecoder, Tokenizer


@pytest.fixture(scope="module")
def model(tiny_dir):
    return gemma4_nb.load(tiny_dir, progress=False)


def test_stream_concatenates_to_full_text(model):
    messages = [{"role": "user", "content": "Explain GQA in two lines"}]
    full = model.chat(messages, temperature=0, max_new_tokens=24)
    deltas = list(model.chat(messages, temperature=0, max_new_tokens=24, stream=True))
    assert "".join(deltas) == full
    usage = model.last_usage
    assert usage.prompt_tokens == len(model.chat_ids(messages))
    assert 0 < usage.generated_tokens <= 24
    assert usage.finish_reason in {"eos", "length"}
    assert usage.prefill_tokens_per_second > 0


def test_stream_never_splits_utf8(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir)
    text = "naïve café – 数据 🙂🚀 done"
    ids = tok.encode(text)
    assert any(tok.hf.id_to_token(i).startswith("<0x") for i in ids), "text should need byte fallback"
    dec = StreamDecoder(tok)
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_token_ends_generation(model):
    prompt = "import pandas as pd"
    free = model.generate(prompt, temperature=0, max_new_tokens=12)
    first = model.encode(prompt + free)[len(model.encode(prompt))]
    req = model.request(model.encode(prompt), 12, temperature=0)
    req.stop_token_ids = frozenset({first})
    stream = model.stream(req)
    assert "".join(stream) == "" and stream.usage.finish_reason == "eos"


def test_stop_string_truncates_output(model):
    prompt = "df.groupby(region)"
    free = model.generate(prompt, temperature=0, max_new_tokens=30)
    assert len(free) > 6
    stop = free[3:6]
    cut = model.generate(prompt, temperature=0, max_new_tokens=30, stop=stop)
    assert cut == free[: free.index(stop)]
    assert model.last_usage.finish_reason == "stop_string"
    streamed = "".join(model.generate(prompt, temperature=0, max_new_tokens=30, stop=[stop], stream=True))
    assert streamed == cut


def test_seeded_sampling_is_reproducible(model):
    a = model.generate("hello", temperature=1.0, top_k=50, seed=7, max_new_tokens=16)
    b = model.generate("hello", temperature=1.0, top_k=50, seed=7, max_new_tokens=16)
    assert a == b
    samples = {model.generate("hello", temperature=10.0, seed=s, max_new_tokens=8) for s in range(6)}
    assert len(samples) > 1


def test_top_k_one_is_greedy(model):
    greedy = model.generate("plot revenue", temperature=0, max_new_tokens=16)
    assert model.generate("plot revenue", temperature=0.8, top_k=1, seed=1, max_new_tokens=16) == greedy


def test_checkpoint_sampling_defaults_are_used(model):
    gen = dict(model.generation_config)
    assert SamplingParams.from_generation_config({"do_sample": True, "temperature": 0.7, "top_k": 64, "top_p": 0.95}) == \
        SamplingParams(temperature=0.7, top_k=64, top_p=0.95)
    assert SamplingParams.from_generation_config({}) == SamplingParams()
    assert model.default_sampling.greedy == (not gen.get("do_sample", False))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=20),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=0.9, top_k=64, top_p=0.95, min_p=0.02),
])
def test_filters_match_transformers_warpers(params):
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0)) * 3
    ref = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
    if params.top_k:
        ref = TopKLogitsWarper(params.top_k)(None, ref)
    if params.top_p < 1:
        ref = TopPLogitsWarper(params.top_p)(None, ref)
    if params.min_p:
        ref = MinPLogitsWarper(params.min_p)(None, ref)
    got = filter_logits(logits, params)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    assert torch.allclose(got[finite], ref[finite], atol=1e-6)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_k=20, top_p=0.9),
                                    SamplingParams(temperature=1.3, top_k=5, min_p=0.1)])
def test_sampling_from_head_top_k_is_the_full_distribution(params):
    """``Sampler.pick`` on the top-k logits gives every token the probability ``__call__``'s
    filtering of all the logits gives it (and the rest none)."""
    from gemma4_nb.runtime.sampling import filter_logits

    logits = torch.randn(5000, generator=torch.Generator().manual_seed(4)) * 4
    full = filter_logits(logits, params).softmax(-1)
    vals, ids = torch.topk(logits, params.top_k)
    sub = filter_logits(vals, params).softmax(-1)
    assert torch.allclose(full[ids], sub, atol=1e-6)
    assert float(full.sum() - full[ids].sum()) < 1e-6
    sampler = Sampler(params.updated(seed=3))
    assert Sampler(params).head_k() == params.top_k and Sampler(SamplingParams()).head_k() == 1
    assert Sampler(SamplingParams(temperature=1.0)).head_k() is None  # no top-k: every logit matters
    draws = {sampler.pick(vals, ids) for _ in range(200)}
    assert draws <= set(ids.tolist()) and len(draws) > 1
