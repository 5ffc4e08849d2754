"""What the copilot sees of the notebook: live dataframes, figures, recent cells, the last error.

Built from the kernel's own namespace, so it sees the data itself rather than the code that made
it. Fast and copy-free on large frames (head, dtypes, per-column counts), and trimmed to a token
budget, most relevant first. One variable never breaks it: whatever cannot be described (an odd
DataFrame, an object whose attributes raise) is listed with the reason it was skipped.
"""

from __future__ import annotations

import re
import sys
import traceback
from dataclasses import dataclass, field

from ..errors import Gemma4Error

HIDDEN_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}


class ContextError(Gemma4Error):
    """A context request that cannot be met (an unknown dataframe name, say)."""


@dataclass
class NotebookContext:
    sections: list[tuple[str, str]] = field(default_factory=list)  # (title, text), most important first
    figures: list = field(default_factory=list)  # matplotlib figures worth showing the model

    def render(self) -> str:
        return "\n\n".join(f"## {title}\n{text}" for title, text in self.sections)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Text any tokenizer and JSON encoder accepts: lone surrogates (from bytes decoded with
    ``surrogateescape``, say) become U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def failure(exc: BaseException) -> str:
    """A short note of why something could not be described."""
    try:
        detail = str(exc)
    except Exception:  # an exception whose message raises
        detail = ""
    return f"{type(exc).__name__}: {detail[:120]}" if detail else type(exc).__name__


def shape_of(obj) -> str:
    """`` shape (2, 3)`` for objects with a shape, empty when there is none or it cannot be read."""
    try:
        shape = getattr(obj, "shape", None)
        return f" shape {tuple(shape)}" if shape is not None and not callable(shape) else ""
    except Exception:  # a property that raises, a shape that is not iterable
        return ""


def describe_variable(name: str, obj) -> str:
    """One line for a variable that is not a DataFrame: type, shape, short value; what cannot be
    read is left out, and an object that defeats even that is named as skipped."""
    try:
        line = f"- {name}: {type(obj).__name__}{shape_of(obj)}"
        if isinstance(obj, (int, float, str, bool)):
            line += f" = {obj!r:.60}"
        return clean_text(line)
    except Exception as exc:
        return f"- {name}: skipped ({failure(exc)})"


def is_frame(obj) -> bool:
    mod = type(obj).__module__
    return mod.startswith("pandas") and type(obj).__name__ in ("DataFrame", "Series")


def user_variables(namespace: dict) -> dict:
    """The user's own variables: no private names, modules, IPython plumbing."""
    import types

    out = {}
    for k, v in list(namespace.items()):
        if not isinstance(k, str) or k.startswith("_") or k in HIDDEN_NAMES:
            continue
        try:
            if not isinstance(v, types.ModuleType) and (is_frame(v) or not callable(v)):
                out[k] = v
        except Exception:  # an object whose __class__ raises: still the user's variable
            out[k] = v
    return out


SAMPLE_ROWS = 200_000


def _nulls(col) -> str:
    """Null count of a column: exact for numeric columns, sampled on large text/object columns."""
    kind = getattr(col.dtype, "kind", "O")
    if kind in "iub":  # numpy ints and bools cannot hold nulls
        return ""
    n = len(col)
    if kind == "O" and n > SAMPLE_ROWS:
        step = n // SAMPLE_ROWS
        sample = col.iloc[::step]
        frac = 1 - int(sample.count()) / len(sample)
        return f", ~{frac * n:,.0f} nulls (sampled)" if frac else ""
    nulls = n - int(col.count())
    return f", {nulls:,} nulls" if nulls else ""


def describe_frame(name: str, obj, max_rows: int = 5, max_cols: int = 30) -> str:
    """Name, shape, dtypes, nulls, memory and the first rows, without copying the data."""
    import pandas as pd

    if isinstance(obj, pd.Series):
        nulls = len(obj) - int(obj.count())
        head = obj.head(max_rows).to_string(max_rows=max_rows)
        return (f"`{name}`: Series {obj.name!r}, {len(obj):,} rows, dtype {obj.dtype}, {nulls:,} nulls, "
                f"{obj.memory_usage(deep=False) / 2**20:.1f} MiB\n{head}")
    names = list(obj.columns[:max_cols])
    rows = len(obj)
    lines = [f"`{name}`: DataFrame, {rows:,} rows x {obj.shape[1]} columns, "
             f"{obj.memory_usage(deep=False).sum() / 2**20:.1f} MiB"]
    repeated = obj.columns.duplicated()
    for i, c in enumerate(names):
        col = obj.iloc[:, i]  # by position: a repeated column name selects several columns
        lines.append(f"  - {c!s}: {col.dtype}{_nulls(col)}" + (" (a repeated column name)" if repeated[i] else ""))
    if obj.shape[1] > max_cols:
        lines.append(f"  - ... and {obj.shape[1] - max_cols} more columns")
    with pd.option_context("display.max_columns", max_cols, "display.width", 160):
        lines.append("first rows:\n" + obj.head(max_rows).to_string(max_cols=max_cols, max_colwidth=40))
    return "\n".join(lines)


def _series(ax, limit: int = 6) -> list[str]:
    """The plotted series of an axes: each line's label, point count and y range; bars; scatters."""
    import numpy as np

    out = []
    for line in ax.lines[:limit]:
        label = line.get_label()
        y = np.asarray(line.get_ydata(), dtype=float) if len(line.get_ydata()) else np.zeros(0)
        finite = y[np.isfinite(y)] if y.size else y
        span = f", y {finite.min():.4g}..{finite.max():.4g}" if finite.size else ""
        out.append(f"line{'' if label.startswith('_') else ' ' + repr(label)} ({len(y)} points{span})")
    if len(ax.lines) > limit:
        out.append(f"{len(ax.lines) - limit} more lines")
    if ax.patches:
        out.append(f"{len(ax.patches)} bars/patches")
    for coll in ax.collections[:limit]:
        label = coll.get_label()
        n = len(coll.get_offsets()) if hasattr(coll, "get_offsets") else 0
        out.append(f"scatter/collection{'' if label.startswith('_') else ' ' + repr(label)} ({n} points)")
    return out


def figure_title(fig) -> str:
    """The figure's title: its suptitle, else the first axes title that is set ("" when none)."""
    sup = getattr(fig, "_suptitle", None)
    if sup is not None and sup.get_text():
        return sup.get_text()
    return next((ax.get_title() for ax in fig.axes if ax.get_title()), "")


def describe_figure(fig) -> str:
    """Title, axes labels and series of a matplotlib figure (works on a closed figure too)."""
    parts = []
    for ax in fig.axes:
        bits = [f"title {ax.get_title()!r}" if ax.get_title() else "",
                f"x {ax.get_xlabel()!r}" if ax.get_xlabel() else "",
                f"y {ax.get_ylabel()!r}" if ax.get_ylabel() else "",
                *_series(ax)]
        legend = ax.get_legend()
        labels = {line.get_label() for line in ax.lines} | {c.get_label() for c in ax.collections}
        if legend is not None and not {t.get_text() for t in legend.get_texts()} <= labels:  # else: the series say it
            bits.append("legend " + ", ".join(t.get_text() for t in legend.get_texts()))
        parts.append("axes: " + "; ".join(b for b in bits if b))
    sup = getattr(fig, "_suptitle", None)
    head = f"figure {fig.number}" + (f" {sup.get_text()!r}" if sup is not None and sup.get_text() else "")
    return head + ": " + (" | ".join(parts) if parts else "empty")


def open_figures() -> list:
    if "matplotlib.pyplot" not in sys.modules:
        return []
    import matplotlib.pyplot as plt

    return [plt.figure(n) for n in plt.get_fignums()]


def last_error(shell) -> str | None:
    etype, value, tb = getattr(sys, "last_type", None), getattr(sys, "last_value", None), getattr(sys, "last_traceback", None)
    if value is None:
        return None
    try:
        text = "".join(traceback.format_exception(etype, value, tb))
    except Exception as exc:  # an exception that cannot be formatted
        return f"(the last error could not be shown: {failure(exc)})"
    return text[-3000:]


def count_tokens(text: str, tokenizer=None) -> int:
    if tokenizer is not None:
        return len(tokenizer.encode(text))
    return len(text) // 3 + 1


def select_frames(ns: dict, frames: list[str] | None) -> dict:
    """The dataframes a request shows: those named (``--df``; ContextError for a name that is not
    a DataFrame or Series here), else every DataFrame and Series of the user's."""
    if not frames:
        return {k: v for k, v in user_variables(ns).items() if is_frame(v)}
    missing = [n for n in frames if n not in ns]
    if missing:
        known = sorted(k for k, v in user_variables(ns).items() if is_frame(v))
        raise ContextError(f"no variable named {', '.join(missing)} in the notebook; dataframes here: "
                           f"{', '.join(known) or 'none'}")
    wrong = [n for n in frames if not is_frame(ns[n])]
    if wrong:
        raise ContextError(f"{', '.join(wrong)} is not a pandas DataFrame or Series "
                           f"(it is a {type(ns[wrong[0]]).__name__})")
    return {n: ns[n] for n in frames}


def build_context(shell, *, frames: list[str] | None = None, budget_tokens: int = 2000, tokenizer=None,
                  history_cells: int = 5, include_figures: bool = True) -> NotebookContext:
    """The notebook context for a request, within ``budget_tokens``.

    ``frames``: the dataframe names to include (``--df``); by default every DataFrame and Series.
    """
    ns = shell.user_ns if shell is not None else {}
    ctx = NotebookContext()
    variables = user_variables(ns)
    chosen = select_frames(ns, frames)
    error = last_error(shell)
    if error:
        ctx.sections.append(("The last error", error))
    for name, obj in chosen.items():
        try:
            text = describe_frame(name, obj)
        except Exception as exc:  # an odd frame: say so, describe the rest
            text = f"`{name}`: {type(obj).__name__}, skipped: it could not be described ({failure(exc)})"
        ctx.sections.append((f"Data: {name}", text))
    others = {k: v for k, v in variables.items() if not is_frame(v)}
    if others:
        ctx.sections.append(("Other variables", "\n".join(describe_variable(k, v) for k, v in list(others.items())[:40])))
    if include_figures:
        try:
            figs = open_figures()
            if figs:
                ctx.figures = figs[-2:]
                ctx.sections.append(("Open figures", "\n".join(describe_figure(f) for f in figs[-4:])))
        except Exception as exc:  # a figure in a broken state
            ctx.sections.append(("Open figures", f"(skipped: {failure(exc)})"))
    if shell is not None:
        raw = getattr(getattr(shell, "history_manager", None), "input_hist_raw", None) or ns.get("In", [])
        inputs = [c for c in raw[1:] if isinstance(c, str) and c.strip() and not c.lstrip().startswith("%")]
        inputs = inputs[-history_cells - 1 : -1]
        if inputs:
            ctx.sections.append(("Recent cells", "\n\n".join(f"```python\n{c[-800:]}\n```" for c in inputs)))
    ctx.sections = [(clean_text(title), clean_text(text)) for title, text in ctx.sections]
    # trim to the budget: drop the least important sections (the end of the list) first
    while ctx.sections and count_tokens(ctx.render(), tokenizer) > budget_tokens:
        title, text = ctx.sections[-1]
        if len(text) > 400:
            ctx.sections[-1] = (title, text[: len(text) // 2] + "\n...")
        else:
            ctx.sections.pop()
    return ctx
