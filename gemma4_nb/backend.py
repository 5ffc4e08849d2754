"""The interface the notebook features use to talk to a model, and the in-kernel implementation.

A backend turns a conversation (plus tool declarations) into a :class:`Reply`: the visible text,
streamed as it is generated, and the tool calls the model made. The in-kernel runtime is one
backend; a remote OpenAI-compatible server can be another.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .generation import Usage, generate_ids
from .tokenizer import StreamDecoder
from .toolcalls import CALL_OPEN, ToolCall, parse_tool_calls

THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>", "<channel|>"


@dataclass
class Reply:
    text: str  # what the user sees (tool-call markup and thinking removed)
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # tool calls that could not be parsed
    usage: Usage | None = None
    stopped: bool = False  # interrupted by the user
    raw: str = ""


class Backend(Protocol):
    supports_tools: bool
    supports_images: bool

    def complete(self, messages: list[dict], *, tools: list[dict] | None = None,
                 on_text: Callable[[str], None] | None = None, prefix: str = "", stop: list[str] | None = None,
                 max_new_tokens: int = 512, **sampling) -> Reply: ...


def visible(raw: str) -> str:
    """The part of a raw reply a reader should see."""
    text = raw.split(CALL_OPEN, 1)[0]
    while THOUGHT_OPEN in text:
        head, _, rest = text.partition(THOUGHT_OPEN)
        text = head + (rest.partition(THOUGHT_CLOSE)[2] if THOUGHT_CLOSE in rest else "")
    return text


class LocalBackend:
    """The in-kernel runtime (a loaded :class:`~gemma4_nb.runtime.Model`)."""

    def __init__(self, model) -> None:
        self.model = model
        tok = model.tokenizer
        self.supports_tools = tok.token_id(CALL_OPEN) is not None and "tool" in (tok.chat_template or "")
        self.supports_images = model.config.vision is not None
        self.base_model = tok.base_model  # answers plain-text prompts better than chat turns
        specials = sorted((t for i in tok.all_special_ids if (t := tok.hf.id_to_token(i))), key=len, reverse=True)
        self._special = re.compile("|".join(re.escape(t) for t in specials)) if specials else None

    def complete_text(self, text: str, *, stop: list[str], max_new_tokens: int = 256, draft: bool | None = None,
                      on_text: Callable[[str], None] | None = None, **sampling) -> Reply:
        """Continue plain text (no chat template): the code-completion protocol for base models."""
        m = self.model
        from .tokenizer import StreamDecoder as _SD

        req = m._request(m.encode(text), max_new_tokens, None, **sampling)
        m._check_memory(req)
        usage, decoder, out = Usage(), _SD(m.tokenizer), ""
        m.last_usage = usage
        try:
            shown = 0
            for token in generate_ids(m.net, req, m.max_context, usage, prefix=m.cache, prefill_chunk=m.prefill_chunk,
                                      drafter=m.drafter_for(draft)):
                out += decoder.push(token)
                hits = [out.index(s) for s in stop if s in out]
                if hits:
                    out = out[: min(hits)]
                    if on_text and len(out) > shown:
                        on_text(out[shown:])
                    return Reply(text=out, usage=usage, raw=out)
                # hold back what could still become a stop string
                safe = len(out) - max((len(s) - 1 for s in stop), default=0)
                if on_text and safe > shown:
                    on_text(out[shown:safe])
                    shown = safe
        except KeyboardInterrupt:
            return Reply(text=out[:shown], usage=usage, stopped=True, raw=out)
        out += decoder.flush()
        if on_text and len(out) > shown:
            on_text(out[shown:])
        return Reply(text=out, usage=usage, raw=out)

    def _strip(self, text: str) -> str:
        return self._special.sub("", text) if self._special is not None and "<" in text else text

    def complete(self, messages, *, tools=None, on_text=None, prefix: str = "", stop=None, max_new_tokens=512,
                 draft: bool | None = None, **sampling) -> Reply:
        m = self.model
        prompt = m.prepare_chat(messages, tools=tools if self.supports_tools else None)
        ids = prompt.ids + (m.tokenizer.encode(prefix) if prefix else [])
        req = m._request(ids, max_new_tokens, None, prompt=prompt if (prompt.soft_mask is not None and not prefix) else None,
                         **sampling)
        m._check_memory(req)
        usage = Usage()
        m.last_usage = usage
        decoder = StreamDecoder(m.tokenizer, skip_special_tokens=False)
        raw, shown, stopped = "", "", False
        try:
            for token in generate_ids(m.net, req, m.max_context, usage, prefix=m.cache, prefill_chunk=m.prefill_chunk,
                                      drafter=m.drafter_for(draft)):
                raw += decoder.push(token)
                view = self._strip(visible(raw))
                if stop and any(s in view for s in stop):
                    view = view[: min(view.index(s) for s in stop if s in view)]
                    usage.finish_reason = "stop_string"
                    if on_text and len(view) > len(shown):
                        on_text(view[len(shown):])
                    shown = view
                    break
                if len(view) > len(shown) and CALL_OPEN not in raw:
                    if on_text:
                        on_text(view[len(shown):])
                    shown = view
        except KeyboardInterrupt:
            stopped = True
            usage.finish_reason = "interrupted"
        raw += decoder.flush()
        text, calls, errors = parse_tool_calls(raw)
        text = shown if (stop or stopped) else self._strip(visible(raw))
        return Reply(text=text, tool_calls=[] if stopped else calls, errors=[] if stopped else errors,
                     usage=usage, stopped=stopped, raw=raw)


