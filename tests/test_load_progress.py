"""A load reports its real progress to ``load(on_progress=...)``: a GGUF's repack in the file's bytes
converted, the weights in tensors read; every stage ends at its total (what the notebook's status
lines turn into a percentage)."""

from __future__ import annotations

import warnings

import pytest
from gguf import GGMLQuantizationType
from gguf_helpers import write_gguf

import gemma4_nb
from gemma4_nb.devtools.tiny import write_tiny_checkpoint
from gemma4_nb.runtime.checkpoint import expected_tensors
from gemma4_nb.runtime.config import load_config
from gemma4_nb.runtime.gguf_file import GGUFFile


def recorded():
    events: list[tuple[str, int, int]] = []
    return events, lambda stage, done, total: events.append((stage, done, total))


def stages(events) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for stage, done, total in events:
        out.setdefault(stage, []).append((done, total))
    return out


def check_stage(steps: list[tuple[int, int]], total: int) -> None:
    """From 0 to the total, never backwards, the total fixed."""
    assert {t for _, t in steps} == {total}
    done = [d for d, _ in steps]
    assert done[0] == 0 and done[-1] == total and done == sorted(done), done
    assert len(done) > 2  # steps along the way, not only the ends


@pytest.fixture
def quantized_gguf(tmp_path):
    """A tiny GGUF whose matrices are Q8_0 (repacked into int8 on first load), the rest F32."""
    path = tmp_path / "tiny-q8.gguf"
    write_gguf(path, tensor_types={f"blk.{i}.{n}.weight": GGMLQuantizationType.Q8_0 for i in range(2)
                                   for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                             "ffn_down")})
    return path


def test_a_gguf_repack_reports_its_bytes_then_the_tensors(quantized_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA4_NB_CACHE", str(tmp_path / "cache"))
    events, callback = recorded()
    model = gemma4_nb.load(str(quantized_gguf), progress=False, on_progress=callback)
    by_stage = stages(events)
    repack = by_stage.pop("repacking tiny-q8.gguf as int8")
    check_stage(repack, sum(info.nbytes for info in GGUFFile(quantized_gguf).tensors.values()))
    tensors = len(expected_tensors(model.net.cfg))
    check_stage(by_stage.pop("loading weights (int8)"), tensors)
    assert not by_stage
    # the stages in order: the repack, then the weights
    assert events[0][0].startswith("repacking") and events[-1] == ("loading weights (int8)", tensors, tensors)

    # cached: nothing to repack, the weights still counted
    events, callback = recorded()
    gemma4_nb.load(str(quantized_gguf), progress=False, on_progress=callback)
    by_stage = stages(events)
    assert list(by_stage) == ["loading weights (int8)"]
    check_stage(by_stage["loading weights (int8)"], tensors)

    # read as plain tensors (fp32): the file's bytes, at every load
    events, callback = recorded()
    gemma4_nb.load(str(quantized_gguf), progress=False, quant="fp32", on_progress=callback)
    check_stage(stages(events)["reading tiny-q8.gguf"],
                sum(info.nbytes for info in GGUFFile(quantized_gguf).tensors.values()))


@pytest.mark.parametrize("quant", [None, "int8"])
def test_a_safetensors_load_reports_each_tensor(tmp_path, quant):
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    events, callback = recorded()
    gemma4_nb.load(str(ckpt), progress=False, quant=quant or "fp32", on_progress=callback)
    name = "loading weights (int8)" if quant else "loading weights"
    assert list(stages(events)) == [name]
    check_stage(stages(events)[name], len(expected_tensors(load_config(ckpt))))


def test_a_failing_callback_does_not_break_the_load(quantized_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA4_NB_CACHE", str(tmp_path / "cache"))
    calls = []

    def broken(stage, done, total):
        calls.append(stage)
        raise ValueError("the display is gone")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = gemma4_nb.load(str(quantized_gguf), progress=False, on_progress=broken)
    assert model.generate("the data", max_new_tokens=2, temperature=0) is not None
    assert len(calls) == 1  # told once, then no longer
    assert any("load progress callback failed (ValueError: the display is gone)" in str(w.message) for w in caught)


def test_the_chat_status_carries_the_loads_percentage(quantized_gguf, tmp_path, monkeypatch):
    """The sidebar's status while the model loads: the runtime's stage and its percentage, at each
    stage's start and end at least, never backwards within a stage; then ready."""
    import queue

    from gemma4_nb.notebook.comm import ChatProtocol
    from gemma4_nb.notebook.copilot import Copilot

    monkeypatch.setenv("GEMMA4_NB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    events: queue.Queue = queue.Queue()
    c = Copilot(None)
    c.settings.model, c.settings.max_new_tokens = str(quantized_gguf), 2
    proto = ChatProtocol(c, events.put)
    proto.handle({"type": "chat", "id": "r1", "text": "the data", "context": False})
    proto.service.wait(60)
    seen = []
    while not events.empty():
        seen.append(events.get())
    loading = [e for e in seen if e["type"] == "status" and e["state"] == "loading"]
    shown = [(e["progress"]["stage"], e["progress"]["percent"]) for e in loading if "progress" in e]
    stages_shown = list(dict.fromkeys(stage for stage, _ in shown))
    assert stages_shown == ["repacking tiny-q8.gguf as int8", "loading weights (int8)"], shown
    for stage in stages_shown:
        percents = [p for s, p in shown if s == stage]
        assert percents[0] == 0 and percents[-1] == 100 and percents == sorted(percents), shown
    progress = next(e["progress"] for e in loading if "progress" in e)
    assert progress["total"] == sum(info.nbytes for info in GGUFFile(quantized_gguf).tensors.values())
    assert c.load_progress is None  # nothing loads any more
    final = [e for e in seen if e["type"] == "status"][-1]
    assert final["state"] == "ready" and "progress" not in final
    assert any(e["type"] == "done" for e in seen), seen
