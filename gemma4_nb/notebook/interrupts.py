"""A kernel interrupt (the stop button, Ctrl-C) also stops a chat panel's reply.

A panel's reply runs on a worker thread (``chat_service.py``); a kernel interrupt is a SIGINT to
the kernel's main thread, which ipykernel turns into a KeyboardInterrupt in the cell that runs --
or ignores when no cell runs. Two routes bring it to the reply:

- while the kernel is idle, ipykernel runs with the SIGINT handler it saved before its last
  message handler (``Kernel.saved_sigint_handler``, restored after each one); it becomes ours,
  which stops the running reply and then does what the saved one did;
- while a cell runs, the interrupt ends it with a KeyboardInterrupt; a ``post_run_cell`` hook
  stops the running reply too.
"""

from __future__ import annotations

import signal
import threading


def stop_replies(shell) -> bool:
    """Stop the chat panel reply that is running in this kernel, if any."""
    copilot = getattr(shell, "_gemma4_nb_copilot", None)
    service = getattr(copilot, "chat_service", None)
    return bool(service is not None and service.busy and service.stop())


def route_kernel_interrupts(shell) -> bool:
    """Make kernel interrupts stop chat panel replies (once per kernel). Must run on the main
    thread inside a kernel message handler (a comm message, a cell), which is where panels are
    created; returns False elsewhere (no ipykernel, another thread), where nothing changes."""
    if getattr(shell, "_gemma4_nb_interrupts", False):
        return True
    kernel = getattr(shell, "kernel", None)
    if (kernel is None or not hasattr(kernel, "saved_sigint_handler")
            or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):  # not inside a handler
        return False
    previous = kernel.saved_sigint_handler

    def on_interrupt(signum, frame):
        stop_replies(shell)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    kernel.saved_sigint_handler = on_interrupt  # installed when the current handler returns

    def after_cell(result) -> None:
        if isinstance(getattr(result, "error_in_exec", None), KeyboardInterrupt):
            stop_replies(shell)

    shell.events.register("post_run_cell", after_cell)
    shell._gemma4_nb_interrupts = True
    return True
