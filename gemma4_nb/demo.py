"""``make demo``: stream a pandas-flavoured reply and print the speed.

With ``$GEMMA4_NB_MODEL`` set (Gemma 4 12B, say) it asks a chat question. Without it, it runs
the embedded Gemma 3 270M (a base model) on a code-completion prompt, which suits a base model.
"""

from __future__ import annotations

import os
import sys

from .errors import Gemma4Error
from .resolve import ENV_VAR
from .runtime import load

CHAT_PROMPT = ("I have a pandas DataFrame `sales` with columns region, quarter and revenue. "
               "How do I find the region with the highest revenue growth last quarter?")
COMPLETION_PROMPT = '''import pandas as pd

sales = pd.read_csv("sales.csv", parse_dates=["date"])
sales["quarter"] = sales["date"].dt.to_period("Q")

# Total revenue per region and quarter, then the growth from one quarter to the next
'''


def main() -> int:
    configured = bool(os.environ.get(ENV_VAR))
    try:
        model = load()
        print(model, flush=True)
        if configured and model.tokenizer.chat_template:
            print(f"\nuser> {CHAT_PROMPT}\nmodel> ", end="", flush=True)
            stream = model.chat([{"role": "user", "content": CHAT_PROMPT}], max_new_tokens=200, stream=True)
        else:
            print(f"\n--- completing this prompt (greedy) ---\n{COMPLETION_PROMPT}--- model output ---")
            stream = model.generate(COMPLETION_PROMPT, max_new_tokens=80, temperature=0, stream=True,
                                    stop=["\n\n\n"])
        for delta in stream:
            print(delta, end="", flush=True)
        print(f"\n\n[{stream.usage.summary()}]")
    except Gemma4Error as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
