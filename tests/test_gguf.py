"""GGUF loading: the embedded Gemma 3 270M against transformers 5.23, and bad files."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from gguf_helpers import write_gguf

import gemma4_nb
from gemma4_nb.errors import CheckpointError, ConfigError
from gemma4_nb.runtime.generation import GenerationRequest, Usage, generate_ids
from gemma4_nb.runtime.gguf_file import GGUFFile
from gemma4_nb.runtime.resolve import embedded_model

PROMPTS = [
    "The history of the printing press begins in",  # prose
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",  # Python
    "import pandas as pd\n\ndf = pd.read_csv(\"sales.csv\")\n# total revenue per region, largest first\n",  # pandas
    "# Find rows with missing values in the 'price' column\nmissing = df[df[",  # pandas
    "Gradient descent updates the parameters by",  # prose
]


@pytest.fixture(scope="session")
def gguf_cache(conversion_cache):
    """The session's conversion cache (conftest): CI converts from scratch."""
    return conversion_cache


@pytest.fixture(scope="session")
def embedded(gguf_cache):
    """The file's blocks dequantized to fp32, as transformers reads them (the reference)."""
    return gemma4_nb.load(embedded_model(), device="cpu", quant="fp32", progress=False)


@pytest.fixture(scope="session")
def reference():
    from transformers import AutoModelForCausalLM

    path = embedded_model()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_config_from_gguf_metadata(embedded):
    cfg = embedded.config
    assert cfg.model_type == "gemma3_text" and cfg.family.name == "gemma3"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.vocab_size) == (18, 640, 4, 262144)
    assert [s.kind for s in cfg.layers].count("full") == 3 and cfg.layers[5].kind == "full"
    assert {s.num_kv_heads for s in cfg.layers} == {1} and {s.head_dim for s in cfg.layers} == {256}
    assert cfg.layers[0].window == 512 and cfg.query_scale == 256 ** -0.5
    assert cfg.layers[5].rope.theta == 1e6 and cfg.layers[0].rope.theta == 1e4


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_logits_match_transformers(prompt, embedded, reference):
    ids = embedded.encode(prompt)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids])).logits[0]
    got = embedded.net.forward(torch.tensor(ids), embedded.net.new_cache(), outputs="all").logits
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-3, f"max |logit difference| {diff:.2e}"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_64_greedy_tokens_match_transformers(prompt, embedded, reference):
    ids = embedded.encode(prompt)
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, pad_token_id=0,
                                 eos_token_id=None)
    expected = out[0, len(ids):].tolist()
    req = GenerationRequest(prompt_ids=ids, max_new_tokens=64)  # no stop tokens: all 64 compared
    assert list(generate_ids(embedded.net, req, embedded.max_context, Usage())) == expected


def test_tokenizer_matches_transformers_gguf_conversion(embedded):
    from transformers import AutoTokenizer

    path = embedded_model()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = PROMPTS + ["naïve café – 数据 🙂  two  spaces\n\n\tTab", "<start_of_turn>user\nhi<end_of_turn>\n"]
    for text in texts:
        assert embedded.tokenizer.encode(text, add_special_tokens=True) == ref.encode(text), text
        ids = ref.encode(text)
        assert embedded.tokenizer.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_default_keeps_the_files_blocks_and_is_cached(gguf_cache):
    """By default the Q4_K_M file loads as int4 (its Q4_K blocks as they are; its wider Q6_K/Q5_0/
    Q8_0 tensors as int8), repacked once into a cache directory that later loads memory-map; an
    fp32 load dequantizes from the file and caches only the config and tokenizer."""
    from gemma4_nb.kernels.qweight import QWeight, to_planes

    model = gemma4_nb.load(embedded_model(), progress=False)
    assert model.quant == "int4" and isinstance(model.net.weights["layers.0.mlp.gate_proj.weight"], QWeight)
    packed = model.model_dir / "model.safetensors"
    assert packed.stat().st_size < embedded_model().stat().st_size * 1.5  # about the file's size, never fp32
    stamp = packed.stat().st_mtime_ns
    again = gemma4_nb.load(embedded_model(), progress=False)
    assert again.model_dir == model.model_dir and packed.stat().st_mtime_ns == stamp
    head = again.net.lm_head  # the int8 head, stored by the repack in the decoder's nibble planes
    split = to_planes(QWeight("int8", head.int8_codes(), head.scales, None, head.shape))
    assert head.planes and all(torch.equal(a, b) for a, b in
                               ((split.codes, head.codes), (split.low, head.low), (split.row_err, head.row_err)))
    plain = gemma4_nb.load(embedded_model(), quant="fp32", progress=False)
    assert plain.quant is None and not list(plain.model_dir.glob("*.safetensors"))


def test_default_model_is_embedded_with_one_notice(tmp_path, gguf_cache):
    code = (
        "import gemma4_nb\n"
        "m = gemma4_nb.load(progress=False)\n"
        "m2 = gemma4_nb.load(progress=False)\n"
        "print(m.config.model_type, m.config.num_layers)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "GEMMA4_NB_MODEL"}
    env["GEMMA4_NB_CACHE"] = str(gguf_cache)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "gemma3_text 18"
    assert res.stderr.count("no model configured, using the embedded Gemma 3 270M") == 1
    assert "GEMMA4_NB_MODEL=google/gemma-4-12B-it" in res.stderr


# -- bad and unusual files ---------------------------------------------------------------------

def test_truncated_gguf_names_the_file(tmp_path):
    src = embedded_model()
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(src.stat().st_size // 3))
    with pytest.raises(CheckpointError, match=r"cut\.gguf: the file is truncated"):
        gemma4_nb.load(bad, progress=False)
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 5)
    with pytest.raises(CheckpointError, match=r"cut\.gguf: the GGUF header is truncated or corrupt"):
        gemma4_nb.load(bad, progress=False)
    bad.write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        gemma4_nb.load(bad, progress=False)


def test_unknown_architecture(tmp_path):
    write_gguf(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(ConfigError, match=r"GGUF architecture 'llama' is not supported\. Supported: gemma3"):
        gemma4_nb.load(tmp_path / "llama.gguf", progress=False)


def test_unsupported_tensor_type(tmp_path):
    write_gguf(tmp_path / "q81.gguf", tensor_types={"blk.1.ffn_up.weight": GGMLQuantizationType.Q8_1})
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_up\.weight is stored as Q8_1.*supported: F32, F16, BF16, Q8_0"):
        gemma4_nb.load(tmp_path / "q81.gguf", progress=False)


def test_f16_bf16_q8_0_tensors_dequantize_like_gguf(tmp_path):
    types = {"blk.0.attn_q.weight": GGMLQuantizationType.F16, "blk.0.ffn_gate.weight": GGMLQuantizationType.BF16,
             "token_embd.weight": GGMLQuantizationType.Q8_0}
    values = write_gguf(tmp_path / "mixed.gguf", tensor_types=types)
    g = GGUFFile(tmp_path / "mixed.gguf")
    for name, qtype in types.items():
        got = g.tensor(g.tensors[name]).numpy()
        expected = dequantize(quantize(values[name], qtype), qtype) if qtype != GGMLQuantizationType.F16 \
            else values[name].astype(np.float16).astype(np.float32)
        assert got.shape == values[name].shape
        np.testing.assert_array_equal(got, expected)
    model = gemma4_nb.load(tmp_path / "mixed.gguf", progress=False)  # the whole tiny model loads and runs
    assert model.generate([2, 263, 264], max_new_tokens=4, temperature=0) is not None
    norm = model.net.weights["norm.weight"]
    assert torch.allclose(norm + 1, torch.from_numpy(values["output_norm.weight"]))  # GGUF stores 1 + w


def test_directory_with_one_gguf(tmp_path, gguf_cache):
    shutil.copy(embedded_model(), tmp_path / "model.gguf")
    model = gemma4_nb.load(tmp_path, progress=False)
    assert model.config.model_type == "gemma3_text"


def test_int8_kv_keeps_greedy_tokens_of_the_real_model(embedded):
    from gemma4_nb.devtools.workload import AGREEMENT_TEXT
    from gemma4_nb.runtime.kv_cache import PrefixCache

    net = embedded.net
    ids = embedded.encode(AGREEMENT_TEXT * 3)[:512]
    full = net.forward(torch.tensor(ids), net.new_cache(), outputs="all").logits
    int8 = net.forward(torch.tensor(ids), net.new_cache(kv_dtype="int8"), outputs="all").logits
    agreement = (full.argmax(-1) == int8.argmax(-1)).float().mean().item()
    assert agreement >= 0.95, f"teacher-forced top-1 agreement {agreement:.3f}"  # measured 0.969
    runs = []
    for kv_dtype in (None, "int8"):
        prefix = PrefixCache(lambda: net.new_cache(kv_dtype=kv_dtype))
        req = GenerationRequest(prompt_ids=ids, max_new_tokens=64)
        runs.append(list(generate_ids(net, req, embedded.max_context, Usage(), prefix=prefix)))
    assert runs[0] == runs[1]


def test_base_model_is_asked_with_a_plain_question_and_answer_prompt(gguf_cache, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    from gemma4_nb.notebook.copilot import Copilot

    monkeypatch.delenv("GEMMA4_NB_MODEL", raising=False)
    shell = InteractiveShell.instance()
    shell.run_cell("import pandas as pd\nsales = pd.DataFrame({'region': ['north', 'south'], 'revenue': [3.0, 5.0]})")
    copilot = Copilot(shell)
    copilot.settings.max_new_tokens, copilot.settings.temperature = 24, 0.0
    pieces = []
    result = copilot.ask("Which region has the most revenue?", on_text=pieces.append)
    assert copilot.model.tokenizer.base_model and copilot.backend.base_model  # a GGUF without a chat template
    assert "You are gemma4-nb" not in result.answer  # no echo of a chat prompt the model was never tuned on
    assert "".join(pieces).strip() == result.answer
    prompt = copilot.prepare("And the least?").text
    assert "`sales`: DataFrame" in prompt and "Question: Which region has the most revenue?" in prompt
    assert prompt.endswith("Question: And the least?\nAnswer:")
    # a cell runs, the next question carries what changed and reuses the whole first prompt
    first = copilot.last_usage
    shell.run_cell("sales['units'] = [7, 9]", store_history=True)
    copilot.ask("How many units in total?")
    second = copilot.last_usage
    assert second.cached_tokens >= first.prompt_tokens, (first, second)
    assert "Notebook changes:\n## New cells\n```python\nsales['units'] = [7, 9]" in copilot.prepare("?").text


def test_cli_asks_a_base_model_with_a_plain_prompt(gguf_cache):
    env = {k: v for k, v in __import__("os").environ.items() if k != "GEMMA4_NB_MODEL"}
    res = subprocess.run([sys.executable, "-m", "gemma4_nb", "generate", "--max-new-tokens", "24", "--temperature", "0",
                          "Explain what a pandas DataFrame is."], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Explain what a pandas DataFrame is" not in res.stdout  # a chat prompt it was never tuned on made it echo
