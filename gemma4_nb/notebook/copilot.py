"""The notebook copilot: one per kernel, behind ``%%gemma`` and the chat panels.

It loads the model lazily, builds the notebook context for each request, keeps the conversation
across cells (and, opted in, in a history file next to the notebook), and runs the agent.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..backends.local import LocalBackend
from ..errors import Gemma4Error
from ..runtime.chat_template import PLAIN_STOPS, plain_prompt
from .agent import APPROVALS, CODE_PRIMER, Agent, AgentResult, AgentSettings
from .context import build_context

LOCAL = "local"  # backend_url: the in-kernel model, whatever $GEMMA4_NB_BACKEND_URL says

SYSTEM_PROMPT = """You are gemma4-nb, a data-science assistant inside the user's Jupyter notebook, running \
privately on their machine. You see the user's live data below. Answer concisely in Markdown. When code \
helps, write short Python that uses the variables shown; do not invent data."""


@dataclass
class Settings:
    model: str | None = None  # None: $GEMMA4_NB_MODEL, else the embedded default
    approval: str = "ask"
    max_new_tokens: int = 512
    temperature: float | None = None  # None: the checkpoint's default
    context_tokens: int = 2000
    max_steps: int = 6
    history_file: bool = False
    backend_url: str | None = None  # an OpenAI-compatible server; None: $GEMMA4_NB_BACKEND_URL; "local": in-kernel
    backend_model: str | None = None
    backend_tools: bool = True
    first_byte_timeout: float | None = None  # seconds a server may take to start answering (None: 60, or the env)

    def update(self, key: str, value: str) -> None:
        names = {f.name: f for f in fields(self)}
        if key not in names:
            raise Gemma4Error(f"unknown setting {key!r}; settings: {', '.join(names)}")
        current = getattr(self, key)
        if key == "approval" and value not in APPROVALS:
            raise Gemma4Error(f"approval must be one of {', '.join(APPROVALS)}")
        if key == "backend_url" and value.lower() not in ("none", LOCAL):
            from ..backends.openai_compat import check_url

            value = check_url(value)
        try:
            if isinstance(current, bool) or key in ("history_file", "backend_tools"):
                parsed = value.lower() in ("1", "true", "on", "yes")
            elif key in ("max_new_tokens", "context_tokens", "max_steps"):
                parsed = int(value)
            elif key in ("temperature", "first_byte_timeout"):
                parsed = None if value.lower() in ("none", "default") else float(value)
            else:
                parsed = None if value.lower() == "none" else value
        except ValueError:
            raise Gemma4Error(f"{key} needs a number, got {value!r}") from None
        setattr(self, key, check_setting(key, parsed))


def check_setting(key: str, value):
    """``value`` when it is a usable value for setting ``key`` (also a cell's own flags), else a
    :class:`Gemma4Error` that says what is allowed."""
    if key in ("max_new_tokens", "context_tokens", "max_steps") and (not isinstance(value, int) or value < 1):
        raise Gemma4Error(f"{key} must be a whole number of at least 1, got {value!r}")
    if key == "temperature" and value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                                           and value >= 0):
        raise Gemma4Error(f"temperature must be a number >= 0 (0 is greedy), got {value!r}")
    if key == "first_byte_timeout" and value is not None and not (math.isfinite(value) and value > 0):
        raise Gemma4Error(f"first_byte_timeout must be a number of seconds above 0, got {value!r}")
    return value


def get_copilot(shell) -> "Copilot":
    """The kernel's one copilot, shared by ``%%gemma``, the ipywidgets panel and the sidebar."""
    c = getattr(shell, "_gemma4_nb_copilot", None)
    if c is None:
        c = Copilot(shell)
        shell._gemma4_nb_copilot = c
    return c


class Copilot:
    def __init__(self, shell) -> None:
        self.shell = shell
        self.settings = Settings()
        self.backend = None
        self.model = None
        self.turns: list[dict] = []
        self.frontend = None  # the chat sidebar's connection, when present
        self.draft = True  # speculative drafting for requests (a cell's --no-draft turns it off for that cell)
        self.lock = threading.Lock()  # one request at a time: %%gemma cells and the chat panels share the model
        self._restore_history()

    # -- the model --------------------------------------------------------------------------

    def use_backend(self, url: str | None, model: str | None = None, tools: bool = True) -> None:
        """Point the copilot at a serving engine (``url``), or back at the in-kernel model (None:
        even when $GEMMA4_NB_BACKEND_URL names a server). A URL that cannot work is refused before
        anything changes."""
        if url is not None:
            from ..backends.openai_compat import check_url

            url = check_url(url)
        self.unload()
        self.settings.backend_url = url if url is not None else LOCAL
        self.settings.backend_model, self.settings.backend_tools = model, tools

    @property
    def last_usage(self):
        if self.model is not None:
            return self.model.last_usage
        return getattr(self.backend, "last_usage", None)

    def remote_url(self) -> str | None:
        """The server the copilot uses, or None for the in-kernel model."""
        url = self.settings.backend_url or os.environ.get("GEMMA4_NB_BACKEND_URL")
        return None if not url or url.lower() == LOCAL else url

    def ensure_model(self):
        if self.backend is None and self.remote_url():
            from ..backends.openai_compat import OpenAIBackend

            url = self.remote_url()
            model = self.settings.backend_model or os.environ.get("GEMMA4_NB_BACKEND_MODEL")
            self.backend = OpenAIBackend(url, model, tools=self.settings.backend_tools,
                                         first_byte_timeout=self.settings.first_byte_timeout)
        if self.settings.first_byte_timeout is not None and hasattr(self.backend, "first_byte_timeout"):
            self.backend.first_byte_timeout = self.settings.first_byte_timeout  # changed since it was made
        if self.backend is None:
            from ..runtime.model import load

            t = time.perf_counter()
            self.model = load(self.settings.model, progress=True)
            self.load_seconds = time.perf_counter() - t
            self.backend = LocalBackend(self.model)
        return self.backend

    def unload(self) -> None:
        import gc

        self.backend = self.model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def status(self) -> str:
        if self.backend is not None and self.model is None:
            u = self.last_usage
            return self.backend.status() + (f"\nlast reply: {u.summary()}" if u is not None else "")
        if self.model is None and self.remote_url():
            return f"backend: {self.remote_url()} (connects on first use)"
        if self.model is None:
            return f"model: not loaded yet (loads on first use: {self.settings.model or 'default'})"
        m = self.model
        u = m.last_usage
        kv = m.cache.kv.memory() if m.cache.kv is not None else {}
        lines = [repr(m), f"approval: {self.settings.approval}; conversation: {len(self.turns) // 2} turns",
                 f"KV cache: {sum(v for k, v in kv.items() if k in ('sliding', 'full')) / 2**20:.1f} MiB, "
                 f"{len(m.cache.ids)} positions",
                 f"drafting: {m.drafter!r}" + ("" if self.draft else " (off: --no-draft)")]
        if u is not None:
            lines.append(f"last reply: {u.summary()}")
        return "\n".join(lines)

    # -- conversation memory ----------------------------------------------------------------

    def history_path(self) -> Path:
        ns = self.shell.user_ns if self.shell is not None else {}
        notebook = ns.get("__session__") or os.environ.get("JPY_SESSION_NAME")
        if notebook and str(notebook).endswith(".ipynb"):
            p = Path(notebook)
            return p.with_name(p.stem + ".gemma-history.json")
        return Path.cwd() / "gemma-history.json"

    def _restore_history(self) -> None:
        path = self.history_path()
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.turns = [t for t in data.get("turns", []) if isinstance(t, dict) and "role" in t]
                self.settings.history_file = True
            except (OSError, ValueError):
                pass  # an unreadable history file is ignored, never fatal

    def _save_history(self) -> None:
        if self.settings.history_file:
            data = {"turns": self.turns, "settings": asdict(self.settings)}
            self.history_path().write_text(json.dumps(data, indent=1), encoding="utf-8")

    def reset(self) -> None:
        self.turns = []
        if self.model is not None:
            self.model.reset()
        if self.settings.history_file and self.history_path().is_file():
            self.history_path().unlink()

    # -- a request --------------------------------------------------------------------------

    def messages(self, question: str, *, frames=None, images=(), audios=(), use_context=True) -> list[dict]:
        system = SYSTEM_PROMPT
        images = list(images)
        if use_context:
            tok = self.model.tokenizer if self.model is not None else None
            budget = self.settings.context_tokens
            if self.model is not None:  # leave most of a small context window to the conversation
                budget = min(budget, self.model.max_context // 4)
            ctx = build_context(self.shell, frames=frames, budget_tokens=budget, tokenizer=tok)
            if ctx.sections:
                system += "\n\n# The notebook\n" + ctx.render()
            if ctx.figures and self.backend is not None and self.backend.supports_images:
                images += ctx.figures  # a vision model sees the open plots themselves
        content: list[dict] | str = question
        if images or audios:
            content = [{"type": "image", "image": i} for i in images] + \
                      [{"type": "audio", "audio": a} for a in audios] + [{"type": "text", "text": question}]
        return [{"role": "system", "content": system}, *self.turns, {"role": "user", "content": content}]

    def code_prompt(self, question: str, frames=None) -> str:
        """A commented Python prompt for models that complete code rather than call tools."""
        from .context import is_frame, user_variables

        ns = user_variables(self.shell.user_ns)
        names = frames or [k for k, v in ns.items() if is_frame(v)]
        lines = ["# Jupyter notebook. Variables:"]
        for name in names[:8]:
            obj = self.shell.user_ns[name]
            try:  # columns by position: a repeated column name selects several
                cols = ", ".join(f"{c} ({obj.iloc[:, i].dtype})" for i, c in enumerate(list(getattr(obj, "columns", []))[:20]))
                lines.append(f"#   {name}: {type(obj).__name__} with {len(obj)} rows" + (f"; columns: {cols}" if cols else ""))
            except Exception:  # an odd frame: named, not described
                lines.append(f"#   {name}: {type(obj).__name__}")
        # A base model completes code best when the code is already under way: start the answer line.
        primer = CODE_PRIMER + (f"result = {names[0]}" if names else "result = ")
        lines += [f"# Task: {question.strip()}", "# One line of pandas, result in `result`:", "", primer]
        return "\n".join(lines)

    @staticmethod
    def qa_prompt(messages: list[dict]) -> str:
        """The request as plain text for a base model: notebook data, earlier turns, the question."""
        system = messages[0]["content"]
        context = system.split("# The notebook\n", 1)[1] if "# The notebook\n" in system else ""
        return plain_prompt(messages[1:], preamble=f"Notebook data:\n{context}" if context else "")

    def sampling(self) -> dict:
        out = {"max_new_tokens": self.settings.max_new_tokens, "draft": self.draft}
        if self.settings.temperature is not None:
            out["temperature"] = self.settings.temperature
        return out

    def ask(self, question: str, *, agent: bool = False, frames=None, images=(), audios=(), use_context=True,
            on_text=None, ask_approval=None, on_event=None, workspace=None, sampling: dict | None = None) -> AgentResult:
        """One request. ``sampling`` overrides the settings for this request only (a cell's flags)."""
        if not question.strip() and not images and not audios:
            raise Gemma4Error("the cell is empty: write a question under %%gemma")
        sampling = {**self.sampling(), **(sampling or {})}
        backend = self.ensure_model()
        if hasattr(backend, "cancelled"):
            backend.cancelled.clear()  # a Stop meant for an earlier request does not carry over
        messages = self.messages(question, frames=frames, images=images, audios=audios, use_context=use_context)
        if agent:
            from .workspace import KernelWorkspace

            ws = workspace or KernelWorkspace(self.shell, self.frontend)
            runner = Agent(backend, ws, AgentSettings(self.settings.approval, self.settings.max_steps),
                           ask=ask_approval, on_event=on_event, sampling=sampling)
            result = runner.run(messages, on_text=on_text, code_prompt=self.code_prompt(question, frames))
            if hasattr(ws, "flush"):
                ws.flush()
        elif getattr(backend, "base_model", False):  # a base model answers a plain Q&A prompt better
            reply = backend.complete_text(self.qa_prompt(messages), stop=PLAIN_STOPS,
                                          on_text=on_text, **sampling)
            result = AgentResult(answer=reply.text.strip(), stopped=reply.stopped, notes=[reply.cut] if reply.cut else [])
        else:
            reply = backend.complete(messages, on_text=on_text, **sampling)
            result = AgentResult(answer=reply.text.strip(), stopped=reply.stopped, notes=[reply.cut] if reply.cut else [])
        note = " [with attachments]" if (images or audios) else ""
        self.turns += [{"role": "user", "content": question + note}, {"role": "assistant", "content": result.answer}]
        self._save_history()
        return result
