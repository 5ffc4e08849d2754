"""Inline completion in the kernel: the prompt (cells above, then the cell up to the cursor), the
trimmed suggestion, a newer request stopping the older, the off switch, the comm message, and a
real completion by the embedded Gemma 3 270M."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from gemma4_nb.backends.base import Reply
from gemma4_nb.errors import Gemma4Error
from gemma4_nb.notebook.comm import ChatProtocol
from gemma4_nb.notebook.completion import CELL_SEPARATOR, Completer, completion_prompt, trim_completion
from gemma4_nb.notebook.copilot import Copilot, Settings


def test_the_prompt_keeps_whole_cells_above_and_ends_at_the_cursor():
    cells = ["import pandas as pd", "", "x = 1\n", "def f():\n    return x"]
    p = completion_prompt(cells, "y = f(")
    assert p == CELL_SEPARATOR.join(["import pandas as pd", "x = 1", "def f():\n    return x"]) + CELL_SEPARATOR + "y = f("
    # over the budget: the newest whole cells that fit, the start of the prompt stays put as the cell grows
    small = completion_prompt(["a" * 50, "b" * 50, "c" * 50], "d", budget=120)
    assert small == "b" * 50 + CELL_SEPARATOR + "c" * 50 + CELL_SEPARATOR + "d"
    assert completion_prompt(["a" * 50, "b" * 50, "c" * 50], "dd", budget=120).startswith(small[:-1])
    assert completion_prompt([], "x") == "x"


def test_a_suggestion_is_one_line_inside_a_line_and_stops_at_a_blank_line():
    assert trim_completion("sum()\nprint(1)", suffix=")") == "sum()"
    assert trim_completion(" a + b\n\nprint(add(1, 2))  ", suffix="") == " a + b"
    assert trim_completion("x\ny\n   ", suffix="\nmore") == "x\ny"


class Slow:
    """A backend that writes until asked to stop (control flow of superseded requests)."""

    def complete_text(self, text, *, stop, max_new_tokens, should_stop=None, **kw):
        out = ""
        for _ in range(200):
            if should_stop is not None and should_stop():
                return Reply(text=out, stopped=True)
            out += "x"
            time.sleep(0.01)
        return Reply(text=out)


def test_a_newer_request_stops_the_one_under_way():
    c = Completer(Settings())
    c.backend, c.model_ref = Slow(), None
    first = []
    t = threading.Thread(target=lambda: first.append(c.complete("a = ")))
    t.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    c.backend = type("Quick", (), {"complete_text": lambda self, text, **kw: Reply(text="1")})()
    assert c.complete("a = 1") == "1"
    t.join(5)
    assert first == [""]  # stale: nothing shown
    assert time.perf_counter() - t0 < 1.5  # it did not wait for the old one's 2 s


def test_off_is_a_clear_answer_over_the_comm(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    events: queue.Queue = queue.Queue()
    c = Copilot(None)
    c.settings.update("completion_model", "off")
    proto = ChatProtocol(c, events.put)
    proto.handle({"type": "complete", "id": "k1", "prefix": "x = ", "suffix": "", "cells": []})
    msg = events.get(timeout=10)
    assert msg["type"] == "completion" and msg["id"] == "k1" and msg["text"] == ""
    assert "inline completion is off" in msg["error"]
    proto.handle({"type": "complete", "id": "k2", "prefix": "x", "cells": "not a list"})
    assert "cells must be a list" in events.get(timeout=5)["message"]
    with pytest.raises(Gemma4Error, match="prefix and suffix must be text"):
        Completer(Settings()).complete(None)


def test_the_embedded_model_completes_code(monkeypatch):
    monkeypatch.delenv("GEMMA4_NB_MODEL", raising=False)
    c = Completer(Settings())
    cells = ["import pandas as pd",
             "sales = pd.DataFrame({'region': ['north', 'south'], 'revenue': [10.0, 20.0]})"]
    text = c.complete("total = sales['revenue'].", "", cells)
    assert text and "\n\n" not in text, repr(text)
    first = c.last_latency_s
    again = c.complete("total = sales['revenue'].s", "", cells)  # the prompt's start is cached
    assert again is not None and c.last_latency_s is not None
    assert c.model.last_usage.cached_tokens > 0, "the cells above came from the prefix cache"
    assert first is not None
