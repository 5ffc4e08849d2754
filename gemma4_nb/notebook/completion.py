"""Inline (ghost-text) code completion: JupyterLab's inline completer asks, over the sidebar's comm,
for the code that follows the cursor; a small model of its own answers (the embedded Gemma 3 270M
unless ``%gemma config completion_model=...`` names another, ``off`` turns it off).

The prompt is the notebook's code cells above (whole cells, the newest that fit) then the current
cell up to the cursor, so as the user types only its end changes and the model's prefix cache
reuses the rest. Completions run on a worker thread, one at a time: a newer request stops the one
under way at its next token (the user typed on; its answer would be stale). The frontend asks
only while the kernel is idle, so a completion never waits behind a running cell.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from ..errors import Gemma4Error

MAX_NEW_TOKENS = 24
CONTEXT_CHARS = 6000  # the cells above that go into the prompt (about 1.5k tokens)
CELL_SEPARATOR = "\n\n# %%\n"  # between cells, as a script with cell markers reads
STOPS = ["\n\n\n", "\n# %%", "```"]


def completion_prompt(cells_above: list[str], prefix: str, budget: int = CONTEXT_CHARS) -> str:
    """The cells above (the newest whole cells that fit in ``budget`` characters, in notebook
    order) then the current cell up to the cursor."""
    kept: list[str] = []
    used = 0
    for cell in reversed([c for c in cells_above if isinstance(c, str) and c.strip()]):
        if used + len(cell) > budget:
            break
        kept.append(cell.rstrip())
        used += len(cell)
    head = CELL_SEPARATOR.join(reversed(kept))
    return (head + CELL_SEPARATOR if head else "") + prefix


def trim_completion(text: str, suffix: str) -> str:
    """What to show after the cursor: one line when the cursor is inside a line (text follows it
    on that line), else up to the first blank line; no trailing whitespace."""
    if suffix.split("\n", 1)[0].strip():
        text = text.split("\n", 1)[0]
    text = text.split("\n\n", 1)[0]
    return text.rstrip()


class Completer:
    """The kernel's inline completer: its own model, loaded on the first request."""

    def __init__(self, settings) -> None:
        self.settings = settings  # the copilot's Settings (completion_model)
        self.model = None
        self.backend = None
        self.model_ref: str | None = None
        self.lock = threading.Lock()
        self._latest = 0  # the newest request: older ones stop at their next token
        self.last_latency_s: float | None = None

    def _backend(self):
        ref = self.settings.completion_model
        if ref is not None and ref.lower() == "off":
            raise Gemma4Error("inline completion is off in this kernel (%gemma config completion_model=off); "
                              "`%gemma config completion_model=none` turns it back on")
        if self.backend is None or self.model_ref != ref:
            from ..backends.local import LocalBackend
            from ..runtime.model import load
            from ..runtime.resolve import embedded_model

            self.backend = self.model = None
            self.model = load(ref or str(embedded_model()), progress=False)
            self.backend, self.model_ref = LocalBackend(self.model), ref
        return self.backend

    def complete(self, prefix: str, suffix: str = "", cells_above: list[str] | None = None, *,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> str:
        """The completion at the cursor ("" when the model has nothing to add, or a newer
        request came)."""
        if not isinstance(prefix, str) or not isinstance(suffix, str):
            raise Gemma4Error("prefix and suffix must be text")
        self._latest += 1
        mine = self._latest
        with self.lock:
            if mine != self._latest:
                return ""  # superseded while it waited
            t0 = time.perf_counter()
            backend = self._backend()
            prompt = completion_prompt(list(cells_above or []), prefix)
            if not prompt.strip():
                return ""
            reply = backend.complete_text(prompt, stop=STOPS, max_new_tokens=max_new_tokens, temperature=0,
                                          draft=None, should_stop=lambda: mine != self._latest)
            self.last_latency_s = time.perf_counter() - t0
            if reply.stopped:
                return ""
            return trim_completion(reply.text, suffix)

    def submit(self, request_id, prefix, suffix, cells_above, emit: Callable[[dict], None]) -> None:
        """Answer on a worker thread with a ``completion`` message (``text``, or ``error``)."""
        def run():
            try:
                text = self.complete(prefix, suffix, cells_above)
                emit({"type": "completion", "id": request_id, "text": text})
            except Gemma4Error as exc:
                emit({"type": "completion", "id": request_id, "text": "", "error": str(exc)})
            except Exception as exc:  # a message for the frontend, never a traceback in the kernel's log
                emit({"type": "completion", "id": request_id, "text": "",
                      "error": f"{type(exc).__name__}: {exc}"})

        threading.Thread(target=run, name="gemma4-nb-complete", daemon=True).start()


def get_completer(copilot) -> Completer:
    c = getattr(copilot, "completer", None)
    if c is None:
        c = copilot.completer = Completer(copilot.settings)
    return c
