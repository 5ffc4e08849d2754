"""Servers that get the protocol wrong, played by a small real HTTP server on loopback (``http.server``
in a thread; no mock of httpx): a stream cut before ``[DONE]``, a web page or an error body with
status 200, an error event, a server that accepts the request and never answers, tool-call
arguments nested thousands deep. Each is named as the server's mistake, never shown as an answer
or a traceback, and Stop works while waiting."""

from __future__ import annotations

import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from gemma4_nb.backends.openai_compat import OpenAIBackend, RemoteError
from gemma4_nb.notebook.agent import Agent, AgentSettings
from gemma4_nb.notebook.comm import ChatProtocol
from gemma4_nb.notebook.copilot import Copilot
from gemma4_nb.notebook.workspace import KernelWorkspace
from IPython.core.interactiveshell import InteractiveShell

from kernel_helpers import execute as run_in_kernel
from kernel_helpers import gemma_errors

MESSAGES = [{"role": "user", "content": "hello?"}]


def chunk(content=None, finish=None, tool_calls=None) -> bytes:
    delta = {}
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    event = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(event)}\n\n".encode()


DEEP = "[" * 50_000 + "]" * 50_000
PAGE = b"<!DOCTYPE html><html><head><title>Sign in - Corporate Proxy</title></head><body>login</body></html>"


class Misbehaving(BaseHTTPRequestHandler):
    """Behaves per the first path segment: /cut/v1/chat/completions, /html/v1/..., ..."""

    release: threading.Event  # set at teardown: silent handlers give up

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # /v1/models, for `%gemma backend` and status()
        if self.path.startswith("/html"):
            self._send(200, "text/html", PAGE)
        else:
            self._send(200, "application/json", json.dumps({"data": [{"id": "misbehaving"}]}).encode())

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        mode = self.path.strip("/").split("/")[0]
        sse = "text/event-stream"
        if mode == "cut":  # a few pieces, then the connection closes: no finish reason, no [DONE]
            self._start(200, sse)
            for piece in ("The answer ", "is forty", "-"):
                self.wfile.write(chunk(piece))
                self.wfile.flush()
        elif mode == "finished-no-done":  # a finish reason, then closed without [DONE]: whole, if untidy
            self._start(200, sse)
            self.wfile.write(chunk("Complete answer.") + chunk(finish="stop"))
        elif mode == "empty":
            self._start(200, sse)
        elif mode == "cut-tool":  # a tool call whose arguments stop half-way
            self._start(200, sse)
            self.wfile.write(chunk(tool_calls=[{"index": 0, "id": "c1", "type": "function",
                                                "function": {"name": "run_python", "arguments": '{"code": "import os'}}]))
        elif mode == "html":
            self._send(200, "text/html; charset=utf-8", PAGE)
        elif mode == "html-untyped":
            self._send(200, None, PAGE)
        elif mode == "plain":
            self._send(200, "text/plain", b"It works!\n")
        elif mode == "json-error":
            self._send(200, "application/json", json.dumps({"error": {"message": "model 'x' is not loaded"}}).encode())
        elif mode == "json-whole":  # stream: true ignored: one whole completion
            body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Whole reply."},
                                 "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
            self._send(200, "application/json", json.dumps(body).encode())
        elif mode == "error-event":
            self._start(200, sse)
            self.wfile.write(chunk("Partial ") + b'data: {"error": {"message": "CUDA out of memory"}}\n\n')
        elif mode == "deep-event":
            self._start(200, sse)
            self.wfile.write(b"data: " + DEEP.encode() + b"\n\n")
        elif mode == "deep-args":
            self._start(200, sse)
            self.wfile.write(chunk(tool_calls=[{"index": 0, "id": "c1", "type": "function",
                                                "function": {"name": "run_python", "arguments": DEEP}}]))
            self.wfile.write(chunk(finish="tool_calls") + b"data: [DONE]\n\n")
        elif mode == "silent":  # accepts the request, never answers
            self.release.wait(120)
        elif mode == "stall":  # one piece, then silence
            self._start(200, sse)
            self.wfile.write(chunk("Thinking"))
            self.wfile.flush()
            self.release.wait(120)
        else:
            self._send(404, "text/plain", b"no such mode")

    def _start(self, status, content_type):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.end_headers()

    def _send(self, status, content_type, body: bytes):
        self._start(status, content_type)
        self.wfile.write(body)


@pytest.fixture(scope="module")
def bad_server():
    release = threading.Event()
    handler = type("Handler", (Misbehaving,), {"release": release})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()
    server.server_close()


def backend(url, mode, **kw):
    return OpenAIBackend(f"{url}/{mode}", "misbehaving", retries=0, **kw)


def test_a_stream_cut_before_done_is_marked_cut(bad_server):
    pieces = []
    reply = backend(bad_server, "cut").complete(MESSAGES, on_text=pieces.append)
    assert reply.text == "The answer is forty-" == "".join(pieces)  # what came is kept...
    assert "ended the stream without its closing [DONE]" in reply.cut and "cut off" in reply.cut  # ...and marked
    assert reply.usage.finish_reason == "cut" and not reply.stopped


def test_a_finish_reason_without_done_is_a_whole_reply(bad_server):
    reply = backend(bad_server, "finished-no-done").complete(MESSAGES)
    assert reply.text == "Complete answer." and not reply.cut


def test_an_empty_stream_is_cut_not_an_empty_answer(bad_server):
    reply = backend(bad_server, "empty").complete(MESSAGES)
    assert reply.text == "" and "it sent nothing" in reply.cut


@pytest.mark.parametrize("mode,message", [
    ("html", "answered with a web page titled 'Sign in - Corporate Proxy', not an OpenAI-compatible event stream"),
    ("html-untyped", "answered with a web page titled 'Sign in - Corporate Proxy'"),
    ("plain", "answered text/plain, not an OpenAI-compatible event stream; it began with 'It works!'"),
    ("json-error", "answered with an error: model 'x' is not loaded"),
    ("error-event", "reported an error during the reply: CUDA out of memory"),
    ("deep-event", "sent an event that is not valid JSON"),
])
def test_a_server_mistake_is_named(bad_server, mode, message):
    with pytest.raises(RemoteError) as err:
        backend(bad_server, mode).complete(MESSAGES)
    assert message in str(err.value) and bad_server in str(err.value)
    if mode == "error-event":
        assert "cut off after: 'Partial '" in str(err.value)  # the partial answer is named, not passed off


def test_a_whole_json_completion_is_accepted(bad_server):
    pieces = []
    reply = backend(bad_server, "json-whole").complete(MESSAGES, on_text=pieces.append)
    assert reply.text == "Whole reply." and pieces == ["Whole reply."] and not reply.cut
    assert reply.usage.prompt_tokens == 5 and reply.usage.generated_tokens == 2


def test_deeply_nested_tool_arguments_are_a_malformed_call_not_a_crash(bad_server):
    reply = backend(bad_server, "deep-args").complete(MESSAGES, tools=[{"type": "function"}])
    assert not reply.tool_calls and "nested too deeply" in reply.errors[0]


def test_a_silent_server_meets_the_first_byte_limit(bad_server):
    t = time.monotonic()
    with pytest.raises(RemoteError, match=r"accepted the request but sent nothing for \d+ s \(the first-byte limit is 1\.5 s\)"):
        backend(bad_server, "silent", first_byte_timeout=1.5).complete(MESSAGES)
    assert 1.4 < time.monotonic() - t < 10


def test_the_first_byte_limit_comes_from_the_environment(bad_server, monkeypatch):
    monkeypatch.setenv("GEMMA4_NB_FIRST_BYTE_TIMEOUT", "1")
    assert backend(bad_server, "silent").first_byte_timeout == 1.0
    monkeypatch.setenv("GEMMA4_NB_FIRST_BYTE_TIMEOUT", "soon")
    with pytest.raises(RemoteError, match=r"\$GEMMA4_NB_FIRST_BYTE_TIMEOUT must be a number of seconds"):
        backend(bad_server, "silent")
    monkeypatch.delenv("GEMMA4_NB_FIRST_BYTE_TIMEOUT")
    assert backend(bad_server, "silent").first_byte_timeout == 60.0


@pytest.mark.parametrize("mode", ["silent", "stall"])
def test_cancel_stops_a_wait_for_the_server(bad_server, mode):
    b = backend(bad_server, mode)
    threading.Timer(0.5, b.cancel).start()
    t = time.monotonic()
    reply = b.complete(MESSAGES)
    assert reply.stopped and reply.usage.finish_reason == "interrupted"
    assert time.monotonic() - t < 3  # not the 60 s limit
    assert reply.text == ("Thinking" if mode == "stall" else "")


def test_a_cut_reply_stops_the_agent_before_it_runs_anything(bad_server):
    shell = InteractiveShell.instance()
    shell.user_ns.pop("os", None)
    agent = Agent(backend(bad_server, "cut-tool"), KernelWorkspace(shell), AgentSettings(approval="auto"))
    result = agent.run([{"role": "user", "content": "do it"}])
    assert not result.cells and "cut off" in result.notes[0]


def test_stop_in_a_chat_panel_ends_a_wait_for_a_silent_server(bad_server, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    events: queue.Queue = queue.Queue()
    c = Copilot(None)
    c.use_backend(f"{bad_server}/silent", "misbehaving", tools=False)
    proto = ChatProtocol(c, events.put)
    proto.handle({"type": "chat", "id": "r1", "text": "hello?", "context": False})
    time.sleep(1.0)
    t = time.monotonic()
    proto.handle({"type": "stop"})
    proto.service.wait(5)
    seen = []
    while not events.empty():
        seen.append(events.get())
    done = [e for e in seen if e["type"] == "done"]
    assert done and done[0]["stopped"] and time.monotonic() - t < 3, seen
    # the next request is not stopped by the earlier Stop
    c.use_backend(f"{bad_server}/finished-no-done", "misbehaving", tools=False)
    proto.handle({"type": "chat", "id": "r2", "text": "again", "context": False})
    proto.service.wait(10)
    seen = []
    while not events.empty():
        seen.append(events.get())
    done = [e for e in seen if e["type"] == "done"]
    assert done and done[0]["text"] == "Complete answer." and not done[0]["stopped"]


def test_a_cut_reply_is_marked_in_a_panel(bad_server, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    events: queue.Queue = queue.Queue()
    c = Copilot(None)
    c.use_backend(f"{bad_server}/cut", "misbehaving", tools=False)
    proto = ChatProtocol(c, events.put)
    proto.handle({"type": "chat", "id": "r1", "text": "hello?", "context": False})
    proto.service.wait(10)
    seen = []
    while not events.empty():
        seen.append(events.get())
    notes = [e["text"] for e in seen if e["type"] == "note"]
    done = [e for e in seen if e["type"] == "done"][0]
    assert notes and "cut off" in notes[0] and done["notes"] == notes and done["text"] == "The answer is forty-"


def test_misbehaving_servers_in_a_real_kernel(bad_server, tmp_path):
    """The magics show the server's mistake as a message, mark a cut reply, keep no bad URL, and
    the kernel's Stop ends a wait for a silent server at once."""
    from test_notebook_kernel import run_cells, text_of

    cells = run_cells([
        "%load_ext gemma4_nb",
        f"%gemma backend {bad_server}/cut --no-tools",
        "%%gemma\nhello?",                                                    # 2
        f"%gemma backend {bad_server}/html --no-tools",
        "%%gemma\nhello?",                                                    # 4
        f"%gemma backend {bad_server}/json-error --no-tools",
        "%%gemma\nhello?",                                                    # 6
        f"%gemma backend {bad_server}/silent --no-tools\n%gemma config first_byte_timeout=1",
        "%%gemma\nhello?",                                                    # 8
        "%gemma config first_byte_timeout=-1",                                # 9
        "%gemma backend 127.0.0.1:1",                                         # 10
        "%gemma backend",                                                     # 11
        "print(6 * 7)",                                                       # 12
    ], tmp_path)
    out = [text_of(c) for c in cells]
    assert not [o for c in cells for o in c.outputs if o.get("output_type") == "error"]
    assert "The answer is forty-" in out[2] and "without its closing [DONE]" in out[2] and "cut off" in out[2]
    assert "answered with a web page titled 'Sign in - Corporate Proxy'" in out[4]
    assert "answered with an error: model 'x' is not loaded" in out[6]
    assert "sent nothing for 1 s (the first-byte limit is 1 s)" in out[8]
    assert "first_byte_timeout must be a number of seconds above 0" in out[9]
    assert "did you mean http://127.0.0.1:1?" in out[10]
    assert f"{bad_server}/silent" in out[11]  # the refused URL was not kept
    assert "42" in out[12]


def test_the_kernel_interrupt_stops_a_wait_for_a_silent_server(bad_server, tmp_path):
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        kc.execute_interactive(f"%load_ext gemma4_nb\n%gemma backend {bad_server}/silent --no-tools", timeout=60)
        messages, interrupted = run_in_kernel(km, kc, "%%gemma\nhello?", interrupt_after=1.5, timeout=60)
        texts = [json.dumps(m["content"]) for m in messages]
        took = time.time() - interrupted
        assert took < 5, took  # not the 60 s first-byte limit
        assert "(stopped)" in " ".join(texts) and '"ename"' not in " ".join(texts)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_the_way_back_to_the_in_kernel_model_when_the_environment_names_a_server(bad_server, tiny_dir, tmp_path):
    from test_notebook_kernel import run_cells, text_of

    cells = run_cells([
        "%load_ext gemma4_nb",
        "%gemma backend\n%gemma status",                    # 1: the environment's server
        "%%gemma\nhi",                                      # 2
        "%gemma status",                                    # 3
        f"%gemma model {tiny_dir}\n%gemma backend local",   # 4
        "%gemma backend",                                   # 5
        "%%gemma --max-new-tokens 3\nhi",                   # 6
    ], tmp_path, env={"GEMMA4_NB_BACKEND_URL": f"{bad_server}/html"})
    out = [text_of(c) for c in cells]
    assert f"{bad_server}/html" in out[1] and "connects on first use" in out[1]
    assert "answered with a web page titled 'Sign in - Corporate Proxy'" in out[2]
    assert "answers, but not as an OpenAI-compatible API (text/html at /models): check the URL" in out[3]
    assert "local (the in-kernel model)" in out[5]
    assert any(o.get("output_type") == "display_data" for o in cells[6].outputs) and not gemma_errors(out[6])
