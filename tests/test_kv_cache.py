"""The chunked KV cache: equality with a full forward, rollback, prefix reuse, int8, long context."""

from __future__ import annotations

import pytest
import torch

import gemma4_nb
from gemma4_nb.devtools.tiny import write_tiny_checkpoint
from gemma4_nb.runtime.generation import prefill
from gemma4_nb.runtime.kv_cache import CacheRollbackError, PrefixCache
from gemma4_nb.runtime.memory import MemoryPlanError, plan_memory

SMALL = dict(chunk=4, max_rollback=3)  # boundaries crossed every few tokens


def ids_for(n: int, seed: int = 0, vocab: int = 512) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([2]), torch.randint(30, vocab, (n - 1,), generator=gen)])


@pytest.fixture(scope="module")
def models(hf_checkpoints):
    return {k: gemma4_nb.load(p, device="cpu", dtype="fp32", progress=False) for k, (p, _) in hf_checkpoints.items()}


def full_logits(net, ids):
    return net.forward(ids, net.new_cache(chunk=1024), outputs="all").logits


@pytest.mark.parametrize("variant", ["a", "b", "c"])
def test_chunked_decode_equals_full_forward(variant, models):
    net = models[variant].net
    ids = ids_for(100, seed=1)
    expected = full_logits(net, ids)
    cache = net.new_cache(**SMALL)
    got = [net.forward(ids[:10], cache, outputs="all").logits]
    for i in range(10, len(ids)):
        got.append(net.forward(ids[i : i + 1], cache).logits)
    assert (torch.cat(got) - expected).abs().max().item() <= 1e-4
    # sliding layers let go of old chunks: they hold at most window + rollback (+ a partial chunk each side)
    window = net.cfg.layers[0].window
    for lay in cache.layers:
        if lay is not None and lay.window is not None:
            per = 1 if lay.k_pool is None else 2
            assert len(lay.slots) // per <= -(-(window + SMALL["max_rollback"]) // SMALL["chunk"]) + 2
            assert lay.first > 0


@pytest.mark.parametrize("variant", ["a", "c"])
def test_chunked_prefill_equals_one_forward(variant, models):
    net = models[variant].net
    ids = ids_for(90, seed=2).tolist()
    prefix = PrefixCache(lambda: net.new_cache(**SMALL))
    prefix.prepare(ids + [0])  # creates the cache
    out = prefill(net, ids, prefix, chunk=7)
    assert prefix.kv.length == 90 and prefix.ids == ids
    expected = full_logits(net, torch.tensor(ids))[-1]
    assert (out.logits[-1] - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["a", "c"])
def test_rollback_then_decode_equals_fresh_decode(variant, models):
    net = models[variant].net
    ids = ids_for(70, seed=3)
    other = ids_for(70, seed=4)
    cache = net.new_cache(chunk=4, max_rollback=6)  # rolling back up to 6 positions is guaranteed
    net.forward(ids[:60], cache, outputs="all")
    for n in (58, 56):  # several rollbacks, crossing chunk boundaries
        cache.truncate(n)
        assert cache.length == n
        got = net.forward(other[n : n + 4], cache, outputs="all").logits
        fresh = full_logits(net, torch.cat([ids[:n], other[n : n + 4]]))[n:]
        assert (got - fresh).abs().max().item() <= 1e-4
        cache.truncate(n)
    with pytest.raises(CacheRollbackError, match="sliding layers keep positions from"):
        cache.truncate(20)
    cache.truncate(0)  # starting over is always possible
    assert cache.memory()["sliding"] == 0 and cache.memory()["full"] == 0


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_offloaded_full_layer_chunks_read_back_exactly(kv_dtype, models):
    net = models["c"].net  # K/V (not K=V) full layers and KV sharing
    ids = ids_for(90, seed=6)
    plain = net.new_cache(chunk=4, kv_dtype=kv_dtype, max_rollback=6)
    expected = [net.forward(ids[:20], plain, outputs="all").logits]
    cache = net.new_cache(chunk=4, kv_dtype=kv_dtype, max_rollback=6, offload_after=8)
    got = [net.forward(ids[:20], cache, outputs="all").logits]
    for i in range(20, 90):
        expected.append(net.forward(ids[i : i + 1], plain).logits)
        got.append(net.forward(ids[i : i + 1], cache).logits)
    assert torch.equal(torch.cat(got), torch.cat(expected))
    mem, base = cache.memory(), plain.memory()
    assert mem["full_offloaded"] > 0 and mem["full"] < base["full"]
    assert mem["full"] + mem["full_offloaded"] == base["full"]
    cache.truncate(85)  # a rollback reaching back into chunks that are still on the device
    plain.truncate(85)
    assert torch.equal(net.forward(ids[:3], cache, outputs="all").logits,
                       net.forward(ids[:3], plain, outputs="all").logits)


def test_prefix_reuse_equals_recomputation(hf_checkpoints):
    path, _ = hf_checkpoints["a"]
    reuse = gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False, kv_chunk=8)
    conversation = [{"role": "system", "content": "You are a data assistant."},
                    {"role": "user", "content": "Load sales.csv and show the head."}]
    first = reuse.chat(conversation, temperature=0, max_new_tokens=12)
    assert reuse.last_usage.cached_tokens == 0
    conversation += [{"role": "assistant", "content": first}, {"role": "user", "content": "Now plot revenue."}]
    second = reuse.chat(conversation, temperature=0, max_new_tokens=12)
    assert reuse.last_usage.cached_tokens > 10
    fresh = gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False)
    assert fresh.chat(conversation, temperature=0, max_new_tokens=12) == second
    assert fresh.last_usage.cached_tokens == 0
    # the same prompt again: everything but the last prompt token comes from the cache
    again = reuse.chat(conversation, temperature=0, max_new_tokens=12)
    assert again == second and reuse.last_usage.cached_tokens == reuse.last_usage.prompt_tokens - 1
    reuse.reset()
    reuse.chat(conversation, temperature=0, max_new_tokens=4)
    assert reuse.last_usage.cached_tokens == 0


def test_int8_kv_close_to_full_precision(models):
    net = models["b"].net
    ids = ids_for(120, seed=5)
    expected = full_logits(net, ids)
    got = net.forward(ids, net.new_cache(chunk=16, kv_dtype="int8"), outputs="all").logits
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.95
    assert (got - expected).abs().max().item() < 0.5
    c8, c16 = net.new_cache(kv_dtype="int8"), net.new_cache()
    net.forward(ids, c8)
    net.forward(ids, c16)
    assert c8.memory()["full"] < 0.3 * c16.memory()["full"]  # int8 + scale vs fp32


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    path = write_tiny_checkpoint(
        tmp_path_factory.mktemp("long"), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], sliding_window=64,
        max_position_embeddings=65536)
    return gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False)


def test_32k_context_memory_is_bounded_and_planned(long_model):
    net, cfg = long_model.net, long_model.config
    prefix = PrefixCache(lambda: net.new_cache())
    ids = torch.randint(30, 512, (32768,), generator=torch.Generator().manual_seed(0)).tolist()
    prefix.prepare(ids + [0])
    prefill(net, ids[:8192], prefix, chunk=1024)
    at_8k = prefix.kv.memory()
    out = prefill(net, ids[8192:], prefix, chunk=1024)
    at_32k = prefix.kv.memory()
    assert prefix.kv.length == 32768 and torch.isfinite(out.logits).all()
    assert at_32k["sliding"] == at_8k["sliding"] > 0  # bounded whatever the length
    plan = plan_memory(cfg, context=32768, weights="fp32", kv="fp32")
    assert at_32k["full"] == plan.kv_full  # exactly the planner's figure
    assert at_32k["sliding"] <= plan.kv_sliding


def test_refuses_what_will_not_fit(tiny_dir, monkeypatch):
    model = gemma4_nb.load(tiny_dir, progress=False)
    monkeypatch.setattr("gemma4_nb.runtime.model.available_memory", lambda device: 1 << 20)
    with pytest.raises(MemoryPlanError, match=r"needs about .* GiB more memory .* but only 0\.00 GiB is available"):
        model.generate("hello", max_new_tokens=8)
    with pytest.raises(MemoryPlanError, match="weights need"):
        monkeypatch.setattr("gemma4_nb.runtime.model.available_memory", lambda device: 1000)
        gemma4_nb.load(tiny_dir, progress=False)


def test_planner_figures_for_gemma4_12b():
    from gemma4_nb.devtools.shapes import SHAPES
    from gemma4_nb.devtools.tiny import tiny_config
    from gemma4_nb.runtime.config import parse_config

    cfg = parse_config(tiny_config(**dict(SHAPES["gemma4-12b"])))
    assert 11.5e9 < cfg.parameter_count() < 12.5e9
    bf16 = plan_memory(cfg, context=262144, weights="int4", kv="bf16")
    int8 = plan_memory(cfg, context=262144, weights="int4", kv="int8")
    assert bf16.kv_full == 8 * 262144 * 512 * 2  # 8 full layers, one KV head of 512, K=V stored once
    assert int8.kv_full == 8 * 262144 * (512 + 4)
    assert bf16.kv_sliding == plan_memory(cfg, context=8192, weights="int4", kv="bf16").kv_sliding  # bounded
    assert bf16.kv < 4.5 * 2**30 and int8.kv < 2.5 * 2**30
    # int4 weights fit 7.5 GB; with a 131,072-token int8 KV cache and fp32 activations (the CPU's),
    # the whole plan fits 9.5 GB
    long = plan_memory(cfg, context=131072, weights="int4", kv="int8", compute="fp32")
    assert long.weights <= 7.5e9 and long.total <= 9.5e9


def test_interrupted_prefill_leaves_a_reusable_cache(hf_checkpoints, monkeypatch):
    path, _ = hf_checkpoints["a"]
    model = gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False, prefill_chunk=8)
    prompt = ids_for(60, seed=7).tolist()
    expected = model.generate(prompt, max_new_tokens=8, temperature=0)
    model.reset()
    real_forward, calls = model.net.forward, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the user pressed Stop during the prefill
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model.net, "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        model.generate(prompt, max_new_tokens=8, temperature=0)
    assert model.cache.kv.length == len(model.cache.ids) == 24  # three chunks committed, consistent
    assert model.generate(prompt, max_new_tokens=8, temperature=0) == expected
    assert model.last_usage.cached_tokens == 24


class _UpdateOnly:
    """A KV cache seen without ``store_rows``: the decoder then takes its torch path
    (``update``, then ``chunk_view``), the one other caches (the MTP drafter's) use."""

    def __init__(self, cache) -> None:
        self._cache = cache

    def __getattr__(self, name):
        if name == "store_rows":
            raise AttributeError(name)
        return getattr(self._cache, name)


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
@pytest.mark.parametrize("variant", ["a", "b", "c"])
def test_fused_decode_in_numpy_equals_the_torch_path(variant, kv_dtype, hf_checkpoints, monkeypatch):
    """A decode step on quantized CPU weights runs each layer in numpy from end to end (q/k/v
    stored straight into the chunks): its logits are the same bits as the torch path's over the
    same kernels, across chunk boundaries and sliding-window evictions."""
    from gemma4_nb.runtime.kv_cache import KVCache

    net = gemma4_nb.load(hf_checkpoints[variant][0], quant="int8", progress=False).net
    stored = []
    real = KVCache.store_rows
    monkeypatch.setattr(KVCache, "store_rows", lambda self, *a: stored.append(1) or real(self, *a))
    ids = ids_for(40, seed=3)
    fast = net.new_cache(kv_dtype=kv_dtype, **SMALL)
    plain = net.new_cache(kv_dtype=kv_dtype, **SMALL)
    a = [net.forward(ids[:6], fast, outputs="all").logits]
    b = [net.forward(ids[:6], _UpdateOnly(plain), outputs="all").logits]
    for i in range(6, len(ids)):
        a.append(net.forward(ids[i : i + 1], fast).logits)
        b.append(net.forward(ids[i : i + 1], _UpdateOnly(plain)).logits)
    assert torch.equal(torch.cat(a), torch.cat(b))
    assert fast.length == plain.length == len(ids)
    fused_layers = sum(1 for args in (net._decode_args or []) if args.ok)
    if variant == "a":  # every matrix of variant a has a width the kernels take
        assert fused_layers == len(net.cfg.layers) and stored
    forwards = len(ids) - 6 + (6 <= net.integer_batch)  # the first 6 positions too, when that few fuse
    assert len(stored) == forwards * sum(
        1 for s, args in zip(net.cfg.layers, net._decode_args or []) if args.ok and s.owns_kv)
