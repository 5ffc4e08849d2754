"""The copilot on a serving engine: a real llama.cpp server on loopback, started here, serving the
embedded Gemma 3 270M GGUF through the OpenAI-compatible API. No mocks."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest
from IPython.core.interactiveshell import InteractiveShell

from gemma4_nb.backends.openai_compat import OpenAIBackend, RemoteError
from gemma4_nb.notebook.copilot import Copilot
from gemma4_nb.runtime.resolve import embedded_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path_factory, chat_format: str):
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    log_file = open(log, "w")  # a file, not a pipe: llama.cpp logs a lot, and a full pipe blocks it
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_model()), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "4096", "--n_threads", "2", "--chat_format", chat_format],
        stdout=log_file, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"llama.cpp server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("llama.cpp server did not start in 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log_file.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from start_server(tmp_path_factory, "gemma")


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    """llama.cpp's function-calling chat format: tool calls constrained by a grammar."""
    yield from start_server(tmp_path_factory, "chatml-function-calling")


MESSAGES = [{"role": "user", "content": "Write one sentence about pandas DataFrames."}]


def test_streaming_and_usage(server):
    backend = OpenAIBackend(server, "gemma-3-270m", tools=False)
    pieces = []
    reply = backend.complete(MESSAGES, on_text=pieces.append, max_new_tokens=24, temperature=0)
    assert len(pieces) > 1 and "".join(pieces) == reply.text and reply.text.strip()
    u = reply.usage
    # llama-cpp-python's server sends no `usage` while streaming (vLLM and Ollama do): generated
    # tokens are then counted from the stream, and the prompt count stays unknown (0)
    assert u.generated_tokens == len(pieces) <= 24 and u.prefill_seconds > 0 and u.decode_seconds > 0
    assert u.finish_reason in ("length", "eos") and "tok/s" in u.summary()
    assert "reachable, serving" in backend.status()


def test_stop_strings_and_stopping_mid_reply(server):
    backend = OpenAIBackend(server, tools=False)
    reply = backend.complete(MESSAGES, stop=["."], max_new_tokens=40, temperature=0)
    assert "." not in reply.text

    seen = []

    def stop_after_three(piece):
        seen.append(piece)
        if len(seen) == 3:
            raise KeyboardInterrupt  # what the kernel's Stop button raises

    reply = backend.complete(MESSAGES, on_text=stop_after_three, max_new_tokens=200, temperature=0)
    assert reply.stopped and reply.text == "".join(seen) and reply.usage.finish_reason == "interrupted"
    again = backend.complete(MESSAGES, max_new_tokens=8, temperature=0)  # the server carries on
    assert again.text and not again.stopped
    asked = iter(range(1000))  # a panel's Stop: asked at every streamed event, shown or not
    stopped = backend.complete(MESSAGES, max_new_tokens=200, temperature=0, should_stop=lambda: next(asked) >= 3)
    assert stopped.stopped and stopped.usage.finish_reason == "interrupted" and stopped.usage.generated_tokens <= 3


def test_a_servers_prefix_cache_report_lands_in_usage():
    from gemma4_nb.runtime.generation import Usage

    usage = Usage()
    OpenAIBackend._usage(usage, {"usage": {"prompt_tokens": 812, "completion_tokens": 5,
                                           "prompt_tokens_details": {"cached_tokens": 768}}})
    assert (usage.prompt_tokens, usage.cached_tokens, usage.generated_tokens) == (812, 768, 5)


def test_agent_loop_through_the_remote_backend(server):
    shell = InteractiveShell.instance()
    shell.run_cell("import pandas as pd\nsales = pd.DataFrame({'region': ['north', 'south', 'north'], "
                   "'revenue': [10.0, 20.0, 5.0]})")
    copilot = Copilot(shell)
    copilot.use_backend(server, "gemma-3-270m", tools=False)
    copilot.settings.approval, copilot.settings.max_new_tokens, copilot.settings.temperature = "auto", 48, 0.0
    events = []
    result = copilot.ask("Compute the total revenue per region.", agent=True, on_event=lambda k, t: events.append((k, t)))
    assert result.cells and result.cells[0].startswith("import pandas as pd\nresult = sales")
    assert ("code", result.cells[0]) in events and any(k == "output" for k, _ in events)
    assert "result" in shell.user_ns  # the cell ran in the user's namespace
    assert copilot.turns[-1]["role"] == "assistant"
    plain = copilot.ask("Say hello.")
    assert plain.answer and copilot.last_usage.generated_tokens > 0


def test_tool_calls_stream_from_the_server(tool_server):
    from gemma4_nb.notebook.agent import TOOLS

    backend = OpenAIBackend(tool_server, tools=True)
    reply = backend.complete([{"role": "user", "content": "Compute the total revenue per region of `sales`."}],
                             tools=TOOLS[:1], tool_choice={"type": "function", "function": {"name": "run_python"}},
                             max_new_tokens=60, temperature=0)
    assert not reply.errors, reply.errors
    assert [c.name for c in reply.tool_calls] == ["run_python"]
    assert isinstance(reply.tool_calls[0].arguments.get("code"), str) and reply.tool_calls[0].id


def test_unreachable_server_is_a_clear_error():
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.05)
    t = time.time()
    with pytest.raises(RemoteError, match=r"cannot reach the server at http://127\.0\.0\.1:\d+/v1 .*Is it running\?"):
        backend.complete(MESSAGES)
    assert time.time() - t < 10
    assert "unreachable" in backend.status()


def test_error_status_is_a_clear_error(server):
    with pytest.raises(RemoteError, match=r"answered HTTP 404"):
        OpenAIBackend(server + "/not-an-api").complete(MESSAGES, max_new_tokens=4)
    with pytest.raises(RemoteError, match=r"must start with http"):
        OpenAIBackend("localhost:8000")


def test_magic_switches_backends_in_a_real_kernel(server, tmp_path):
    from test_notebook_kernel import run_cells, text_of

    cells = run_cells([
        "%load_ext gemma4_nb",
        f"%gemma backend {server} --model gemma-3-270m --no-tools",
        "%%gemma --max-new-tokens 12 --temperature 0\nWhat is a DataFrame?",
        "%gemma status",
        f"%gemma backend http://127.0.0.1:{free_port()}",
        "%%gemma --max-new-tokens 4\nhello?",
        "1 + 1",
    ], tmp_path)
    out = [text_of(c) for c in cells]
    assert "reachable, serving" in out[1]
    assert any(o.get("output_type") == "display_data" for o in cells[2].outputs)
    assert "last reply: prompt" in out[3]
    assert "cannot reach the server" in out[5]
    assert "2" in out[6]
