"""The JupyterLab sidebar's comm protocol (target ``gemma4_nb.chat``), kernel side.

The sidebar opens the comm (after ``import gemma4_nb.notebook.comm; gemma4_nb.notebook.comm.register()``) and sends
JSON messages; replies come back on the same comm. Generation runs on a worker thread
(:class:`~gemma4_nb.notebook.chat_service.ChatService`), so the kernel keeps handling ``stop`` while a reply
streams. The open comm is the copilot's ``frontend``: the agent inserts its cells through it.
See docs/panels.md for every message.
"""

from __future__ import annotations

from ..errors import Gemma4Error
from .chat_service import ChatService
from .copilot import get_copilot

TARGET = "gemma4_nb.chat"
FRONTEND_TARGET = "gemma4_nb.frontend"  # opened by the kernel (the widget panel's inserts)
PROTOCOL_VERSION = 1


class ChatProtocol:
    """Messages in (``handle``), messages out (``send``); independent of the transport."""

    def __init__(self, copilot, send) -> None:
        self.copilot = copilot
        self._send = send
        self.service = ChatService(copilot, self.send)

    def send(self, msg: dict) -> None:
        try:
            self._send(msg)
        except Exception:  # a closed comm or a gone frontend must not break generation
            pass

    # the copilot's frontend hook (notebook.KernelWorkspace calls it for the agent's cells)
    def insert_cell(self, code: str, run: bool = False) -> None:
        self.send({"type": "insert_cell", "code": code, "run": bool(run)})

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
            elif kind == "reset":
                if self.service.busy:
                    raise Gemma4Error("a reply is streaming: stop it before clearing the conversation")
                self.copilot.reset()
                self.send({"type": "reset"})
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
        self.service.cancel_approvals()
        if self.copilot.frontend is self:
            self.copilot.frontend = None


def _open(comm, open_msg, shell) -> ChatProtocol:
    proto = ChatProtocol(get_copilot(shell), comm.send)
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
