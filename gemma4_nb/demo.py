"""``make demo``: stream a pandas-flavoured chat reply and print the speed.

Uses ``$GEMMA4_NB_MODEL`` when set. Otherwise it writes a tiny random Gemma 4 checkpoint to the
user cache and runs that (the text is noise: it shows the plumbing, not the model).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import Gemma4Error
from .resolve import ENV_VAR
from .runtime import load

PROMPT = "I have a pandas DataFrame `sales` with columns region, quarter and revenue. How do I find the region with the highest revenue growth last quarter?"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gemma4-nb"


def main() -> int:
    model_ref = os.environ.get(ENV_VAR)
    if not model_ref:
        from .tiny import write_tiny_checkpoint

        target = cache_dir() / "tiny-random-gemma4"
        if not (target / "model.safetensors").is_file():
            write_tiny_checkpoint(target)
        print(f"{ENV_VAR} is not set: running a tiny RANDOM Gemma 4 checkpoint ({target}).\n"
              f"Its text is noise. Point {ENV_VAR} at a Gemma 4 12B directory or repo id for real answers.\n")
        model_ref = str(target)
    try:
        model = load(model_ref)
        print(f"{model}\n\nuser> {PROMPT}\nmodel> ", end="", flush=True)
        stream = model.chat([{"role": "user", "content": PROMPT}], max_new_tokens=96, stream=True, seed=0)
        for delta in stream:
            print(delta, end="", flush=True)
        print(f"\n\n[{stream.usage.summary()}]")
    except Gemma4Error as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
