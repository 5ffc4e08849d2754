"""The JupyterLab sidebar's comm protocol (target ``gemma4_nb.chat``), kernel side.

The sidebar opens the comm (after ``import gemma4_nb.notebook.comm; gemma4_nb.notebook.comm.register()``) and sends
JSON messages; replies come back on the same comm. Generation runs on a worker thread
(:class:`~gemma4_nb.notebook.chat_service.ChatService`), so the kernel keeps handling ``stop`` while a reply
streams. The open comm is the copilot's ``frontend``: the agent inserts its cells through it and,
when the sidebar runs cells (``{"run_cells": true}`` in the comm's open message), runs them in the
notebook through it (their outputs stay under them; the agent reads them back).
See docs/panels.md for every message.
"""

from __future__ import annotations

import threading
import uuid

from ..errors import Gemma4Error
from .chat_service import ChatService
from .completion import get_completer
from .copilot import get_copilot
from .workspace import RunResult, run_result_from_outputs

TARGET = "gemma4_nb.chat"
FRONTEND_TARGET = "gemma4_nb.frontend"  # opened by the kernel (the widget panel's inserts)
PROTOCOL_VERSION = 1


class ChatProtocol:
    """Messages in (``handle``), messages out (``send``); independent of the transport."""

    def __init__(self, copilot, send, *, runs_cells: bool = False) -> None:
        self.copilot = copilot
        self._send = send
        self.service = ChatService(copilot, self.send)
        # The frontend runs the agent's cells in the notebook (it said so when it opened the comm):
        # ``run_cell`` asks it and waits for the cell's outputs.
        self.runs_cells = runs_cells
        self._runs: dict[str, tuple[threading.Event, list]] = {}
        self.closed = False

    def send(self, msg: dict) -> None:
        try:
            self._send(msg)
        except Exception:  # a closed comm or a gone frontend must not break generation
            pass

    # the copilot's frontend hooks (notebook.KernelWorkspace calls them for the agent's cells)
    def insert_cell(self, code: str, run: bool = False) -> str:
        """A new cell below the active one; returns the name ``run_cell`` knows it by."""
        ref = uuid.uuid4().hex[:12]
        self.send({"type": "insert_cell", "code": code, "run": bool(run), "ref": ref})
        return ref

    def run_cell(self, ref: str) -> RunResult | None:
        """Run the inserted cell ``ref`` in the notebook and wait for its outputs (called on a
        request's worker thread; the kernel's main thread runs the cell). None when this
        frontend does not run cells (the caller runs the code itself)."""
        if not self.runs_cells or self.closed:
            return None
        event, answer = threading.Event(), []
        self._runs[ref] = (event, answer)
        self.send({"type": "run_cell", "ref": ref})
        try:
            while not event.wait(0.2):
                service = getattr(self.copilot, "chat_service", None)
                if self.closed or (service is not None and service.stop_requested):
                    # the cell may still be running in the notebook: the agent stops reading it
                    return RunResult(interrupted=True)
            return answer[0]
        finally:
            self._runs.pop(ref, None)

    def _cell_result(self, msg: dict) -> None:
        pending = self._runs.get(str(msg.get("ref")))
        if pending is None:
            return
        if msg.get("missing"):
            result = RunResult(error="not run: the cell is no longer in the notebook (deleted or moved away)")
        else:
            result = run_result_from_outputs(msg.get("outputs") or [], str(msg.get("status") or "ok"))
        pending[1].append(result)
        pending[0].set()

    def hello(self) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("gemma4-nb")
        except PackageNotFoundError:  # run from a source tree
            installed = "unknown"
        self.send({"type": "hello", "version": installed, "protocol": PROTOCOL_VERSION})
        self.send(self.service.status())

    def handle(self, msg) -> None:
        if not isinstance(msg, dict):
            self.send({"type": "error", "message": "a message must be a JSON object with a 'type'"})
            return
        kind = msg.get("type")
        try:
            if kind == "chat":
                attachments = msg.get("attachments") or []
                if not isinstance(attachments, list):
                    raise Gemma4Error("attachments must be a list")
                self.service.submit(msg.get("text", ""), attachments, agent=bool(msg.get("agent")),
                                    use_context=msg.get("context", True) is not False, request_id=msg.get("id"))
            elif kind == "stop":
                service = self.service
                other = getattr(self.copilot, "chat_service", None)
                if not service.busy and other is not None and other.busy:
                    service = other  # started by an earlier connection or the widget panel
                self.send({"type": "stopping", "id": service.request_id, "running": service.stop()})
            elif kind == "approve":
                self.service.approve(str(msg.get("approval_id")), bool(msg.get("ok")))
            elif kind == "status":
                self.send(self.service.status())
            elif kind == "cell_result":
                self._cell_result(msg)
            elif kind == "complete":
                cells = msg.get("cells") or []
                if not isinstance(cells, list):
                    raise Gemma4Error("cells must be a list of the cells' sources")
                get_completer(self.copilot).submit(msg.get("id"), msg.get("prefix", ""), msg.get("suffix", ""),
                                                   cells, self.send)
            elif kind == "reset":
                if self.service.busy:
                    raise Gemma4Error("a reply is streaming: stop it before clearing the conversation")
                self.copilot.reset()
                self.send({"type": "reset"})
                self.send(self.service.status())
            elif kind == "config":
                settings = msg.get("settings")
                if not isinstance(settings, dict):
                    raise Gemma4Error('settings must be an object of setting names and values, e.g. {"approval": "ask"}')
                for key, value in settings.items():
                    self.copilot.settings.update(str(key), str(value))
                self.send(self.service.status())
            else:
                raise Gemma4Error(f"unknown message type {kind!r}")
        except Gemma4Error as exc:
            self.send({"type": "error", "id": msg.get("id"), "message": str(exc)})
        except Exception as exc:  # a message shaped in a way no check foresaw: an answer, never a kernel-log traceback
            self.send({"type": "error", "id": msg.get("id"), "message": f"cannot handle this {kind!r} message "
                       f"({type(exc).__name__}: {exc})"})

    def close(self) -> None:
        # The sidebar moved to another notebook or went away: a reply under way finishes (its
        # messages go nowhere), code waiting for approval is not run.
        self.closed = True
        self.service.cancel_approvals()
        if self.copilot.frontend is self:
            self.copilot.frontend = None


def _open(comm, open_msg, shell) -> ChatProtocol:
    data = (open_msg or {}).get("content", {}).get("data") or {}
    proto = ChatProtocol(get_copilot(shell), comm.send, runs_cells=bool(data.get("run_cells")))
    proto.copilot.frontend = proto  # the newest sidebar gets the agent's cells
    comm.on_msg(lambda msg: proto.handle(msg["content"]["data"]))
    comm.on_close(lambda msg: proto.close())
    proto.hello()
    return proto


def register(shell=None) -> bool:
    """Accept the sidebar's comm in this kernel (idempotent). False outside a Jupyter kernel."""
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    if getattr(shell, "_gemma4_nb_comm_registered", False):
        return True
    from comm import get_comm_manager

    get_comm_manager().register_target(TARGET, lambda comm, msg: _open(comm, msg, shell))
    shell._gemma4_nb_comm_registered = True
    return True


class FrontendLink:
    """The kernel's own connection to the JupyterLab extension, for the widget panel's "insert"
    when no sidebar is open: a comm the extension accepts on every notebook kernel."""

    def __init__(self) -> None:
        from comm import create_comm

        self.closed = False  # the frontend closes it at once when it has no such target
        self.comm = create_comm(target_name=FRONTEND_TARGET, data={})
        self.comm.on_close(lambda msg: setattr(self, "closed", True))

    def insert_cell(self, code: str, run: bool = False) -> None:
        self.comm.send({"type": "insert_cell", "code": code, "run": bool(run)})
