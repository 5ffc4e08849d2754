"""The copilot in a real Jupyter kernel (ipykernel via nbclient / jupyter_client) with a real model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from kernel_helpers import execute as run_in_kernel
from nbclient import NotebookClient

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.ipynb"))


def run_cells(cells: list[str], cwd: Path, env: dict | None = None, timeout: int = 300):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                       resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb.cells


def text_of(cell) -> str:
    parts = []
    for o in cell.outputs:
        parts.append(o.get("text", ""))
        data = o.get("data", {})
        parts.append(data.get("text/markdown", "") or data.get("text/plain", ""))
        parts.append(o.get("ename", "") + " " + o.get("evalue", ""))
    return "\n".join(parts)


def test_magics_context_and_bad_inputs(tiny_dir, tmp_path):
    cells = run_cells([
        "%load_ext gemma4_nb",
        f"%gemma model {tiny_dir}",
        "import pandas as pd\ndf = pd.DataFrame({'region': ['n', 's'], 'revenue': [1.0, None]})\nx = 5",
        "%gemma context",
        "%%gemma --max-new-tokens 8 --temperature 0\nWhich region has the most revenue?",
        "%gemma status",
        "%gemma history",
        "%%gemma --df nope\nhello",
        "%%gemma --df x\nhello",
        "%%gemma\n",
        "%gemma frobnicate",
        "%gemma config approval=sometimes",
        "%gemma reset\n%gemma history",
        "%%gemma --no-draft --max-new-tokens 4\nhi\n",
        "x + 37",
    ], tmp_path)
    out = [text_of(c) for c in cells]
    assert "`df`: DataFrame, 2 rows x 2 columns" in out[3] and "revenue: float64, 1 nulls" in out[3]
    streamed = [o for o in cells[4].outputs  # (with ipywidgets, the load's progress bar is a widget output)
                if o.get("output_type") == "display_data" and "text/markdown" in o["data"]]
    assert streamed and streamed[0]["data"]["text/markdown"].strip()  # the answer, as Markdown
    assert "gemma4_unified" in out[5] and "last reply: prompt" in out[5]
    assert "user: Which region has the most revenue?" in out[6] and "assistant:" in out[6]
    assert "no variable named nope in the notebook; dataframes here: df" in out[7]
    assert "x is not a pandas DataFrame or Series (it is a int)" in out[8]
    assert "cell body is empty" in out[9]
    assert "unknown command 'frobnicate'" in out[10]
    assert "approval must be one of ask, auto, never" in out[11]
    assert "conversation cleared" in out[12] and "(no conversation yet)" in out[12]
    assert any(o.get("output_type") == "display_data" for o in cells[13].outputs), cells[13].outputs
    assert "42" in out[14]  # the kernel and the user's variables are intact
    assert not any(o.get("output_type") == "error" for c in cells[:9] for o in c.outputs)


def test_agent_end_to_end_with_the_real_runtime(tmp_path):
    """The embedded Gemma 3 270M (no tool calling) writes a cell, it runs, the answer follows."""
    cells = run_cells([
        "%load_ext gemma4_nb\n%gemma approval auto\n%gemma config max_new_tokens=48 temperature=0",
        "import pandas as pd\nsales = pd.DataFrame({'region': ['north', 'south', 'north'], 'revenue': [10.0, 20.0, 5.0]})",
        "%%gemma --agent\nCompute the total revenue per region.",
        "%gemma history",
    ], tmp_path)
    out = text_of(cells[2])
    assert "```python" in out and "result = sales" in out  # the code the model wrote, shown
    assert "region" in out  # ...and the output of running it
    assert "assistant:" in text_of(cells[3])


def test_history_file_survives_a_kernel_restart(tiny_dir, tmp_path):
    run_cells(["%load_ext gemma4_nb", f"%gemma model {tiny_dir}", "%gemma config history_file=on",
               "%%gemma --max-new-tokens 4\nRemember the plum."], tmp_path)
    assert (tmp_path / "gemma-history.json").is_file()
    cells = run_cells(["%load_ext gemma4_nb", "%gemma history"], tmp_path)  # a new kernel
    assert "Remember the plum." in text_of(cells[1])


def test_interrupt_stops_generation_and_keeps_the_partial_answer(tmp_path):
    import json

    from jupyter_client.manager import KernelManager

    from gemma4_nb.devtools.tiny import write_tiny_checkpoint

    tiny_dir = write_tiny_checkpoint(tmp_path / "tiny")  # 4,096-token context: a long generation
    for name, key in (("config.json", None), ("generation_config.json", "eos_token_id")):
        data = json.loads((tiny_dir / name).read_text())  # no stop token: it would run to the end
        if key:
            data[key] = [99999]  # an id outside the vocabulary: never generated
        else:
            data["text_config"]["eos_token_id"] = 99999
        (tiny_dir / name).write_text(json.dumps(data))

    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)

        def execute(code, interrupt_after=None):
            return run_in_kernel(km, kc, code, interrupt_after=interrupt_after)[0]

        execute(f"%load_ext gemma4_nb\n%gemma model {tiny_dir}\ny = 123")
        execute("%%gemma --max-new-tokens 8\nwarm up")  # loads the model
        outs = execute("%%gemma --max-new-tokens 3000 --temperature 0\nWrite a very long essay.", interrupt_after=1.5)
        text = " ".join(str(m["content"].get("data", {}).get("text/markdown", "")) for m in outs)
        assert "(stopped)" in text
        assert not any(m["msg_type"] == "error" for m in outs)
        outs = execute("print(y)\n%gemma status")
        printed = " ".join(m["content"].get("text", "") for m in outs if m["msg_type"] == "stream")
        assert "123" in printed and "finish: interrupted" in printed
        outs = execute("%%gemma --max-new-tokens 4\nStill there?")  # the model and cache still work
        assert any(m["msg_type"] == "display_data" for m in outs)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.mark.parametrize("notebook", EXAMPLES, ids=lambda p: p.name)
def test_example_notebooks_execute(notebook, tmp_path):
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]


def test_private_by_construction_without_a_network(tiny_dir, tmp_path):
    """The notebook flow in a network namespace with no way out (only loopback, for the kernel)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip to make a network namespace")
    script = tmp_path / "offline.py"
    script.write_text(
        "import nbformat, socket\nfrom nbclient import NotebookClient\n"
        "try:\n    socket.create_connection(('1.1.1.1', 443), timeout=2); raise SystemExit('network reachable')\n"
        "except OSError:\n    pass\n"
        "nb = nbformat.v4.new_notebook()\n"
        f"nb.cells = [nbformat.v4.new_code_cell(c) for c in ['%load_ext gemma4_nb', '%gemma model {tiny_dir}',\n"
        "    'import pandas as pd\\ndf = pd.DataFrame({\"a\": [1, 2]})', '%%gemma --max-new-tokens 6\\nDescribe df']]\n"
        "NotebookClient(nb, timeout=300, kernel_name='python3').execute()\n"
        "print('OFFLINE OK', bool(nb.cells[-1].outputs))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # no offline flags: nothing may need them
    res = subprocess.run(["unshare", "-n", "sh", "-c", f"ip link set lo up && {sys.executable} {script}"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert "OFFLINE OK True" in res.stdout, res.stdout + res.stderr
