"""The notebook as the model has been shown it, question after question.

The first question of a conversation carries a compact snapshot of the notebook (dataframes, other
variables, figures, recent cells, the last error); later questions carry only what changed since
the model last looked: new cells, new or changed variables, a new figure, a new error, what was
deleted. The conversation keeps every snapshot as it was sent (``prompts.py``), so the prompt
only grows at its end and a prefix cache -- the in-kernel runtime's, or a server's -- reuses
everything before the new question.

Within the token budget, what the question names comes first: a variable or a column by name,
the error when the question is about an error, the figures when it is about a plot.

Figures are remembered when they are displayed and when a cell finishes, before the inline
backend closes them: a plot's title, axes and series are still described after it was closed.
"""

from __future__ import annotations

import re
import sys
import weakref
from dataclasses import dataclass, field

from .context import (
    clean_text,
    count_tokens,
    describe_figure,
    describe_frame,
    describe_variable,
    figure_title,
    is_frame,
    last_error,
    open_figures,
    select_frames,
    user_variables,
)

KINDS = ("error", "frame", "variable", "figure", "cell")  # kept within the budget in this order
# shown in this order: the notebook's story first, its latest state (the error last) next to the
# question (a base model that meets code just before a question tends to answer with code)
DISPLAY = ("cell", "frame", "variable", "figure", "error")
ERROR_WORDS = {"error", "errors", "fix", "bug", "traceback", "exception", "fails", "failed", "failing",
               "fail", "crash", "crashes", "wrong", "broken", "raise", "raised", "raises"}
PLOT_WORDS = {"plot", "plots", "plotted", "figure", "figures", "chart", "charts", "graph", "axis", "axes",
              "legend", "title", "curve", "curves", "bar", "bars", "scatter", "histogram", "line", "lines",
              "colour", "color", "visualise", "visualize", "picture", "image"}
HISTORY_CELLS = 5  # recent cells in a full snapshot, and new cells at most in an update
MAX_VARIABLES = 40
CELL_CHARS = 800
ERROR_CHARS = 3000


@dataclass
class Item:
    """One thing in the notebook the model can be shown."""

    key: str  # "error", "frame:sales", "variable:x", "figure:2", "cell:14"
    kind: str  # one of KINDS
    name: str  # the variable's name, the figure's title, the exception's type
    text: str  # the whole description (also what tells a change)
    label: str = ""  # its word in the context summary ("sales 120x4", 'figure "Revenue"')
    words: frozenset = frozenset()  # lower-case names a question may use for it (columns, labels)
    facts: dict = field(default_factory=dict)  # what a change is described from (a frame's shape, columns)
    figure: object | None = None  # the matplotlib Figure (a vision model is shown the image)


@dataclass
class Update:
    """What one request carries about the notebook."""

    full: bool  # a whole snapshot (the conversation's first), or what changed since the last one
    text: str  # Markdown sections; "" when nothing changed
    items: list[Item]  # the items it describes
    state: dict[str, str]  # every item's text when it was built (the model has now looked at these)
    removed: list[str] = field(default_factory=list)  # variables deleted since the model last looked
    figures: list = field(default_factory=list)  # Figure objects among the items (images for a vision model)
    whole: bool = True  # everything it meant to describe fit in the budget (nothing left out or cut)


# -- what is in the notebook ---------------------------------------------------------------------

def _safe(describe, name: str, obj) -> str:
    try:
        return describe()
    except Exception as exc:  # a description must never fail the request
        return f"`{name}`: {type(obj).__name__} (could not be described: {type(exc).__name__}: {exc})"


def frame_item(name: str, obj) -> Item:
    text = _safe(lambda: describe_frame(name, obj), name, obj)
    try:
        if hasattr(obj, "columns"):
            # by position: a repeated column name selects several columns
            columns = {str(c): str(obj.iloc[:, i].dtype) for i, c in enumerate(list(obj.columns)[:200])}
            facts = {"rows": len(obj), "columns": columns, "width": obj.shape[1]}
            label = f"{name} {len(obj)}x{obj.shape[1]}"
        else:
            columns = {}
            facts = {"rows": len(obj), "dtype": str(obj.dtype)}
            label = f"{name} ({len(obj)})"
    except Exception:
        columns, facts, label = {}, {}, name
    return Item(f"frame:{name}", "frame", name, text, label, frozenset(c.lower() for c in columns), facts)


def cell_sources(shell) -> list[tuple[int, str]]:
    """(history index, source) of the user's executed cells, magics left out."""
    if shell is None:
        return []
    ns = shell.user_ns
    raw = getattr(getattr(shell, "history_manager", None), "input_hist_raw", None) or ns.get("In", [])
    return [(i, c) for i, c in enumerate(raw) if i and isinstance(c, str) and c.strip()
            and not c.lstrip().startswith("%")]


def gather(shell, figures: "FigureMemory | None" = None, history_cells: int = HISTORY_CELLS) -> list[Item]:
    """Everything the model could be shown now, in the default order."""
    ns = shell.user_ns if shell is not None else {}
    items = []
    error = last_error(shell)
    if error:
        etype = getattr(sys, "last_type", None)
        name = getattr(etype, "__name__", "error")
        items.append(Item("error", "error", name, error[-ERROR_CHARS:], "last error", frozenset({name.lower()})))
    variables = user_variables(ns)
    for name, obj in variables.items():
        if is_frame(obj):
            items.append(frame_item(name, obj))
    # matplotlib objects (an Axes from .plot()) are described as figures
    others = [(k, v) for k, v in variables.items()
              if not is_frame(v) and not type(v).__module__.startswith("matplotlib")][:MAX_VARIABLES]
    for name, obj in others:
        items.append(Item(f"variable:{name}", "variable", name, describe_variable(name, obj)))
    if figures is not None:
        items.extend(figures.items())
    for index, source in cell_sources(shell)[-history_cells:]:
        items.append(Item(f"cell:{index}", "cell", str(index), source[-CELL_CHARS:]))
    for item in items:  # text any tokenizer and JSON encoder accepts (no lone surrogates)
        item.name, item.text, item.label = clean_text(item.name), clean_text(item.text), clean_text(item.label)
    return items


class FigureMemory:
    """The figures a notebook drew: described when displayed, when a cell finishes (before the
    inline backend closes them) and when asked, so a closed plot is still described. The newest ``keep`` are
    remembered; the newest two keep their Figure object, for a model that looks at images."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.entries: list[Item] = []
        self._serial = 0
        self._serials: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, shell) -> "FigureMemory":
        """The shell's one figure memory, hooked to see every figure the notebook displays (the
        inline backend's ``plt.show()`` displays, then closes them) and the ones open after a cell."""
        memory = getattr(shell, "_gemma4_nb_figures", None)
        if memory is None:
            memory = cls()
            memory._hook(shell)
            if shell is not None:
                shell._gemma4_nb_figures = memory
        return memory

    def _hook(self, shell) -> None:
        publisher = getattr(shell, "display_pub", None)
        if publisher is not None and callable(getattr(publisher, "publish", None)):
            # the inline backend's plt.show() displays each figure, then closes it: describe the open
            # figures when a figure is displayed (IPython's own formatters for Figure are reset
            # whenever a backend is selected, so a formatter of ours would not last)
            original = publisher.publish

            def publish(data, *args, **kwargs):
                if isinstance(data, dict) and str(data.get("text/plain", "")).startswith("<Figure"):
                    self.capture()
                return original(data, *args, **kwargs)

            publisher.publish = publish
        events = getattr(shell, "events", None)
        callbacks = getattr(events, "callbacks", {}).get("post_execute") if events is not None else None
        if callbacks is not None:
            # first in line: matplotlib-inline's flush_figures (registered on the same event) closes them
            callbacks.insert(0, self.capture)


    def capture(self) -> None:
        """Describe the open figures (never fails: it runs after every cell)."""
        try:
            for fig in open_figures():
                self.see(fig)
        except Exception:
            pass

    def see(self, fig) -> None:
        serial = self._serials.get(fig)
        if serial is None:
            self._serial += 1
            serial = self._serials[fig] = self._serial
        title = figure_title(fig)
        text = describe_figure(fig)
        if "axes:" not in text:  # an empty figure (plt.figure() before plotting) says nothing
            return
        words = {w.lower() for ax in fig.axes for w in (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) if w}
        words |= {line.get_label().lower() for ax in fig.axes for line in ax.lines if not line.get_label().startswith("_")}
        item = Item(f"figure:{serial}", "figure", title or f"figure {serial}", text,
                    f'figure "{title}"' if title else "figure", frozenset(words), figure=fig)
        self.entries = [e for e in self.entries if e.key != item.key] + [item]
        del self.entries[: -self.keep]
        for e in self.entries[:-2]:
            e.figure = None

    def items(self) -> list[Item]:
        self.capture()
        return list(self.entries)


# -- relevance and the budget ------------------------------------------------------------------

def question_words(question: str) -> set[str]:
    return set(re.findall(r"[a-z_][a-z0-9_]*", question.lower()))


def relevance(item: Item, words: set[str], question: str) -> int:
    """How directly the question names ``item`` (0: not at all)."""
    named = item.name.lower()
    if item.kind in ("frame", "variable") and named in words:
        return 4
    if item.kind == "error" and (words & ERROR_WORDS or words & item.words):
        return 4
    if item.kind == "frame" and (words & item.words or any(" " in c and c in question for c in item.words)):
        return 3  # a column by name
    if item.kind == "figure" and (words & PLOT_WORDS or words & item.words or (named and named.lower() in question)):
        return 3
    return 0


def prioritise(items: list[Item], question: str) -> list[Item]:
    """Items in the order they are kept within the budget: what the question names first, then
    the default order (the error, data, variables, figures, cells; the newest cells first)."""
    q = question.lower()
    words = question_words(q)
    order = {k: i for i, k in enumerate(KINDS)}
    pos = {id(it): i for i, it in enumerate(items)}
    return sorted(items, key=lambda it: (-relevance(it, words, q), order[it.kind],
                                         -pos[id(it)] if it.kind == "cell" else pos[id(it)]))


def _fit(sections: list[tuple[str, Item, str]], budget: int, tokenizer) -> list[tuple[str, Item, str]]:
    """Keep (heading, item, text) entries in order while they fit in ``budget`` tokens; a long
    text that does not fit whole is cut to what is left."""
    kept, used, headings = [], 0, set()
    for heading, item, text in sections:
        cost = count_tokens(text, tokenizer) + (0 if heading in headings else count_tokens(heading, tokenizer) + 2)
        if used + cost > budget:
            left = budget - used - count_tokens(heading, tokenizer) - 4
            if len(text) > 400 and left > 60:
                text = text[: max(200, int(len(text) * left / cost))] + "\n..."
                cost = count_tokens(text, tokenizer) + count_tokens(heading, tokenizer) + 2
            else:
                continue
        kept.append((heading, item, text))
        used += cost
        headings.add(heading)
    return kept


def render(sections: list[tuple[str, Item, str]]) -> str:
    """Markdown: one ``## heading`` per group, groups in ``DISPLAY`` order (entries within a group
    in the order given); cells in the order they ran, each fenced."""
    groups: dict[str, list[tuple[Item, str]]] = {}
    for heading, item, text in sorted(sections, key=lambda s: DISPLAY.index(s[1].kind)):
        groups.setdefault(heading, []).append((item, text))
    out = []
    for heading, entries in groups.items():
        if entries[0][0].kind == "cell":
            entries = sorted(entries, key=lambda e: int(e[0].name))
            body = "\n".join(f"```python\n{text}\n```" for _, text in entries)
        else:
            body = "\n".join(text for _, text in entries)
        out.append(f"## {heading}\n{body}")
    return "\n\n".join(out)


# -- what changed -----------------------------------------------------------------------------

def frame_change(old: Item, new: Item) -> str | None:
    """A changed dataframe in a line or two (shape, columns added, removed or retyped), or None
    when only its values changed."""
    a, b = old.facts, new.facts
    if not a or not b or "columns" not in a or "columns" not in b:
        return None
    bits = []
    if a["rows"] != b["rows"]:
        bits.append(f"now {b['rows']:,} rows (was {a['rows']:,})")
    added = [f"{c} ({t})" for c, t in b["columns"].items() if c not in a["columns"]]
    gone = [c for c in a["columns"] if c not in b["columns"]]
    retyped = [f"{c} {a['columns'][c]} -> {t}" for c, t in b["columns"].items() if c in a["columns"] and a["columns"][c] != t]
    if added:
        bits.append("new column" + ("s " if len(added) > 1 else " ") + ", ".join(added))
    if gone:
        bits.append("dropped " + ", ".join(gone))
    if retyped:
        bits.append("dtype " + ", ".join(retyped))
    if b["width"] > len(b["columns"]) and (a["width"] != b["width"]):  # beyond the columns listed
        bits.append(f"now {b['width']} columns (was {a['width']})")
    return f"`{new.name}`: " + "; ".join(bits) if bits else None


def _head_rows(text: str, rows: int = 3) -> str:
    """The description's first lines up to and including ``rows`` rows of its table."""
    head, sep, table = text.partition("first rows:\n")
    if not sep:
        return text
    lines = table.splitlines()
    return head.splitlines()[0] + "\nfirst rows now:\n" + "\n".join(lines[: rows + 1])


def change_sections(item: Item, before: Item | None) -> tuple[str, str]:
    """(heading, text) of an item that is new or changed since the model last saw it."""
    if item.kind == "cell":
        return "New cells", item.text
    if item.kind == "error":
        return "New error", item.text[-1500:]
    if item.kind == "figure":
        return ("Changed figure" if before is not None else "New figure"), item.text
    if item.kind == "variable":
        return "Variables", item.text
    if before is None:
        return "New data", item.text
    return "Changed data", frame_change(before, item) or _head_rows(item.text)


class NotebookView:
    """What the model has been shown of the notebook in this conversation."""

    def __init__(self, shell=None) -> None:
        self.shell = shell
        self.figures = FigureMemory.of(shell)
        self.reset()

    def reset(self) -> None:
        """A new conversation: the next request carries a whole snapshot again."""
        self.known: dict[str, str] = {}  # every item's text when the model last looked
        self.sent: dict[str, Item] = {}  # each item as the model last saw it
        self.started = False

    def update(self, question: str = "", *, budget: int = 2000, tokenizer=None, frames=None) -> Update:
        """The notebook part of the next request (not yet sent: ``commit`` it once it is)."""
        ns = self.shell.user_ns if self.shell is not None else {}
        chosen = select_frames(ns, frames) if frames else None
        items = gather(self.shell, self.figures)
        if chosen is not None:  # --df: these frames only; the others are left as the model knew them
            items = [it for it in items if it.kind != "frame" or it.name in chosen]
        state = {it.key: it.text for it in items}
        if chosen is not None:
            state.update({k: v for k, v in self.known.items() if k.startswith("frame:") and k not in state})
        if not self.started:
            sections = [(self._full_heading(it), it, it.text) for it in prioritise(items, question)]
            kept = _fit(sections, budget, tokenizer)
            return self._update(True, kept, state, [], whole=kept == sections)
        q = question.lower()
        words = question_words(q)

        def unseen(it: Item) -> bool:  # not shown as it is now
            return it.key not in self.sent or self.sent[it.key].text != it.text

        # new or changed since the model last looked; what the question names (or --df) and the
        # model has not seen as it is now
        changed = [it for it in items if self.known.get(it.key) != it.text
                   or ((relevance(it, words, q) or chosen is not None and it.kind == "frame") and unseen(it))]
        sections = []
        for it in prioritise(changed, question):
            heading, text = change_sections(it, self.sent.get(it.key))
            sections.append((heading, it, text))
        kept = _fit(sections, budget, tokenizer)
        removed = sorted(k.split(":", 1)[1] for k in self.known
                         if k not in state and k.split(":", 1)[0] in ("frame", "variable"))
        return self._update(False, kept, state, removed, whole=kept == sections)

    def extend(self, base: Update, question: str, *, budget: int = 2000, tokenizer=None) -> Update | None:
        """``base`` (built before the question, while the kernel was idle: see ``warmup.py``) as
        this question's update, plus what the question names that the model has not seen as it is
        now, in sections after it, so the request starts with exactly what was prefilled. None when
        the notebook changed since ``base`` was built, or when ``base`` could not hold everything
        (then the question decides what comes first within the budget)."""
        items = gather(self.shell, self.figures)
        if not base.whole or {it.key: it.text for it in items} != base.state:
            return None
        q = question.lower()
        words = question_words(q)
        have = {it.key for it in base.items}
        extra = [it for it in items if it.key not in have and relevance(it, words, q)
                 and (it.key not in self.sent or self.sent[it.key].text != it.text)]
        if not extra:
            return base
        sections = []
        for it in prioritise(extra, question):
            heading, text = change_sections(it, self.sent.get(it.key))
            sections.append((heading, it, text))
        used = count_tokens(base.text, tokenizer)
        kept = _fit(sections, max(0, budget - used), tokenizer)
        text = base.text + ("\n\n" if base.text and kept else "") + render(kept)
        items_all = base.items + [it for _, it, _ in kept]
        return Update(base.full, text, items_all, base.state, base.removed,
                      [it.figure for it in items_all if it.figure is not None], whole=kept == sections)

    @staticmethod
    def _full_heading(item: Item) -> str:
        return {"error": "The last error", "frame": f"Data: {item.name}", "variable": "Other variables",
                "figure": "Figures", "cell": "Recent cells"}[item.kind]

    @staticmethod
    def _update(full: bool, kept, state, removed, whole: bool = True) -> Update:
        text = render(kept)
        if removed:
            text += ("\n\n" if text else "") + "## Deleted\n" + ", ".join(f"`{n}`" for n in removed)
        items = [it for _, it, _ in kept]
        return Update(full, text, items, state, removed, [it.figure for it in items if it.figure is not None], whole)

    def commit(self, update: Update) -> None:
        """The request carrying ``update`` was sent: the model has now seen it."""
        self.known = dict(update.state)
        for it in update.items:
            self.sent[it.key] = it
        for name in update.removed:
            self.sent.pop(f"frame:{name}", None)
            self.sent.pop(f"variable:{name}", None)
        self.started = True

    def mark_agent_work_seen(self) -> None:
        """The cells an agent ran during a request, and the error one of them raised, are known to
        the model already: it wrote them and read their output. (A question about that error
        still brings it in: it names it and the model has not been shown it whole.)"""
        for index, source in cell_sources(self.shell)[-HISTORY_CELLS:]:
            self.known[f"cell:{index}"] = source[-CELL_CHARS:]  # as gather() describes them
        error = last_error(self.shell)
        if error:
            self.known["error"] = error[-ERROR_CHARS:]

    def summary(self, update: Update | None = None) -> str:
        """One line: what the model has seen of the notebook in this conversation (with
        ``update``: once it is sent)."""
        seen = dict(self.sent)
        if update is not None:
            seen.update({it.key: it for it in update.items})
            for name in update.removed:
                seen.pop(f"frame:{name}", None)
                seen.pop(f"variable:{name}", None)
        sent = list(seen.values())
        frames = [it.label for it in sent if it.kind == "frame"]
        figures = [it.label for it in sent if it.kind == "figure"]
        n_vars = sum(it.kind == "variable" for it in sent)
        n_cells = sum(it.kind == "cell" for it in sent)
        parts = frames[:3] + ([f"+{len(frames) - 3} more dataframes"] if len(frames) > 3 else [])
        parts += figures[-2:] + ([f"+{len(figures) - 2} more figures"] if len(figures) > 2 else [])
        if n_vars:
            parts.append(f"{n_vars} variable{'s' if n_vars > 1 else ''}")
        if n_cells:
            parts.append(f"{n_cells} cell{'s' if n_cells > 1 else ''}")
        if any(it.kind == "error" for it in sent):
            parts.append("last error")
        return " · ".join(parts) if parts else "nothing from the notebook yet"
