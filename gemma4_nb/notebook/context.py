"""What the copilot sees of the notebook: live dataframes, figures, recent cells, the last error.

Built from the kernel's own namespace, so it sees the data itself rather than the code that made
it. Fast and copy-free on large frames (head, dtypes, per-column counts), and trimmed to a token
budget, most relevant first.
"""

from __future__ import annotations

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


def is_frame(obj) -> bool:
    mod = type(obj).__module__
    return mod.startswith("pandas") and type(obj).__name__ in ("DataFrame", "Series")


def user_variables(namespace: dict) -> dict:
    """The user's own variables: no private names, modules, IPython plumbing."""
    import types

    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k not in HIDDEN_NAMES and not isinstance(v, types.ModuleType)
            and (is_frame(v) or not callable(v))}


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
    cols = list(obj.columns[:max_cols])
    rows = len(obj)
    lines = [f"`{name}`: DataFrame, {rows:,} rows x {obj.shape[1]} columns, "
             f"{obj.memory_usage(deep=False).sum() / 2**20:.1f} MiB"]
    for c in cols:
        col = obj[c]
        lines.append(f"  - {c!s}: {col.dtype}{_nulls(col)}")
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
    text = "".join(traceback.format_exception(etype, value, tb))
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
        ctx.sections.append((f"Data: {name}", describe_frame(name, obj)))
    others = {k: v for k, v in variables.items() if not is_frame(v)}
    if others:
        lines = [f"- {k}: {type(v).__name__}" + (f" shape {v.shape}" if hasattr(v, "shape") else "")
                 + (f" = {v!r:.60}" if isinstance(v, (int, float, str, bool)) else "") for k, v in list(others.items())[:40]]
        ctx.sections.append(("Other variables", "\n".join(lines)))
    if include_figures:
        figs = open_figures()
        if figs:
            ctx.figures = figs[-2:]
            ctx.sections.append(("Open figures", "\n".join(describe_figure(f) for f in figs[-4:])))
    if shell is not None:
        raw = getattr(getattr(shell, "history_manager", None), "input_hist_raw", None) or ns.get("In", [])
        inputs = [c for c in raw[1:] if c.strip() and not c.lstrip().startswith("%")][-history_cells - 1 : -1]
        if inputs:
            ctx.sections.append(("Recent cells", "\n\n".join(f"```python\n{c[-800:]}\n```" for c in inputs)))
    # trim to the budget: drop the least important sections (the end of the list) first
    while ctx.sections and count_tokens(ctx.render(), tokenizer) > budget_tokens:
        title, text = ctx.sections[-1]
        if len(text) > 400:
            ctx.sections[-1] = (title, text[: len(text) // 2] + "\n...")
        else:
            ctx.sections.pop()
    return ctx
