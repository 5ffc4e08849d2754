"""The prompt's layout: a fixed system prompt, then the conversation exactly as it was sent.

Each user turn carries the notebook part of its request (``snapshot.Update``: a whole snapshot
with the first question, what changed with later ones) next to the question, and keeps it: an
earlier turn is rendered the same way every time, so each request's prompt is the previous one
plus the previous answer plus the new turn. A prefix cache then recomputes only the new turn.

Two renderings of the same turns:

- chat messages (the checkpoint's chat template, or an OpenAI-compatible server);
- plain text for base models (the embedded Gemma 3 270M): ``Notebook data:`` / ``Notebook
  changes:`` blocks, ``Question:`` and ``Answer:`` lines, and the agent's code-completion
  transcripts where it ran.

A turn is a dict: ``role`` and ``content`` (the question or the answer, as ``%gemma history``
shows it), plus what the rendering needs: ``notebook`` (the Markdown sections), ``snapshot``
(``"full"`` or ``"changes"``), ``media`` (image and audio parts, kept in memory only),
``attachments`` (how many of those the user attached),
``transcript`` (a base model's agent run, as sent and generated), ``generated`` (a base model's
answer exactly as generated), ``tool_calls`` and the tool messages of an agent run.
"""

from __future__ import annotations

from ..runtime.chat_template import PLAIN_STOPS

SYSTEM_PROMPT = """You are gemma4-nb, a data-science assistant inside the user's Jupyter notebook, running \
privately on their machine. Questions come with the user's live notebook: all of it first, then what changed. \
Answer concisely in Markdown. When code helps, write short Python that uses the variables shown; do not invent data."""

CHAT_HEADINGS = {"full": "# The notebook", "changes": "# What changed in the notebook since the last question"}
PLAIN_HEADINGS = {"full": "Notebook data:", "changes": "Notebook changes:"}
MESSAGE_KEYS = ("role", "content", "tool_calls", "name", "tool_call_id")
# stands for the question not asked yet where the prompt's start is prefilled ahead of it
QUESTION_MARK = "\ue000question\ue000"
# a base model's answer ends where it would start the next turn of the plain layout itself
QUESTION_STOPS = [*PLAIN_STOPS, *(f"\n{h}" for h in PLAIN_HEADINGS.values())]


def user_turn(question: str, update=None, media=(), *, attachments: int = 0) -> dict:
    """The record of a user turn: the question and the notebook part of its request
    (``attachments``: how many images and clips the user attached, for the history)."""
    turn = {"role": "user", "content": question}
    if update is not None and update.text:
        turn["notebook"] = update.text
        turn["snapshot"] = "full" if update.full else "changes"
    if media:
        turn["media"] = list(media)
    if attachments:
        turn["attachments"] = attachments
    return turn


def _user_text(turn: dict, headings: dict) -> str:
    notebook = turn.get("notebook")
    if not notebook:
        return str(turn.get("content") or "")
    return f"{headings[turn.get('snapshot', 'full')]}\n{notebook}\n\n# Question\n{turn.get('content') or ''}"


def chat_messages(turns: list[dict], system: str = SYSTEM_PROMPT) -> list[dict]:
    """The conversation as chat messages: the system prompt, then every turn as it was sent."""
    out = [{"role": "system", "content": system}]
    for t in turns:
        if t["role"] == "user":
            text = _user_text(t, CHAT_HEADINGS)
            media = t.get("media") or []
            out.append({"role": "user", "content": [*media, {"type": "text", "text": text}] if media else text})
        else:
            out.append({k: t[k] for k in MESSAGE_KEYS if k in t})
    return out


def plain_block(turn: dict) -> str:
    """A user turn's notebook part in the plain layout ("" when it carries none)."""
    notebook = turn.get("notebook")
    return f"{PLAIN_HEADINGS[turn.get('snapshot', 'full')]}\n{notebook}\n\n" if notebook else ""


def plain_conversation(turns: list[dict]) -> str:
    """The conversation as plain text for a base model (system prompt and tool messages left
    out): each turn's notebook block, ``Question:``/``Answer:`` lines, agent transcripts."""
    out = []
    for t in turns:
        if t["role"] == "user":
            out.append(plain_block(t))
            if not t.get("agent"):  # an agent turn's task is in its transcript
                content = t.get("content")
                if isinstance(content, list):
                    content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
                out.append(f"Question: {str(content or '').strip()}\n")
        elif t["role"] in ("assistant", "model"):
            if t.get("transcript") is not None:
                out.append(t["transcript"] + "\n")
            elif t.get("generated") is not None:  # as generated, spaces and all: the cache holds it so
                out.append(f"Answer:{t['generated']}\n")
            else:
                out.append(f"Answer: {str(t.get('content') or '').strip()}\n")
    return "".join(out)


def plain_question(turns: list[dict], turn: dict) -> str:
    """A base model's prompt for the question in ``turn``."""
    return plain_conversation([*turns, turn]) + "Answer:"


def conversation_chars(turns: list[dict]) -> int:
    """About how long the conversation renders, in characters."""
    total = 0
    for t in turns:
        content = t.get("content")
        total += len(content) if isinstance(content, str) else 200
        total += len(t.get("notebook") or "") + len(t.get("transcript") or "") + 40
        total += sum(len(str(c)) for c in t.get("tool_calls") or [])
    return total


def trim_conversation(turns: list[dict], limit_chars: int) -> list[dict]:
    """``turns`` when they fit in ``limit_chars``; otherwise without their oldest exchanges, down
    to half the limit (the prefix changes once, not at every request after)."""
    if conversation_chars(turns) <= limit_chars:
        return turns
    starts = [i for i, t in enumerate(turns) if t["role"] == "user"]
    for start in starts[1:]:
        if conversation_chars(turns[start:]) <= limit_chars // 2:
            return turns[start:]
    return turns[starts[-1]:] if starts else []


def storable(turns: list[dict]) -> list[dict]:
    """The turns without their media (the history file is JSON)."""
    out = []
    for t in turns:
        t = {k: v for k, v in t.items() if k != "media"}
        out.append(t)
    return out
