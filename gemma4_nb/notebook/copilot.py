"""The notebook copilot: one per kernel, behind ``%%gemma`` and the chat panels.

It loads the model lazily, keeps the conversation across cells as it was sent (and, opted in, in
a history file next to the notebook), adds the notebook's snapshot or its changes to each
question (``snapshot.py``, laid out by ``prompts.py`` so the prompt only grows at its end), and
runs the agent.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..backends.local import LocalBackend
from ..errors import Gemma4Error
from .agent import APPROVALS, CODE_PRIMER, TOOLS, Agent, AgentResult, AgentSettings
from .prompts import (
    QUESTION_MARK,
    QUESTION_STOPS,
    SYSTEM_PROMPT,
    chat_messages,
    conversation_chars,
    plain_block,
    plain_conversation,
    plain_question,
    storable,
    trim_conversation,
    user_turn,
)
from .snapshot import NotebookView, Update

__all__ = ["SYSTEM_PROMPT", "Copilot", "PreparedRequest", "Settings", "get_copilot"]

LOCAL = "local"  # backend_url: the in-kernel model, whatever $GEMMA4_NB_BACKEND_URL says


@dataclass
class PreparedRequest:
    """A request rendered for the backend, not yet sent."""

    turn: dict  # the user turn it adds to the conversation
    update: Update | None  # its notebook part (None: without the notebook context)
    messages: list[dict] | None = None  # the chat layout
    text: str | None = None  # the plain layout (a base model): the whole prompt
    prefix: str = ""  # the plain layout: the conversation and this turn's notebook block
    context: str = ""  # one line: what the model will have seen of the notebook


@dataclass
class Settings:
    model: str | None = None  # None: $GEMMA4_NB_MODEL, else the embedded default
    quant: str | None = None  # weight format (auto, bf16, int8, int4); None: $GEMMA4_NB_QUANT, else auto
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
    completion_model: str | None = None  # inline completion's model (None: the embedded Gemma 3 270M; "off")
    warm: bool = True  # prefill the next question's start while the kernel is idle (warmup.py)

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
    if key == "quant" and value is not None:
        from ..runtime.weight_choice import QUANT_SETTINGS

        if value.lower() not in QUANT_SETTINGS:
            raise Gemma4Error(f"quant must be one of {', '.join(QUANT_SETTINGS)} (or none: $GEMMA4_NB_QUANT, else "
                              f"auto), got {value!r}")
        value = value.lower()
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
        self.turns: list[dict] = []  # the conversation as sent (prompts.py)
        self.conversation_id = uuid.uuid4().hex[:12]  # a new one whenever the conversation is forgotten
        self.view = NotebookView(shell)  # what the model has seen of the notebook in this conversation
        # The tools are declared in the system turn, the prompt's first: from a conversation's first
        # agent request on, every request declares them, so they never change the prefix again.
        self.tools_declared = False
        self.frontend = None  # the chat sidebar's connection, when present
        self.draft = True  # speculative drafting for requests (a cell's --no-draft turns it off for that cell)
        self.lock = threading.Lock()  # one request at a time: %%gemma cells and the chat panels share the model
        self.warmer = None  # prefills the next question's start while the kernel is idle (warmup.py)
        self._warmed = None  # (Update, turns, conversation) that warm_up prefilled
        self.load_progress: tuple[str, int, int] | None = None  # (stage, done, total) of a load under way
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

    def ensure_model(self, on_progress=None):
        """The backend, loading the in-kernel model first if needed. While it loads,
        ``load_progress`` holds the runtime's latest report (stage, done, total), also passed to
        ``on_progress``."""
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

            def report(stage: str, done: int, total: int) -> None:
                self.load_progress = (stage, done, total)
                if on_progress is not None:
                    on_progress(stage, done, total)

            t = time.perf_counter()
            try:
                self.model = load(self.settings.model, progress=True, quant=self.settings.quant, on_progress=report)
            finally:
                self.load_progress = None
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
        turns = sum(t["role"] == "user" for t in self.turns)
        lines = [repr(m), f"approval: {self.settings.approval}; conversation: {turns} turns",
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
            data = {"turns": storable(self.turns), "settings": asdict(self.settings)}
            self.history_path().write_text(json.dumps(data, indent=1), encoding="utf-8")

    def reset(self) -> None:
        self.turns = []
        self.conversation_id = uuid.uuid4().hex[:12]
        self.view.reset()
        self.tools_declared = False
        if self.model is not None:
            self.model.reset()
        if self.settings.history_file and self.history_path().is_file():
            self.history_path().unlink()

    # -- a request --------------------------------------------------------------------------

    @property
    def plain(self) -> bool:
        """The backend is a base model: it is asked with plain text, not chat turns."""
        return bool(getattr(self.backend, "base_model", False))

    def context_budget(self) -> int:
        budget = self.settings.context_tokens
        if self.model is not None:  # leave most of a small context window to the conversation
            budget = min(budget, self.model.max_context // 4)
        return budget

    def prepare(self, question: str, *, frames=None, images=(), audios=(), use_context=True,
                agent=False) -> PreparedRequest:
        """The next request as the backend will get it: the conversation so far, then this
        question with the notebook's snapshot (the conversation's first) or what changed since.
        Nothing is sent or remembered (``%gemma context`` shows it)."""
        update = None
        if use_context:
            tok = self.model.tokenizer if self.model is not None else None
            warmed = self._warmed
            if warmed is not None and frames is None and warmed[1:] == (len(self.turns), self.conversation_id):
                update = self.view.extend(warmed[0], question, budget=self.context_budget(), tokenizer=tok)
            if update is None:
                update = self.view.update(question, budget=self.context_budget(), tokenizer=tok, frames=frames)
        attached = len(images) + len(audios)
        images = list(images)
        if update is not None and update.figures and self.backend is not None and self.backend.supports_images:
            images += update.figures  # a vision model sees the new plots themselves
        media = [{"type": "image", "image": i} for i in images] + [{"type": "audio", "audio": a} for a in audios]
        turn = user_turn(question, update, media, attachments=attached)
        context = self.view.summary(update) if update is not None else "no notebook context"
        if self.plain:
            prefix = plain_conversation(self.turns) + plain_block(turn)
            text = prefix + self.code_prompt(question, frames) if agent else plain_question(self.turns, turn)
            return PreparedRequest(turn, update, text=text, prefix=prefix, context=context)
        return PreparedRequest(turn, update, messages=chat_messages([*self.turns, turn]), context=context)

    def warm_up(self, should_stop=None) -> int:
        """Prefill what the next question will start with (the conversation, then what changed in
        the notebook since the last question) while the kernel is idle, so the question then
        computes only itself. For the in-kernel model, once a conversation has started, when the
        changes fit the context budget whole (beyond it, the question decides what comes first);
        a request under way is never waited for. Returns the positions the cache holds (0: nothing
        was done)."""
        if (not self.settings.warm or self.model is None or not isinstance(self.backend, LocalBackend)
                or not self.view.started or not self.lock.acquire(blocking=False)):
            return 0
        try:
            self._trim()
            update = self.view.update("", budget=self.context_budget(), tokenizer=self.model.tokenizer)
            if not update.whole or (update.figures and self.backend.supports_images):
                return 0  # (a vision model gets new plots as images, placed by the question's request)
            turn = user_turn(QUESTION_MARK, update)
            if self.plain:
                n = self.backend.warm(plain_conversation(self.turns) + plain_block(turn), should_stop=should_stop)
            else:
                n = self.backend.warm(chat_messages([*self.turns, turn]), cut=QUESTION_MARK,
                                      tools=TOOLS if self.tools_declared else None, should_stop=should_stop)
            self._warmed = (update, len(self.turns), self.conversation_id)
            return n
        finally:
            self.lock.release()

    def quiet(self) -> None:
        """Stop a warm-up under way and wait for it (its finished chunks stay in the cache): a
        request is about to use the model."""
        if self.warmer is not None:
            self.warmer.stop(wait=True)

    def _trim(self) -> None:
        """Drop the oldest exchanges when the conversation would crowd the model's context (its
        size: the last request's prompt and reply, as the runtime counted them)."""
        u = self.model.last_usage if self.model is not None else None
        if u is None or not self.turns:
            return
        room = self.model.max_context - self.settings.max_new_tokens - self.context_budget() - 64  # the question
        size = u.prompt_tokens + u.generated_tokens
        if size <= room:
            return
        chars_per_token = conversation_chars(self.turns) / max(size, 1)
        kept = trim_conversation(self.turns, int(max(room, 0) * chars_per_token))
        if kept is not self.turns:
            self.turns = kept
            self.view.reset()  # the snapshot may have gone with them: the next request sends one

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

    def sampling(self) -> dict:
        out = {"max_new_tokens": self.settings.max_new_tokens, "draft": self.draft}
        if self.settings.temperature is not None:
            out["temperature"] = self.settings.temperature
        return out

    def ask(self, question: str, *, agent: bool = False, frames=None, images=(), audios=(), use_context=True,
            on_text=None, ask_approval=None, on_event=None, workspace=None, should_stop=None,
            sampling: dict | None = None) -> AgentResult:
        """Answer ``question`` (``agent``: write and run cells for it). ``sampling`` overrides the
        settings for this request only (a cell's flags); ``should_stop`` is asked at every token, and
        True ends the reply there (a chat panel's Stop)."""
        if not question.strip() and not images and not audios:
            raise Gemma4Error("the cell is empty: write a question under %%gemma")
        sampling = {**self.sampling(), **(sampling or {})}
        backend = self.ensure_model()
        if hasattr(backend, "cancelled"):
            backend.cancelled.clear()  # a Stop meant for an earlier request does not carry over
        self._trim()
        req = self.prepare(question, frames=frames, images=images, audios=audios, use_context=use_context,
                           agent=agent)
        if should_stop is not None:
            sampling["should_stop"] = should_stop
        turn, added = req.turn, None
        if agent:
            from .workspace import KernelWorkspace

            ws = workspace or KernelWorkspace(self.shell, self.frontend)
            runner = Agent(backend, ws, AgentSettings(self.settings.approval, self.settings.max_steps),
                           ask=ask_approval, on_event=on_event, sampling=sampling)
            code_prompt = req.text if self.plain else self.code_prompt(question, frames)
            result = runner.run(req.messages or [], on_text=on_text, code_prompt=code_prompt)
            if hasattr(ws, "flush"):
                ws.flush()
            self.tools_declared = self.tools_declared or bool(getattr(backend, "supports_tools", False))
            if self.plain and result.transcript is not None and result.transcript.startswith(req.prefix):
                turn = {**turn, "agent": True}  # the task is in the transcript, as the model saw it
                added = [{"role": "assistant", "content": result.answer,
                          "transcript": result.transcript[len(req.prefix):]}]
            elif result.messages and not self.plain:
                added = list(result.messages)
        elif self.plain:  # a base model answers a plain Q&A prompt better
            reply = backend.complete_text(req.text, stop=QUESTION_STOPS, on_text=on_text, **sampling)
            result = AgentResult(answer=reply.text.strip(), stopped=reply.stopped, notes=[reply.cut] if reply.cut else [])
            added = [{"role": "assistant", "content": result.answer, "generated": reply.text}]
        else:
            reply = backend.complete(req.messages, tools=TOOLS if self.tools_declared else None, on_text=on_text,
                                     **sampling)
            answer = reply.text.strip()
            if reply.tool_calls:  # the tools are declared (an earlier agent request), but this is a question
                answer += "\n\n*(the model wanted to run code: ask with `--agent`, or tick Agent, to let it)*"
                added = [{"role": "assistant", "content": reply.text,
                          "tool_calls": [c.as_message_part() for c in reply.tool_calls]}]
            result = AgentResult(answer=answer, stopped=reply.stopped, notes=[reply.cut] if reply.cut else [])
        if not added or added[-1]["role"] != "assistant":
            added = [*(added or []), {"role": "assistant", "content": result.answer}]
        self._warmed = None
        if req.update is not None:
            self.view.commit(req.update)
        if agent:
            self.view.mark_agent_work_seen()  # the agent's own cells and their error: the model saw them
        self.turns += [turn, *added]
        self._save_history()
        result.context = req.context
        return result
