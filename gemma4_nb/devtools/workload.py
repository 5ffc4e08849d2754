"""What a benchmark runs: a timed prefill and greedy decode of a model, and the prompts (English
text from Python's own help topics, a notebook text for agreement, code-rewrite prompts)."""

from __future__ import annotations

import time

import torch

from ..runtime.decoder import GemmaModel


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def greedy_step(net: GemmaModel, tok: torch.Tensor, cache) -> torch.Tensor:
    """One decode step; the head picks the greedy token itself (fused top-1 when quantized)."""
    hidden = net.forward(tok.view(1), cache, logits=False).hidden
    return net.top_k(hidden[-1], 1)[1][0]


def prefilled(net: GemmaModel, ids: list[int], depth: int = 0, prefill_chunk: int | None = None,
              kv_dtype: str | None = None):
    """The kernels warmed, then a timed chunked prefill of ``ids[depth:]`` after ``depth`` untimed
    context tokens: ``(prefill seconds, the greedy next token, the prefix cache)``."""
    from ..runtime.generation import prefill
    from ..runtime.kv_cache import PrefixCache

    dev = net.device
    chunk = prefill_chunk or (2048 if dev.type == "cuda" else 512)
    warm = net.new_cache(kv_dtype=kv_dtype)
    net.forward(torch.tensor(ids[:48]), warm)  # > 16 positions: the prefill path of quantized weights
    net.forward(torch.tensor(ids[:4]), warm)  # small batches: the fused kernels
    greedy_step(net, torch.tensor(ids[0]), warm)
    del warm
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prefix = PrefixCache(lambda: net.new_cache(kv_dtype=kv_dtype))
    prefix.prepare(ids + [0])
    if depth:
        prefill(net, ids[:depth], prefix, chunk)
    sync(dev)
    t0 = time.perf_counter()
    out = prefill(net, ids, prefix, chunk, start=depth)
    tok = out.logits[-1].argmax()
    sync(dev)
    return time.perf_counter() - t0, tok, prefix


def run(net: GemmaModel, prompt_len: int, decode: int, prefill_chunk: int | None = None,
        ids: list[int] | None = None, depth: int = 0, cuda_graphs: bool = False, kv_dtype: str | None = None) -> dict:
    """Time a chunked prefill of ``prompt_len`` random tokens (after ``depth`` untimed context
    tokens), then ``decode`` greedy steps (``cuda_graphs``: with :class:`StaticDecoder`, whose
    graphs are captured before the timing starts; eager on the CPU; ``kv_dtype``: the KV cache's,
    as :func:`gemma4_nb.load` takes it)."""
    dev = net.device
    if ids is None:
        ids = torch.randint(10, net.cfg.vocab_size, (depth + prompt_len,)).tolist()
    prefill_s, tok, prefix = prefilled(net, ids, depth, prefill_chunk, kv_dtype)
    step = lambda tok: greedy_step(net, tok, prefix.kv)  # noqa: E731
    if cuda_graphs:
        from ..runtime.static_decode import StaticDecoder

        static = StaticDecoder(net, depth + prompt_len + decode + 1)
        static.load(prefix.kv)
        static.prepare(static.length + decode)
        step = static.step
        sync(dev)
    t1 = time.perf_counter()
    for _ in range(decode):
        tok = step(tok)
    sync(dev)
    dec = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    return {"prompt": prompt_len, "ttft_s": prefill_s, "prefill_tok_s": prompt_len / prefill_s,
            "decode_tok_s": decode / dec, "peak_gpu_gib": peak / 2**30 if peak else None,
            "peak_rss_gib": peak_rss() / 2**30}


def text_ids(encode, n: int) -> list[int]:
    """The first ``n`` tokens of natural English text: the help topics every Python ships
    (``pydoc_data``), so the prompt is deterministic and needs no download. Decoding after text
    gives the peaked next-token distributions of real use; random ids give flat ones."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = encode(text[: 8 * n + 1000])
    if len(ids) < n:
        ids = encode(text)
    if len(ids) < n:
        raise SystemExit(f"--tokens text has {len(ids)} tokens; ask for fewer or use --tokens random")
    return ids[:n]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


AGREEMENT_TEXT = """\
import pandas as pd
import matplotlib.pyplot as plt

# Load the quarterly sales report and look at its structure.
sales = pd.read_csv("sales_2024.csv", parse_dates=["date"])
print(sales.shape)
print(sales.dtypes)
sales.head()

# Revenue per region and quarter, then the growth from one quarter to the next.
quarterly = (
    sales.assign(quarter=sales["date"].dt.to_period("Q"))
    .groupby(["region", "quarter"], as_index=False)["revenue"]
    .sum()
)
quarterly["growth"] = quarterly.groupby("region")["revenue"].pct_change()
best = quarterly[quarterly["quarter"] == quarterly["quarter"].max()].nlargest(3, "growth")
print(best)

The table shows that the western region grew fastest in the last quarter, while the northern
region, which had led the previous year, fell back. A line chart of revenue per region makes the
turning point easy to see, and a bar chart of the growth rates ranks the regions at a glance.
fig, ax = plt.subplots(figsize=(8, 4))
for region, frame in quarterly.groupby("region"):
    ax.plot(frame["quarter"].astype(str), frame["revenue"], marker="o", label=region)
ax.set_title("Revenue per region")
ax.legend()
plt.show()
"""


REWRITE_PROMPTS = [
    """# Original
def load_sales(path):
    df = pd.read_csv(path)
    df["revenue"] = df["price"] * df["quantity"]
    df = df[df["revenue"] > 0]
    summary = df.groupby("region")["revenue"].sum().sort_values(ascending=False)
    return summary

# The same function with type hints
def load_sales(path: str) -> pd.Series:
""",
    """# Rewrite with method chaining
sales = pd.read_csv("sales.csv")
sales["quarter"] = pd.to_datetime(sales["date"]).dt.to_period("Q")
sales = sales.dropna(subset=["revenue"])
totals = sales.groupby(["region", "quarter"])["revenue"].sum().reset_index()
totals["growth"] = totals.groupby("region")["revenue"].pct_change()

# Method-chained version
totals = (
    pd.read_csv("sales.csv")
""",
    """import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(8, 4))
for region, frame in totals.groupby("region"):
    ax.plot(frame["quarter"].astype(str), frame["revenue"], marker="o", label=region)
ax.set_title("Revenue per region")
ax.legend()

# The same plot, with growth instead of revenue
fig, ax = plt.subplots(figsize=(8, 4))
""",
]
