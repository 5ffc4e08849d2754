"""Prefill the start of the next question while the kernel is idle.

A follow-up's prompt is the previous one, the previous answer, then what changed in the notebook
and the question (``prompts.py``). All but the question is known as soon as a cell has run, so
after each cell, once the kernel has been idle for ``IDLE_DELAY``, the copilot prefills it
(``Copilot.warm_up``) on a background thread. When the question comes, it is all the model has left
to compute: a follow-up after a cell then costs about what one after nothing changed does.

The user's work comes first: a cell that starts stops the warm-up at its next chunk (without
waiting for it), a request stops it and waits for the chunk under way (its work is the request's
own start), and a warm-up never waits for a request. ``%gemma config warm=off`` turns it off.
"""

from __future__ import annotations

import threading

IDLE_DELAY = 0.3  # seconds after a cell before warming: "run all" moves on to its next cell first


class Warmer:
    def __init__(self, copilot) -> None:
        self.copilot = copilot
        self._stop = threading.Event()
        self._timer: threading.Timer | None = None
        self._thread: threading.Thread | None = None
        self.positions = 0  # the cache's length after the last warm-up (0: it did nothing)

    def cell_starts(self, *_) -> None:
        self.stop(wait=False)

    def cell_done(self, *_) -> None:
        self.stop(wait=False)
        self._stop.clear()
        self._timer = threading.Timer(IDLE_DELAY, self._start)
        self._timer.daemon = True
        self._timer.start()

    def _start(self) -> None:
        if self._stop.is_set():
            return
        self._thread = threading.Thread(target=self._run, name="gemma4-nb-warm", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.positions = self.copilot.warm_up(should_stop=self._stop.is_set)
        except Exception:  # the question computes it instead; a warm-up never disturbs the user's work
            self.positions = 0

    def stop(self, wait: bool = False) -> None:
        """Stop a pending or running warm-up (``wait``: until its chunk under way has finished)."""
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()


def register(shell) -> None:
    """Warm the copilot's next question after every cell (once per kernel). The copilot is made
    when it is first used; before that there is nothing to warm."""
    if getattr(shell, "_gemma4_nb_warmup", False):
        return

    def warmer():
        copilot = getattr(shell, "_gemma4_nb_copilot", None)
        if copilot is not None and copilot.warmer is None:
            copilot.warmer = Warmer(copilot)
        return copilot.warmer if copilot is not None else None

    def pre(*args):
        w = warmer()
        if w is not None:
            w.cell_starts()

    def post(*args):
        w = warmer()
        if w is not None:
            w.cell_done()

    shell.events.register("pre_run_cell", pre)
    shell.events.register("post_run_cell", post)
    shell._gemma4_nb_warmup = True
