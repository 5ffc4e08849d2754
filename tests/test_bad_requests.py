"""Requests shaped in ways nobody planned for get a message that names the problem, never a raw
traceback: text that is not valid Unicode (a lone surrogate), sampling numbers that are not
numbers (``temperature=nan``), a panel's ``settings`` that is not an object, tool-call text nested
thousands of brackets deep."""

from __future__ import annotations

import json
import math

import pytest
from test_agent import Scripted, run, shell  # noqa: F401  (shell: the fixture)
from test_chat_protocol import KernelComm

import gemma4_nb
from gemma4_nb.backends.openai_compat import OpenAIBackend
from gemma4_nb.backends.toolcalls import parse_arguments, parse_tool_calls
from gemma4_nb.errors import PromptError
from gemma4_nb.notebook.comm import ChatProtocol
from gemma4_nb.notebook.copilot import Copilot


@pytest.fixture(scope="module")
def model(tiny_dir):
    return gemma4_nb.load(tiny_dir, progress=False)


@pytest.mark.parametrize("text,where", [("caf\udce9 au lait", 3), ("\ud800", 0), ("ok \udfff", 3)])
def test_a_lone_surrogate_is_named(model, text, where):
    with pytest.raises(PromptError, match=rf"lone surrogate \(U\+D[89A-F][0-9A-F]{{2}}\) at character {where}"):
        model.generate(text, max_new_tokens=2)
    with pytest.raises(PromptError, match=r"lone surrogate"):
        model.chat([{"role": "user", "content": text}], max_new_tokens=2)


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": math.nan}, "temperature must be a finite number"),
    ({"temperature": math.inf}, "temperature must be a finite number"),
    ({"temperature": "hot"}, "temperature must be a finite number"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_p": math.nan}, "top_p must be a finite number"),
    ({"min_p": "a lot"}, "min_p must be a finite number"),
    ({"top_k": 1.5}, "top_k must be a whole number"),
    ({"seed": "lucky"}, "seed must be a whole number"),
    ({"max_new_tokens": "5"}, "max_new_tokens must be a whole number of at least 1"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number of at least 1"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a whole number of at least 1"),
    ({"stop": [5]}, "stop must be a string or a list of strings"),
])
def test_sampling_values_that_are_not_usable_numbers_are_named(model, kwargs, message):
    with pytest.raises(PromptError, match=message):
        model.generate("the data", **kwargs)


def test_a_prompt_of_the_wrong_type_is_named(model):
    with pytest.raises(PromptError, match="the prompt must be text or a list of token ids, got dict"):
        model.generate({"text": "hi"})


def test_the_remote_backend_refuses_what_json_cannot_carry():
    backend = OpenAIBackend("http://127.0.0.1:9", retries=0)  # nothing is sent: refused before
    with pytest.raises(PromptError, match="lone surrogate"):
        backend.complete([{"role": "user", "content": "caf\udce9"}])
    with pytest.raises(PromptError, match="a number JSON cannot carry"):
        backend.complete([{"role": "user", "content": "hi"}], temperature=math.nan)


def test_deeply_nested_tool_call_text_is_a_malformed_call():
    for deep in ("[" * 10_000 + "]" * 10_000, "{a:" * 10_000 + "1" + "}" * 10_000):
        text, calls, errors = parse_tool_calls(f"Sure.<|tool_call>call:run_python{{code:{deep}}}<tool_call|>")
        assert text == "Sure." and not calls and "nested more than 64 levels deep" in errors[0]
    with pytest.raises(ValueError, match="nested more than 64 levels"):
        parse_arguments('{"a": ' + "[" * 5000 + "]" * 5000 + "}")  # JSON spelling too
    assert parse_arguments('{"a": [[[1]]], "b": {"c": {"d": 2}}}') == {"a": [[[1]]], "b": {"c": {"d": 2}}}


def test_the_agent_reports_deep_nesting_back_to_the_model(shell):  # noqa: F811
    deep = "[" * 20_000 + "]" * 20_000
    backend = Scripted(f"<|tool_call>call:run_python{{code:{deep}}}<tool_call|>", "All right.")
    result, _ = run(shell, backend)
    assert "malformed" in backend.seen[1][-1]["content"] and "nested more than 64" in backend.seen[1][-1]["content"]
    assert result.answer == "All right."


@pytest.mark.parametrize("settings", [["approval", "auto"], "approval=auto", None, 42, True])
def test_a_settings_message_that_is_not_an_object(settings, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    sent = []
    proto = ChatProtocol(Copilot(None), sent.append)
    proto.handle({"type": "config", "id": "c1", "settings": settings})
    assert sent == [{"type": "error", "id": "c1",
                     "message": 'settings must be an object of setting names and values, e.g. {"approval": "ask"}'}]


@pytest.mark.parametrize("msg,message", [
    ({"type": "config", "settings": {"temperature": "nan"}}, "temperature must be a number >= 0"),
    ({"type": "config", "settings": {"max_new_tokens": "0"}}, "max_new_tokens must be a whole number of at least 1"),
    ({"type": "config", "settings": {"backend_url": "example.com"}}, "did you mean http://example.com?"),
    ({"type": "chat", "text": "hi", "attachments": {"a": 1}}, "attachments must be a list"),
    ({"type": "chat", "text": "hi", "attachments": ["not an object"]}, "an attachment must be an object"),
    ({"type": "launch"}, "unknown message type 'launch'"),
    ({"type": ["chat"]}, "unknown message type ['chat']"),
])
def test_other_malformed_panel_messages(msg, message, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    sent = []
    proto = ChatProtocol(Copilot(None), sent.append)
    proto.handle(msg)
    errors = [m for m in sent if m["type"] == "error"]
    assert errors and message in errors[0]["message"], sent


def test_bad_panel_messages_over_a_real_comm(tiny_dir, tmp_path):
    """In a real kernel: malformed settings and a question with a lone surrogate (JSON allows the
    escape, and a browser can send it) each get an error event; the kernel and the comm carry on."""
    k = KernelComm(tmp_path)
    try:
        packer = k.kc.session.pack
        k.kc.session.pack = lambda obj: json.dumps(obj, ensure_ascii=True, default=str).encode()  # "\ud800" escapes
        k.execute(f"import gemma4_nb.notebook.comm\ngemma4_nb.notebook.comm.register()\n%load_ext gemma4_nb\n"
                  f"%gemma model {tiny_dir}\nz = 6")
        k.open()
        k.events(lambda e: e["type"] == "status")
        k.send({"type": "config", "id": "c1", "settings": ["approval", "auto"]})
        evs = k.events(lambda e: e["type"] == "error")
        assert "settings must be an object" in evs[-1]["message"]
        k.send({"type": "chat", "id": "q1", "text": "caf\udce9?", "context": False})
        evs = k.events(lambda e: e["type"] in ("done", "error"), timeout=120)
        assert evs[-1]["type"] == "error" and "lone surrogate (U+DCE9) at character" in evs[-1]["message"], evs[-3:]
        k.send({"type": "config", "id": "c2", "settings": {"max_new_tokens": "4"}})
        evs = k.events(lambda e: e["type"] == "status")
        k.send({"type": "chat", "id": "q2", "text": "café?", "context": False})
        evs = k.events(lambda e: e["type"] in ("done", "error"), timeout=120)
        assert evs[-1]["type"] == "done", evs[-3:]
        k.kc.session.pack = packer
        out = k.execute("print(z * 7)")
        assert "42" in " ".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
    finally:
        k.close()
