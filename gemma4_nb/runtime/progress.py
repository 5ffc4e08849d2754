"""How far a load is: each stage of its work with its real count done and total.

A load's long loops (repacking a GGUF, reading the weights) report through a :class:`LoadProgress`:
a tqdm bar on the terminal when shown, and ``on_progress(stage, done, total)`` when the caller
passed one (the notebook's status lines turn it into a percentage). The numbers are the loop's
own: bytes of the file converted, tensors read. The runtime never imports the notebook layer;
this callback is how the numbers reach it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class LoadProgress:
    """Where a load reports its stages: ``show`` a tqdm bar per stage, ``callback`` each step."""

    show: bool = True
    callback: ProgressCallback | None = None

    def stage(self, name: str, total: int, unit: str = "tensor") -> "Stage":
        return Stage(self, name, total, unit)

    def report(self, name: str, done: int, total: int) -> None:
        if self.callback is None:
            return
        try:
            self.callback(name, done, total)
        except Exception as exc:  # a broken display must not break the load: it stops being told
            self.callback = None
            warnings.warn(f"load progress callback failed ({type(exc).__name__}: {exc}); progress is no longer "
                          "reported", RuntimeWarning, stacklevel=2)


def as_progress(progress: bool | LoadProgress) -> LoadProgress:
    """``progress`` as functions take it: True/False (a bar or none) or a :class:`LoadProgress`."""
    return progress if isinstance(progress, LoadProgress) else LoadProgress(show=bool(progress))


class Stage:
    """One loop of a load: ``update(n)`` after each piece of work; a context manager."""

    def __init__(self, owner: LoadProgress, name: str, total: int, unit: str) -> None:
        from tqdm.auto import tqdm

        self.owner, self.name, self.total, self.done = owner, name, max(0, int(total)), 0
        self.bar = tqdm(total=self.total, desc=name, unit=unit, unit_scale=unit == "B", disable=not owner.show,
                        leave=False)
        owner.report(name, 0, self.total)

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + int(n))
        self.bar.update(n)
        self.owner.report(self.name, self.done, self.total)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
