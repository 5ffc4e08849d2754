"""Render a checkpoint's own Jinja chat template, the way Hugging Face tokenizers do.

The environment matches transformers' ``apply_chat_template``: a sandbox, ``trim_blocks`` and
``lstrip_blocks``, loop controls, the ``{% generation %}`` tag, ``raise_exception``,
``strftime_now`` and a ``tojson`` that does not escape HTML.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import PromptError, TokenizerError


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` marks model-written spans; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"the chat template has a syntax error at line {exc.lineno}: {exc.message}") from None


def validate_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise PromptError(f"message {i} must be a dict with a 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ("system", "developer", "user", "assistant", "model", "tool"):
            raise PromptError(f"message {i} has unknown role {m['role']!r} (system, user, assistant, tool)")
    return [dict(m) for m in messages]


def render_chat(
    source: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = False,
    tools: list[dict] | None = None,
    special_tokens: dict[str, str] | None = None,
    **extra: Any,
) -> str:
    """Render ``messages`` with the template ``source`` (thinking off unless asked for)."""
    template = compile_template(source)
    context = dict(special_tokens or {})
    context.update(extra)
    try:
        return template.render(
            messages=validate_messages(messages),
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            **context,
        )
    except jinja2.exceptions.TemplateError as exc:
        raise PromptError(f"the chat template rejected these messages: {exc}") from None


PLAIN_STOPS = ["\n\n", "\nQuestion:"]


def plain_prompt(messages: list[dict], preamble: str = "") -> str:
    """A conversation as a plain Question/Answer text, for base models that were never tuned on
    chat turns (they tend to echo a chat prompt). System messages are left out."""
    lines = [preamble.rstrip() + "\n"] if preamble else []
    for m in validate_messages(messages):
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if m["role"] in ("user", "assistant", "model"):
            lines.append(("Question: " if m["role"] == "user" else "Answer: ") + str(content or "").strip())
    lines.append("Answer:")
    return "\n".join(lines)
