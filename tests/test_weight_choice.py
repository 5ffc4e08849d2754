"""Weights that fit: the format load() picks from the free-memory probe and the planned KV cache,
and the format forced by quant=, $GEMMA4_NB_QUANT and `gemma4-nb generate --quant` (the notebook's
`%gemma config quant=` is in test_local_stores.py's kernel test)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import gemma4_nb
from gemma4_nb.devtools.shapes import SHAPES
from gemma4_nb.devtools.tiny import tiny_config
from gemma4_nb.errors import Gemma4Error
from gemma4_nb.runtime.config import load_config, parse_config
from gemma4_nb.runtime.memory import GiB, MemoryPlanError, plan_memory, weight_bytes
from gemma4_nb.runtime.weight_choice import COMFORTABLE, PLANNED_CONTEXT, QUANT_ENV, choose_weights

GB = 10 ** 9


@pytest.fixture(scope="module")
def cfg_12b():
    return parse_config(tiny_config(**SHAPES["gemma4-12b"]))


def free(**by_device):
    return lambda device: by_device[torch.device(device).type]


@pytest.fixture(autouse=True)
def no_env_setting(monkeypatch):
    monkeypatch.delenv(QUANT_ENV, raising=False)


@pytest.mark.parametrize("unit", [GiB, GB])
@pytest.mark.parametrize("size,fmt", [(16, "int4"), (32, "int8"), (64, "bf16")])
def test_auto_picks_the_widest_format_that_fits_the_12b(cfg_12b, size, fmt, unit):
    choice = choose_weights(cfg_12b, device="cpu", probe=free(cpu=size * unit))
    assert (choice.quant or "bf16") == fmt and choice.device == "cpu"
    assert choice.dtype == ("bf16" if fmt == "bf16" else "fp32")  # fp32 activations beside quantized weights
    assert choice.note.startswith(f"gemma4-nb: {fmt} weights on cpu: ") and "\n" not in choice.note
    assert f"{size * unit / GiB:.1f} GiB free" in choice.note and f"{PLANNED_CONTEXT:,} tokens" in choice.note
    planned = plan_memory(cfg_12b, context=PLANNED_CONTEXT, weights=fmt, kv=choice.dtype, compute=choice.dtype)
    assert f"{planned.total / GiB:.1f} GiB with the KV cache" in choice.note
    if fmt != "bf16":  # the wider format it passed over, with its size
        wider = {"int4": "int8", "int8": "bf16"}[fmt]
        assert f"{wider} would take" in choice.note


def test_the_kv_cache_is_part_of_the_plan(cfg_12b):
    """Just above what int8 weights alone need in 70% of free memory, the KV cache tips it to int4."""
    plan = plan_memory(cfg_12b, context=PLANNED_CONTEXT, weights="int8", kv="fp32", compute="fp32")
    weights_only = int(plan.weights / COMFORTABLE) + GiB // 8
    assert plan.total / COMFORTABLE > weights_only
    assert choose_weights(cfg_12b, device="cpu", probe=free(cpu=weights_only)).quant == "int4"
    short = choose_weights(cfg_12b, device="cpu", max_context=2048, probe=free(cpu=int(plan.total / COMFORTABLE) + GiB))
    assert short.quant == "int8"


@pytest.mark.parametrize("size", [11, 8])
def test_when_only_int4_fits_it_loads_tightly_and_says_so(cfg_12b, size):
    """Under 70%, int4 loads while its weights fit (load()'s own limit), saying how little is left."""
    choice = choose_weights(cfg_12b, device="cpu", probe=free(cpu=size * GiB))
    assert choice.quant == "int4" and f"GiB, {size}.0 GiB free: little to spare (the KV cache and activations for " \
        "32,768 tokens take" in choice.note
    assert "close other programs if the kernel dies; int8 would take" in choice.note


def test_when_nothing_fits_the_refusal_has_the_numbers(cfg_12b):
    with pytest.raises(MemoryPlanError) as err:
        choose_weights(cfg_12b, device="cpu", probe=free(cpu=6 * GiB))
    msg = str(err.value)
    need = {f: weight_bytes(cfg_12b, f, rest="bf16" if f == "bf16" else "fp32") / GiB for f in ("bf16", "int8", "int4")}
    assert 21 < need["bf16"] < 24 and need["int4"] < need["int8"] < need["bf16"] / 1.5
    assert (f"weights need {need['bf16']:.1f} GiB in bf16, {need['int8']:.1f} GiB in int8, {need['int4']:.1f} GiB in "
            "int4 (plus ") in msg, msg
    assert "but only 6.0 GiB is available on cpu" in msg and "32,768 tokens" in msg


def test_on_a_gpu_auto_tries_the_gpu_first_then_the_cpu(cfg_12b, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = choose_weights(cfg_12b, probe=free(cuda=24 * GiB, cpu=64 * GiB))
    assert (on_gpu.device, on_gpu.quant, on_gpu.dtype) == ("cuda", "int8", "bf16")  # the Triton kernel runs it
    small_gpu = choose_weights(cfg_12b, probe=free(cuda=8 * GiB, cpu=16 * GiB))
    assert (small_gpu.device, small_gpu.quant) == ("cpu", "int4") and "on cpu" in small_gpu.note
    tight_gpu = choose_weights(cfg_12b, device="cuda", probe=free(cuda=8 * GiB))  # a device given: that one only
    assert (tight_gpu.device, tight_gpu.quant) == ("cuda", "int4") and "little to spare" in tight_gpu.note
    with pytest.raises(MemoryPlanError, match="available on cuda; free memory or device='cpu'"):
        choose_weights(cfg_12b, device="cuda", probe=free(cuda=6 * GiB))


def test_a_gpu_asked_for_without_one_is_refused_before_probing(cfg_12b, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Gemma4Error, match="device='cuda' was asked for but PyTorch sees no CUDA GPU"):
        choose_weights(cfg_12b, device="cuda", probe=lambda device: 1 / 0)


def test_forced_formats_and_where_they_come_from(cfg_12b, monkeypatch):
    roomy = free(cpu=64 * GiB)
    assert choose_weights(cfg_12b, quant="int4", device="cpu", probe=roomy).quant == "int4"
    bf16 = choose_weights(cfg_12b, quant="BF16", device="cpu", probe=free(cpu=GiB))  # forced: no plan
    assert (bf16.quant, bf16.dtype) == (None, "bf16") and "(quant='BF16')" in bf16.note
    monkeypatch.setenv(QUANT_ENV, "int8")
    env = choose_weights(cfg_12b, device="cpu", probe=roomy)
    assert env.quant == "int8" and f"(${QUANT_ENV})" in env.note
    assert choose_weights(cfg_12b, quant="int4", device="cpu", probe=roomy).quant == "int4"  # the argument wins
    assert choose_weights(cfg_12b, quant="auto", device="cpu", probe=roomy).quant is None  # auto: bf16 fits
    monkeypatch.setenv(QUANT_ENV, "int5")
    with pytest.raises(Gemma4Error, match=rf"\${QUANT_ENV}='int5' is not a weight format: use one of auto, bf16, fp32, int8, int4"):
        choose_weights(cfg_12b, device="cpu", probe=roomy)
    with pytest.raises(Gemma4Error, match=r"quant='q4' is not a weight format: use one of auto, bf16, fp32, int8, int4"):
        choose_weights(cfg_12b, quant="q4", device="cpu", probe=roomy)


def test_stored_formats_are_kept_unless_forced(cfg_12b):
    tight = free(cpu=16 * GiB)
    gguf = choose_weights(cfg_12b, device="cpu", stored="gguf", probe=tight)
    assert (gguf.quant, gguf.dtype, gguf.note) == (None, None, "")  # the GGUF's own format; nothing printed
    assert choose_weights(cfg_12b, quant="int8", device="cpu", stored="gguf", probe=tight).quant == "int8"
    assert choose_weights(cfg_12b, device="cpu", stored="int4", probe=tight).quant is None  # as saved
    with pytest.raises(Gemma4Error, match="holds int4 weights .* asks for bf16: load the original checkpoint"):
        choose_weights(cfg_12b, quant="bf16", device="cpu", stored="int4", probe=tight)
    explicit = choose_weights(cfg_12b, device="cpu", dtype="fp32", probe=tight)  # a dtype: unquantized
    assert (explicit.quant, explicit.dtype) == (None, "fp32")
    with pytest.raises(Gemma4Error, match="asks for bf16 weights but dtype='fp32'"):
        choose_weights(cfg_12b, quant="bf16", device="cpu", dtype="fp32", probe=tight)


def _only_int4_fits(cfg) -> int:
    """Free bytes where int4 fits the tiny model comfortably and int8 does not."""
    plans = {f: plan_memory(cfg, context=min(cfg.max_position_embeddings, PLANNED_CONTEXT), weights=f, kv="fp32",
                            compute="fp32") for f in ("int8", "int4")}
    assert plans["int4"].total < plans["int8"].total
    return int((plans["int4"].total + plans["int8"].total) / 2 / COMFORTABLE)


def test_load_picks_int4_when_only_int4_fits(tiny_dir, monkeypatch, capsys):
    probe = _only_int4_fits(load_config(tiny_dir))
    monkeypatch.setattr("gemma4_nb.runtime.model.available_memory", lambda device: probe)
    model = gemma4_nb.load(tiny_dir, device="cpu")
    assert model.quant == "int4" and "int4 weights" in repr(model)
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("gemma4-nb: int4 weights on cpu")]
    assert len(line) == 1 and line[0] == model.weight_note
    assert model.generate("hello", max_new_tokens=3, temperature=0)


def test_load_with_the_environment_setting_and_the_argument(tiny_dir, monkeypatch):
    monkeypatch.setenv(QUANT_ENV, "int8")
    assert gemma4_nb.load(tiny_dir, progress=False).quant == "int8"
    assert gemma4_nb.load(tiny_dir, progress=False, quant="int4").quant == "int4"
    plain = gemma4_nb.load(tiny_dir, progress=False, quant="bf16")
    assert plain.quant is None and plain.net.dtype == torch.bfloat16
    monkeypatch.setenv(QUANT_ENV, "eight")
    with pytest.raises(Gemma4Error, match="GEMMA4_NB_QUANT='eight' is not a weight format"):
        gemma4_nb.load(tiny_dir, progress=False)


def _cli(*args, env=None):
    import os

    full = {k: v for k, v in os.environ.items() if k != QUANT_ENV}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "gemma4_nb", *args], capture_output=True, text=True, timeout=300,
                          env=full)


def test_the_generate_command_takes_the_format(tiny_dir):
    common = ["generate", "--model", str(tiny_dir), "--device", "cpu", "--temperature", "0", "--max-new-tokens", "3",
              "--raw", "hello"]
    forced = _cli(*common, "--quant", "int4")
    assert forced.returncode == 0 and "gemma4-nb: int4 weights (quant='int4')" in forced.stderr, forced.stderr
    env = _cli(*common, env={QUANT_ENV: "int8"})
    assert env.returncode == 0 and f"gemma4-nb: int8 weights (${QUANT_ENV})" in env.stderr, env.stderr
    bad = _cli(*common, "--quant", "int5")
    assert bad.returncode == 2 and "invalid choice: 'int5'" in bad.stderr and "'int4'" in bad.stderr
