"""Gemma 4's native tool-call syntax, parsed robustly.

A call is written ``<|tool_call>call:NAME{key:value,...}<tool_call|>`` where keys are bare words,
strings are delimited by ``<|"|>`` and other values are JSON-like (numbers, true/false/null,
``{...}`` and ``[...]``). A malformed call becomes a :class:`ToolCallError` that the agent reports
back to the model instead of crashing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

CALL_OPEN, CALL_CLOSE, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'
_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*call:(?P<name>[A-Za-z_][\w.-]*)(?P<args>.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)",
                   re.DOTALL)


class ToolCallError(ValueError):
    """A tool call the model wrote that cannot be parsed."""


@dataclass
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)
    id: str = ""

    def as_message_part(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


MAX_NESTING = 64  # objects and lists deeper than this are refused (Python's recursion ends near 1000)


class _Parser:
    def __init__(self, text: str) -> None:
        self.s, self.i = text, 0
        self.depth = 0

    def nested(self) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error(f"values nested more than {MAX_NESTING} levels deep")

    def error(self, what: str) -> ToolCallError:
        return ToolCallError(f"{what} at character {self.i} of {self.s[:120]!r}")

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def value(self):
        self.ws()
        s = self.s
        if s.startswith(QUOTE, self.i):
            end = s.find(QUOTE, self.i + len(QUOTE))
            if end < 0:
                raise self.error("unterminated string")
            out = s[self.i + len(QUOTE) : end]
            self.i = end + len(QUOTE)
            return out
        if self.i >= len(s):
            raise self.error("missing value")
        c = s[self.i]
        if c == "{":
            return self.obj()
        if c == "[":
            self.i += 1
            self.nested()
            items = []
            self.ws()
            if s.startswith("]", self.i):
                self.i += 1
                self.depth -= 1
                return items
            while True:
                items.append(self.value())
                self.ws()
                if s.startswith(",", self.i):
                    self.i += 1
                elif s.startswith("]", self.i):
                    self.i += 1
                    self.depth -= 1
                    return items
                else:
                    raise self.error("expected ',' or ']'")
        if c == '"':  # plain JSON string, which models sometimes write
            m = re.compile(r'"(?:[^"\\]|\\.)*"').match(s, self.i)
            if not m:
                raise self.error("unterminated string")
            self.i = m.end()
            try:
                return json.loads(m.group(0))
            except json.JSONDecodeError as exc:  # a bad escape inside the string
                raise self.error(f"invalid string ({exc.msg})") from None
        m = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null").match(s, self.i)
        if not m:
            raise self.error("unexpected value")
        self.i = m.end()
        return json.loads(m.group(0))

    def obj(self) -> dict:
        if not self.s.startswith("{", self.i):
            raise self.error("expected '{'")
        self.i += 1
        self.nested()
        out = {}
        self.ws()
        if self.s.startswith("}", self.i):
            self.i += 1
            self.depth -= 1
            return out
        while True:
            self.ws()
            if self.s.startswith(QUOTE, self.i) or self.s.startswith('"', self.i):
                key = self.value()
            else:
                m = re.compile(r"[A-Za-z_][\w.-]*").match(self.s, self.i)
                if not m:
                    raise self.error("expected a key")
                key, self.i = m.group(0), m.end()
            self.ws()
            if not self.s.startswith(":", self.i):
                raise self.error(f"expected ':' after key {key!r}")
            self.i += 1
            out[key] = self.value()
            self.ws()
            if self.s.startswith(",", self.i):
                self.i += 1
            elif self.s.startswith("}", self.i):
                self.i += 1
                self.depth -= 1
                return out
            else:
                raise self.error("expected ',' or '}'")


def parse_arguments(text: str) -> dict:
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{") and QUOTE not in text:
        try:
            value = json.loads(text)
            if isinstance(value, dict):
                return value
        except (json.JSONDecodeError, RecursionError):  # the parser below says what is wrong
            pass
    p = _Parser(text)
    out = p.obj()
    p.ws()
    if p.i != len(text):
        raise p.error("unexpected text after the arguments")
    return out


def parse_tool_calls(raw: str) -> tuple[str, list[ToolCall], list[str]]:
    """Split a raw reply (special tokens kept) into visible text, tool calls and parse errors."""
    calls, errors = [], []
    for n, m in enumerate(_CALL.finditer(raw)):
        try:
            calls.append(ToolCall(m.group("name"), parse_arguments(m.group("args")), id=f"call_{n}"))
        except ToolCallError as exc:
            errors.append(f"tool call {m.group('name')!r} could not be parsed: {exc}")
    if CALL_OPEN in raw and not calls and not errors:
        errors.append("a tool call was started but has no 'call:NAME{...}'")
    text = raw.split(CALL_OPEN, 1)[0]
    return text, calls, errors


def format_call(name: str, arguments: dict) -> str:
    """The native syntax for a call (used by scripted test models and docs)."""

    def fmt(v) -> str:
        if isinstance(v, str):
            return QUOTE + v + QUOTE
        if isinstance(v, dict):
            return "{" + ",".join(f"{k}:{fmt(x)}" for k, x in v.items()) + "}"
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(fmt(x) for x in v) + "]"
        return json.dumps(v)

    return f"{CALL_OPEN}call:{name}{fmt(arguments)}{CALL_CLOSE}"
