"""In a real JupyterLab with Debian's Chromium: the status's load percentage (the runtime's own
count, a GGUF repacked for the first time) up to ready, and in a %%gemma cell's load line; the
agent's approval offered on its cell too (Run from the cell: the cell runs in the notebook, its
output under it, the panel's buttons gone; Skip from the cell: nothing runs).

The load is the real embedded model's. The agent's replies come from a scripted backend put into
the kernel's copilot (the approval's control flow is the point there; its code must be known).
Screenshots go to build/e2e/.
"""

from __future__ import annotations

import re

from test_browser_e2e import ARTIFACTS, CELL_INDEX, KERNEL_IDLE, TOKEN, launch

# Runs code in the notebook's kernel, returns what it printed.
KERNEL_RUN = """async (code) => {
  const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const f = k.requestExecute({ code, store_history: false });
  let out = '';
  f.onIOPub = m => {
    if (m.header.msg_type === 'stream') out += m.content.text;
    if (m.header.msg_type === 'error') out += m.content.ename + ': ' + m.content.evalue;
  };
  await f.done;
  return out;
}"""

# Runs a cell in the kernel; returns the Markdown of its displays and their updates, as they came.
CELL_DISPLAYS = """async (code) => {
  const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const f = k.requestExecute({ code, store_history: false });
  const seen = [];
  f.onIOPub = m => {
    const t = m.header.msg_type;
    if (t === 'display_data' || t === 'update_display_data') {
      seen.push(m.content.data['text/markdown'] || m.content.data['text/plain']);
    }
  };
  await f.done;
  return seen;
}"""

# Every text the sidebar's status line shows, as it changes.
WATCH_STATUS = """() => {
  window.__g4_status = [];
  const s = document.querySelector('.g4-sidebar .g4-status');
  new MutationObserver(() => window.__g4_status.push(s.textContent))
    .observe(s, { childList: true, characterData: true, subtree: true });
}"""

# A chat model that writes one cell (the code of the first reply), then answers from its output.
AGENT = '''
from gemma4_nb.backends.base import Reply as _Reply
from gemma4_nb.notebook.copilot import get_copilot as _get_copilot

class _AgentScript:
    supports_tools = True
    supports_images = supports_audio = base_model = False

    def __init__(self, code, answer):
        self.replies = [f"```python\\n{code}\\n```", answer]

    def complete(self, messages, *, tools=None, on_text=None, **sampling):
        text = self.replies.pop(0) if self.replies else "done"
        if on_text:
            on_text(text)
        return _Reply(text=text)

    def status(self):
        return "scripted agent"

def _agent(code, answer):
    _get_copilot(get_ipython()).backend = _AgentScript(code, answer)
'''

TOTALS = "totals = sales.groupby('region')['revenue'].sum()\nprint(totals.to_dict())"
REMOVE = "import os\nos.remove('sales-backup.csv')"


def test_load_percentage_and_approval_on_the_cell(lab):
    from playwright.sync_api import expect, sync_playwright

    url, root = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        context = browser.new_context(viewport={"width": 1500, "height": 950})
        page = context.new_page()
        console: list[str] = []
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        try:
            _scenario(page, url, root, expect)
        finally:
            page.screenshot(path=str(ARTIFACTS / "agent-cell-final.png"))
            (ARTIFACTS / "agent-cell-console.log").write_text("\n".join(console))
            browser.close()


def _scenario(page, url, root, expect):
    page.goto(f"{url}/lab/tree/analysis.ipynb?token={TOKEN}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    page.wait_for_function(KERNEL_IDLE, timeout=90_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('.jp-Notebook .jp-InputPrompt'))"
        ".every(e => /\\[\\d+\\]/.test(e.textContent))", timeout=120_000)
    cells = page.locator(".jp-Notebook .jp-Cell")
    run = lambda code: page.evaluate(KERNEL_RUN, code)  # noqa: E731

    page.locator(".lm-TabBar-tab[data-id='gemma4-nb-sidebar']").click()
    sidebar = page.locator(".g4-sidebar")
    right = page.locator("#jp-right-stack").bounding_box()  # wider, as a user drags it (the README's screenshots)
    page.mouse.move(right["x"] - 2, right["y"] + 300)
    page.mouse.down()
    page.mouse.move(right["x"] - 180, right["y"] + 300, steps=5)
    page.mouse.up()
    status = sidebar.locator(".g4-status")
    expect(status).to_contain_text("not loaded", timeout=60_000)
    box = sidebar.locator(".g4-input")

    # 1. the load's percentage: a first load repacks the embedded GGUF (a new conversion cache in
    #    this kernel), the status shows the runtime's stage and percentage, then ready
    out = run("import os as _os, tempfile as _tf\n_os.environ['GEMMA4_NB_CACHE'] = _tf.mkdtemp()\n"
              "%gemma config max_new_tokens=4 temperature=0")
    assert "max_new_tokens = 4" in out, out
    page.evaluate(WATCH_STATUS)
    box.fill("Say hi.")
    box.press("Enter")
    repacking = re.compile(r"loading · repacking gemma-3-270m\S*\.gguf as (int4|int8): ([1-9]\d?)% · \d+ s")
    expect(status).to_contain_text(repacking, timeout=120_000)  # part way, neither 0 nor 100
    page.screenshot(path=str(ARTIFACTS / "load-progress.png"))
    expect(sidebar.locator(".g4-assistant .g4-usage").last).to_contain_text("tokens/s", timeout=180_000)
    expect(status).to_contain_text(re.compile(r"ready · gemma-3-270m\S*\.gguf, GGUF \w+, cpu"))
    shown = page.evaluate("() => window.__g4_status")
    stages: dict[str, list[int]] = {}
    for text in shown:
        m = re.search(r"loading · (.+?): (\d+)%", text)
        if m:
            stages.setdefault(m.group(1), []).append(int(m.group(2)))
    repack = next((v for k, v in stages.items() if k.startswith("repacking")), [])
    assert len(set(repack)) >= 2 and repack == sorted(repack), stages  # it moved, never backwards
    assert any(k.startswith("loading weights") for k in stages), stages  # then the weights, counted
    last_loading = max(i for i, t in enumerate(shown) if t.startswith("loading"))
    assert any(t.startswith("ready") for t in shown[last_loading:]), shown[-5:]

    # ... and in a %%gemma cell's load line (the model cached now: the weights' stage, 0 to 100%)
    run("%gemma unload")
    expect(status).to_contain_text("not loaded", timeout=30_000)
    lines = page.evaluate(CELL_DISPLAYS, "%%gemma --max-new-tokens 2\nSay hi.")
    loads = [x for x in lines if x.startswith("*loading ")]
    weights = [int(m.group(1)) for x in loads if (m := re.search(r"loading weights \((?:int4|int8)\): (\d+)%", x))]
    assert weights and weights[0] == 0 and weights[-1] == 100 and weights == sorted(weights), lines
    assert any(re.fullmatch(r"\*loaded \S+\.gguf \(GGUF \w+, cpu\) in [\d.]+ s\*", x) for x in lines), lines

    # 2. the agent's approval on its cell: Run there; the cell runs in the notebook, the panel's
    #    buttons go
    n_cells = cells.count()
    run(AGENT + f"_agent({TOTALS!r}, 'north has 15.0 and south 20.0.')")
    sidebar.locator(".g4-agent").check()
    box.fill("Total revenue per region.")
    box.press("Enter")
    expect(cells).to_have_count(n_cells + 1, timeout=30_000)
    agent_cell = cells.nth(page.evaluate(CELL_INDEX, TOTALS))
    on_cell = agent_cell.locator(".g4-cell-approval")
    expect(on_cell).to_be_visible(timeout=30_000)
    expect(on_cell).to_contain_text("gemma4-nb: run this cell? (it was written by the model)")
    expect(sidebar.locator(".g4-approve")).to_have_count(1)  # the same question in the panel
    expect(agent_cell.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\s*\]"))  # nothing ran yet
    page.screenshot(path=str(ARTIFACTS / "approval-on-cell.png"))
    on_cell.locator(".g4-cell-run").click()
    expect(agent_cell.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\d+\]"), timeout=30_000)
    expect(agent_cell.locator(".jp-OutputArea-output")).to_contain_text("'north': 15.0, 'south': 20.0",
                                                                        timeout=30_000)
    expect(on_cell).to_have_count(0)
    expect(sidebar.locator(".g4-approve")).to_have_count(0)  # answered: the panel's buttons went
    expect(sidebar.locator(".g4-approval").last).to_contain_text("approved: it runs in the notebook")
    expect(sidebar.locator(".g4-assistant").last).to_contain_text("north has 15.0", timeout=30_000)
    expect(sidebar.locator(".g4-streaming")).to_have_count(0, timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "approval-on-cell-ran.png"))

    # 3. skipped from the cell: the code (it deletes a file) is not run, the file stays
    (root / "sales-backup.csv").write_text("region,revenue\nnorth,10\n")
    run(AGENT + f"_agent({REMOVE!r}, 'I did not delete it.')")
    box.fill("Delete the backup file.")
    box.press("Enter")
    expect(cells).to_have_count(n_cells + 2, timeout=30_000)
    skipped_cell = cells.nth(page.evaluate(CELL_INDEX, REMOVE))
    on_cell = skipped_cell.locator(".g4-cell-approval")
    expect(on_cell).to_contain_text("deletes", timeout=30_000)  # the safety check's reason, on the cell
    on_cell.locator(".g4-cell-skip").click()
    expect(on_cell).to_have_count(0)
    expect(sidebar.locator(".g4-approve")).to_have_count(0)
    expect(sidebar.locator(".g4-approval").last).to_contain_text("skipped: not run")
    expect(sidebar.locator(".g4-note").last).to_contain_text("the user did not approve it", timeout=30_000)
    expect(sidebar.locator(".g4-streaming")).to_have_count(0, timeout=30_000)
    expect(skipped_cell.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\s*\]"))  # never ran
    assert skipped_cell.locator(".jp-OutputArea-output").count() == 0
    assert (root / "sales-backup.csv").exists()
    page.wait_for_function(KERNEL_IDLE, timeout=30_000)
    assert run("print(_os.path.exists('sales-backup.csv'))").strip() == "True"
