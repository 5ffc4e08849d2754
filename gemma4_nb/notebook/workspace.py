"""The agent's hands in the notebook: new cells below, code run in the user's namespace."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field


@dataclass
class RunResult:
    stdout: str = ""
    stderr: str = ""
    result: str = ""
    error: str = ""
    interrupted: bool = False
    displays: list[str] = field(default_factory=list)  # text of rich outputs
    images: list[bytes] = field(default_factory=list)  # PNG figures the code produced

    @property
    def failed(self) -> bool:
        return bool(self.error)

    def summary(self, limit: int = 3000) -> str:
        if self.interrupted:
            return "interrupted by the user"
        parts = []
        if self.stdout.strip():
            parts.append("stdout:\n" + self.stdout.strip()[-limit:])
        if self.stderr.strip():
            parts.append("stderr:\n" + self.stderr.strip()[-limit // 2:])
        if self.result:
            parts.append("result:\n" + self.result[:limit])
        parts.extend(d[:limit] for d in self.displays)
        if self.images:
            parts.append(f"({len(self.images)} figure(s) drawn)")
        if self.error:
            parts.append("error:\n" + self.error[-limit:])
        return "\n".join(parts) if parts else "(ran without output)"


class KernelWorkspace:
    """Cells and code execution in a live IPython shell.

    New cells go through the chat sidebar's frontend when it is connected (``frontend``, set by
    the panel), else through IPython's ``set_next_input`` (one new cell below, holding every cell
    the run wrote): the user's own cells are never overwritten.
    """

    def __init__(self, shell, frontend=None) -> None:
        self.shell = shell
        self.frontend = frontend
        self.pending: list[str] = []

    @property
    def namespace(self) -> dict:
        return self.shell.user_ns

    def insert_cell(self, code: str) -> None:
        if self.frontend is not None:
            self.frontend.insert_cell(code)
        else:
            self.pending.append(code)

    def flush(self) -> None:
        """Hand the collected cells to the frontend as the next input (a new cell below)."""
        if self.pending:
            self.shell.set_next_input("\n\n".join(self.pending), replace=False)
            self.pending = []

    def run_code(self, code: str) -> RunResult:
        from IPython.utils.capture import capture_output

        out = RunResult()
        with capture_output(stdout=True, stderr=True, display=True) as cap:
            res = self.shell.run_cell(code, store_history=True)
        cap.show()  # the user sees the output too
        out.stdout, out.stderr = cap.stdout, cap.stderr
        for o in cap.outputs:
            if "image/png" in o.data:
                png = o.data["image/png"]
                out.images.append(png if isinstance(png, bytes) else __import__("base64").b64decode(png))
            elif "text/plain" in o.data:
                out.displays.append(o.data["text/plain"])
        if res.result is not None:
            out.result = repr(res.result)[:3000]
        err = res.error_in_exec or res.error_before_exec
        if isinstance(err, KeyboardInterrupt):
            out.interrupted = True
        elif err is not None:
            out.error = "".join(traceback.format_exception(type(err), err, err.__traceback__))[-3000:]
        return out
