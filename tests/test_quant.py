"""Quantized weights end to end: loading, the fused decode path, save/reload, errors, and the
greedy agreement of the real 270M in int8/int4 with fp32."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("numba")

from quant_reference import dequantized, quantized_activation_linear  # noqa: E402

import gemma4_nb  # noqa: E402
from gemma4_nb.devtools.workload import AGREEMENT_TEXT  # noqa: E402
from gemma4_nb.errors import CheckpointError, Gemma4Error  # noqa: E402
from gemma4_nb.kernels.qweight import QWeight  # noqa: E402
from gemma4_nb.runtime.decoder import GemmaModel  # noqa: E402
from gemma4_nb.runtime.quant import MARKER_FILE  # noqa: E402
from gemma4_nb.runtime.resolve import embedded_model  # noqa: E402


def dequantized_twin(net: GemmaModel) -> GemmaModel:
    """The same model with every quantized weight dequantized: the plain torch path."""
    weights = {n: (dequantized(w) if isinstance(w, QWeight) else w) for n, w in net.weights.items()}
    return GemmaModel(net.cfg, weights)


@pytest.mark.parametrize("variant", ["a", "b", "c"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_fused_path_matches_torch_on_dequantized_weights(hf_checkpoints, variant, quant, monkeypatch):
    """Prefill (dequantized blocks) and decode steps (numba GEMV, fused MLP, decode attention)
    give the logits of the torch path on the same dequantized weights, the torch path quantizing its
    activations where the kernels do (quant_reference)."""
    quantized_activation_linear(monkeypatch)
    model = gemma4_nb.load(hf_checkpoints[variant][0], quant=quant, progress=False)
    net = model.net
    assert net.fused and isinstance(net.weights["layers.0.mlp.gate_proj.weight"], QWeight)
    twin = dequantized_twin(net)
    ids = torch.randint(0, net.cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
    c1, c2 = net.new_cache(chunk=4), twin.new_cache()  # small chunks: decode attention crosses chunks
    got = [net.forward(ids[:16], c1, outputs="all").logits]
    want = [twin.forward(ids[:16], c2, outputs="all").logits]
    for i in range(16, 24):
        got.append(net.forward(ids[i : i + 1], c1).logits)
        want.append(twin.forward(ids[i : i + 1], c2).logits)
    got, want = torch.cat(got), torch.cat(want)
    # Not bit-exact: both quantize activations to int8, and fp32 differences of ~1e-6 upstream
    # (attention's summation order) move an occasional activation across a rounding boundary,
    # which changes that product by one code step (~1% of the logits' scale after the norms
    # amplify it). A wrong kernel, rope or cache read changes everything. The kernels themselves are
    # held to 1e-5 on identical inputs in test_fused_decode_layer_kernels and test_cpu_kernels.
    assert float((got - want).abs().max()) <= 3e-2 * float(want.abs().max())
    assert int((got.argmax(-1) == want.argmax(-1)).sum()) >= len(want) - 1
    # decode steps ran the fused layer kernels wherever every matrix is quantized (variant b's
    # 24-wide heads leave its attention output projection unquantized: those layers fall back)
    fused = [a.ok for a in net._decode_args]
    assert all(fused) if variant in "ac" else (not all(fused))
    hidden = net.forward(ids[:1], net.new_cache(), logits=False).hidden
    vals, top = net.top_k(hidden[-1], 3)
    assert torch.equal(top, net.logits(hidden).topk(3).indices[-1])


def agree(got: torch.Tensor, want: torch.Tensor) -> None:
    """Fused kernels against the torch composition: the kernels normalize in numba (fastmath), so
    the normalized activations differ from torch's by ~1e-7, which now and then moves one across an
    int8 rounding boundary: every output of that product moves by one activation code step times
    its weight (a fraction of a percent; the products themselves are held to 1e-5 on identical
    inputs in test_cpu_kernels). A wrong norm, rope, residual or layer scalar is off by O(1)."""
    assert float((got - want).abs().max()) <= 2e-2 * float(want.abs().max())


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_fused_decode_layer_kernels(hf_checkpoints, quant, monkeypatch):
    """The two fused decode-layer kernels against the torch composition they replace, layer by
    layer (sliding and K=V full layers, KV-shared layers), on the same dequantized weights (the
    torch products quantizing their activations as the kernels do)."""
    from gemma4_nb.kernels import ops

    quantized_activation_linear(monkeypatch)

    net = gemma4_nb.load(hf_checkpoints["a"][0], quant=quant, progress=False).net
    twin = dequantized_twin(net)
    gen = torch.Generator().manual_seed(3)
    for spec in net.cfg.layers:
        args = ops.DecodeLayerArgs(net.cfg, spec, net.layer_weights[spec.index])
        assert args.ok
        w = twin.layer_weights[spec.index]
        x = 3 * torch.randn(1, net.cfg.hidden_size, generator=gen)
        rope = twin.rope_tables[spec.rope].get(range(37, 38))
        got = ops.decode_attention_inputs(args, x, rope)
        want = twin.qkv(spec, w, twin.norm(x, w["input_norm"]), rope)
        for g, t in zip(got, want):
            assert (g is None) == (t is None)
            if t is not None:
                agree(g, t)
        attn = torch.randn(1, net.cfg.num_heads * spec.head_dim, generator=gen)
        h = x + twin.norm(ops.linear(attn, w["o_proj"]), w["post_attn_norm"])
        mlp = ops.gated_mlp(twin.norm(h, w["pre_ffn_norm"]), w["gate"], w["up"], w["down"])
        want = (h + twin.norm(mlp, w["post_ffn_norm"])) * (w["layer_scalar"] if w["layer_scalar"] is not None else 1)
        agree(ops.decode_attention_output_and_mlp(args, x, attn), want)


def test_screened_head_generation_and_save(hf_checkpoints, tmp_path, monkeypatch):
    """A head stored as nibble planes (forced on a tiny vocabulary) decodes the same greedy tokens
    as the plain int8 head, samples reproducibly through the head's top-k, and saves as plain int8."""
    plain = gemma4_nb.load(hf_checkpoints["a"][0], quant="int8", progress=False)
    monkeypatch.setattr(GemmaModel, "SCREENED_HEAD_MIN_ROWS", 1)
    screened = gemma4_nb.load(hf_checkpoints["a"][0], quant="int8", progress=False)
    assert screened.net.lm_head.planes and screened.net.embed_weight is screened.net.lm_head
    assert not plain.net.lm_head.planes
    prompt = [2, 17, 99, 5, 300]
    assert screened.generate(prompt, max_new_tokens=12, temperature=0) == plain.generate(prompt, max_new_tokens=12, temperature=0)
    a = screened.generate(prompt, max_new_tokens=8, temperature=0.8, top_k=40, seed=5)
    assert a == screened.generate(prompt, max_new_tokens=8, temperature=0.8, top_k=40, seed=5)
    out = screened.save_quantized(tmp_path / "q8")
    again = gemma4_nb.load(out, progress=False)
    assert again.net.lm_head.planes  # screened again after the reload (the patch is still on)
    assert torch.equal(again.net.lm_head.int8_codes(), plain.net.lm_head.codes)


def test_prompt_lookup_drafting_on_quantized_weights(hf_checkpoints):
    """With quantized weights on the CPU prompt lookup is on by default; its draft length follows
    measured costs, and its plain steps and verifications take the fused head's top-k
    (generation._speculative): greedy text is the same with and without drafting, and seeded top-k
    sampling is reproducible."""
    model = gemma4_nb.load(hf_checkpoints["a"][0], quant="int8", progress=False)
    assert model.net.fused and type(model.drafter).__name__ == "PromptLookupDrafter"
    prompt = [2] + [17, 99, 5, 300, 41] * 6  # repetitive: lookup has something to propose
    drafted = model.generate(prompt, max_new_tokens=24, temperature=0)
    stats = model.last_usage.drafting
    assert drafted == model.generate(prompt, max_new_tokens=24, temperature=0, draft=False)
    assert stats.proposed > 0 and stats.steps + stats.plain_steps > 0
    sampled = model.generate(prompt, max_new_tokens=12, temperature=0.8, top_k=20, seed=3)
    assert sampled == model.generate(prompt, max_new_tokens=12, temperature=0.8, top_k=20, seed=3)


def test_save_and_reload(hf_checkpoints, tmp_path):
    model = gemma4_nb.load(hf_checkpoints["a"][0], quant="int4", progress=False)
    out = model.save_quantized(tmp_path / "q4")
    again = gemma4_nb.load(out, progress=False)
    assert again.quant == "int4"
    ids = torch.tensor([2, 17, 99, 5])
    a = model.net.forward(ids, model.net.new_cache()).logits
    b = again.net.forward(ids, again.net.new_cache()).logits
    assert torch.equal(a, b)
    assert again.generate([2, 17, 99], max_new_tokens=4, temperature=0) == model.generate(
        [2, 17, 99], max_new_tokens=4, temperature=0)
    with pytest.raises(Gemma4Error, match="holds int4 weights but quant='int8'"):
        gemma4_nb.load(out, quant="int8", progress=False)
    marker = json.loads((out / MARKER_FILE).read_text())
    marker["version"] = 1  # int4 of the first layout: refused with the line that re-saves it
    (out / MARKER_FILE).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match=r"earlier gemma4-nb layout.*quant='int4'\)\.save_quantized\("):
        gemma4_nb.load(out, progress=False)
    marker["version"] = 99
    (out / MARKER_FILE).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="incompatible gemma4-nb.*Quantize the original"):
        gemma4_nb.load(out, progress=False)


def test_int8_saved_by_the_first_format_version_still_loads(hf_checkpoints, tmp_path):
    """Version 2 changed only int4: an int8 directory marked version 1 loads as it was saved."""
    model = gemma4_nb.load(hf_checkpoints["a"][0], quant="int8", progress=False)
    out = model.save_quantized(tmp_path / "q8")
    marker = json.loads((out / MARKER_FILE).read_text())
    marker["version"] = 1
    (out / MARKER_FILE).write_text(json.dumps(marker))
    again = gemma4_nb.load(out, progress=False)
    ids = torch.tensor([2, 17, 99, 5])
    assert torch.equal(model.net.forward(ids, model.net.new_cache()).logits,
                       again.net.forward(ids, again.net.new_cache()).logits)


@pytest.mark.parametrize("quant", ["int8", "int4", None])
def test_planned_weight_bytes_are_the_loaded_bytes(hf_checkpoints, quant):
    """The memory planner's weight figure (one bytes-per-weight table, one format choice per
    tensor) is exactly what a load holds, for every format."""
    from gemma4_nb.kernels.qweight import QWeight
    from gemma4_nb.kernels.simd import WIDE
    from gemma4_nb.runtime.memory import weight_bytes
    from gemma4_nb.runtime.quant import weights_nbytes

    model = gemma4_nb.load(hf_checkpoints["c"][0], quant=quant, dtype="fp32", progress=False)
    held = weights_nbytes(model.net.weights)
    assert weight_bytes(model.config, quant or "fp32", rest="fp32") == held
    assert model.memory_plan(64).weights == held
    # the decode kernels' sixteen-row copies of the small layer matrices: made with the model,
    # counted in both figures, and decoding adds none
    copies = [w for w in model.net.weights.values() if isinstance(w, QWeight) and w.block_codes is not None]
    assert bool(copies) == bool(WIDE and quant)
    model.generate("Hello", max_new_tokens=3, temperature=0)
    assert weights_nbytes(model.net.weights) == held
    if quant:  # bf16 activations run the unfused path: no copies, none planned
        model = gemma4_nb.load(hf_checkpoints["c"][0], quant=quant, dtype="bf16", progress=False)
        assert not any(isinstance(w, QWeight) and w.block_codes is not None for w in model.net.weights.values())
        assert weight_bytes(model.config, quant, rest="bf16") == weights_nbytes(model.net.weights)


def test_bad_quant_requests(tiny_dir):
    with pytest.raises(Gemma4Error, match="quant='int3' is not a weight format: use one of auto, bf16, fp32, int8, int4"):
        gemma4_nb.load(tiny_dir, quant="int3", progress=False)
    with pytest.raises(Gemma4Error, match="CPU or a CUDA GPU"):
        gemma4_nb.load(tiny_dir, quant="int8", device="meta", progress=False)
    plain = gemma4_nb.load(tiny_dir, progress=False)
    with pytest.raises(Gemma4Error, match="not quantized"):
        plain.save_quantized("/tmp/never-written")


@pytest.fixture(scope="module")
def fp32_270m(conversion_cache):
    return gemma4_nb.load(embedded_model(), device="cpu", quant="fp32", progress=False)


@pytest.mark.parametrize("quant,target", [("int8", 0.99), ("int4", 0.95)])
def test_270m_greedy_agreement_with_fp32(fp32_270m, quant, target):
    """Teacher-forced over the same fixed 256-token text: top-1 of the quantized model against
    fp32 at every position: the first 128 through the prefill path (dequantized blocks, fp32
    activations), the last 128 through the fused decode step (int8 activations, screened head)."""
    ids = fp32_270m.encode(AGREEMENT_TEXT)[:256]
    assert len(ids) == 256
    want = fp32_270m.net.forward(torch.tensor(ids), fp32_270m.net.new_cache(), outputs="all").logits.argmax(-1)
    model = gemma4_nb.load(embedded_model(), quant=quant, progress=False)
    net = model.net
    cache = net.new_cache()
    top = [net.forward(torch.tensor(ids[:128]), cache, outputs="all").logits.argmax(-1)]
    for i in range(128, 256):
        hidden = net.forward(torch.tensor(ids[i : i + 1]), cache, logits=False).hidden
        top.append(net.top_k(hidden[-1], 1)[1])  # the fused head, as greedy decoding runs it
    agreement = float((torch.cat(top) == want).float().mean())
    print(f"{quant}: top-1 agreement with fp32 {agreement * 100:.1f}% over 256 positions")
    assert agreement >= target
