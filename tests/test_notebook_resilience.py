"""The copilot keeps working on ordinary, untidy notebooks, in a real Jupyter kernel with a real
model: odd variables never break the context, a cell's flags apply to that cell, attachments are
checked, and every way back (the default model, a bad backend URL) works."""

from __future__ import annotations

import json
import wave

import numpy as np
import pytest
from gemma4_nb.notebook.context import build_context
from IPython.core.interactiveshell import InteractiveShell

from kernel_helpers import gemma_errors
from test_notebook_kernel import run_cells, text_of

ODD_VARIABLES = r'''
import pandas as pd, numpy as np
dup = pd.DataFrame([[1, 2.5, "x"], [3, None, "y"]], columns=["a", "a", "b"])
multi = pd.DataFrame(np.ones((2, 2)), columns=pd.MultiIndex.from_tuples([("g", "x"), ("g", "y")]))
escaped = pd.DataFrame({"name": [b"caf\xe9".decode("utf-8", "surrogateescape"), "ok"]})
class Hostile:
    @property
    def shape(self):
        raise ValueError("shape is broken")
    def __repr__(self):
        raise RuntimeError("repr is broken")
    def __len__(self):
        raise TypeError("len is broken")
hostile = Hostile()
class NoClass:
    @property
    def __class__(self):
        raise RuntimeError("class is broken")
noclass = NoClass()
deep = []
for _ in range(100000):
    deep = [deep]
text = "caf\udce9"
sales = pd.DataFrame({"region": ["n", "s"], "revenue": [1.0, 2.0]})
'''


@pytest.fixture
def odd_shell():
    sh = InteractiveShell.instance()
    sh.run_cell(ODD_VARIABLES)
    yield sh
    for name in ("dup", "multi", "escaped", "Hostile", "hostile", "NoClass", "noclass", "deep", "text", "sales"):
        sh.user_ns.pop(name, None)


def test_context_describes_what_it_can_and_notes_what_it_skipped(odd_shell):
    ctx = build_context(odd_shell, budget_tokens=100_000)
    text = ctx.render()
    assert "`dup`: DataFrame, 2 rows x 3 columns" in text
    assert "a: int64" in text and "a: float64, 1 nulls (a repeated column name)" in text
    assert "`multi`: DataFrame" in text and "`sales`: DataFrame" in text
    assert "- hostile: Hostile" in text  # type named, the broken shape and repr left out
    assert "- deep: list" in text
    assert "\ufffd" in text and not any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)  # lone surrogates replaced
    json.dumps(text).encode("utf-8")  # sendable to a server, encodable by a tokenizer


def test_the_agent_tools_survive_odd_variables(odd_shell):
    from gemma4_nb.backends.toolcalls import ToolCall
    from gemma4_nb.notebook.agent import Agent, AgentResult, AgentSettings
    from gemma4_nb.notebook.workspace import KernelWorkspace

    agent = Agent(None, KernelWorkspace(odd_shell), AgentSettings())
    listed, failed = agent.call_tool(ToolCall("list_variables", {}), AgentResult(""))
    assert not failed and "- hostile: Hostile" in listed and "- dup: DataFrame" in listed
    shown, _ = agent.call_tool(ToolCall("inspect_dataframe", {"name": "dup"}), AgentResult(""))
    assert "(a repeated column name)" in shown


def write_wav(path, seconds=0.5, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


@pytest.fixture(scope="module")
def endless_tiny(tmp_path_factory, tiny_dir):
    """The tiny checkpoint with its stop token taken away (every reply runs to max_new_tokens) and
    a context long enough for the agent's tool declarations."""
    import shutil

    path = tmp_path_factory.mktemp("endless") / "tiny"
    shutil.copytree(tiny_dir, path)
    for name, key in (("config.json", None), ("generation_config.json", "eos_token_id")):
        data = json.loads((path / name).read_text())
        if key:
            data[key] = [99999]
        else:
            data["text_config"].update(eos_token_id=99999, max_position_embeddings=4096)
        (path / name).write_text(json.dumps(data))
    return path


def test_an_untidy_notebook_in_a_real_kernel(endless_tiny, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "plot.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "notes.txt").write_text("hello")
    write_wav(tmp_path / "voice.wav")
    usage = ("from gemma4_nb.notebook.copilot import get_copilot\n_c = get_copilot(get_ipython())\n"
             "print('USAGE', _c.last_usage.generated_tokens, _c.sampling())")
    cells = run_cells([
        "%load_ext gemma4_nb",
        f"%gemma model {endless_tiny}\n%gemma config max_new_tokens=12",
        ODD_VARIABLES,
        "%gemma context",                                                       # 3
        "%%gemma\nWhat is in dup?",                                             # 4
        "%%gemma --agent --max-new-tokens 6\nSum the revenue.",                 # 5
        "%%gemma --max-new-tokens 3 --temperature 0.5 --no-draft\nShort, please.",  # 6
        usage,                                                                  # 7
        "%%gemma\nAnd now at the usual length.",                                # 8
        usage,                                                                  # 9
        "%gemma config",                                                        # 10
        "%%gemma --max-new-tokens 0\nhi",                                       # 11
        "%%gemma --temperature nan\nhi",                                        # 12
        "%gemma config temperature=nan",                                        # 13
        "%gemma config max_new_tokens=-3",                                      # 14
        "%%gemma --image missing.png\nWhat is this?",                           # 15
        "%%gemma --image broken.png\nWhat is this?",                            # 16
        "%%gemma --image notes.txt\nWhat is this?",                             # 17
        "%%gemma --audio missing.wav\nWhat is this?",                           # 18
        "%%gemma --max-new-tokens 4 --image plot.png --audio voice.wav\nWhat is this?",  # 19
        "import numpy as np\narr = np.zeros((4, 4, 3), dtype=np.uint8)",
        "%%gemma --max-new-tokens 4 --image arr\nAnd this array?",              # 21
        "%gemma history",                                                       # 22
        "%%gemma --max-new-tokens 4 'unclosed\nhi",                            # 23
        "%gemma backend localhost:8000",                                        # 24
        "%gemma config backend_url=localhost:9",                                # 25
        "%gemma backend",                                                       # 26
        "%%gemma --max-new-tokens 4\nStill local?",                             # 27
        "%gemma model default",                                                 # 28
        "%gemma model",                                                         # 29
        f"%gemma model {endless_tiny}\n%gemma model none\n%gemma model",        # 30
        "print(sales.revenue.sum(), dup.shape)",                                # 31
    ], tmp_path)
    out = [text_of(c) for c in cells]
    errors = [(i, o) for i, c in enumerate(cells) for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, errors  # no traceback anywhere: every problem is a message

    assert "`dup`: DataFrame, 2 rows x 3 columns" in out[3] and "- hostile: Hostile" in out[3]
    for i in (4, 5, 8):
        assert "Markdown" in out[i] or any(o.get("output_type") == "display_data" for o in cells[i].outputs), out[i]
    assert not gemma_errors(out[4] + out[5])

    # a cell's flags apply to that cell; the settings and the panels' sampling are untouched
    assert "USAGE 3 {'max_new_tokens': 12, 'draft': True}" in out[7]
    assert "USAGE 12 {'max_new_tokens': 12, 'draft': True}" in out[9]
    assert "max_new_tokens = 12" in out[10] and "temperature = None" in out[10]
    assert "max_new_tokens must be a whole number of at least 1, got 0" in out[11]
    assert "temperature must be a number >= 0" in out[12] and "temperature must be a number >= 0" in out[13]
    assert "max_new_tokens must be a whole number of at least 1, got -3" in out[14]

    # attachments: a missing or unreadable file is an error; a text-only model says what it did not send
    assert "--image missing.png: no such file, and no variable named 'missing.png'" in out[15]
    assert "--image broken.png:" in out[16] and "not an image format that can be read" in out[16]
    assert "--image notes.txt:" in out[17] and "unsupported image type .txt" in out[17]
    assert "--audio missing.wav: no such file" in out[18]
    assert "1 image(s) not sent: this model has no vision encoder" in out[19]
    assert "1 audio clip(s) not sent: this model has no audio encoder" in out[19]
    assert "1 image(s) not sent" in out[21]
    assert "with attachments" not in out[22] and "user: What is this?" in out[22]
    assert "close the quote" in out[23]

    # a bad backend URL is refused and not kept; the local model keeps answering
    assert "must start with http:// or https://; did you mean http://localhost:8000?" in out[24]
    assert "did you mean http://localhost:9?" in out[25]
    assert "local (the in-kernel model)" in out[26]
    assert any(o.get("output_type") == "display_data" for o in cells[27].outputs) and not gemma_errors(out[27])

    # the way back to the default model
    assert "back to the default" in out[28]
    assert "(default: $GEMMA4_NB_MODEL or the embedded Gemma 3 270M)" in out[29]
    assert out[30].strip().endswith("(default: $GEMMA4_NB_MODEL or the embedded Gemma 3 270M)")
    assert "3.0 (2, 3)" in out[31]  # the user's data is intact
