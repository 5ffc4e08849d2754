"""A chat turn off the kernel's main thread, shared by the ipywidgets panel and the sidebar's comm.

While a cell executes, the kernel handles no comm messages; a Stop button therefore only works
when generation runs elsewhere. :class:`ChatService` runs each request on a worker thread, reports
what happens as plain dict events (``emit``), and stops at the next token when asked. One request
runs at a time per kernel: the copilot's lock is shared with ``%%gemma``, so the model is never
used by the panel and a cell at once (the second gets a clear "busy" message).
"""

from __future__ import annotations

import base64
import binascii
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from ..errors import Gemma4Error
from ..runtime.media import AUDIO_SUFFIXES, IMAGE_SUFFIXES, MediaError, load_audio, load_image
from .agent import CODE_BLOCK
from .attachments import drop_unsupported
from .interrupts import route_kernel_interrupts
from .workspace import KernelWorkspace

MAX_ATTACHMENT_BYTES = 32 * 2**20
IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp", "image/tiff"}
AUDIO_TYPES = {"audio/wav", "audio/x-wav", "audio/wave", "audio/flac", "audio/x-flac", "audio/ogg", "audio/mpeg",
               "audio/mp3", "audio/aiff", "audio/x-aiff"}
BUSY = "busy: the model is answering another request (a %%gemma cell or a chat panel); wait, or press Stop"


class Stopped(KeyboardInterrupt):
    """Raised from the streaming callback on the worker thread: the backend ends the reply there."""


def code_blocks(text: str) -> list[str]:
    """The fenced Python code blocks of a reply (what "insert" and "run" offer)."""
    return [b.strip("\n") for b in CODE_BLOCK.findall(text) if b.strip()]


def decode_attachment(att: dict):
    """A panel attachment (``{"kind", "name", "mime", "data": base64}``) as ``(kind, array)``.

    Raises :class:`MediaError` with a message for the user when the file cannot be used."""
    if not isinstance(att, dict):
        raise MediaError("an attachment must be an object with kind, name, mime and data")
    name = str(att.get("name") or "attachment")
    mime = str(att.get("mime") or "").lower().split(";")[0].strip()
    suffix = os.path.splitext(name)[1].lower()
    kind = att.get("kind")
    if kind not in ("image", "audio"):
        kind = "image" if (mime in IMAGE_TYPES or suffix in IMAGE_SUFFIXES) else \
            "audio" if (mime in AUDIO_TYPES or suffix in AUDIO_SUFFIXES) else None
    if kind == "image" and not (mime in IMAGE_TYPES or suffix in IMAGE_SUFFIXES):
        kind = None
    if kind == "audio" and not (mime in AUDIO_TYPES or suffix in AUDIO_SUFFIXES):
        kind = None
    if kind is None:
        raise MediaError(f"{name}: unsupported attachment type ({mime or suffix or 'unknown'}); "
                         "attach an image (PNG, JPEG, GIF, WebP, BMP, TIFF) or audio (WAV, FLAC, OGG, MP3)")
    data = att.get("data")
    try:
        raw = data if isinstance(data, (bytes, bytearray)) else base64.b64decode(str(data or ""), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{name}: the attachment data is not valid base64") from None
    if not raw:
        raise MediaError(f"{name}: the file is empty")
    if len(raw) > MAX_ATTACHMENT_BYTES:
        raise MediaError(f"{name}: {len(raw) / 2**20:.0f} MiB is over the {MAX_ATTACHMENT_BYTES // 2**20} MiB limit")
    try:
        value = load_image(bytes(raw)) if kind == "image" else load_audio(bytes(raw))
    except MediaError as exc:
        raise MediaError(f"{name}: {exc}") from None
    return kind, value


def describe_model(copilot) -> dict:
    """The model as the status line names it: ``model`` (the file, directory or repository the
    user chose, or the server's model), ``model_format`` (GGUF, quantized or plain weights and
    their dtype) and ``device``; read from attributes, never a network call."""
    m, b = copilot.model, copilot.backend
    if m is not None:
        source = Path(str(getattr(m, "source", "") or "model"))
        net = getattr(m, "net", None)
        dtype = str(getattr(net, "dtype", "") or "").replace("torch.", "")
        kind = "GGUF" if source.suffix.lower() == ".gguf" else "safetensors"
        quant = getattr(m, "quant", None)
        fmt = " ".join(x for x in (kind, quant or dtype) if x)  # quantized: the format, not the activations' dtype
        return {"model": source.name or str(source), "model_format": fmt, "device": str(getattr(net, "device", "") or "")}
    if b is not None:
        url = getattr(b, "url", None)
        return {"model": str(getattr(b, "model", None) or type(b).__name__), "model_format": "server" if url else None,
                "device": str(url) if url else None}
    url = copilot.remote_url()
    if url:
        return {"model": copilot.settings.backend_model or os.environ.get("GEMMA4_NB_BACKEND_MODEL") or "server",
                "model_format": "server (connects on first use)", "device": url}
    chosen = copilot.settings.model or os.environ.get("GEMMA4_NB_MODEL")
    name = Path(chosen).name if chosen else "the embedded Gemma 3 270M"
    return {"model": f"{name} (loads on first use)", "model_format": None, "device": None}


def load_progress(copilot) -> dict | None:
    """The load under way as the status lines show it: ``stage`` (what the runtime is doing),
    ``done`` and ``total`` (its own count: bytes or tensors), ``percent`` (whole, 100 only when
    done); None when nothing loads or the runtime has not reported yet."""
    p = getattr(copilot, "load_progress", None)
    if not p:
        return None
    stage, done, total = p
    percent = 100 if total <= 0 or done >= total else int(100 * done // total)
    return {"stage": stage, "done": done, "total": total, "percent": percent}


def progress_line(p: dict | None) -> str:
    """``load_progress``'s dict as words: "repacking gemma-3-270m-q4_k_m.gguf as int4: 42%"."""
    return f"{p['stage']}: {p['percent']}%" if p else ""


class ProgressPacer:
    """When to show a load's progress again: a stage's first and last report always, in between
    when its percentage moved and ``interval`` seconds passed (a repack reports every block)."""

    def __init__(self, show: Callable[[], None], interval: float = 0.25) -> None:
        self.show, self.interval = show, interval
        self.last: tuple[str, int] | None = None
        self.at = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        percent = 100 if total <= 0 or done >= total else int(100 * done // total)
        now = time.monotonic()
        edge = self.last is None or self.last[0] != stage or done >= total
        if edge or (percent != self.last[1] and now - self.at >= self.interval):
            self.last, self.at = (stage, percent), now
            self.show()


def _rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class ChatService:
    """Requests to a :class:`~gemma4_nb.notebook.copilot.Copilot` on a worker thread.

    Events (``emit(dict)``), in order for one request ``id``: ``start``; ``status`` while the model
    loads (every second, and as the runtime's ``progress`` moves); ``token`` (``text``: the next piece of the reply); ``step`` (what the agent is doing:
    writing code, waiting for approval, running the cell...); ``code`` (a cell the agent wrote);
    then ``done`` (``text``, ``stopped``, ``code_blocks``, ``usage``, ``context``: one line on what
    the model saw of the notebook) or ``error`` (``message``).

    Stop is asked at every token the model generates, shown or hidden (tool-call markup, a thought
    channel), and between prefill chunks; a kernel interrupt stops the reply too (``interrupts.py``).
    """

    def __init__(self, copilot, emit: Callable[[dict], None]) -> None:
        self.copilot = copilot
        self.emit = emit
        self.thread: threading.Thread | None = None
        self.request_id: str | None = None
        self._stop = threading.Event()
        self._approvals: dict[str, tuple[threading.Event, list]] = {}
        self.loading = False
        self.active = False  # a request is under way (set before its thread starts, cleared at its end)
        route_kernel_interrupts(getattr(copilot, "shell", None))

    @property
    def busy(self) -> bool:
        return self.active

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict:
        c = self.copilot
        u = c.last_usage
        state = "loading" if self.loading else "generating" if self.busy else \
            "ready" if c.backend is not None else "not loaded"
        out = {"type": "status", "state": state, **describe_model(c), "memory_mib": _rss_mib(),
               "tokens_per_s": round(u.decode_tokens_per_second, 2) if u is not None else None,
               "approval": c.settings.approval, "frontend": c.frontend is not None,
               "conversation": c.conversation_id}
        if self.loading:
            progress = load_progress(c)
            if progress is not None:
                out["progress"] = progress
        return out

    # -- a request ----------------------------------------------------------------------------

    def submit(self, text: str, attachments=(), *, agent: bool = False, use_context: bool = True,
               request_id: str | None = None) -> str | None:
        """Start a request; returns its id, or None after emitting an ``error`` (bad input, busy)."""
        rid = request_id or uuid.uuid4().hex[:12]
        text = (text or "").strip() if isinstance(text, str) else ""
        try:
            decoded = [decode_attachment(a) for a in (attachments or [])]
            if not text and not decoded:
                raise Gemma4Error("the message is empty: type a question (or attach an image or audio)")
        except Gemma4Error as exc:
            self.emit({"type": "error", "id": rid, "message": str(exc)})
            return None
        if not self.busy:
            self.copilot.quiet()  # a warm-up of this request's start finishes its chunk, then yields
        if self.busy or not self.copilot.lock.acquire(blocking=False):
            self.emit({"type": "error", "id": rid, "message": BUSY})
            return None
        self._stop.clear()
        self.active, self.request_id = True, rid
        self.copilot.chat_service = self  # the request under way, for a Stop from another panel
        images = [v for k, v in decoded if k == "image"]
        audios = [v for k, v in decoded if k == "audio"]
        self.thread = threading.Thread(target=self._run, args=(rid, text, images, audios, agent, use_context),
                                       name="gemma4-nb-chat", daemon=True)
        self.emit({"type": "start", "id": rid, "text": text, "attachments": [
            {"kind": k, "name": str(a.get("name", ""))} for (k, _), a in zip(decoded, attachments or [])]})
        self.thread.start()
        return rid

    def stop(self) -> bool:
        """Stop the running request at its next token (no-op when idle). The kernel keeps running."""
        if not self.busy:
            return False
        self._stop.set()
        cancel = getattr(self.copilot.backend, "cancel", None)
        if cancel is not None:  # a server's backend: ends a wait for the server too, not only the next token
            cancel()
        self.cancel_approvals()
        return True

    def cancel_approvals(self) -> None:
        """Answer every pending approval "no" (nobody is left to answer it)."""
        for event, answer in list(self._approvals.values()):
            answer.append(False)
            event.set()

    def approve(self, approval_id: str, ok: bool) -> None:
        pending = self._approvals.get(approval_id)
        if pending is not None:
            pending[1].append(bool(ok))
            pending[0].set()

    def wait(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def _ask_approval(self, rid: str, code: str, why: str, ref: str | None = None) -> bool:
        """Asked from the worker thread; answered by an ``approve`` message on the main thread.
        ``ref``: the sidebar's name for the agent's cell this would run (it offers Run / Skip on
        that cell too; either answer is the one ``approve``)."""
        aid = uuid.uuid4().hex[:12]
        event, answer = threading.Event(), []
        self._approvals[aid] = (event, answer)
        self.emit({"type": "approval", "id": rid, "approval_id": aid, "code": code, "why": why, "ref": ref})
        try:
            while not event.wait(0.2):
                if self._stop.is_set():
                    return False
            return bool(answer and answer[0])
        finally:
            self._approvals.pop(aid, None)

    def _load(self, rid: str) -> None:
        c = self.copilot
        if c.backend is not None:
            return
        self.loading = True
        t0 = time.monotonic()
        done = threading.Event()

        def show():  # what loads, how far the runtime is (its own count), for how long
            st = self.status()
            st.update(id=rid, elapsed_s=round(time.monotonic() - t0, 1))
            self.emit(st)

        def tick():  # every second, also while a stage reports nothing (reading the tokenizer)
            while not done.wait(1.0):
                show()

        ticker = threading.Thread(target=tick, daemon=True)
        show()
        ticker.start()
        try:
            c.ensure_model(on_progress=ProgressPacer(show))
        finally:
            done.set()
            self.loading = False
        st = self.status()
        st.update(id=rid, load_seconds=round(time.monotonic() - t0, 1))
        self.emit(st)

    def _run(self, rid, text, images, audios, agent, use_context) -> None:
        c = self.copilot
        pieces: list[str] = []

        def on_text(delta: str) -> None:
            if self._stop.is_set():
                raise Stopped()
            pieces.append(delta)
            self.emit({"type": "token", "id": rid, "text": delta})

        def on_event(kind: str, detail: str) -> None:
            if kind == "code":
                self.emit({"type": "code", "id": rid, "code": detail})
            elif kind in ("skipped", "output", "step"):
                self.emit({"type": kind, "id": rid, "text": detail})

        notes = []
        try:
            self._load(rid)
            if (images or audios) and c.backend is not None:
                images, audios, notes = drop_unsupported(c, images, audios)
                for n in notes:
                    self.emit({"type": "note", "id": rid, "text": n})
                if not text and not images and not audios:
                    raise Gemma4Error("nothing left to ask: " + "; ".join(notes))
            if self._stop.is_set():
                raise Stopped()
            question = text or "Describe the attachment."
            # the agent's hands, kept here: an approval names the cell it just inserted
            ws = KernelWorkspace(c.shell, c.frontend) if agent else None
            result = c.ask(question, agent=agent, images=images, audios=audios, use_context=use_context,
                           on_text=on_text, on_event=on_event, should_stop=self._stop.is_set, workspace=ws,
                           ask_approval=lambda code, why: self._ask_approval(rid, code, why,
                                                                             getattr(ws, "cell_ref", None)))
            answer = result.answer if not result.stopped else ("".join(pieces) or result.answer)
            for n in result.notes:  # e.g. a reply the server cut off
                notes.append(n)
                self.emit({"type": "note", "id": rid, "text": n})
            blocks = code_blocks(answer) or list(getattr(result, "cells", []) or [])
            u = c.last_usage
            final = {"type": "done", "id": rid, "text": answer, "stopped": bool(result.stopped or self._stop.is_set()),
                     "code_blocks": blocks, "notes": notes, "context": result.context,
                     "usage": None if u is None else {
                         "prompt_tokens": u.prompt_tokens, "cached_tokens": u.cached_tokens,
                         "generated_tokens": u.generated_tokens,
                         "tokens_per_s": round(u.decode_tokens_per_second, 2),
                         "prefill_tokens_per_s": round(u.prefill_tokens_per_second, 2),
                         "summary": u.summary()}}
        except KeyboardInterrupt:  # stopped before the reply began (while loading, say)
            final = {"type": "done", "id": rid, "text": "".join(pieces), "stopped": True, "code_blocks": [],
                     "notes": notes, "usage": None}
        except Gemma4Error as exc:
            final = {"type": "error", "id": rid, "message": str(exc)}
        except MemoryError:
            final = {"type": "error", "id": rid, "message": "out of memory: try a smaller model or a shorter question"}
        except Exception as exc:  # a clear message in the panel, never a traceback or a dead kernel
            final = {"type": "error", "id": rid, "message": f"{type(exc).__name__}: {exc}"}
        finally:
            # free the model before saying so: a request sent on "done" must not find it busy
            self.active, self.request_id = False, None
            c.lock.release()
        self.emit(final)
        self.emit(self.status())
