"""The chat panels' comm protocol: control flow with a scripted backend, then a real kernel and
the real embedded model over a real comm (jupyter_client)."""

from __future__ import annotations

import base64
import io
import queue
import threading
import time
import uuid

from gemma4_nb.backends.base import Reply
from gemma4_nb.notebook.chat_service import BUSY, code_blocks, decode_attachment
from gemma4_nb.notebook.comm import ChatProtocol
from gemma4_nb.notebook.copilot import Copilot


class Scripted:
    """A deterministic backend: streams the script one piece at a time (control flow only)."""

    supports_tools = supports_images = base_model = False

    def __init__(self, pieces, delay=0.0):
        self.pieces, self.delay, self.calls = pieces, delay, 0

    def complete(self, messages, *, tools=None, on_text=None, **sampling):
        self.calls += 1
        text, stopped = "", False
        try:
            for p in self.pieces:
                time.sleep(self.delay)
                text += p
                if on_text:
                    on_text(p)
        except KeyboardInterrupt:
            stopped = True
        return Reply(text=text, stopped=stopped)

    def status(self):
        return "scripted"


def make(pieces, delay=0.0, tmp_path=None):
    events: queue.Queue = queue.Queue()
    c = Copilot(None)
    c.backend = Scripted(pieces, delay)
    return c, ChatProtocol(c, events.put), events


def drain(events, until=("done", "error"), timeout=20.0):
    out, deadline = [], time.time() + timeout
    while time.time() < deadline:
        try:
            ev = events.get(timeout=0.1)
        except queue.Empty:
            continue
        out.append(ev)
        if ev["type"] in until:
            return out
    raise AssertionError(f"no {until} event: {out}")


def png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_reply_streams_with_its_code_blocks(monkeypatch):
    monkeypatch.chdir(__import__("tempfile").mkdtemp())
    c, proto, events = make(["Use this:\n", "```python\n", "print(1 + 1)\n", "```\n"])
    proto.handle({"type": "chat", "id": "r1", "text": "add", "context": False})
    evs = drain(events)
    kinds = [e["type"] for e in evs]
    assert kinds[0] == "start" and kinds.count("token") == 4 and kinds[-1] == "done"
    done = evs[-1]
    assert done["id"] == "r1" and not done["stopped"] and done["code_blocks"] == ["print(1 + 1)"]
    assert "".join(e["text"] for e in evs if e["type"] == "token") == done["text"] + "\n"
    assert c.turns[-1] == {"role": "assistant", "content": done["text"]}
    proto.service.wait(5)
    assert not c.lock.locked()


def test_stop_mid_generation_keeps_the_partial_reply(monkeypatch):
    monkeypatch.chdir(__import__("tempfile").mkdtemp())
    c, proto, events = make([f"w{i} " for i in range(2000)], delay=0.005)
    proto.handle({"type": "chat", "id": "r2", "text": "long", "context": False})
    while events.get(timeout=10)["type"] != "token":
        pass
    proto.handle({"type": "stop"})
    evs = drain(events)
    done = evs[-1]
    assert done["type"] == "done" and done["stopped"]
    assert 0 < len(done["text"].split()) < 2000
    assert any(e["type"] == "stopping" and e["running"] for e in evs)
    proto.service.wait(5)
    assert not c.lock.locked() and not proto.service.busy
    assert events.get(timeout=5)["type"] == "status"  # the last event of a request
    proto.handle({"type": "stop"})  # idle: harmless
    assert events.get(timeout=5) == {"type": "stopping", "id": None, "running": False}


def test_the_model_is_free_when_done_arrives(monkeypatch):
    """A request sent as soon as a reply is done (Send re-enabled) must not find the model busy."""
    monkeypatch.chdir(__import__("tempfile").mkdtemp())
    seen = []
    c = Copilot(None)
    c.backend = Scripted(["ok"])
    proto = ChatProtocol(c, lambda ev: seen.append((ev["type"], c.lock.locked(), proto.service.busy)))
    for _ in range(3):
        proto.handle({"type": "chat", "text": "hi", "context": False})
        proto.service.wait(5)
    assert [s for s in seen if s[0] in ("done", "error")] == [("done", False, False)] * 3


def test_a_new_connection_can_stop_a_reply_started_by_the_old_one(monkeypatch):
    monkeypatch.chdir(__import__("tempfile").mkdtemp())
    c, old, events = make([f"w{i} " for i in range(2000)], delay=0.005)
    old.handle({"type": "chat", "id": "r1", "text": "long", "context": False})
    old.close()  # the sidebar moved away and came back
    new = ChatProtocol(c, events.put)
    new.handle({"type": "stop"})
    assert drain(events)[-1]["stopped"]


def test_one_request_at_a_time_and_the_lock_is_shared_with_cells(monkeypatch):
    monkeypatch.chdir(__import__("tempfile").mkdtemp())
    c, proto, events = make(["a "] * 400, delay=0.005)
    proto.handle({"type": "chat", "id": "r1", "text": "one", "context": False})
    proto.handle({"type": "chat", "id": "r2", "text": "two", "context": False})
    evs = drain(events, until=("error",))
    assert evs[-1] == {"type": "error", "id": "r2", "message": BUSY}
    proto.handle({"type": "stop"})
    drain(events)
    proto.service.wait(5)
    with c.lock:  # a %%gemma cell holds the model
        proto.handle({"type": "chat", "id": "r3", "text": "three", "context": False})
        assert drain(events, until=("error",))[-1]["message"] == BUSY


def test_bad_input_gets_clear_messages(monkeypatch):
    monkeypatch.chdir(__import__("tempfile").mkdtemp())
    c, proto, events = make(["ok"])
    cases = [
        ({"type": "chat", "text": "   "}, "the message is empty"),
        ({"type": "chat", "text": "x", "attachments": [{"name": "notes.txt", "mime": "text/plain", "data": "aGk="}]},
         "unsupported attachment type (text/plain)"),
        ({"type": "chat", "text": "x", "attachments": [{"name": "a.png", "mime": "image/png", "data": "%%%"}]},
         "not valid base64"),
        ({"type": "chat", "text": "x", "attachments": [{"name": "a.png", "mime": "image/png",
                                                          "data": base64.b64encode(b"not a png").decode()}]},
         "a.png: "),
        ({"type": "chat", "text": "x", "attachments": "a.png"}, "attachments must be a list"),
        ({"type": "frobnicate"}, "unknown message type 'frobnicate'"),
        (["not", "a", "dict"], "must be a JSON object"),
        ({"type": "config", "settings": {"approval": "sometimes"}}, "approval must be one of"),
    ]
    for msg, expected in cases:
        proto.handle(msg)
        ev = events.get(timeout=5)
        assert ev["type"] == "error" and expected in ev["message"], (msg, ev)
    assert c.backend.calls == 0


def test_an_image_for_a_text_only_model_is_named_not_dropped_silently(monkeypatch):
    monkeypatch.chdir(__import__("tempfile").mkdtemp())
    c, proto, events = make(["It is red."])
    att = {"name": "pasted.png", "mime": "image/png", "data": base64.b64encode(png_bytes()).decode()}
    proto.handle({"type": "chat", "text": "What colour?", "attachments": [att], "context": False})
    evs = drain(events)
    assert evs[0]["attachments"] == [{"kind": "image", "name": "pasted.png"}]
    assert any(e["type"] == "note" and "no vision encoder" in e["text"] for e in evs)
    assert evs[-1]["type"] == "done" and evs[-1]["text"] == "It is red."
    proto.service.wait(5)
    # an image alone, with nothing the model can take, is an error, not an empty question
    proto.handle({"type": "chat", "text": "", "attachments": [att], "context": False})
    assert "nothing left to ask" in drain(events)[-1]["message"]


def test_decode_attachment_kinds():
    kind, arr = decode_attachment({"name": "x.png", "mime": "image/png", "data": base64.b64encode(png_bytes()).decode()})
    assert kind == "image" and arr.shape == (8, 8, 3)
    import numpy as np
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (0.1 * np.sin(np.arange(16000) / 10)).astype("float32"), 16000, format="WAV")
    kind, audio = decode_attachment({"name": "voice.wav", "mime": "audio/wav",
                                     "data": base64.b64encode(buf.getvalue()).decode()})
    assert kind == "audio" and audio.shape == (16000,)
    assert code_blocks("a\n```python\nx = 1\n```\nb\n```\ny\n```") == ["x = 1", "y"]


def test_approval_is_asked_through_the_frontend(monkeypatch):
    monkeypatch.chdir(__import__("tempfile").mkdtemp())
    c, proto, events = make(["x"])
    answers = []
    t = threading.Thread(target=lambda: answers.append(proto.service._ask_approval("r", "print(1)", "why")))
    t.start()
    ev = events.get(timeout=5)
    assert ev["type"] == "approval" and ev["code"] == "print(1)"
    proto.handle({"type": "approve", "approval_id": ev["approval_id"], "ok": True})
    t.join(5)
    assert answers == [True]


def test_model_load_failure_is_a_message(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    events: queue.Queue = queue.Queue()
    c = Copilot(None)
    c.settings.model = str(tmp_path / "no-such-model")
    proto = ChatProtocol(c, events.put)
    proto.handle({"type": "chat", "text": "hi", "context": False})
    err = drain(events)[-1]
    assert err["type"] == "error" and "no-such-model" in err["message"] and "Traceback" not in err["message"]
    proto.service.wait(5)
    assert not c.lock.locked()


def test_the_agent_inserts_cells_through_the_frontend():
    from gemma4_nb.notebook.workspace import KernelWorkspace

    sent = []
    proto = ChatProtocol(Copilot(None), sent.append)
    ws = KernelWorkspace(None, proto)
    ws.insert_cell("x = 1")
    assert sent == [{"type": "insert_cell", "code": "x = 1", "run": False, "ref": ws.cell_ref}]


# -- a real kernel, the real embedded model, a real comm ----------------------------------------

class KernelComm:
    def __init__(self, cwd):
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(cwd))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.comm_id = uuid.uuid4().hex

    def execute(self, code, timeout=120):
        msg_id = self.kc.execute(code)
        out, deadline = [], time.time() + timeout
        while time.time() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    return out
                out.append(msg)
            elif msg["msg_type"] == "comm_msg":
                self.pending.append(msg["content"]["data"])
        raise AssertionError("timed out")

    pending: list = []

    def open(self):
        self.pending = []
        self.kc.shell_channel.send(self.kc.session.msg("comm_open", {"comm_id": self.comm_id, "target_name": "gemma4_nb.chat", "data": {}}))

    def send(self, data):
        self.kc.shell_channel.send(self.kc.session.msg("comm_msg", {"comm_id": self.comm_id, "data": data}))

    def events(self, until, timeout=180):
        out, deadline = [], time.time() + timeout
        while self.pending:
            ev = self.pending.pop(0)
            out.append(ev)
            if until(ev):
                return out
        while time.time() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            if msg["msg_type"] == "comm_msg" and msg["content"]["comm_id"] == self.comm_id:
                ev = msg["content"]["data"]
                out.append(ev)
                if until(ev):
                    return out
        raise AssertionError(f"timed out: {out[-5:]}")

    def close(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def test_sidebar_protocol_in_a_real_kernel_with_the_embedded_model(tmp_path):
    k = KernelComm(tmp_path)
    try:
        k.execute("import gemma4_nb.notebook.comm\ngemma4_nb.notebook.comm.register()\n%load_ext gemma4_nb\n"
                  "%gemma config max_new_tokens=24 temperature=0\nimport pandas as pd\n"
                  "df = pd.DataFrame({'a': [1, 2, 3]})\ny = 7")
        k.open()
        hello = k.events(lambda e: e["type"] == "status")
        assert hello[0]["type"] == "hello" and hello[-1]["state"] == "not loaded"
        k.send({"type": "chat", "id": "q1", "text": "What is the sum of column a of df?"})
        evs = k.events(lambda e: e["type"] in ("done", "error"))
        assert evs[-1]["type"] == "done", evs[-3:]
        assert any(e["type"] == "status" and e["state"] == "loading" for e in evs)
        tokens = [e["text"] for e in evs if e["type"] == "token"]
        assert tokens and "".join(tokens).strip()
        assert evs[-1]["usage"]["tokens_per_s"] > 0
        ready = k.events(lambda e: e["type"] == "status")[-1]  # readable: the file, its format, the device
        assert ready["model"].endswith(".gguf") and ready["model_format"].startswith("GGUF"), ready
        assert ready["device"] == "cpu" and "<" not in ready["model"]
        # stop mid-generation: the kernel handles the stop message while the worker generates
        k.execute("%gemma config max_new_tokens=400")
        k.send({"type": "chat", "id": "q2", "text": "Write a very long story about a dragon, chapter by chapter."})
        k.events(lambda e: e["type"] == "token")
        k.send({"type": "stop"})
        evs = k.events(lambda e: e["type"] in ("done", "error"), timeout=60)
        done = evs[-1]
        assert done["type"] == "done" and done["stopped"], done
        assert done["usage"]["generated_tokens"] < 400
        # the agent through the sidebar: it writes a cell (sent to the frontend), then waits for the
        # user's approval, holding the model; meanwhile a %%gemma cell, or unloading the model, is "busy"
        k.execute("%gemma config max_new_tokens=24")
        k.send({"type": "chat", "id": "q3", "text": "Compute the sum of column a of df.", "agent": True})
        evs = k.events(lambda e: e["type"] in ("approval", "done", "error"), timeout=180)
        assert evs[-1]["type"] == "approval", evs[-3:]
        assert any(e["type"] == "insert_cell" and "df" in e["code"] for e in evs)  # the agent's cell, inserted
        out = k.execute("%%gemma\nhello")
        printed = " ".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
        assert "busy" in printed
        out = k.execute("%gemma unload")
        assert "busy" in " ".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
        k.send({"type": "approve", "approval_id": evs[-1]["approval_id"], "ok": False})
        evs = k.events(lambda e: e["type"] in ("done", "error"), timeout=120)
        assert evs[-1]["type"] == "done", evs[-3:]
        assert any(e["type"] == "skipped" and "did not approve" in e["text"] for e in evs)
        out = k.execute("print(y * 6)")
        assert "42" in " ".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
    finally:
        k.close()


# -- the ipywidgets panel on the same service ------------------------------------------------------

def test_widget_panel_streams_stops_and_reports_bad_input(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    from types import SimpleNamespace

    from gemma4_nb.notebook.copilot import get_copilot
    from gemma4_nb.notebook.panel import ChatPanel

    shell = SimpleNamespace(user_ns={})
    get_copilot(shell).backend = Scripted(["Try:\n```python\n", "x = 1\n", "```"])
    panel = ChatPanel(shell)
    assert get_copilot(shell) is panel.copilot  # one copilot per kernel, shared with %%gemma
    html = lambda: " ".join(getattr(w, "value", "") for w in panel.history.children)  # noqa: E731
    assert panel.send("") is None and "the message is empty" in html()
    panel.upload.value = ({"name": "notes.txt", "type": "text/plain", "content": memoryview(b"hi"), "size": 2,
                            "last_modified": __import__("datetime").datetime.now()},)
    assert panel.send("x") is None and "unsupported attachment type" in html()
    panel.upload.value = ()
    assert panel.send("add one") is not None
    panel.service.wait(10)
    assert "x = 1" in html() and not panel.send_button.disabled and panel.stop_button.disabled
    rows = [w for w in panel.history.children if hasattr(w, "children")]  # the code block with its buttons
    assert [b.description for b in rows[-1].children[1].children] == ["Insert below", "Insert and run"]
    panel.copilot.backend = Scripted([f"w{i} " for i in range(2000)], delay=0.005)
    panel.send("long")
    time.sleep(0.3)
    panel.service.stop()  # what the Stop button does
    panel.service.wait(10)
    assert "(stopped)" in html()


def test_an_approval_names_the_agents_cell(monkeypatch):
    """The agent's cell goes to the sidebar with a name (``ref``); the approval before running it
    names the same cell, so the sidebar offers Run / Skip on that cell too. Skipped: nothing runs."""
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.chdir(__import__("tempfile").mkdtemp())
    events: queue.Queue = queue.Queue()
    c = Copilot(InteractiveShell.instance())
    c.backend = Scripted(["```python\nimport os\nos.remove('data.csv')\n```\n"])
    c.backend.supports_tools = True  # a chat model: its code block is the agent's run_python call
    proto = ChatProtocol(c, events.put, runs_cells=True)
    c.frontend = proto
    proto.handle({"type": "chat", "id": "r1", "text": "delete the data file", "agent": True, "context": False})
    seen = []
    while True:
        ev = events.get(timeout=20)
        seen.append(ev)
        if ev["type"] == "approval":
            break
        assert ev["type"] not in ("done", "error", "run_cell"), seen
    inserted = [e for e in seen if e["type"] == "insert_cell"]
    assert len(inserted) == 1 and "os.remove('data.csv')" in inserted[0]["code"]
    assert ev["ref"] == inserted[0]["ref"] and "delete" in ev["why"]
    proto.handle({"type": "approve", "approval_id": ev["approval_id"], "ok": False})
    rest = drain(events)
    assert not [e for e in rest if e["type"] == "run_cell"]  # skipped: the notebook runs nothing
    assert any(e["type"] == "skipped" for e in rest), rest
    proto.service.wait(5)
