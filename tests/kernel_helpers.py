"""Driving a real Jupyter kernel from a test as a frontend does."""

from __future__ import annotations

import queue
import time


def execute(km, kc, code: str, *, interrupt_after: float | None = None, timeout: float = 120):
    """Run ``code`` in the kernel and collect its iopub messages until it is idle again. With
    ``interrupt_after``, the kernel is interrupted once, that many seconds after the request.
    Returns the messages and when the interrupt was sent (``time.time()``; None without one)."""
    start = time.time()
    msg_id = kc.execute(code)
    messages, interrupted = [], None
    while time.time() < start + timeout:
        if interrupt_after is not None and interrupted is None and time.time() > start + interrupt_after:
            km.interrupt_kernel()
            interrupted = time.time()
        try:
            msg = kc.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
        messages.append(msg)
    return messages, interrupted


def gemma_errors(text: str) -> list[str]:
    """The ``gemma4-nb:`` lines of a cell's output that are not the one-line note of the weight
    format a load chose (``gemma4-nb: int4 weights on cpu: ...``, runtime/weight_choice.py)."""
    import re

    return [line for line in text.splitlines()
            if "gemma4-nb:" in line and not re.match(r"\s*gemma4-nb: \w+ weights ", line)]
