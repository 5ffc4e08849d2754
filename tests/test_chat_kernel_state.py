"""The sidebar follows the kernel: a readable model status, the conversation id that changes when
the kernel forgets the conversation, the agent's steps, and the agent's cells run in the notebook
through the frontend (the kernel never runs them behind the notebook's back). Control flow with a
scripted backend; the browser tests drive the same paths in a real JupyterLab."""

from __future__ import annotations

import base64
import queue
import threading
from types import SimpleNamespace

from test_chat_protocol import Scripted, drain, make

from gemma4_nb.notebook.chat_service import describe_model
from gemma4_nb.notebook.comm import ChatProtocol
from gemma4_nb.notebook.copilot import Copilot
from gemma4_nb.notebook.workspace import KernelWorkspace, run_result_from_outputs


def test_status_names_the_model_readably(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GEMMA4_NB_MODEL", raising=False)
    monkeypatch.delenv("GEMMA4_NB_BACKEND_URL", raising=False)
    c = Copilot(None)
    assert describe_model(c) == {"model": "the embedded Gemma 3 270M (loads on first use)", "model_format": None,
                                 "device": None}
    c.settings.model = "/models/gemma-4-12b-it-Q4_K_M.gguf"
    assert describe_model(c)["model"] == "gemma-4-12b-it-Q4_K_M.gguf (loads on first use)"
    c.settings.model = None
    c.settings.backend_url = "http://127.0.0.1:8080/v1"
    assert describe_model(c) == {"model": "server", "model_format": "server (connects on first use)",
                                 "device": "http://127.0.0.1:8080/v1"}


def test_the_conversation_id_changes_when_the_kernel_forgets(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    c, proto, events = make(["hi"])
    first = proto.service.status()["conversation"]
    proto.handle({"type": "chat", "id": "r1", "text": "q", "context": False})
    drain(events)
    assert drain(events, until=("status",))[-1]["conversation"] == first and c.turns
    proto.handle({"type": "reset"})  # the sidebar's Clear
    evs = drain(events, until=("status",))
    assert [e["type"] for e in evs][-2:] == ["reset", "status"]
    assert evs[-1]["conversation"] != first and c.turns == []
    second = evs[-1]["conversation"]
    c.reset()  # %gemma reset in a cell
    assert proto.service.status()["conversation"] != second


class ToolScripted(Scripted):
    supports_tools = True  # the tool-calling loop (its fenced code becomes a run_python call)


class FakeNotebook:
    """The frontend's part in a test: inserts cells, and runs a cell when asked, answering with the
    outputs a notebook cell would hold."""

    def __init__(self, proto, outputs):
        self.proto, self.outputs, self.cells, self.ran = proto, outputs, {}, []

    def __call__(self, msg):
        if msg["type"] == "insert_cell":
            self.cells[msg["ref"]] = msg["code"]
        elif msg["type"] == "run_cell":
            self.ran.append(self.cells[msg["ref"]])
            # answered from another thread, as the comm's messages arrive on the kernel's main thread
            threading.Thread(target=self.proto.handle, args=({"type": "cell_result", "ref": msg["ref"],
                                                              "outputs": self.outputs, "execution_count": 5},)).start()


def test_the_agent_runs_its_cell_in_the_notebook(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    events: queue.Queue = queue.Queue()
    c = Copilot(SimpleNamespace(user_ns={}))  # a shell that cannot run cells: the notebook must run it
    c.backend = ToolScripted(["Running it:\n```python\nprint(sum([1, 2, 3]))\n```\n"])
    c.settings.approval = "auto"
    proto = ChatProtocol(c, lambda m: (events.put(m), notebook(m)), runs_cells=True)
    notebook = FakeNotebook(proto, [{"output_type": "stream", "name": "stdout", "text": "6\n"}])
    c.frontend = proto
    proto.handle({"type": "chat", "id": "a1", "text": "sum 1, 2, 3", "agent": True, "context": False})
    evs = drain(events)
    assert evs[-1]["type"] == "done", evs[-3:]
    assert [code.strip() for code in notebook.ran] == ["print(sum([1, 2, 3]))"]  # run in the notebook, as the cell inserted
    assert any(e["type"] == "output" and "6" in e["text"] for e in evs)  # the agent read the cell's output
    steps = [e["text"] for e in evs if e["type"] == "step"]
    assert steps[:4] == ["writing", "running the cell", "reading the output", "continuing with the output"], steps


def test_a_deleted_cell_is_not_run_and_a_frontend_without_cells_runs_nothing(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    sent = []
    proto = ChatProtocol(Copilot(None), sent.append, runs_cells=True)
    ws = KernelWorkspace(None, proto)
    ws.insert_cell("x = 1")
    assert sent[-1] == {"type": "insert_cell", "code": "x = 1", "run": False, "ref": ws.cell_ref}
    result = []
    t = threading.Thread(target=lambda: result.append(proto.run_cell(ws.cell_ref)))
    t.start()
    t.join(0.5)
    assert sent[-1] == {"type": "run_cell", "ref": ws.cell_ref} and t.is_alive()
    proto.handle({"type": "cell_result", "ref": ws.cell_ref, "missing": True})
    t.join(5)
    assert result[0].failed and "no longer in the notebook" in result[0].error
    # the sidebar went away while a cell ran: the agent stops waiting (nothing runs twice)
    t = threading.Thread(target=lambda: result.append(proto.run_cell("other")))
    t.start()
    proto.close()
    t.join(5)
    assert result[-1].interrupted
    # an older frontend that never said it runs cells: the workspace runs the code itself
    assert ChatProtocol(Copilot(None), sent.append).run_cell("r") is None


def test_notebook_outputs_read_as_the_agent_reads_a_run():
    png = base64.b64encode(b"\x89PNG fake").decode()
    r = run_result_from_outputs([
        {"output_type": "stream", "name": "stdout", "text": ["a\n", "b\n"]},
        {"output_type": "stream", "name": "stderr", "text": "warn\n"},
        {"output_type": "execute_result", "data": {"text/plain": "42"}, "execution_count": 3},
        {"output_type": "display_data", "data": {"image/png": png, "text/plain": "<Figure>"}},
        {"output_type": "display_data", "data": {"text/plain": "table"}},
    ])
    assert (r.stdout, r.stderr, r.result, r.displays, r.images) == ("a\nb\n", "warn\n", "42", ["table"],
                                                                     [b"\x89PNG fake"])
    assert not r.failed
    err = run_result_from_outputs([{"output_type": "error", "ename": "KeyError", "evalue": "'x'",
                                    "traceback": ["\x1b[0;31mKeyError\x1b[0m: 'x'"]}])
    assert err.failed and err.error == "KeyError: 'x'"
    assert run_result_from_outputs([{"output_type": "error", "ename": "KeyboardInterrupt", "evalue": "",
                                     "traceback": []}]).interrupted
    assert run_result_from_outputs("not a list").summary() == "(ran without output)"
