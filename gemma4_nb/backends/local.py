"""The in-kernel runtime as a backend: a loaded :class:`~gemma4_nb.runtime.model.Model`."""

from __future__ import annotations

import re
from typing import Callable

from ..runtime.generation import Usage
from ..runtime.tokenizer import StreamDecoder
from .base import Reply, visible
from .toolcalls import CALL_OPEN, parse_tool_calls


class LocalBackend:
    """The in-kernel runtime (a loaded :class:`~gemma4_nb.runtime.model.Model`)."""

    def __init__(self, model) -> None:
        self.model = model
        tok = model.tokenizer
        self.supports_tools = tok.token_id(CALL_OPEN) is not None and "tool" in (tok.chat_template or "")
        self.supports_images = model.config.vision is not None
        self.base_model = tok.base_model  # answers plain-text prompts better than chat turns
        specials = sorted((t for i in tok.all_special_ids if (t := tok.hf.id_to_token(i))), key=len, reverse=True)
        self._special = re.compile("|".join(re.escape(t) for t in specials)) if specials else None

    def complete_text(self, text: str, *, stop: list[str], max_new_tokens: int = 256, draft: bool | None = None,
                      on_text: Callable[[str], None] | None = None, should_stop=None, **sampling) -> Reply:
        """Continue plain text (no chat template): the code-completion and question-and-answer
        protocols for base models. Streams through the same stop-string handling as ``generate``.
        ``should_stop``: asked before every token (hidden ones too); True stops the reply there."""
        m = self.model
        stream = m.stream(m.request(m.encode(text), max_new_tokens, stop, should_stop=should_stop, **sampling), draft)
        stopped = False
        try:
            for delta in stream:
                if on_text:
                    on_text(delta)
        except KeyboardInterrupt:
            stopped = True
        stopped = stopped or stream.usage.finish_reason == "interrupted"
        return Reply(text=stream.text, usage=stream.usage, stopped=stopped, raw=stream.text)

    def warm(self, start: str | list[dict], *, cut: str | None = None, tools=None, should_stop=None) -> int:
        """Prefill what the next request will start with (plain text, or chat ``messages`` whose
        rendered prompt is taken up to the marker ``cut``), so only the rest is computed when it
        comes. Returns the positions cached."""
        m = self.model
        if isinstance(start, str):
            return m.warm(m.encode(start), should_stop=should_stop)
        text = m.chat_prompt(start, tools=tools if self.supports_tools else None)
        at = text.find(cut) if cut else -1
        if at < 0:
            return 0
        return m.warm(m.tokenizer.encode(text[:at], add_special_tokens=False), should_stop=should_stop)  # as chat_ids

    def _strip(self, text: str) -> str:
        return self._special.sub("", text) if self._special is not None and "<" in text else text

    def complete(self, messages, *, tools=None, on_text=None, max_new_tokens=512, draft: bool | None = None,
                 should_stop=None, **sampling) -> Reply:
        m = self.model
        prompt = m.prepare_chat(messages, tools=tools if self.supports_tools else None)
        req = m.request(prompt.ids, max_new_tokens, None, prompt=prompt if prompt.soft_mask is not None else None,
                        should_stop=should_stop, **sampling)
        usage = Usage()
        decoder = StreamDecoder(m.tokenizer, skip_special_tokens=False)
        raw, shown, stopped = "", "", False
        try:
            for token in m.token_ids(req, usage, draft):
                raw += decoder.push(token)
                view = self._strip(visible(raw))
                if len(view) > len(shown) and CALL_OPEN not in raw:
                    if on_text:
                        on_text(view[len(shown):])
                    shown = view
        except KeyboardInterrupt:
            stopped = True
            usage.finish_reason = "interrupted"
        stopped = stopped or usage.finish_reason == "interrupted"
        raw += decoder.flush()
        text, calls, errors = parse_tool_calls(raw)
        text = shown if stopped else self._strip(visible(raw))
        return Reply(text=text, tool_calls=[] if stopped else calls, errors=[] if stopped else errors,
                     usage=usage, stopped=stopped, raw=raw)


