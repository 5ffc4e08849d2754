"""A serving engine as the backend: any OpenAI-compatible chat-completions endpoint (vLLM,
llama.cpp's server, Ollama, LM Studio). The notebook features work unchanged through it.

Streaming, tool calls, images and audio (where the server accepts them), usage figures; timeouts
(the first byte has its own limit), retries with backoff before the first byte, Stop at any moment,
a reply the server cut off marked as cut, and errors that say what to do (the reading itself is in
:mod:`.event_stream`).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import threading
import time
from typing import Callable

import httpx

from ..errors import PromptError
from ..runtime.generation import Usage
from .base import Reply
from .event_stream import EventStream, RemoteError
from .toolcalls import ToolCall

ENV_URL, ENV_MODEL, ENV_KEY = "GEMMA4_NB_BACKEND_URL", "GEMMA4_NB_BACKEND_MODEL", "GEMMA4_NB_API_KEY"
ENV_FIRST_BYTE = "GEMMA4_NB_FIRST_BYTE_TIMEOUT"
# Seconds a server may take to start answering: enough for a server that loads its model on the
# first request (Ollama), short enough that a server that never answers is given up on in a minute.
DEFAULT_FIRST_BYTE_TIMEOUT = 60.0


def resolve_first_byte_timeout(value=None) -> float:
    """The first-byte limit: ``value``, else $GEMMA4_NB_FIRST_BYTE_TIMEOUT, else 60 s."""
    raw = value if value is not None else os.environ.get(ENV_FIRST_BYTE)
    if raw is None or raw == "":
        return DEFAULT_FIRST_BYTE_TIMEOUT
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds <= 0:
        source = "first_byte_timeout" if value is not None else f"${ENV_FIRST_BYTE}"
        raise RemoteError(f"{source} must be a number of seconds above 0, got {raw!r}")
    return seconds


def encode_request(body: dict) -> bytes:
    """The request as JSON bytes, or a :class:`PromptError` for what JSON cannot carry: a number
    that is not finite (``temperature=nan``), text that is not valid Unicode (a lone surrogate)."""
    try:
        return json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(f"the request holds a lone surrogate ({exc.object[exc.start:exc.end]!r}), which is not valid "
                          "Unicode: decode the text with the right encoding, or replace it") from None
    except ValueError as exc:
        raise PromptError(f"the request holds a number JSON cannot carry ({exc}): temperature, top_p and the "
                          "other settings must be finite") from None


def check_url(url) -> str:
    """A server URL that requests can go to, or a :class:`RemoteError` saying what is wrong."""
    text = str(url).strip()
    if not text.lower().startswith(("http://", "https://")):
        hint = f"; did you mean http://{text.rstrip('/')}?" if text and "://" not in text else ""
        raise RemoteError(f"backend URL {text!r} must start with http:// or https://{hint}")
    if any(c.isspace() for c in text):
        raise RemoteError(f"backend URL {text!r} contains spaces")
    try:
        parsed = httpx.URL(text)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise RemoteError(f"backend URL {text!r} is not a valid URL ({exc})") from None
    if not parsed.host:
        raise RemoteError(f"backend URL {text!r} names no host; write it as http://HOST:PORT")
    return text.rstrip("/")


def _png(obj) -> str:
    from PIL import Image

    from ..runtime.media import load_image

    buf = io.BytesIO()
    Image.fromarray(load_image(obj)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _wav(obj, rate=None) -> str:
    import soundfile

    from ..runtime.media import SAMPLING_RATE, load_audio

    buf = io.BytesIO()
    soundfile.write(buf, load_audio(obj, rate), SAMPLING_RATE, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def to_openai_messages(messages: list[dict]) -> list[dict]:
    """Our messages (transformers' format) as OpenAI chat messages."""
    out = []
    for m in messages:
        msg = {"role": "assistant" if m["role"] in ("assistant", "model") else m["role"]}
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                kind = p.get("type")
                if kind == "text":
                    parts.append({"type": "text", "text": p["text"]})
                elif kind == "image":
                    src = p.get("image", p.get("path", p.get("url")))
                    parts.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_png(src)}"}})
                elif kind == "audio":
                    src = p.get("audio", p.get("path", p.get("url")))
                    parts.append({"type": "input_audio", "input_audio": {"data": _wav(src, p.get("sampling_rate")),
                                                                          "format": "wav"}})
            msg["content"] = parts
        else:
            msg["content"] = content or ""
        if m.get("tool_calls"):
            msg["tool_calls"] = [{"id": c.get("id") or f"call_{i}", "type": "function",
                                  "function": {"name": c["function"]["name"],
                                               "arguments": json.dumps(c["function"].get("arguments", {}))}}
                                 for i, c in enumerate(m["tool_calls"])]
        if m["role"] == "tool":
            msg["tool_call_id"] = m.get("tool_call_id") or "call_0"
        out.append(msg)
    return out


class OpenAIBackend:
    """A remote OpenAI-compatible server.

    ``tools=False`` for servers or models without tool calling: the agent then uses its
    code-completion protocol through ``/v1/completions``.
    """

    supports_images = True

    def __init__(self, url: str, model: str | None = None, *, api_key: str | None = None, tools: bool = True,
                 timeout: float = 60.0, first_byte_timeout: float | None = None, retries: int = 3,
                 backoff: float = 0.5) -> None:
        url = check_url(url)
        self.url = url if url.endswith("/v1") else url + "/v1"
        self.model = model or "default"
        self.api_key = api_key or os.environ.get(ENV_KEY) or os.environ.get("OPENAI_API_KEY")
        self.supports_tools = tools
        self.retries, self.backoff = retries, backoff
        self.first_byte_timeout = resolve_first_byte_timeout(first_byte_timeout)
        self.cancelled = threading.Event()  # set by cancel(): the request under way stops
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        # reads wait up to `timeout` between pieces of a reply; the first byte has its own limit,
        # enforced by the reader (so a silent server is given up on at that limit, not asked again)
        read = max(timeout, self.first_byte_timeout)
        self.client = httpx.Client(timeout=httpx.Timeout(read, connect=min(timeout, 10.0)), headers=headers)
        self.last_usage: Usage | None = None

    def __repr__(self) -> str:
        return f"<remote backend {self.url} model={self.model}>"

    @classmethod
    def from_env(cls) -> "OpenAIBackend | None":
        url = os.environ.get(ENV_URL)
        return cls(url, os.environ.get(ENV_MODEL)) if url else None

    # -- the backend interface --------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the request under way (a chat panel's Stop): a wait for the server ends within
        0.1 s, and a reply in progress is cut off, its connection closed. The copilot clears this
        at the start of each request."""
        self.cancelled.set()

    @staticmethod
    def _usage(usage: Usage, event: dict) -> None:
        u = event.get("usage") or {}
        if isinstance(u, dict) and u:
            usage.prompt_tokens = int(u.get("prompt_tokens", 0) or 0)
            # servers that report their prefix cache (vLLM, OpenAI) say how much of the prompt they reused
            details = u.get("prompt_tokens_details")
            usage.cached_tokens = int((details.get("cached_tokens") if isinstance(details, dict) else 0) or 0)
            usage.generated_tokens = int(u.get("completion_tokens", usage.generated_tokens) or 0)

    # -- the backend interface --------------------------------------------------------------

    def complete(self, messages, *, tools=None, on_text: Callable[[str], None] | None = None, stop=None, max_new_tokens=512, temperature=None, top_p=None, seed=None, tool_choice=None,
                 should_stop=None, **_) -> Reply:
        body = {"model": self.model, "messages": to_openai_messages(messages), "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": max_new_tokens}
        if tools and self.supports_tools:
            body["tools"] = tools
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
        for key, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed), ("stop", stop)):
            if value is not None:
                body[key] = value
        return self._run("/chat/completions", body, on_text, chat=True, should_stop=should_stop)

    def complete_text(self, text: str, *, stop: list[str], max_new_tokens: int = 256, temperature=None,
                      on_text: Callable[[str], None] | None = None, should_stop=None, **_) -> Reply:
        body = {"model": self.model, "prompt": text, "stream": True, "max_tokens": max_new_tokens, "stop": stop,
                "stream_options": {"include_usage": True}}
        if temperature is not None:
            body["temperature"] = temperature
        return self._run("/completions", body, on_text, chat=False, should_stop=should_stop)

    def _run(self, path: str, body: dict, on_text, chat: bool, should_stop=None) -> Reply:
        usage = Usage()
        self.last_usage = usage
        t0 = time.perf_counter()
        text, calls, stopped, finished = "", {}, False, False
        t_first = None
        stream = EventStream(self.client, self.url, path, encode_request(body), retries=self.retries, backoff=self.backoff,
                             first_byte_timeout=self.first_byte_timeout, cancelled=self.cancelled, chat=chat)
        try:
            for event in stream:
                if should_stop is not None and should_stop():  # every event, tool-call deltas too
                    stopped, usage.finish_reason = True, "interrupted"
                    break  # closing the connection ends the generation on the server
                self._usage(usage, event)
                for choice in event.get("choices") or []:
                    if not isinstance(choice, dict):
                        continue
                    delta = (choice.get("delta") or {}) if chat else {"content": choice.get("text") or ""}
                    piece = delta.get("content") or ""
                    if piece:
                        if t_first is None:
                            t_first = time.perf_counter()
                        text += piece
                        usage.generated_tokens += 0 if event.get("usage") else 1
                        if on_text:
                            on_text(piece)
                    for tc in delta.get("tool_calls") or []:
                        slot = calls.setdefault(tc.get("index", 0), {"id": tc.get("id", ""), "name": "", "arguments": ""})
                        fn = tc.get("function") or {}
                        slot["name"] = slot["name"] or fn.get("name") or ""  # sent whole (some servers repeat it)
                        slot["id"] = slot["id"] or tc.get("id") or ""
                        args = fn.get("arguments") or ""
                        slot["arguments"] += args if isinstance(args, str) else json.dumps(args)
                    if choice.get("finish_reason"):
                        finished = True
                        usage.finish_reason = {"stop": "eos", "tool_calls": "eos"}.get(choice["finish_reason"],
                                                                                        choice["finish_reason"])
        except KeyboardInterrupt:  # Stop (the kernel's, a panel's, or cancel()): closing the connection ends it
            stopped = True
            usage.finish_reason = "interrupted"
        except RemoteError as exc:
            if text:  # what streamed so far stays on screen; say where it broke
                raise RemoteError(f"{exc}; the reply was cut off after: {text[-200:]!r}") from None
            raise
        finally:
            stream.close()
        cut = ""
        if not stopped and not stream.done and not finished:
            cut = (f"the server at {self.url} ended the stream without its closing [DONE] and without a finish "
                   f"reason{' (it sent nothing)' if not stream.events else ''}: the reply is cut off")
            usage.finish_reason = "cut"
        end = time.perf_counter()
        usage.prefill_seconds = (t_first or end) - t0
        usage.decode_seconds = end - (t_first or end)
        tool_calls, errors = [], []
        for i, slot in sorted(calls.items(), key=lambda kv: str(kv[0])):
            try:
                args = json.loads(slot["arguments"]) if slot["arguments"].strip() else {}
                if not isinstance(args, dict):
                    raise ValueError("arguments are not an object")
                tool_calls.append(ToolCall(slot["name"], args, id=slot["id"] or f"call_{i}"))
            except (ValueError, RecursionError) as exc:
                why = "nested too deeply" if isinstance(exc, RecursionError) else exc
                errors.append(f"tool call {slot['name']!r} has malformed arguments ({why}): {slot['arguments'][:200]!r}")
        return Reply(text=text, tool_calls=[] if stopped or cut else tool_calls, errors=[] if stopped else errors,
                     usage=usage, stopped=stopped, raw=text, cut=cut)

    def status(self) -> str:
        try:
            r = self.client.get(self.url + "/models", timeout=5)
        except httpx.HTTPError as exc:
            state = f"unreachable ({exc.__class__.__name__})"
        else:
            try:
                data = r.json().get("data", []) if r.status_code == 200 else []
                models = [m.get("id") for m in data if isinstance(m, dict)]
                state = f"reachable, serving {', '.join(map(str, models)) or '?'}" if r.status_code == 200 else \
                    f"HTTP {r.status_code}"
            except (ValueError, AttributeError, RecursionError):  # a web page, or JSON of another shape
                kind = r.headers.get("content-type", "?").split(";")[0]
                state = f"answers, but not as an OpenAI-compatible API ({kind} at /models): check the URL"
        return f"backend: {self.url} (model {self.model}; {state}; tools {'on' if self.supports_tools else 'off'})"
