"""The prompt's layout for prefix reuse: the notebook's snapshot with a conversation's first
question, what changed with the next ones, the conversation kept as sent -- checked on what the
model gets (the rendered prompt) and on what the runtime reuses (``Usage.cached_tokens``)."""

from __future__ import annotations

import sys

import pytest
from IPython.core.interactiveshell import InteractiveShell

from gemma4_nb.backends.base import Reply
from gemma4_nb.backends.toolcalls import format_call, parse_tool_calls
from gemma4_nb.notebook.copilot import Copilot
from gemma4_nb.notebook.snapshot import NotebookView

WEATHER = ("import pandas as pd\n"
           "weather = pd.DataFrame({'day': list(range(1, 8)) * 3, 'city': ['Oslo'] * 7 + ['Rome'] * 7 + ['Lima'] * 7,"
           " 'temp': [float(i % 9) for i in range(21)]})\nunit = 'C'")


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny instruction (chat template) checkpoint with a 4,096-token context."""
    from gemma4_nb.devtools.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("chat"))


@pytest.fixture
def shell():
    """The shared IPython shell with only ``weather`` and ``unit`` among the user's variables (other
    tests' variables are set aside and put back after) and no figures from other tests."""
    from gemma4_nb.notebook.context import user_variables

    sh = InteractiveShell.instance()
    aside = user_variables(sh.user_ns)
    for name in aside:
        del sh.user_ns[name]
    before = set(sh.user_ns)

    def forget_figures():
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")
        memory = getattr(sh, "_gemma4_nb_figures", None)
        if memory is not None:
            memory.entries.clear()

    forget_figures()
    sh.run_cell(WEATHER, store_history=True)
    yield sh
    for name in set(sh.user_ns) - before:
        del sh.user_ns[name]
    for name in ("weather", "unit"):
        sh.user_ns.pop(name, None)
    sh.user_ns.update(aside)
    forget_figures()


def test_snapshot_first_then_only_what_changed(shell):
    view = NotebookView(shell)
    first = view.update("Which city is the warmest?")
    assert first.full and "## Data: weather" in first.text and "first rows:" in first.text
    assert "## Recent cells" in first.text and "- unit: str = 'C'" in first.text
    view.commit(first)
    assert view.update("And the coldest?").text == ""  # nothing changed: nothing sent again

    shell.run_cell("weather['temp_f'] = weather['temp'] * 9 / 5 + 32\ntemp_max = weather.temp.max()\ndel unit",
                   store_history=True)
    changes = view.update("What is the mean of temp_f?")
    assert not changes.full
    assert "## New cells\n```python\nweather['temp_f'] = weather['temp'] * 9 / 5 + 32" in changes.text
    assert "## Changed data\n`weather`: new column temp_f (float64)\n" in changes.text
    assert "first rows" not in changes.text  # the change, not the whole description again
    assert "- temp_max: float64" in changes.text and "## Deleted\n`unit`" in changes.text
    view.commit(changes)

    shell.run_cell("boom = weather['no_such_column']", store_history=True)
    error = view.update("Why does it fail?")
    assert "## New error" in error.text and "KeyError" in error.text
    view.commit(error)
    summary = view.summary()
    assert summary.startswith("weather 21x4 · 1 variable · ") and summary.endswith("cells · last error"), summary


def test_a_closed_figure_is_still_described(shell):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    view = NotebookView(shell)
    view.commit(view.update(""))

    def close_all():  # what the inline backend does after each cell (registered after the memory's hook)
        plt.close("all")

    shell.events.register("post_execute", close_all)
    try:
        shell.run_cell("import matplotlib.pyplot as plt\n"
                       "ax = weather.pivot(index='day', columns='city', values='temp').plot(title='Daily temperature')\n"
                       "ax.set_ylabel('temp (C)')", store_history=True)
    finally:
        shell.events.unregister("post_execute", close_all)
    assert plt.get_fignums() == []
    update = view.update("What does the plot show?")
    assert "## New figure" in update.text
    for expected in ("title 'Daily temperature'", "x 'day'", "y 'temp (C)'", "line 'Lima' (7 points, y ",
                     "line 'Oslo' (7 points, y ", "line 'Rome' (7 points, y "):
        assert expected in update.text, update.text
    view.commit(update)
    assert 'figure "Daily temperature"' in view.summary()


def test_what_the_question_names_comes_first_within_the_budget(shell):
    shell.run_cell("import numpy as np\n"
                   "wide = pd.DataFrame(np.zeros((5, 30)), columns=[f'col{i}' for i in range(30)])\n"
                   "sales = pd.DataFrame({'region': ['n', 's'], 'revenue_growth': [0.1, 0.2]})", store_history=True)
    view = NotebookView(shell)
    everything = view.update("hello", budget=10_000)
    assert everything.text.index("## Data: weather") < everything.text.index("## Data: sales")
    small = view.update("Which region has the highest revenue_growth?", budget=160)
    assert "## Data: sales" in small.text and "## Data: wide" not in small.text  # a column, by name
    named = view.update("Describe wide.", budget=160)
    assert "## Data: wide" in named.text and "## Data: sales" not in named.text  # a variable, by name
    shell.run_cell("1 / 0", store_history=True)
    fix = view.update("Fix the error.", budget=120)
    assert "ZeroDivisionError" in fix.text and "## Data:" not in fix.text


class Recording:
    """Records every request's messages; replies from a script (tool calls in Gemma 4's syntax)."""

    supports_images, base_model = False, False

    def __init__(self, *script: str, tools: bool = False) -> None:
        self.script, self.requests, self.tools = list(script), [], []
        self.supports_tools = tools

    def complete(self, messages, *, tools=None, on_text=None, **kw) -> Reply:
        self.requests.append([dict(m) for m in messages])
        self.tools.append(tools)
        text, calls, errors = parse_tool_calls(self.script.pop(0) if self.script else "ok")
        if on_text and text:
            on_text(text)
        return Reply(text=text, tool_calls=calls, errors=errors)

    def status(self):
        return "recording"


def test_every_request_extends_the_previous_one(shell):
    """The chat layout (remote servers and instruction models): each request's messages are the
    previous request's, its answer, then the new turn -- through a cell run and an agent run
    with tools, whose tool declarations stay from then on."""
    c = Copilot(shell)
    c.settings.approval = "auto"
    c.backend = Recording("Lima.", format_call("run_python", {"code": "means = weather.groupby('city').temp.mean()"}),
                          format_call("final_answer", {"answer": "Done."}), "Rome.", tools=True)
    c.ask("Which city is the warmest?")
    shell.run_cell("weather['temp_f'] = weather['temp'] * 9 / 5 + 32", store_history=True)
    c.ask("Mean per city?", agent=True)
    c.ask("And the coldest?")
    r = c.backend.requests
    assert len(r) == 4
    for before, after in zip(r, r[1:]):
        assert after[: len(before)] == before
    assert r[1][len(r[0])]["role"] == "assistant"
    assert "# What changed in the notebook" in r[1][-1]["content"] and "temp_f" in r[1][-1]["content"]
    assert r[3][len(r[2])]["tool_calls"][0]["function"]["name"] == "final_answer"  # the answer as generated
    assert c.backend.tools[0] is None and all(t for t in c.backend.tools[1:])


def test_two_questions_with_a_cell_between_reuse_the_first_prompt(shell, chat_model_dir):
    """The runtime's own count: the second request reuses the first request's prompt (an
    instruction model's chat layout, the real runtime and its prefix cache)."""
    c = Copilot(shell)
    c.settings.model, c.settings.max_new_tokens, c.settings.temperature = str(chat_model_dir), 6, 0.0
    c.ask("Which city is the warmest?")
    first = c.last_usage
    shell.run_cell("weather['temp_f'] = weather['temp'] * 9 / 5 + 32", store_history=True)
    c.ask("What is the mean of temp_f?")
    second = c.last_usage
    assert first.cached_tokens == 0
    assert second.cached_tokens >= 0.9 * first.prompt_tokens, (first, second)
    new = second.prompt_tokens - second.cached_tokens
    assert new < first.prompt_tokens / 2  # the changes and the question, not the notebook again
    assert c.turns[-2]["snapshot"] == "changes" and "temp_f" in c.turns[-2]["notebook"]


def test_a_follow_up_after_a_cell_computes_only_its_question_once_the_kernel_was_idle(shell, chat_model_dir):
    """While the kernel is idle after a cell, the copilot prefills the conversation and what the
    cell changed (``Copilot.warm_up``, which ``warmup.py`` runs after every cell); the question
    then computes only itself -- also when it names something the model has not seen (added after
    the prefilled part) -- and a cell run after the warm-up makes the question build its own."""
    c = Copilot(shell)
    c.settings.model, c.settings.max_new_tokens, c.settings.temperature = str(chat_model_dir), 6, 0.0
    assert c.warm_up() == 0  # no conversation yet: the first question's snapshot is its own
    c.ask("Which city is the warmest?")
    shell.run_cell("weather['temp_f'] = weather['temp'] * 9 / 5 + 32", store_history=True)
    warmed = c.warm_up()
    assert warmed > c.last_usage.prompt_tokens
    c.ask("What is the mean of temp_f?")
    u = c.last_usage
    assert u.cached_tokens >= warmed - 1, (warmed, u)
    question = len(c.model.tokenizer.encode("What is the mean of temp_f?", add_special_tokens=False))
    assert u.prompt_tokens - u.cached_tokens <= question + 8, u  # the question and the turn's end
    assert "temp_f" in c.turns[-2]["notebook"]

    shell.run_cell("ratio = 0.5", store_history=True)
    warmed = c.warm_up()
    c.ask("Is ratio above one?")  # named: already in the prefilled changes
    u = c.last_usage
    assert u.cached_tokens >= warmed - 1 and "ratio" in c.turns[-2]["notebook"]

    shell.run_cell("weather['wind'] = 3.0", store_history=True)
    c.warm_up()
    shell.run_cell("weather['gust'] = 5.0", store_history=True)  # after the warm-up: not prefilled
    c.ask("What about gust?")
    assert "gust" in c.turns[-2]["notebook"] and "wind" in c.turns[-2]["notebook"]
    c.settings.warm = False
    shell.run_cell("speed = 2", store_history=True)
    assert c.warm_up() == 0


def test_a_long_conversation_drops_its_oldest_turns_and_sends_the_snapshot_again(shell, chat_model_dir):
    c = Copilot(shell)
    c.settings.model, c.settings.max_new_tokens, c.settings.temperature = str(chat_model_dir), 4, 0.0
    c.settings.context_tokens = 60
    c.ensure_model()
    c.model.max_context = 1000  # room for the conversation: 1000 - 4 - 60 - 64 tokens
    asked = 0
    while asked < 30 and not (asked and c.turns[0]["content"] != "question 0"):
        c.ask(f"question {asked}")
        asked += 1
    assert c.turns[0]["content"] != "question 0", "the conversation was never trimmed"
    assert c.turns[-2]["snapshot"] == "full"  # the request after the trim carries the snapshot again
    assert sum(t["role"] == "user" for t in c.turns) < asked
    assert c.last_usage.prompt_tokens < c.model.max_context


def test_the_notebook_benchmark_replays_a_session_in_a_real_kernel(chat_model_dir, tmp_path):
    from gemma4_nb.devtools.bench_notebook import SESSION, report, run_session

    turns, description = run_session(SESSION[:5], model=str(chat_model_dir), max_new_tokens=4, workdir=tmp_path,
                                     think=1.5)
    assert "6 layers" in description
    asks = [t for t in turns if t.what == "ask"]
    assert [len(t.requests) for t in asks] == [1, 1, 1]
    assert all(0 < t.requests[0]["first_token_s"] < t.total_s for t in asks)
    # the kernel was idle after the cell: warmup.py prefilled the follow-up's start (the changes),
    # so the follow-up computed only its question and the turn's end
    after_cell = asks[2].requests[0]
    assert after_cell["prompt"] - after_cell["reused"] <= 32, after_cell  # (188 without)
    table, checks = report([turns])
    assert "| follow-up after a cell | " in table
    assert len(checks) == 1 and "(target >= 90%: met)" in checks[0], checks


def test_a_plot_shown_inline_is_described_in_a_real_kernel(tmp_path):
    """The inline backend's plt.show() displays the figure, then closes it, within the cell."""
    from test_notebook_kernel import run_cells, text_of

    from gemma4_nb.devtools.bench_notebook import LOAD_DATA, PLOT

    cells = run_cells(["%load_ext gemma4_nb", LOAD_DATA, PLOT, "import matplotlib.pyplot as plt\nprint(plt.get_fignums())",
                       "%gemma context"], tmp_path)
    assert "[]" in text_of(cells[3])  # closed
    shown = text_of(cells[4])
    assert 'context: weather 21x4 · figure "Daily temperature" · ' in shown
    assert "title 'Daily temperature'; x 'day'; y 'temp (C)'; line 'Lima' (7 points, y " in shown


def test_a_changed_dataframe_in_a_line():
    import pandas as pd

    from gemma4_nb.notebook.snapshot import frame_change, frame_item

    before = frame_item("sales", pd.DataFrame({"region": ["n", "s"], "units": [1, 2], "notes": ["a", "b"]}))
    after = frame_item("sales", pd.DataFrame({"region": ["n", "s", "e"], "units": [1.0, 2.0, 3.0],
                                              "price": [9.5, 8.0, 7.0]}))
    assert frame_change(before, after) == ("`sales`: now 3 rows (was 2); new column price (float64); dropped notes; "
                                           "dtype units int64 -> float64")
    assert frame_change(before, before) is None  # only values changed: the first rows are shown instead
