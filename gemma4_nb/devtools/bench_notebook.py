"""``gemma4-nb bench --notebook``: time to first token through a real notebook session.

A Jupyter kernel (jupyter_client, as a notebook frontend drives it) replays a scripted session:
load data, ask, ask again with nothing changed, run a cell, ask, plot, ask about the plot, an
agent step, ask again. For each question it prints the prompt's tokens, how many were reused
from the previous request's cache, the time to the first token as the frontend sees it (from
the cell's start in the kernel to the first token generated) and the cell's total time.

``--shape gemma4-12b --quant int4`` runs a shorter session on the 12B shape with random int4
weights (``devtools/shapes.random_quantized_model``) behind the embedded model's tokenizer and the
Gemma 3 chat template: the speed is what is measured, the text is noise.
"""

from __future__ import annotations

import ast
import json
import os
import queue
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .workload import cpu_name

LOAD_DATA = """import numpy as np
import pandas as pd

rng = np.random.default_rng(0)
cities = ['Oslo', 'Rome', 'Lima']
weather = pd.DataFrame({'day': np.repeat(np.arange(1, 8), 3), 'city': cities * 7,
                        'temp': np.round(rng.normal([4.0, 18.0, 21.0] * 7, 2.0), 1),
                        'rain_mm': rng.integers(0, 12, 21)})"""
ADD_COLUMN = "weather['temp_f'] = weather['temp'] * 9 / 5 + 32"
PLOT = """import matplotlib.pyplot as plt

ax = weather.pivot(index='day', columns='city', values='temp').plot(title='Daily temperature')
ax.set_ylabel('temp (C)')
plt.show()"""

# (what, label, text): "cell" runs code, "ask" a %%gemma question, "agent" a %%gemma --agent task
SESSION = [
    ("cell", "load data", LOAD_DATA),
    ("ask", "first question", "Which city is the warmest?"),
    ("ask", "follow-up, nothing changed", "And which is the coldest?"),
    ("cell", "a cell adds a column", ADD_COLUMN),
    ("ask", "follow-up after a cell", "What is the mean of temp_f?"),
    ("cell", "a plot", PLOT),
    ("ask", "about the plot (after a cell)", "What does the plot show?"),
    ("agent", "agent step", "Compute the mean temperature per city."),
    ("ask", "follow-up after the agent's cell", "Which city had the most rain?"),
]
# a user reads the output and types the next question: the kernel is idle meanwhile
THINK_SECONDS = 2.0
SHAPE_SESSION = SESSION[:5]  # the 12B shape prefills a few tokens/s on a laptop CPU: a short session

# Runs in the kernel: records each request of the in-kernel backend (its usage, and when its first
# token was generated) and when each cell started.
RECORDER = """
def _gemma4_nb_bench_recorder():
    import time
    from gemma4_nb.backends.local import LocalBackend
    from gemma4_nb.runtime import generation, model
    records, firsts, cell = [], [], {}
    get_ipython().events.register("pre_run_cell", lambda info: cell.__setitem__("start", time.perf_counter()))
    original_ids = generation.generate_ids
    def timed_ids(*args, **kwargs):
        ids = original_ids(*args, **kwargs)
        try:
            for i, token in enumerate(ids):
                if i == 0:
                    firsts.append(time.perf_counter())
                yield token
        finally:
            ids.close()
    generation.generate_ids = model.generate_ids = timed_ids
    for name in ("complete", "complete_text"):
        original = getattr(LocalBackend, name)
        def wrapped(self, *args, _original=original, **kwargs):
            seen = len(firsts)
            t = time.perf_counter()
            reply = _original(self, *args, **kwargs)
            u = reply.usage
            first = firsts[seen] - cell["start"] if len(firsts) > seen else None
            records.append({"prompt": u.prompt_tokens, "reused": u.cached_tokens, "generated": u.generated_tokens,
                            "prefill_s": u.prefill_seconds, "first_token_s": first, "total_s": time.perf_counter() - t})
            return reply
        setattr(LocalBackend, name, wrapped)
    return records
_gemma4_nb_bench_records = _gemma4_nb_bench_recorder()
del _gemma4_nb_bench_recorder
"""


def use_shape_model(shell, shape: str = "gemma4-12b", quant: str = "int4", max_context: int = 8192) -> str:
    """In the kernel: give the copilot the ``shape`` with random ``quant`` weights, behind the
    embedded model's tokenizer (its vocabulary is the 12B's size) and the Gemma 3 chat template."""
    from importlib import resources

    from ..backends.local import LocalBackend
    from ..kernels import warmup
    from ..notebook.copilot import get_copilot
    from ..runtime.gguf_file import prepare_gguf
    from ..runtime.model import Model
    from ..runtime.resolve import resolve_model
    from ..runtime.tokenizer import Tokenizer
    from .shapes import random_quantized_model

    t = time.perf_counter()
    net = random_quantized_model(shape, quant)
    warmup.warm_up()
    embedded = prepare_gguf(resolve_model(None), plain=True, progress=False)  # its tokenizer only
    tok_dir = Path(tempfile.mkdtemp(prefix="gemma4nb-shape-tokenizer-"))
    shutil.copy(embedded / "tokenizer.json", tok_dir / "tokenizer.json")
    config = json.loads((embedded / "tokenizer_config.json").read_text())
    config.pop("gemma4_nb_base_model", None)  # an instruction model: the chat layout
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    template = resources.files("gemma4_nb").joinpath("data/gemma3_chat_template.jinja").read_text(encoding="utf-8")
    (tok_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    model = Model(tok_dir, net.cfg, net, Tokenizer(tok_dir), {}, max_context, source=Path(f"{shape}-{quant}-random"),
                  quant=quant)
    copilot = get_copilot(shell)
    copilot.model, copilot.backend = model, LocalBackend(model)
    copilot.load_seconds = time.perf_counter() - t
    return repr(model)


@dataclass
class Turn:
    what: str
    label: str
    total_s: float = 0.0
    requests: list[dict] = field(default_factory=list)


class Kernel:
    """A kernel driven the way a notebook frontend drives it."""

    def __init__(self, cwd: Path, env: dict) -> None:
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(cwd), env={**os.environ, **env})
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    def execute(self, code: str, timeout: float = 3600, silent: bool = False):
        """Run ``code``; returns (seconds to the first display output, total seconds, text printed)."""
        t0 = time.perf_counter()
        msg_id = self.kc.execute(code, silent=silent, store_history=not silent)
        first, printed = None, []
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind in ("display_data", "update_display_data") and first is None:
                first = time.perf_counter() - t0
            elif kind == "stream":
                printed.append(content.get("text", ""))
            elif kind == "error":
                printed.append("\n".join(content.get("traceback", [])))
            elif kind == "status" and content["execution_state"] == "idle":
                return first, time.perf_counter() - t0, "".join(printed)
        raise TimeoutError(f"the kernel did not finish in {timeout:.0f} s: {code[:60]!r}")

    def value(self, expression: str):
        """A JSON value from the kernel, without adding a cell to its history."""
        msg_id = self.kc.execute("", silent=True, user_expressions={"v": f"__import__('json').dumps({expression})"})
        reply = self.kc.get_shell_msg(timeout=60)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=60)
        data = reply["content"]["user_expressions"]["v"]
        if data.get("status") != "ok":
            raise RuntimeError(f"{expression}: {data.get('ename')}: {data.get('evalue')}")
        return json.loads(ast.literal_eval(data["data"]["text/plain"]))  # the repr of the JSON text

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def run_session(session, *, model: str | None = None, shape: str | None = None, quant: str | None = None,
                threads: int | None = None, max_new_tokens: int = 24, workdir: Path | None = None,
                think: float = 0.0, warm: bool = True) -> tuple[list[Turn], str]:
    """Replay ``session`` in a fresh kernel; returns the turns and the model's description.
    ``think``: seconds between the kernel going idle and each question (the user reading the
    output and typing); ``warm``: the copilot prefills the next question's start meanwhile."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="gemma4nb-bench-notebook-"))
    env = {"GEMMA4_NB_MODEL": model} if model else {}
    kernel = Kernel(workdir, env)
    try:
        setup = ["%load_ext gemma4_nb", f"%gemma config max_new_tokens={max_new_tokens} temperature=0",
                 "%gemma approval auto", f"%gemma config warm={'on' if warm else 'off'}"]
        if threads:
            setup.insert(0, f"import torch as _torch; _torch.set_num_threads({threads}); del _torch")
        for line in setup:
            kernel.execute(line, silent=True)
        if shape:
            kernel.execute("from gemma4_nb.devtools.bench_notebook import use_shape_model as _use\n"
                           f"_use(get_ipython(), {shape!r}, {quant or 'int4'!r})\ndel _use", silent=True)
        else:
            kernel.execute("from gemma4_nb.notebook.copilot import get_copilot as _get\n"
                           "_get(get_ipython()).ensure_model()\ndel _get", silent=True)
        # one request before the session: first-call costs (allocations, compilation) are not a turn's
        kernel.execute("%%gemma --no-context --max-new-tokens 2\nHello", silent=True)
        kernel.execute(f"%gemma reset\n%gemma config max_new_tokens={max_new_tokens}", silent=True)
        kernel.execute(RECORDER, silent=True)
        description = kernel.value("repr(__import__('gemma4_nb').notebook.copilot.get_copilot(get_ipython()).model)")
        turns = []
        for what, label, text in session:
            if what == "cell":
                _, total, _ = kernel.execute(text)
                turns.append(Turn(what, label, total))
                continue
            before = kernel.value("len(_gemma4_nb_bench_records)")
            time.sleep(think)
            magic = "%%gemma --agent" if what == "agent" else "%%gemma"
            _, total, _ = kernel.execute(f"{magic}\n{text}")
            records = kernel.value(f"_gemma4_nb_bench_records[{before}:]")
            turns.append(Turn(what, label, total, records))
        return turns, description
    finally:
        kernel.close()


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    mid = statistics.median(values) * 1000
    return f"{mid:.0f} ms" + (f" ({min(values) * 1000:.0f}-{max(values) * 1000:.0f})" if len(values) > 1 else "")


def report(runs: list[list[Turn]]) -> tuple[str, list[str]]:
    """The table (time to first token: the median of the runs, and their range) and the checks
    of the issue's targets: after a cell ran, >= 90% of the previous prompt reused and a time to
    first token <= 1.5x that of the follow-up with nothing changed."""
    rows = ["| turn | prompt tokens | reused | reused / previous prompt | time to first token | total |",
            "|---|---:|---:|---:|---:|---:|"]
    previous_prompt, ran_cell, unchanged, after_cell = None, False, None, []
    for i, t in enumerate(runs[0]):
        ttfts = [r[i].requests[0]["first_token_s"] for r in runs if r[i].requests and r[i].requests[0]["first_token_s"]]
        total = statistics.median(r[i].total_s for r in runs)
        if t.what == "cell":
            rows.append(f"| *cell: {t.label}* | | | | | {total:.2f} s |")
            ran_cell = True
            continue
        first = t.requests[0] if t.requests else {}
        share = (first.get("reused", 0) / previous_prompt) if previous_prompt and first else None
        extra = f" ({len(t.requests)} requests)" if len(t.requests) > 1 else ""
        rows.append(f"| {t.label}{extra} | {first.get('prompt', '-')} | {first.get('reused', '-')} | "
                    f"{'-' if share is None else f'{share:.0%}'} | {_ms(ttfts)} | {total:.2f} s |")
        ttft = statistics.median(ttfts) if ttfts else None
        if t.what == "ask" and previous_prompt and not ran_cell and unchanged is None:
            unchanged = ttft
        elif t.what == "ask" and ran_cell and previous_prompt:
            after_cell.append((t, share, ttft))
        if t.requests:
            previous_prompt = t.requests[-1]["prompt"]
        ran_cell = t.what == "agent"  # the agent ran a cell before the next question
    checks = []
    for t, share, ttft in after_cell:
        ok_reuse = share is not None and share >= 0.9
        line = f"{t.label}: reuses {share:.0%} of the previous prompt (target >= 90%: {'met' if ok_reuse else 'NOT met'})"
        if unchanged and ttft:
            ratio = ttft / unchanged
            line += f"; TTFT {ratio:.2f}x the unchanged follow-up's (target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})"
        checks.append(line)
    return "\n".join(rows), checks


def notebook_bench(model: str | None = None, shape: str | None = None, quant: str | None = None,
                   threads: int | None = None, max_new_tokens: int | None = None, repeat: int = 1,
                   think: float = THINK_SECONDS, warm: bool = True) -> list[list[Turn]]:
    """``gemma4-nb bench --notebook``: the session (``repeat`` times, a fresh kernel each), its
    table and the checks, printed."""
    import torch

    session = SHAPE_SESSION if shape else SESSION
    max_new = max_new_tokens or (8 if shape else 24)
    t = time.perf_counter()
    runs = []
    for _ in range(max(repeat, 1)):
        turns, description = run_session(session, model=model, shape=shape, quant=quant, threads=threads,
                                          max_new_tokens=max_new, think=think, warm=warm)
        runs.append(turns)
    print(f"model: {description}\nmachine: {cpu_name()}, {threads or torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {max_new} new tokens at most per request, greedy; {len(runs)} session(s), "
          f"{time.perf_counter() - t:.0f} s\nthe user: {think:g} s from the kernel going idle to each question; "
          f"prefilling the next question's start while idle: {'on' if warm else 'off'}")
    print("time to first token: from the %%gemma cell's start in the kernel to the first token generated (the "
          "agent: of its first request)" + (", median of the sessions (range)" if len(runs) > 1 else "")
          + "; reused: prompt tokens taken from the cache of the previous request\n")
    table, checks = report(runs)
    print(table)
    print()
    for line in checks:
        print(line)
    return runs
