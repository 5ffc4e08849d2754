"""The interface the notebook features use to talk to a model.

A backend turns a conversation (plus tool declarations) into a :class:`Reply`: the visible text,
streamed as it is generated, and the tool calls the model made. The in-kernel runtime
(:mod:`.local`) is one backend; an OpenAI-compatible server (:mod:`.openai_compat`) another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..runtime.generation import Usage
from .toolcalls import CALL_OPEN, ToolCall

THOUGHT_OPEN, THOUGHT_CLOSE = "<|channel>", "<channel|>"


@dataclass
class Reply:
    text: str  # what the user sees (tool-call markup and thinking removed)
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # tool calls that could not be parsed
    usage: Usage | None = None
    stopped: bool = False  # interrupted by the user
    raw: str = ""
    cut: str = ""  # why the reply is incomplete when the server broke it off (empty when whole)


class Backend(Protocol):
    """Both calls also take ``should_stop``: a callable asked before every token (hidden ones
    included) and between prefill chunks where the backend can; True ends the reply there
    (``Reply.stopped``)."""

    supports_tools: bool
    supports_images: bool

    def complete(self, messages: list[dict], *, tools: list[dict] | None = None,
                 on_text: Callable[[str], None] | None = None, max_new_tokens: int = 512, **sampling) -> Reply: ...

    def complete_text(self, text: str, *, stop: list[str], max_new_tokens: int = 256,
                      on_text: Callable[[str], None] | None = None, **sampling) -> Reply: ...


def visible(raw: str) -> str:
    """The part of a raw reply a reader should see."""
    text = raw.split(CALL_OPEN, 1)[0]
    while THOUGHT_OPEN in text:
        head, _, rest = text.partition(THOUGHT_OPEN)
        text = head + (rest.partition(THOUGHT_CLOSE)[2] if THOUGHT_CLOSE in rest else "")
    return text
