"""The JupyterLab sidebar end to end: a real ``jupyter lab`` server on loopback, headless Chromium
(Debian's, driven by Playwright) with a fake microphone, a real kernel and the real embedded model.

Screenshots go to build/e2e/ (test artifacts).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "e2e"
CHROMIUM = os.environ.get("GEMMA4_NB_CHROMIUM", "/usr/bin/chromium")
TOKEN = "gemma4-nb-e2e"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext gemma4_nb\n%gemma config max_new_tokens=48 temperature=0"),
        nbformat.v4.new_code_cell("import pandas as pd\n"
                                  "sales = pd.DataFrame({'region': ['north', 'south', 'north'], 'revenue': [10.0, 20.0, 5.0]})"),
        nbformat.v4.new_code_cell("%gemma panel"),  # the ipywidgets panel, next to the sidebar
    ]
    nbformat.write(nb, path)


def serve(tmp_path, module: str, app_args: list[str]):
    """A Jupyter server (``python -m jupyterlab`` or ``python -m notebook``) on 127.0.0.1 serving
    tmp_path/root, with its own config, runtime, settings and workspace dirs."""
    root = tmp_path / "root"
    root.mkdir()
    write_notebook(root / "analysis.ipynb")
    port = free_port()
    settings = tmp_path / "settings"
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))  # no news toast over the sidebar
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"), JUPYTERLAB_SETTINGS_DIR=str(settings))
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}", *app_args],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
            if proc.poll() is not None:
                raise AssertionError((tmp_path / "server.log").read_text())
        else:
            raise AssertionError("the server did not start: " + (tmp_path / "server.log").read_text()[-3000:])
        yield url, root
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "server.log", ARTIFACTS / f"{module}-server.log")


@pytest.fixture
def notebook7(tmp_path):
    yield from serve(tmp_path, "notebook", ["--JupyterNotebookApp.expose_app_in_browser=True"])


def launch(p):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"])


KERNEL_IDLE = ("() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
               " return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
               " && w.sessionContext.session.kernel.status === 'idle'; }")


# The index of the notebook cell whose source is exactly the given code.
CELL_INDEX = ("(code) => window.jupyterapp.shell.currentWidget.content.widgets"
              ".findIndex(c => c.model.sharedModel.getSource() === code)")


def png_b64() -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 64), (250, 250, 250))
    ImageDraw.Draw(img).rectangle((16, 12, 80, 52), fill=(200, 30, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


PASTE = """([b64, name, mime, kind]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, { type: mime }));
  const target = document.querySelector('.g4-sidebar .g4-input');
  const ev = kind === 'paste'
    ? new ClipboardEvent('paste', { clipboardData: dt, bubbles: true, cancelable: true })
    : new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true });
  target.dispatchEvent(ev);
}"""


def test_sidebar_in_a_real_jupyter_lab_with_chromium(lab):
    from playwright.sync_api import expect, sync_playwright

    url, root = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        context = browser.new_context(viewport={"width": 1500, "height": 950})
        context.grant_permissions(["microphone"], origin=url)
        page = context.new_page()
        console: list[str] = []
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        try:
            _scenario(page, url, root, expect)
        finally:
            page.screenshot(path=str(ARTIFACTS / "final.png"))
            (ARTIFACTS / "console.log").write_text("\n".join(console))
            browser.close()


def _scenario(page, url, root, expect):
    page.goto(f"{url}/lab/tree/analysis.ipynb?token={TOKEN}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget", timeout=60_000)
    # the user's setup cells, run the way a user runs them
    page.wait_for_function(KERNEL_IDLE, timeout=90_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('.jp-Notebook .jp-InputPrompt'))"
        ".every(e => /\\[\\d+\\]/.test(e.textContent))", timeout=120_000)
    cells_before = page.locator(".jp-Notebook .jp-Cell").count()

    # open the sidebar from its tab in the right area
    page.locator(".lm-TabBar-tab[data-id='gemma4-nb-sidebar']").click()
    sidebar = page.locator(".g4-sidebar")
    expect(sidebar).to_be_visible()
    expect(sidebar.locator(".g4-status")).to_contain_text("not loaded", timeout=60_000)

    # empty message: a clear error, nothing sent
    sidebar.locator(".g4-send").click()
    expect(sidebar.locator(".g4-error").last).to_contain_text("the message is empty")

    # 1. a question: the model loads (status shows it), the reply streams in, tokens/s shown
    box = sidebar.locator(".g4-input")
    box.fill("Which region has the most revenue in sales?")
    box.press("Enter")
    reply = sidebar.locator(".g4-assistant").last
    expect(reply.locator(".g4-usage")).to_contain_text("tokens/s", timeout=180_000)
    assert reply.locator(".g4-text").inner_text().strip()
    expect(sidebar.locator(".g4-status")).to_contain_text("ready")
    page.screenshot(path=str(ARTIFACTS / "1-streamed-reply.png"))

    # 2. stop mid-generation: the reply ends "(stopped)" and the kernel keeps working
    page.evaluate("window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.requestExecute("
                  "{code: '%gemma config max_new_tokens=400', silent: true})")
    box.fill("Write a very long story about a dragon who learns pandas, chapter by chapter.")
    box.press("Enter")
    streaming = sidebar.locator(".g4-assistant.g4-streaming .g4-text")
    page.wait_for_function("() => { const e = document.querySelector('.g4-assistant.g4-streaming .g4-text');"
                           " return e && e.textContent.trim().length > 0; }", timeout=120_000)
    del streaming
    sidebar.locator(".g4-stop").click()
    stopped = sidebar.locator(".g4-assistant").last
    expect(stopped.locator(".g4-text")).to_contain_text("(stopped)", timeout=60_000)
    usage = stopped.locator(".g4-usage").inner_text()
    assert int(usage.split(" tokens")[0]) < 400, usage
    page.screenshot(path=str(ARTIFACTS / "2-stopped.png"))
    page.evaluate("window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.requestExecute("
                  "{code: '%gemma config max_new_tokens=48', silent: true})")

    # 3. an image pasted from the clipboard: a thumbnail chip; the text-only model says it cannot see it
    page.evaluate(PASTE, [png_b64(), "image.png", "image/png", "paste"])
    expect(sidebar.locator(".g4-chip-image img")).to_be_visible()
    # a dropped file of an unsupported type: a clear message, not attached
    page.evaluate(PASTE, [base64.b64encode(b"hello").decode(), "notes.txt", "text/plain", "drop"])
    expect(sidebar.locator(".g4-error").last).to_contain_text("notes.txt: unsupported attachment type")
    page.screenshot(path=str(ARTIFACTS / "3-pasted-image.png"))
    box.fill("What is in this picture?")
    box.press("Enter")
    expect(sidebar.locator(".g4-note").last).to_contain_text("image(s) not sent: this model has no vision encoder",
                                                             timeout=60_000)
    expect(sidebar.locator(".g4-user").last).to_contain_text("[image: pasted-1.png]")
    expect(sidebar.locator(".g4-assistant").last.locator(".g4-usage")).to_be_visible(timeout=120_000)

    # 4. a voice question from Chromium's fake microphone: recorded, sent as 16 kHz WAV, decoded by the kernel
    sidebar.locator(".g4-record").click()
    expect(sidebar.locator(".g4-record")).to_have_text("Stop recording")
    page.wait_for_timeout(1500)
    sidebar.locator(".g4-record").click()
    expect(sidebar.locator(".g4-chip-audio")).to_contain_text("recording-1.wav", timeout=20_000)
    box.fill("Answer the question in the recording.")
    box.press("Enter")
    expect(sidebar.locator(".g4-note").last).to_contain_text("audio clip(s) not sent: this model has no audio encoder",
                                                             timeout=60_000)
    expect(sidebar.locator(".g4-user").last).to_contain_text("[audio: recording-1.wav]")
    expect(sidebar.locator(".g4-assistant").last.locator(".g4-usage")).to_be_visible(timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "4-voice-question.png"))

    # 5. the agent: its steps show as they happen; it writes its cell below through the sidebar,
    #    asks before running it (approval "ask"; the code shown once, above the question), then runs
    #    it IN the notebook: the cell gets its execution count and its output under it
    sidebar.locator(".g4-agent").check()
    box.fill("Compute the total revenue per region.")
    box.press("Enter")
    approve = sidebar.locator(".g4-approve")
    expect(approve).to_be_visible(timeout=120_000)
    expect(sidebar.locator(".g4-step")).to_have_text("waiting for your approval…")
    code = sidebar.locator(".g4-code-turn .g4-code").last.inner_text()
    assert "sales" in code, code
    assert sidebar.locator(".g4-turn pre", has_text=code.splitlines()[0]).count() == 1  # shown once
    expect(page.locator(".jp-Notebook .jp-Cell")).to_have_count(cells_before + 1)  # the agent's cell, inserted
    index = page.evaluate(CELL_INDEX, code)
    agent_cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    expect(agent_cell.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\s*\]"))  # not run before the yes
    page.screenshot(path=str(ARTIFACTS / "5-agent-approval.png"))
    approve.click()
    expect(agent_cell.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\d+\]"), timeout=60_000)
    expect(agent_cell.locator(".jp-OutputArea-output").first).to_be_visible(timeout=60_000)
    # the agent read the cell's output back and answered (more approvals if it retried)
    for _ in range(3):
        done = sidebar.locator(".g4-assistant").last.locator(".g4-usage")
        try:
            expect(done).to_be_visible(timeout=120_000)
            break
        except AssertionError:
            if approve.is_visible():
                approve.click()
    expect(sidebar.locator(".g4-assistant").last.locator(".g4-usage")).to_be_visible()
    shown = agent_cell.locator(".jp-OutputArea-output").first.inner_text().strip().splitlines()[0]
    expect(sidebar.locator(".g4-note", has_text=shown).first).to_be_visible()  # what the agent read back
    # the user's own cells are untouched
    first = page.locator(".jp-Notebook .jp-Cell").nth(0).locator(".jp-InputArea").inner_text()
    assert "%load_ext gemma4_nb" in first
    page.screenshot(path=str(ARTIFACTS / "5-agent-ran-in-notebook.png"))
    page.screenshot(path=str(ARTIFACTS / "sidebar.png"))

    # 6. the ipywidgets panel (%gemma panel): a streamed reply, then Stop mid-generation
    widget = page.locator(".gemma4-nb-panel")
    widget.scroll_into_view_if_needed()
    widget.locator("textarea").fill("Name one region in sales.")
    widget.locator("button", has_text="Send").click()
    expect(widget.locator(".gemma4-usage")).to_have_count(1, timeout=120_000)
    page.evaluate("window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.requestExecute("
                  "{code: '%gemma config max_new_tokens=400', silent: true})")
    widget.locator("textarea").fill("Write a very long story about a dragon, chapter by chapter.")
    widget.locator("button", has_text="Send").click()
    stop = widget.locator("button", has_text="Stop")
    expect(stop).to_be_enabled(timeout=60_000)
    page.wait_for_function("() => { const b = Array.from(document.querySelectorAll('.gemma4-nb-panel .widget-html'))"
                           ".pop(); return b && b.textContent.replace('gemma', '').replace('…', '').trim().length > 0; }",
                           timeout=120_000)
    stop.click()
    expect(widget.locator(".widget-html", has_text="(stopped)")).to_have_count(1, timeout=60_000)
    expect(widget.locator(".gemma4-usage")).to_have_count(2, timeout=30_000)
    widget.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "6-widget-panel.png"))


def test_sidebar_in_notebook_7(notebook7):
    """The same extension in Notebook 7's right sidebar: connect, ask, a streamed reply."""
    from playwright.sync_api import expect, sync_playwright

    url, _ = notebook7
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            page.goto(f"{url}/notebooks/analysis.ipynb?token={TOKEN}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
            page.wait_for_function(KERNEL_IDLE, timeout=90_000)
            page.evaluate("window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.requestExecute("
                          "{code: '%load_ext gemma4_nb\\n%gemma config max_new_tokens=16 temperature=0', silent: true})")
            page.evaluate("window.jupyterapp.commands.execute('gemma4-nb:open-chat')")
            sidebar = page.locator(".g4-sidebar")
            expect(sidebar).to_be_visible()
            expect(sidebar.locator(".g4-status")).to_contain_text("not loaded", timeout=60_000)
            sidebar.locator(".g4-input").fill("Say hello.")
            sidebar.locator(".g4-input").press("Enter")
            expect(sidebar.locator(".g4-assistant .g4-usage")).to_contain_text("tokens/s", timeout=180_000)
            assert sidebar.locator(".g4-assistant .g4-text").inner_text().strip()
        finally:
            page.screenshot(path=str(ARTIFACTS / "notebook7.png"))
            browser.close()
