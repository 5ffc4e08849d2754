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
    the panel), which also runs them in the notebook; else through IPython's ``set_next_input``
    (one new cell below, holding every cell the run wrote) and the code runs here, its output
    captured: the user's own cells are never overwritten.
    """

    def __init__(self, shell, frontend=None) -> None:
        self.shell = shell
        self.frontend = frontend
        self.pending: list[str] = []
        self.cell_ref = None  # the frontend's name for the cell last inserted (None: not through a frontend)

    @property
    def namespace(self) -> dict:
        return self.shell.user_ns

    def insert_cell(self, code: str) -> None:
        self.cell_ref = None
        if self.frontend is not None:
            self.cell_ref = self.frontend.insert_cell(code)
        else:
            self.pending.append(code)

    def flush(self) -> None:
        """Hand the collected cells to the frontend as the next input (a new cell below)."""
        if self.pending:
            self.shell.set_next_input("\n\n".join(self.pending), replace=False)
            self.pending = []

    def run_code(self, code: str) -> RunResult:
        """Run the agent's code: in the notebook, as the cell just inserted, when a frontend that
        runs cells holds it (its output stays under it, the notebook records the run); else here."""
        run_cell = getattr(self.frontend, "run_cell", None)
        if run_cell is not None and self.cell_ref is not None:
            result = run_cell(self.cell_ref)
            if result is not None:
                return result
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


def run_result_from_outputs(outputs: list, status: str = "ok") -> RunResult:
    """What a cell run in the notebook produced (its nbformat outputs, as the frontend read them)
    in the shape the agent reads: printed text, the value, rich outputs' text, figures, the error."""
    import base64
    import re

    ansi = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
    out = RunResult()
    for o in outputs if isinstance(outputs, list) else []:
        if not isinstance(o, dict):
            continue
        kind = o.get("output_type")
        if kind == "stream":
            text = o.get("text", "")
            text = "".join(text) if isinstance(text, list) else str(text)
            if o.get("name") == "stderr":
                out.stderr += text
            else:
                out.stdout += text
        elif kind in ("execute_result", "display_data"):
            data = o.get("data") or {}
            png = data.get("image/png")
            if isinstance(png, str):
                try:
                    out.images.append(base64.b64decode(png))
                except ValueError:
                    pass
            plain = data.get("text/plain")
            if plain is not None:
                plain = "".join(plain) if isinstance(plain, list) else str(plain)
                if kind == "execute_result":
                    out.result = plain[:3000]
                elif png is None:
                    out.displays.append(plain)
        elif kind == "error":
            if o.get("ename") == "KeyboardInterrupt":
                out.interrupted = True
            else:
                tb = "\n".join(ansi.sub("", str(line)) for line in o.get("traceback") or [])
                out.error = (tb or f"{o.get('ename')}: {o.get('evalue')}")[-3000:]
    if status == "aborted" and not out.error and not out.interrupted:
        out.interrupted = True  # the kernel skipped it (an interrupt, or an error queued before it)
    return out

