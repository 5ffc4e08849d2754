"""Stop at the next token, always: with a model whose every token is hidden from the stream (a
thought-channel marker) and that never stops by itself, Stop still ends the reply within half a
second -- in-process, over the sidebar's comm, and by a kernel interrupt during a panel reply."""

from __future__ import annotations

import json
import queue
import time

import pytest
from hidden_tokens import write_hidden_token_checkpoint
from test_chat_protocol import KernelComm, drain

from gemma4_nb.notebook.comm import ChatProtocol
from gemma4_nb.notebook.copilot import Copilot

LONG = 3000  # new tokens allowed: without Stop, minutes of hidden tokens


@pytest.fixture(scope="module")
def hidden_dir(tmp_path_factory):
    return write_hidden_token_checkpoint(tmp_path_factory.mktemp("hidden"))


@pytest.fixture(scope="module")
def hidden_base_dir(tmp_path_factory):
    """The same, as a base model: the copilot asks it with a plain prompt (``complete_text``)."""
    path = write_hidden_token_checkpoint(tmp_path_factory.mktemp("hidden_base"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["gemma4_nb_base_model"] = True
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def limit(usage) -> float:
    """Half a second, or five decode steps on a machine where a step takes longer than 0.1 s."""
    step = usage.decode_seconds / max(usage.generated_tokens - 1, 1)
    return max(0.5, 5 * step)


@pytest.mark.parametrize("layout", ["chat", "plain"])
def test_stop_ends_a_reply_of_hidden_tokens_in_process(layout, hidden_dir, hidden_base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    events: queue.Queue = queue.Queue()
    c = Copilot(None)
    c.settings.model = str(hidden_dir if layout == "chat" else hidden_base_dir)
    c.settings.max_new_tokens, c.settings.temperature = LONG, 0.0
    proto = ChatProtocol(c, events.put)
    proto.handle({"type": "chat", "id": "h", "text": "Think about it.", "context": False})
    deadline = time.time() + 60
    while not (c.last_usage is not None and c.last_usage.generated_tokens >= 10) and time.time() < deadline:
        time.sleep(0.01)
    assert c.last_usage is not None and c.last_usage.generated_tokens >= 10, "generation never started"
    assert c.plain == (layout == "plain")
    t = time.perf_counter()
    proto.handle({"type": "stop"})
    evs = drain(events, timeout=60)
    took = time.perf_counter() - t
    done = evs[-1]
    assert done["type"] == "done" and done["stopped"], done
    assert not any(e["type"] == "token" for e in evs)  # every token was hidden from the stream
    u = c.last_usage
    assert u.finish_reason == "interrupted" and u.generated_tokens < LONG
    assert took < limit(u), f"stopped after {took:.2f} s"
    proto.service.wait(10)
    assert not c.lock.locked()


def test_stop_over_the_comm_and_a_kernel_interrupt_during_panel_replies(hidden_dir, tmp_path):
    k = KernelComm(tmp_path)
    try:
        k.execute("import gemma4_nb.notebook.comm\ngemma4_nb.notebook.comm.register()\n%load_ext gemma4_nb\n"
                  f"%gemma model {hidden_dir}\n%gemma config max_new_tokens={LONG} temperature=0\ny = 7\n"
                  "from gemma4_nb.notebook.copilot import get_copilot\nget_copilot(get_ipython()).ensure_model()")
        k.open()
        k.events(lambda e: e["type"] == "status")

        def reply_then(stop, wait=0.5):
            """Start a reply, let it generate ``wait`` s, ``stop()`` it; (seconds to done, done)."""
            k.send({"type": "chat", "id": f"r{time.time()}", "text": "Think it over.", "context": False})
            k.events(lambda e: e["type"] == "start")
            time.sleep(wait)
            t = time.perf_counter()
            stop()
            evs = k.events(lambda e: e["type"] in ("done", "error"), timeout=60)
            assert not any(e["type"] == "token" for e in evs)
            return time.perf_counter() - t, evs[-1]

        took, done = reply_then(lambda: k.send({"type": "stop"}))
        assert done["type"] == "done" and done["stopped"], done
        assert done["usage"]["generated_tokens"] < LONG
        step = done["usage"]["tokens_per_s"]
        bound = max(0.5, 5 / step) if step else 0.5
        assert took < bound, f"Stop over the comm took {took:.2f} s"

        # the kernel's interrupt button while the kernel is idle and a panel reply runs
        took, done = reply_then(k.km.interrupt_kernel)
        assert done["type"] == "done" and done["stopped"], done
        assert took < bound, f"the kernel interrupt took {took:.2f} s"

        # ... and while a cell runs: the cell is interrupted, the panel reply stops too
        k.send({"type": "chat", "id": "during-cell", "text": "Think it over.", "context": False})
        k.events(lambda e: e["type"] == "start")
        msg_id = k.kc.execute("import time\ntime.sleep(60)")
        time.sleep(0.5)
        k.km.interrupt_kernel()
        done = k.events(lambda e: e["type"] in ("done", "error"), timeout=30)[-1]
        assert done["type"] == "done" and done["stopped"], done
        reply = k.kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = k.kc.get_shell_msg(timeout=30)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"

        # the ipywidgets panel's reply, stopped by the kernel interrupt
        k.execute("import gemma4_nb\npanel = gemma4_nb.chat()\npanel.send('Think it over.')")
        time.sleep(0.5)
        k.km.interrupt_kernel()
        deadline, state = time.time() + 30, ""
        while time.time() < deadline:
            out = k.execute("print(panel.service.busy, '(stopped)' in ' '.join(getattr(w, 'value', '') "
                            "for w in panel.history.children))")
            state = " ".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
            if state.strip() == "False True":
                break
            time.sleep(0.2)
        assert state.strip() == "False True", state
        out = k.execute("print(y * 6)")  # the kernel and the user's variables are intact
        assert "42" in " ".join(m["content"].get("text", "") for m in out if m["msg_type"] == "stream")
    finally:
        k.close()
