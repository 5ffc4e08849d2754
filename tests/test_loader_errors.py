"""Bad checkpoints and bad requests give one clear message each."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemma4_nb
from gemma4_nb.errors import (
    CheckpointError,
    ConfigError,
    ContextLengthError,
    ModelNotFoundError,
    PromptError,
    TokenizerError,
)


def test_missing_shard_names_the_file(hf_checkpoints, fresh_copy):
    path = fresh_copy(hf_checkpoints["a"][0])
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (path / shard).unlink()
    with pytest.raises(CheckpointError) as err:
        gemma4_nb.load(path, progress=False)
    assert shard in str(err.value) and "missing shard files" in str(err.value)


def test_wrong_shape_missing_and_unexpected_reported_together(hf_checkpoints, fresh_copy):
    path = fresh_copy(hf_checkpoints["b"][0])
    tensors = load_file(path / "model.safetensors")
    prefix = "model.language_model.layers.2."
    tensors[prefix + "mlp.up_proj.weight"] = torch.zeros(7, 96)
    del tensors[prefix + "self_attn.q_norm.weight"]
    tensors[prefix + "self_attn.extra.weight"] = torch.zeros(3)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        gemma4_nb.load(path, progress=False)
    msg = str(err.value)
    assert f"{prefix}mlp.up_proj.weight: checkpoint [7, 96], config expects [160, 96]" in msg
    assert f"missing (1):\n    {prefix}self_attn.q_norm.weight" in msg
    assert f"unexpected (1):\n    {prefix}self_attn.extra.weight" in msg


def test_truncated_shard_names_the_file(hf_checkpoints, fresh_copy):
    path = fresh_copy(hf_checkpoints["b"][0])
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weight shard is truncated or corrupt"):
        gemma4_nb.load(path, progress=False)


def test_garbage_shard_names_the_file(hf_checkpoints, fresh_copy):
    path = fresh_copy(hf_checkpoints["b"][0])
    (path / "model.safetensors").write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weight shard is truncated or corrupt"):
        gemma4_nb.load(path, progress=False)


def test_unknown_model_type_lists_supported(hf_checkpoints, fresh_copy):
    path = fresh_copy(hf_checkpoints["b"][0])
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"'llama' is not supported\. Supported model types: gemma3, gemma3_text, gemma4_unified, gemma4_unified_text"):
        gemma4_nb.load(path, progress=False)


def test_corrupt_config_and_missing_files(hf_checkpoints, fresh_copy):
    path = fresh_copy(hf_checkpoints["b"][0])
    (path / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        gemma4_nb.load(path, progress=False)
    (path / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="cannot be read as JSON"):
        gemma4_nb.load(path, progress=False)
    (path / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        gemma4_nb.load(path, progress=False)


def test_no_safetensors(hf_checkpoints, fresh_copy):
    path = fresh_copy(hf_checkpoints["b"][0])
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights found .*pytorch_model.bin"):
        gemma4_nb.load(path, progress=False)


def test_missing_directory():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        gemma4_nb.load("/nonexistent/gemma-4-12B-it")


def test_empty_prompt(tiny_dir):
    model = gemma4_nb.load(tiny_dir, progress=False)
    with pytest.raises(PromptError, match="empty"):
        model.generate("")
    with pytest.raises(PromptError, match="empty"):
        model.generate([])


def test_prompt_longer_than_context(tiny_dir):
    model = gemma4_nb.load(tiny_dir, progress=False, max_context=32)
    with pytest.raises(ContextLengthError, match=r"the prompt has 40 tokens but the context holds 32"):
        model.generate(list(range(2, 42)))
    with pytest.raises(ContextLengthError, match="2 to 512 tokens"):
        gemma4_nb.load(tiny_dir, progress=False, max_context=10_000)
    # the reply is clipped to what still fits
    model.generate(list(range(2, 30)), max_new_tokens=100, temperature=0)
    assert model.last_usage.prompt_tokens + model.last_usage.generated_tokens <= 32


def test_out_of_range_token_ids(tiny_dir):
    model = gemma4_nb.load(tiny_dir, progress=False)
    with pytest.raises(PromptError, match=r"token ids must be integers in \[0, 512\); got \[512, -1\]"):
        model.generate([2, 512, -1])


def test_bad_sampling_settings(tiny_dir):
    model = gemma4_nb.load(tiny_dir, progress=False)
    with pytest.raises(PromptError, match="top_p"):
        model.generate("hello", top_p=0.0)
    with pytest.raises(PromptError, match="temperature"):
        model.generate("hello", temperature=-1)
