"""Opt-in static-shape decode steps (gemma4_nb/static_decode.py): the step's math eagerly on the
CPU against the model's own decode path; CUDA graph capture and replay on a CUDA GPU only."""

from __future__ import annotations

import pytest
import torch

import gemma4_nb
from gemma4_nb.errors import Gemma4Error
from gemma4_nb.runtime.static_decode import StaticDecoder


def _decode_both(net, prompt: list[int], steps: int, capacity: int, graphs: bool = False, min_bucket: int = 16):
    """Greedy decode with the model's own path and with a StaticDecoder loaded from the same
    prefill: (model logits, static logits, model tokens, static tokens)."""
    cache = net.new_cache(chunk=8)
    last = net.forward(torch.tensor(prompt), cache).logits
    dec = StaticDecoder(net, capacity, graphs=graphs, min_bucket=min_bucket)
    dec.load(cache)
    want, got, want_ids, got_ids = [], [], [], []
    tok = int(last[-1].argmax())
    stok = tok
    for _ in range(steps):
        out = net.forward(torch.tensor([tok]), cache).logits
        want.append(out[-1].float().cpu())
        tok = int(out[-1].argmax())
        want_ids.append(tok)
        stok = dec.step(stok)
        got.append(dec.logits[0].float().cpu().clone())  # the static output is overwritten by the next step
        got_ids.append(int(stok))
    return torch.stack(want), torch.stack(got), want_ids, got_ids


# windows 8/5/12, K=V full layers (a, b), KV-shared layers (c), final softcaps (a, b); fp32 b is left
# out only for time (its 96-wide fp32 products are slow in this torch build on 2 cores)
@pytest.mark.parametrize("variant,quant", [("a", None), ("c", None), ("a", "int8"), ("b", "int8"), ("c", "int8")])
def test_static_steps_match_the_model(hf_checkpoints, variant, quant, monkeypatch):
    """Across the sliding windows' ring wrap and the full layers' buckets (16 -> 32). Quantized
    weights take the same torch products in both (fp32 activations, as on CUDA): the CPU's fused
    numba kernels quantize activations to int8 and have their own tests (test_cpu_kernels,
    test_quant)."""
    from gemma4_nb.kernels import ops

    monkeypatch.setattr(ops, "fused_cpu", lambda w: False)
    path, _ = hf_checkpoints[variant]
    net = gemma4_nb.load(path, device="cpu", dtype="fp32", quant=quant, progress=False).net
    want, got, want_ids, got_ids = _decode_both(net, [2] + list(range(40, 49)), steps=22, capacity=40)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert got_ids == want_ids


def test_static_steps_with_an_attention_softcap(hf_checkpoints):
    """Gemma 2-style score soft-capping (none in Gemma 3/4) takes the explicit fp32 branch."""
    from dataclasses import replace

    from gemma4_nb.runtime.decoder import GemmaModel

    path, _ = hf_checkpoints["c"]
    base = gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False).net
    net = GemmaModel(replace(base.cfg, attn_softcap=0.5), base.weights)
    want, got, want_ids, got_ids = _decode_both(net, [2] + list(range(40, 49)), steps=12, capacity=32)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    plain, _, _, _ = _decode_both(base, [2] + list(range(40, 49)), steps=12, capacity=32)
    assert (plain - want).abs().max() > 1e-2  # the cap changed the result


def test_static_decoder_limits(hf_checkpoints):
    path, _ = hf_checkpoints["c"]
    net = gemma4_nb.load(path, device="cpu", dtype="fp32", progress=False).net
    cache = net.new_cache()
    net.forward(torch.tensor(list(range(2, 22))), cache)
    with pytest.raises(Gemma4Error, match="capacity is 16"):
        StaticDecoder(net, 16, graphs=False).load(cache)
    dec = StaticDecoder(net, 22, graphs=False, min_bucket=16)
    assert dec.buckets == [16, 22]
    dec.load(cache)
    dec.step(5)
    dec.step(6)
    with pytest.raises(Gemma4Error, match="capacity of 22 positions is full"):
        dec.step(7)
    with pytest.raises(Gemma4Error, match="need the model on a CUDA device"):
        StaticDecoder(net, 32, graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quant", [None, "int4"])
def test_cuda_graph_replay_matches_eager_steps(hf_checkpoints, quant):
    path, _ = hf_checkpoints["c"]
    net = gemma4_nb.load(path, device="cuda", dtype="fp32" if quant is None else None, quant=quant, progress=False).net
    prompt = [2] + list(range(40, 59))
    _, eager, _, eager_ids = _decode_both(net, prompt, steps=30, capacity=64, graphs=False)
    _, graph, _, graph_ids = _decode_both(net, prompt, steps=30, capacity=64, graphs=True)
    torch.testing.assert_close(graph, eager, atol=1e-3, rtol=1e-3)
    assert graph_ids == eager_ids


def test_bench_with_static_steps(hf_checkpoints, capsys):
    from gemma4_nb.devtools.bench import bench_command

    path, _ = hf_checkpoints["c"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = bench_command(model=str(path), device=device, prompt=16, decode=20, cuda_graphs=True)
    assert rows[0]["decode_tok_s"] > 0
    out = capsys.readouterr().out
    assert "static-shape steps" in out and ("CUDA graphs" in out if device == "cuda" else "eager" in out)
