"""The agent's seat belt: code that deletes, moves or overwrites files, runs a shell, wipes the
user's variables, installs packages, reaches the network, or cannot be checked, asks before it
runs, in every spelling below; ordinary data-science code runs without a question.

The table is checked against the analysis (with a real IPython shell's transformation), then the
whole table runs through the agent in a real Jupyter kernel with ``approval auto``: every risky
spelling is asked about over the kernel's stdin (the test answers no) and has no effect, and every
harmless one runs without a question."""

from __future__ import annotations

import json
import queue
import time

import pytest
from IPython.core.interactiveshell import InteractiveShell

from gemma4_nb.notebook.code_safety import FILES, INSTALL, NAMESPACE, NETWORK, SHELL, UNCHECKABLE, analyse_code

# (code, the kind of finding it must raise). `data.csv`, `notes.txt` and the folder `results/`
# exist in the working directory; `new.csv` does not; `df` and `keep` are the user's variables.
RISKY = [
    # deleting, moving, overwriting files
    ('import os\nos.remove("data.csv")', FILES),
    ('from os import remove; remove("data.csv")', FILES),
    ('from os import remove as rm\nrm("data.csv")', FILES),
    ('import os as o\no.unlink("data.csv")', FILES),
    ('import os\nf = os.remove\nf("data.csv")', FILES),
    ('import os\ng = os\nh = g\nh.remove("data.csv")', FILES),
    ('import os\ngetattr(os, "remove")("data.csv")', FILES),
    ('__import__("os").remove("data.csv")', FILES),
    ('import importlib\nimportlib.import_module("os").remove("data.csv")', FILES),
    ('import sys\nsys.modules["os"].remove("data.csv")', FILES),
    ('import os\nvars(os)["remove"]("data.csv")', FILES),
    ('os.remove("data.csv")', FILES),  # `os` imported in an earlier cell
    ('from os import *\nremove("data.csv")', FILES),
    ('import os\nlist(map(os.remove, ["data.csv"]))', FILES),
    ('import os\nos.rename("data.csv", "old.csv")', FILES),
    ('import os\nos.replace("new.csv", "data.csv")', FILES),
    ('import os\nos.rmdir("results")', FILES),
    ('import shutil\nshutil.rmtree("results")', FILES),
    ('from shutil import rmtree\nrmtree("results", ignore_errors=True)', FILES),
    ('import shutil\nshutil.move("data.csv", "results/")', FILES),
    ('import shutil\nshutil.copy("new.csv", "data.csv")', FILES),
    ('import shutil as sh2\nsh2.copyfile("x", "notes.txt")', FILES),
    ('from pathlib import Path\nPath("data.csv").unlink()', FILES),
    ('import pathlib\npathlib.Path("data.csv").unlink(missing_ok=True)', FILES),
    ('from pathlib import Path\np = Path("results") / "a.csv"\np.unlink()', FILES),
    ('from pathlib import Path\nfor f in Path(".").glob("*.csv"):\n    f.unlink()', FILES),
    ('from pathlib import Path\nPath("data.csv").rename("old.csv")', FILES),
    ('from pathlib import Path\nPath("data.csv").write_text("")', FILES),
    ('from pathlib import Path\nPath("notes.txt").write_bytes(b"")', FILES),
    ('from pathlib import Path\nwith Path("data.csv").open("w") as f:\n    pass', FILES),
    ('open("data.csv", "w")', FILES),
    ('open("data.csv", "w").close()', FILES),
    ('with open("data.csv", mode="a") as f:\n    f.write("x")', FILES),
    ('open("notes.txt", "r+").truncate()', FILES),
    ('f = open("data.csv", "wb")', FILES),
    ('name = "data.csv"\nopen(name, "w")', FILES),
    ('import io\nio.open("data.csv", "w")', FILES),
    ('import codecs\ncodecs.open("data.csv", "w", "utf-8")', FILES),
    ('mode = input()\nopen("new.csv", mode)', FILES),  # a mode computed at run time
    ('def save(path):\n    open(path, "w").write("x")', FILES),  # a path computed at run time
    ('import os\nfd = os.open("data.csv", os.O_WRONLY | os.O_TRUNC)', FILES),
    ('df.to_csv("data.csv")', FILES),
    ('df.to_csv(path_or_buf="data.csv", index=False)', FILES),
    ('df.to_parquet("data.csv")', FILES),
    ('df.to_excel("notes.txt")', FILES),
    ('df.to_json(f"data.{\'csv\'}")', FILES),  # an f-string: the path cannot be worked out
    ('df.to_sql("sales", con, if_exists="replace")', FILES),
    ('import numpy as np\nnp.save("data.csv", [1, 2])', FILES),
    ('import numpy\nnumpy.savetxt("notes.txt", [1])', FILES),
    ('import matplotlib.pyplot as plt\nplt.savefig("data.csv")', FILES),
    ('import torch\ntorch.save({}, "data.csv")', FILES),
    ('import tarfile\ntarfile.open("x.tar").extractall()', FILES),
    ('import fileinput\nfor line in fileinput.input("data.csv", inplace=True):\n    print(line)', FILES),
    ('%%writefile data.csv\na,b\n', FILES),
    ('%rm data.csv', FILES),
    ('import send2trash\nsend2trash.send2trash("data.csv")', FILES),
    ('from pathlib import Path\nPath.write_text(Path("data.csv"), "")', FILES),
    ('from pathlib import Path\nw = Path.write_text\nw(Path("data.csv"), "")', FILES),
    ('x = __import__\nx("os").remove("data.csv")', FILES),
    ('import os\ncleanup = lambda: os.remove("data.csv")\ncleanup()', FILES),
    ('[__import__("shutil").rmtree(d) for d in ["results"]]', FILES),
    ('class T:\n    def __del__(self):\n        import os; os.remove("data.csv")', FILES),
    ('import functools, os\nfunctools.partial(os.remove, "data.csv")()', FILES),
    ('print("x", file=open("data.csv", "w"))', FILES),
    ('import pickle\npickle.dump(df, open("data.csv", "wb"))', FILES),
    ('import json\njson.dump({}, open("notes.txt", "w"))', FILES),
    # a shell or another program
    ('!ls', SHELL),
    ('!rm data.csv', SHELL),
    ('files = !ls', SHELL),
    ('%%bash\necho hi\n', SHELL),
    ('%%sh\necho hi\n', SHELL),
    ('%%script bash\necho hi\n', SHELL),
    ('%sx ls', SHELL),
    ('%system ls', SHELL),
    ('x = %sx ls', SHELL),
    ('get_ipython().system("ls")', SHELL),
    ('ip = get_ipython()\nip.system("ls")', SHELL),
    ('from IPython import get_ipython\nget_ipython().getoutput("ls")', SHELL),
    ('get_ipython().run_cell_magic("bash", "", "ls")', SHELL),
    ('get_ipython().run_line_magic("sx", "ls")', SHELL),
    ('import subprocess\nsubprocess.run(["ls"])', SHELL),
    ('import subprocess as sp\nsp.check_output("ls", shell=True)', SHELL),
    ('from subprocess import Popen\nPopen(["ls"])', SHELL),
    ('from subprocess import *\ncall(["ls"])', SHELL),
    ('import os\nos.system("ls")', SHELL),
    ('import os\nos.popen("ls").read()', SHELL),
    ('import os\nos.execvp("ls", ["ls"])', SHELL),
    ('import os\nos.spawnlp(os.P_WAIT, "ls", "ls")', SHELL),
    ('__import__("subprocess").run("ls")', SHELL),
    ('import asyncio\nasyncio.create_subprocess_shell("ls")', SHELL),
    ('import pty\npty.spawn("sh")', SHELL),
    ('%%python3\nprint(1)\n', SHELL),
    ('import os\nos.__dict__["system"]("ls")', SHELL),
    ('from os import system as run_it\nrun_it("ls")', SHELL),
    ('import os\nos.execl("/bin/ls", "ls")', SHELL),
    ('import threading, subprocess\nthreading.Thread(target=subprocess.run, args=(["ls"],)).start()', SHELL),
    # wiping or replacing the user's variables, ending the kernel
    ('%reset -f', NAMESPACE),
    ('reset -f', NAMESPACE),  # an automagic
    ('%reset_selective -f df', NAMESPACE),
    ('%xdel df', NAMESPACE),
    ('get_ipython().run_line_magic("reset", "-f")', NAMESPACE),
    ('get_ipython().reset()', NAMESPACE),
    ('del df', NAMESPACE),
    ('del keep, df', NAMESPACE),
    ('if True:\n    del df', NAMESPACE),
    ('def f():\n    global df\n    del df', NAMESPACE),
    ('globals().clear()', NAMESPACE),
    ('globals().update({"df": None})', NAMESPACE),
    ('globals()["df"] = None', NAMESPACE),
    ('del globals()["df"]', NAMESPACE),
    ('g = globals()\ng.pop("df")', NAMESPACE),
    ('get_ipython().user_ns.clear()', NAMESPACE),
    ('get_ipython().user_ns["df"] = 1', NAMESPACE),
    ('get_ipython().del_var("df")', NAMESPACE),
    ('import builtins\nbuiltins.print = None', NAMESPACE),
    ('exit()', NAMESPACE),
    ('quit()', NAMESPACE),
    ('import os\nos._exit(0)', NAMESPACE),
    ('import os, signal\nos.kill(os.getpid(), signal.SIGKILL)', NAMESPACE),
    ('locals().clear()', NAMESPACE),
    ('vars().update(df=None)', NAMESPACE),
    # installing packages
    ('%pip install requests', INSTALL),
    ('pip install requests', INSTALL),  # an automagic
    ('%pip uninstall -y pandas', INSTALL),
    ('%conda install numpy', INSTALL),
    ('!pip install requests', INSTALL),
    ('!python -m pip install requests', INSTALL),
    ('import subprocess, sys\nsubprocess.check_call([sys.executable, "-m", "pip", "install", "x"])', INSTALL),
    ('import pip\npip.main(["install", "x"])', INSTALL),
    ('from pip._internal.cli.main import main\nmain(["install", "x"])', INSTALL),
    ('import os\nos.system("pip install x")', INSTALL),
    ('cmd = "conda install -y x"\nimport os\nos.system(cmd)', INSTALL),
    ('%%bash\napt-get install -y curl\n', INSTALL),
    ('%pip install -q numpy', INSTALL),
    ('!conda install -y numpy', INSTALL),
    ('import sys, subprocess\nsubprocess.run(f"{sys.executable} -m pip install x", shell=True)', INSTALL),
    # reaching the network
    ('import requests\nrequests.get("https://example.com")', NETWORK),
    ('from requests import get\nget("http://example.com")', NETWORK),
    ('import urllib.request\nurllib.request.urlopen("http://x")', NETWORK),
    ('from urllib.request import urlretrieve as fetch\nfetch("ftp://x/y", "y")', NETWORK),
    ('import socket\nsocket.create_connection(("example.com", 80))', NETWORK),
    ('import socket as s\nc = s.socket()', NETWORK),
    ('import httpx\nhttpx.get("https://x")', NETWORK),
    ('import http.client\nhttp.client.HTTPSConnection("x")', NETWORK),
    ('import pandas as pd\npd.read_csv("https://example.com/data.csv")', NETWORK),
    ('url = "s3://bucket/key.parquet"\npd.read_parquet(url)', NETWORK),
    ('import seaborn as sns\nsns.load_dataset("tips")', NETWORK),
    ('from sklearn.datasets import fetch_openml\nfetch_openml("mnist_784")', NETWORK),
    ('import torchvision\ntorchvision.datasets.MNIST(".", download=True)', NETWORK),
    ('import webbrowser\nwebbrowser.open("x")', NETWORK),
    ('import ftplib\nftplib.FTP("x")', NETWORK),
    ('import smtplib\nsmtplib.SMTP("x")', NETWORK),
    ('!curl https://example.com', NETWORK),
    ('AutoModel.from_pretrained("bert-base-uncased")', NETWORK),
    ('import urllib.request as ur\nur.urlopen(address)', NETWORK),
    ('import requests as r\ns = r.Session()\ns.get(address)', NETWORK),
    # what the check cannot decide
    ('exec(input())', UNCHECKABLE),
    ('code = input()\nexec(code)', UNCHECKABLE),
    ('eval(compile(s, "x", "exec"))', UNCHECKABLE),
    ('import os\ngetattr(os, name)("data.csv")', UNCHECKABLE),
    ('__import__(name)', UNCHECKABLE),
    ('import importlib\nimportlib.import_module(mod)', UNCHECKABLE),
    ('import sys\nsys.modules[name]', UNCHECKABLE),
    ('().__class__.__base__.__subclasses__()', UNCHECKABLE),
    ('f.__globals__["df"] = 1', UNCHECKABLE),
    ('import ctypes\nctypes.CDLL(None)', UNCHECKABLE),
    ('import runpy\nrunpy.run_path("x.py")', UNCHECKABLE),
    ('%run other.py', UNCHECKABLE),
    ('%%javascript\nJupyter.notebook.delete_cells()\n', UNCHECKABLE),
    ('%some_unknown_magic x', UNCHECKABLE),
    ('get_ipython().run_line_magic(name, "")', UNCHECKABLE),
    ('get_ipython().run_cell(source)', UNCHECKABLE),
    ('def broken(:\n    pass', UNCHECKABLE),
    ('x = (' * 300 + '1' + ')' * 300, UNCHECKABLE),
    ('import operator\noperator.methodcaller(m)(obj)', UNCHECKABLE),
    ('getattr(__builtins__, "ev" + "al")("1")', UNCHECKABLE),
    ('import importlib\nm = importlib.import_module("o" + "s")', UNCHECKABLE),
    # risky code nested in code the check can read
    ('exec("import os; os.remove(\'data.csv\')")', FILES),
    ('src = "import shutil; shutil.rmtree(\'results\')"\nexec(src)', FILES),
    ('eval("__import__(\'os\').system(\'ls\')")', SHELL),
    ('%time os.remove("data.csv")', FILES),
    ('%timeit -n1 -r1 os.remove("data.csv")', FILES),
    ('%%time\nimport shutil\nshutil.rmtree("results")\n', FILES),
    ('%%capture out\n!ls\n', SHELL),
    ('get_ipython().run_cell("!rm data.csv")', SHELL),
    ('get_ipython().run_cell("%reset -f")', NAMESPACE),
]

HARMLESS = [
    'total = df["b"].sum()\ntotal',
    'import pandas as pd\nsummary = df.groupby("a").sum()',
    'df2 = df.rename(columns={"a": "x"}).replace(1, 2)',
    'text = "a,b".replace(",", ";")',
    'values = [1, 2, 3]\nvalues.remove(2)',
    'tmp = df.copy()\ndel tmp',
    'import os\nexists = os.path.exists("data.csv")',
    'from pathlib import Path\nsize = Path("data.csv").stat().st_size',
    'rows = open("data.csv").read()',
    'with open("data.csv", "r", encoding="utf-8") as f:\n    head = f.readline()',
    'import pandas as pd\nback = pd.read_csv("data.csv")',
    'df.to_csv("new.csv")',  # a new file
    'csv_text = df.to_csv()',
    'import io\nbuf = io.StringIO()\ndf.to_csv(buf)',
    'from pathlib import Path\nPath("new.txt").write_text("hello")',
    'with open("fresh.txt", "w") as f:\n    f.write("x")',
    'import numpy as np\nnp.save("new.npy", np.arange(3))',
    'import json\nencoded = json.dumps({"a": 1})',
    'from urllib.parse import quote\nq = quote("a b")',
    'import matplotlib\nmatplotlib.use("Agg")\nimport matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.close("all")',
    '%matplotlib inline',
    '%timeit -n1 -r1 sum(range(10))',
    '%%time\nsquares = [i * i for i in range(10)]\n',
    '%pip list',
    'import os\nhome = os.environ.get("HOME")',
    'def helper(x):\n    return x + 1\nresult = helper(2)',
    'import math\nfrom math import *\nroot = sqrt(4)',
    'name = "remove"\nmessage = f"{name} is a word"',
    'matches = df["a"].astype(str).str.extractall(r"(\\d)")',
    '"""Docs at https://example.com."""\nanswer = 42',
    'has_df = "df" in globals()',
]


@pytest.fixture(scope="module")
def shell():
    sh = InteractiveShell.instance()  # shared by every test in this process: the variables go at the end
    sh.run_cell("import os\nimport pandas as pd\ndf = pd.DataFrame({'a': [1, 2], 'b': [3.0, 4.0]})\nkeep = 1")
    yield sh
    for name in ("df", "keep"):
        sh.user_ns.pop(name, None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("work")
    (d / "data.csv").write_text("a,b\n1,2\n")
    (d / "notes.txt").write_text("notes")
    (d / "results").mkdir()
    (d / "results" / "a.csv").write_text("x")
    return d


def analyse(code, shell, workdir):
    return analyse_code(code, namespace=shell.user_ns, transform=shell.transform_cell, cwd=str(workdir))


@pytest.mark.parametrize("code,kind", RISKY, ids=[f"{k}-{i}" for i, (_, k) in enumerate(RISKY)])
def test_risky_spellings_are_found(code, kind, shell, workdir):
    a = analyse(code, shell, workdir)
    assert kind in a.kinds, (code, a.findings)
    assert a.reason().startswith("it ")


@pytest.mark.parametrize("code", HARMLESS, ids=range(len(HARMLESS)))
def test_harmless_code_has_no_findings(code, shell, workdir):
    a = analyse(code, shell, workdir)
    assert a.safe, (code, a.findings)


def test_without_a_namespace_or_shell_the_check_is_stricter(workdir):
    a = analyse_code("del df", cwd=str(workdir))  # whose df? unknown: asked
    assert NAMESPACE in a.kinds
    assert analyse_code("df = 1\ndel df", cwd=str(workdir)).safe  # made here, deleted here
    assert FILES in analyse_code('os.remove("x")', cwd=str(workdir)).kinds  # `os` by convention
    assert SHELL in analyse_code("!ls", cwd=str(workdir)).kinds  # IPython's own transformer


def test_the_reason_names_each_class_and_line(shell, workdir):
    a = analyse('import os\nos.remove("data.csv")\n!pip install x', shell, workdir)
    reason = a.reason()
    assert "deletes, moves or overwrites files: os.remove('data.csv') (line 2)" in reason
    assert "installs or removes packages" in reason and "runs a shell command" in reason


def test_a_misbehaving_object_in_the_namespace_does_not_break_the_check(workdir):
    class Hostile:
        @property
        def __class__(self):
            raise RuntimeError("no")

        def __getattr__(self, name):
            raise RuntimeError("no")

    a = analyse_code("x.unlink()\nx.to_csv('data.csv')", namespace={"x": Hostile()}, cwd=str(workdir))
    assert FILES in a.kinds


# -- through the agent, in a real kernel ---------------------------------------------------------

SCRIPTED = '''
import json as _json
from gemma4_nb.backends.base import Reply as _Reply
from gemma4_nb.backends.toolcalls import ToolCall as _ToolCall
from gemma4_nb.notebook.copilot import get_copilot as _get_copilot

class _ScriptedModel:
    """Writes one run_python call with the code it is given, then answers "done"."""
    supports_tools, supports_images, base_model = True, False, False

    def __init__(self):
        self.code, self.seen = None, []

    def complete(self, messages, *, tools=None, on_text=None, **kw):
        self.seen.append(messages[-1].get("content"))
        if self.code is not None:
            code, self.code = self.code, None
            return _Reply(text="", tool_calls=[_ToolCall("run_python", {"code": code}, id="c1")])
        return _Reply(text="done")

    def status(self):
        return "scripted"

_model = _ScriptedModel()
_c = _get_copilot(get_ipython())
_c.backend = _model
_c.settings.approval = "auto"
'''


class Kernel:
    """A real ipykernel driven over jupyter_client, answering its stdin (approval questions)."""

    def __init__(self, cwd) -> None:
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(cwd))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, answer: str = "n", timeout: float = 60) -> tuple[str, list[str]]:
        """Run a cell; return its printed and displayed text and the questions it asked."""
        msg_id = self.kc.execute(code, allow_stdin=True)
        text, asked, deadline = [], [], time.time() + timeout
        while time.time() < deadline:
            try:
                req = self.kc.get_stdin_msg(timeout=0.01)
                asked.append(req["content"]["prompt"])
                self.kc.input(answer)
            except queue.Empty:
                pass
            try:
                msg = self.kc.get_iopub_msg(timeout=0.05)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                return "\n".join(text), asked
            if kind == "stream":
                text.append(content["text"])
            elif kind in ("display_data", "update_display_data", "execute_result"):
                text.append(content["data"].get("text/markdown", "") or content["data"].get("text/plain", ""))
            elif kind == "error":
                text.append(f"{content['ename']}: {content['evalue']}")
        raise AssertionError(f"cell did not finish in {timeout} s: {code!r}")

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("kernel-cwd")
    k = Kernel(cwd)
    out, _ = k.run("%load_ext gemma4_nb\n" + SCRIPTED)
    assert "Error" not in out, out
    yield k, cwd
    k.close()


SETUP = '''
import os, shutil, pandas as pd
from pathlib import Path
os.chdir({cwd!r})
for _p in ("results", "old.csv", "y", "x.tar", "new.csv", "new.txt", "new.npy", "fresh.txt"):
    shutil.rmtree(_p, ignore_errors=True) if os.path.isdir(_p) else (os.path.exists(_p) and os.remove(_p))
Path("data.csv").write_text("a,b\\n1,2\\n"); Path("notes.txt").write_text("notes")
os.makedirs("results", exist_ok=True); Path("results/a.csv").write_text("x")
df = pd.DataFrame({{"a": [1, 2], "b": [3.0, 4.0]}}); keep = 1
'''
STATE = ('import json as _j, os as _o\nprint("STATE", _j.dumps([open("data.csv").read(), open("notes.txt").read(), '
         'sorted(_o.listdir("results")), "df" in globals(), "keep" in globals()]))')


def state(k) -> list:
    out, _ = k.run(STATE)
    return json.loads(out.split("STATE", 1)[1])


def agent_runs(k, code: str) -> tuple[str, list[str]]:
    k.run(f"_model.code = {code!r}")
    return k.run("%%gemma --agent\nplease do it")


def test_auto_approval_asks_before_every_risky_spelling_in_a_real_kernel(kernel):
    k, cwd = kernel
    k.run(SETUP.format(cwd=str(cwd)))
    before = state(k)
    assert before == ["a,b\n1,2\n", "notes", ["a.csv"], True, True]
    missed = []
    for code, kind in RISKY:
        out, asked = agent_runs(k, code)
        if len(asked) != 1 or "not run" not in out:
            missed.append((code, asked, out[-300:]))
            k.run(SETUP.format(cwd=str(cwd)))
            continue
        assert "Run it? [y/N]" in asked[0] and code.strip().splitlines()[0] in asked[0]
        after = state(k)
        if after != before:
            missed.append((code, "changed the state", after))
            k.run(SETUP.format(cwd=str(cwd)))
    assert not missed, missed
    # the model was told why, and that the user did not approve
    out, _ = k.run('print(_model.seen[-1])')
    assert "not run" in out and "the user did not approve it" in out


def test_auto_approval_runs_harmless_code_without_asking_in_a_real_kernel(kernel):
    k, cwd = kernel
    k.run(SETUP.format(cwd=str(cwd)))
    for code in HARMLESS:
        out, asked = agent_runs(k, code)
        assert not asked and "not run" not in out, (code, asked, out)
    out, _ = k.run('print(total, summary.shape, text, values, exists, rows.splitlines()[0], open("new.txt").read(), open("fresh.txt").read())')
    assert "7.0 (2, 1) a;b [1, 3] True a,b hello x" in out
    k.run(SETUP.format(cwd=str(cwd)))


def test_ask_mode_shows_what_the_code_does_and_runs_it_on_yes(kernel):
    k, cwd = kernel
    k.run(SETUP.format(cwd=str(cwd)))
    k.run('_c.settings.approval = "ask"')
    try:
        k.run('_model.code = "import os\\nos.remove(\'notes.txt\')"')
        out, asked = k.run("%%gemma --agent\nremove the notes", answer="y")
        assert len(asked) == 1 and "deletes, moves or overwrites files" in asked[0]
        out, _ = k.run("import os as _o\nprint('EXISTS', _o.path.exists('notes.txt'))")
        assert "EXISTS False" in out  # answered yes: it ran
    finally:
        k.run(SETUP.format(cwd=str(cwd)) + '\n_c.settings.approval = "auto"')


def test_without_a_way_to_ask_risky_code_is_reported_not_run(tmp_path):
    from test_notebook_kernel import run_cells, text_of

    (tmp_path / "data.csv").write_text("keep me")
    cells = run_cells(["%load_ext gemma4_nb\n" + SCRIPTED,
                       "_model.code = 'open(\"data.csv\", \"w\").close()'",
                       "%%gemma --agent\nempty the file",
                       "print(open('data.csv').read())"], tmp_path)
    out = text_of(cells[2])
    assert "cannot ask" in out and "not run" in out and "deletes, moves or overwrites files" in out
    assert "keep me" in text_of(cells[3])
