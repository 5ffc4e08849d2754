"""The agent loop's control flow with a deterministic scripted model, in a real IPython shell."""

from __future__ import annotations

import pytest
from IPython.core.interactiveshell import InteractiveShell

from gemma4_nb.backends.base import Reply
from gemma4_nb.backends.toolcalls import ToolCallError, format_call, parse_arguments, parse_tool_calls
from gemma4_nb.notebook.agent import Agent, AgentSettings
from gemma4_nb.notebook.workspace import KernelWorkspace


class Scripted:
    """Replies from a script; each entry is raw model text (tool calls in the native syntax)."""

    supports_tools = True
    supports_images = False

    def __init__(self, *raw: str) -> None:
        self.script, self.seen = list(raw), []

    def complete(self, messages, *, tools=None, on_text=None, **kw) -> Reply:
        self.seen.append(messages)
        text, calls, errors = parse_tool_calls(self.script.pop(0))
        if on_text:
            on_text(text)
        return Reply(text=text, tool_calls=calls, errors=errors)


@pytest.fixture
def shell():
    sh = InteractiveShell.instance()
    sh.user_ns.pop("total", None)
    sh.run_cell("import pandas as pd\nsales = pd.DataFrame({'region': ['n', 's', 'n'], 'revenue': [1.0, 2.0, 3.0]})")
    sh.rl_next_input = None
    yield sh


def run(shell, backend, approval="auto", asked=None, approve=True, **settings):
    ws = KernelWorkspace(shell)
    answers = asked if asked is not None else []

    def ask(code, why):
        answers.append((code, why))
        return approve

    agent = Agent(backend, ws, AgentSettings(approval=approval, **settings), ask=ask)
    result = agent.run([{"role": "user", "content": "total revenue?"}])
    ws.flush()
    return result, ws


def test_runs_code_then_answers(shell):
    backend = Scripted(format_call("run_python", {"code": "total = sales['revenue'].sum()\nprint(total)"}),
                       format_call("final_answer", {"answer": "Total revenue is **6.0**."}))
    result, _ = run(shell, backend)
    assert result.answer == "Total revenue is **6.0**."
    assert shell.user_ns["total"] == 6.0  # ran in the user's namespace
    tool_msg = backend.seen[1][-1]
    assert tool_msg["role"] == "tool" and "6.0" in tool_msg["content"]
    assert result.cells == ["total = sales['revenue'].sum()\nprint(total)"]
    # a new cell below (in a terminal shell: the next prompt), the user's cells untouched
    assert "total = sales" in shell.rl_next_input


def test_failed_run_is_retried_with_the_traceback(shell):
    backend = Scripted(format_call("run_python", {"code": "sales['revenu'].sum()"}),
                       format_call("run_python", {"code": "total = sales['revenue'].sum()"}),
                       "The total is 6.0.")
    result, _ = run(shell, backend)
    error_msg = backend.seen[1][-1]["content"]
    assert "KeyError" in error_msg and "revenu" in error_msg
    assert result.answer == "The total is 6.0." and shell.user_ns["total"] == 6.0


def test_gives_up_after_repeated_failures(shell):
    backend = Scripted(*[format_call("run_python", {"code": "1/0"})] * 5)
    result, _ = run(shell, backend, max_failed_runs=2)
    assert "failed 2 times" in result.answer


def test_step_limit(shell):
    backend = Scripted(*[format_call("list_variables", {})] * 10)
    result, _ = run(shell, backend, max_steps=3)
    assert "after 3 steps" in result.answer and len(backend.seen) == 3


def test_malformed_and_unknown_tool_calls_are_reported_back(shell):
    backend = Scripted("<|tool_call>call:run_python{code:<|\"|>print(1)}<tool_call|>",
                       format_call("delete_everything", {}),
                       "Sorry, done.")
    result, _ = run(shell, backend)
    assert "malformed" in backend.seen[1][-1]["content"]
    assert "unknown tool 'delete_everything'" in backend.seen[2][-1]["content"]
    assert result.answer == "Sorry, done."


@pytest.mark.parametrize("approval,approve,runs,asks", [
    ("ask", True, True, 1), ("ask", False, False, 1), ("auto", None, True, 0), ("never", None, False, 0)])
def test_approval_settings(shell, approval, approve, runs, asks):
    backend = Scripted(format_call("run_python", {"code": "total = 42"}), "ok")
    asked = []
    result, _ = run(shell, backend, approval=approval, asked=asked, approve=bool(approve))
    assert (shell.user_ns.get("total") == 42) == runs
    assert len(asked) == asks
    assert result.cells == ["total = 42"]  # the cell is written whatever the setting
    if not runs:
        assert "not run" in backend.seen[1][-1]["content"]


def test_risky_code_asks_even_in_auto(shell, tmp_path):
    victim = tmp_path / "data.csv"
    victim.write_text("x")
    backend = Scripted(format_call("run_python", {"code": f"import os\nos.remove({str(victim)!r})"}), "done")
    asked = []
    run(shell, backend, approval="auto", asked=asked, approve=False)
    assert len(asked) == 1 and "os.remove" in asked[0][1]
    assert victim.exists()


def test_inspect_and_capture_tools(shell):
    shell.run_cell("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
                   "fig, ax = plt.subplots(); ax.plot([1, 2]); ax.set_title('Revenue')")
    backend = Scripted(format_call("inspect_dataframe", {"name": "sales"}), format_call("capture_figure", {}),
                       format_call("inspect_dataframe", {"name": "nope"}), "fine")
    run(shell, backend)
    assert "3 rows x 2 columns" in backend.seen[1][-1]["content"] and "mean" in backend.seen[1][-1]["content"]
    assert "Revenue" in backend.seen[2][-1]["content"]
    assert "no DataFrame named 'nope'" in backend.seen[3][-1]["content"]
    shell.run_cell("plt.close('all')")


def test_native_argument_syntax():
    assert parse_arguments('{code:<|"|>print("a, b")<|"|>,n:3,flags:[true,null],opts:{k:<|"|>v<|"|>}}') == \
        {"code": 'print("a, b")', "n": 3, "flags": [True, None], "opts": {"k": "v"}}
    assert parse_arguments('{"code": "x = 1"}') == {"code": "x = 1"}
    for bad in ['{code:<|"|>unterminated}', "{code print(1)}", "{a:1,,b:2}", "{a:1} trailing"]:
        with pytest.raises(ToolCallError):
            parse_arguments(bad)
    text, calls, errors = parse_tool_calls("Let me check." + format_call("list_variables", {}))
    assert text == "Let me check." and calls[0].name == "list_variables" and not errors
