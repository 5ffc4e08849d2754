"""Damaged weights and incomplete GGUF metadata are refused with a message that names the tensor or
the key, never loaded silently (NaN weights generate empty text) and never a raw traceback."""

from __future__ import annotations

import json

import pytest
import torch
from gguf import GGMLQuantizationType
from gguf_helpers import write_gguf
from safetensors.torch import load_file, save_file

import gemma4_nb
from gemma4_nb.errors import CheckpointError, ConfigError

LAYER = "model.language_model.layers.2."


def poison(path, name, value, index=5):
    """Write ``value`` (NaN or infinity) into tensor ``name`` of the checkpoint at ``path``."""
    index_file = path / "model.safetensors.index.json"
    shard = json.loads(index_file.read_text())["weight_map"][name] if index_file.exists() else "model.safetensors"
    tensors = load_file(path / shard)
    tensors[name].view(-1)[index] = value
    save_file(tensors, path / shard, metadata={"format": "pt"})
    return shard


@pytest.mark.parametrize("variant,name,value", [
    ("a", LAYER + "mlp.up_proj.weight", float("nan")),  # a sharded checkpoint
    ("b", LAYER + "self_attn.q_proj.weight", float("inf")),
    ("b", "model.language_model.norm.weight", float("-inf")),
    ("b", "model.language_model.embed_tokens.weight", float("nan")),
])
def test_nonfinite_safetensors_are_refused_by_name(hf_checkpoints, fresh_copy, variant, name, value):
    path = fresh_copy(hf_checkpoints[variant][0])
    shard = poison(path, name, value)
    with pytest.raises(CheckpointError) as err:
        gemma4_nb.load(path, progress=False)
    msg = str(err.value)
    assert f"tensor {name} holds 1 non-finite values" in msg and shard in msg and "damaged" in msg
    assert ("1 NaN" if value != value else "1 infinite") in msg


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_check_runs_whatever_the_load_dtype(hf_checkpoints, fresh_copy, dtype):
    path = fresh_copy(hf_checkpoints["b"][0])
    poison(path, LAYER + "mlp.down_proj.weight", float("nan"))
    with pytest.raises(CheckpointError, match=r"mlp\.down_proj\.weight holds 1 non-finite"):
        gemma4_nb.load(path, dtype=dtype, progress=False)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_nonfinite_weights_are_refused_while_quantization_streams_them_in(hf_checkpoints, fresh_copy, quant):
    path = fresh_copy(hf_checkpoints["b"][0])
    poison(path, LAYER + "mlp.gate_proj.weight", float("nan"), index=3000)
    with pytest.raises(CheckpointError, match=r"tensor model\.language_model\.layers\.2\.mlp\.gate_proj\.weight holds"):
        gemma4_nb.load(path, quant=quant, progress=False)


def test_a_saved_quantized_checkpoint_with_a_damaged_scale_is_refused(hf_checkpoints, tmp_path):
    model = gemma4_nb.load(hf_checkpoints["b"][0], quant="int8", progress=False)
    out = model.save_quantized(tmp_path / "q8")
    tensors = load_file(out / "model.safetensors")
    key = next(k for k in tensors if k.endswith(".qscales"))
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt", "gemma4_nb_quant": "int8",
                                                             "gemma4_nb_quant_version": "1"})
    with pytest.raises(CheckpointError, match=rf"{key[: -len('.qscales')]} \(scales\) holds 1 non-finite"):
        gemma4_nb.load(out, progress=False)


def finite_logits(model, ids) -> bool:
    logits = model.net.forward(torch.tensor(ids), model.net.new_cache(), outputs="all").logits
    return bool(torch.isfinite(logits).all())


def test_a_clean_checkpoint_still_loads(hf_checkpoints):
    model = gemma4_nb.load(hf_checkpoints["b"][0], progress=False)
    assert finite_logits(model, [1, 2, 3])


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A conversion cache of the test's own (the session's cache holds the embedded model only)."""
    monkeypatch.setenv("GEMMA4_NB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("name,qtype", [
    ("blk.1.attn_q.weight", GGMLQuantizationType.F32),
    ("blk.0.ffn_down.weight", GGMLQuantizationType.Q8_0),  # a NaN makes its block's scale NaN
    ("output_norm.weight", GGMLQuantizationType.F32),
])
def test_nonfinite_gguf_tensors_are_refused_by_their_gguf_name(tmp_path, own_cache, name, qtype):
    """Refused by the tensor's GGUF name at every load: a quantized file while it is repacked (no
    half-written repack is left in the cache), a float file as its tensors are read (they are read
    from the file at each load, so there is no weight cache to leave behind)."""
    path = tmp_path / "damaged.gguf"
    write_gguf(path, tensor_types={name: qtype}, nonfinite={name: float("nan")})
    for _ in range(2):
        with pytest.raises(CheckpointError,
                           match=rf"damaged\.gguf: tensor {name.replace('.', r'[.]')}( \(scales\))? holds \d+ non-finite"):
            gemma4_nb.load(path, progress=False)
    cached = list((own_cache / "gguf").glob("damaged-*/*.safetensors"))
    assert not cached  # no weights, checked or half-checked, are left in the cache


def test_an_intact_tiny_gguf_loads_and_its_repack_is_reused(tmp_path, own_cache):
    """A quantized GGUF is checked while it is repacked once; later loads take the repack (whose
    scales are checked again at each load, a small read: see
    test_a_saved_quantized_checkpoint_with_a_damaged_scale_is_refused)."""
    path = tmp_path / "fine.gguf"
    write_gguf(path, tensor_types={"blk.0.ffn_down.weight": GGMLQuantizationType.Q8_0})
    model = gemma4_nb.load(path, progress=False)
    assert model.config.num_layers == 2 and finite_logits(model, model.encode("the data"))
    shards = sorted(model.model_dir.glob("*.safetensors"))
    assert shards
    written = [p.stat().st_mtime_ns for p in shards]
    again = gemma4_nb.load(path, progress=False)
    assert again.model_dir == model.model_dir and [p.stat().st_mtime_ns for p in shards] == written


@pytest.mark.parametrize("key", [
    "gemma3.block_count", "gemma3.embedding_length", "gemma3.attention.head_count", "gemma3.feed_forward_length",
    "tokenizer.ggml.tokens",
])
def test_a_missing_gguf_metadata_key_is_named(tmp_path, own_cache, key):
    path = tmp_path / "incomplete.gguf"
    write_gguf(path, metadata={key: None})
    with pytest.raises(ConfigError) as err:
        gemma4_nb.load(path, progress=False)
    assert f"has no {key!r}" in str(err.value) and "incomplete.gguf" in str(err.value)


@pytest.mark.parametrize("key,value,expected", [
    ("gemma3.block_count", "two", "a whole number >= 1"),
    ("gemma3.block_count", 0, "a whole number >= 1"),
    ("gemma3.attention.head_count", -4, "a whole number >= 1"),
    ("gemma3.embedding_length", 64.5, "a whole number >= 1"),
    ("gemma3.rope.freq_base", "fast", "a finite number"),
    ("gemma3.rope.freq_base", float("nan"), "a finite number"),
    ("gemma3.attention.layer_norm_rms_epsilon", [1, 2], "a finite number"),
    ("gemma3.context_length", "long", "a whole number >= 1"),
    ("tokenizer.ggml.tokens", "abc", "a non-empty list of strings"),
    ("tokenizer.ggml.tokens", [1, 2, 3], "a non-empty list of strings"),
    ("tokenizer.ggml.eos_token_id", 100000, "a token id below the vocabulary size"),
    ("tokenizer.ggml.bos_token_id", -1, "a whole number >= 0"),
    ("tokenizer.ggml.unknown_token_id", "unk", "a whole number >= 0"),
    ("tokenizer.ggml.token_type", [1, 2], "an array of 278 token types"),
])
def test_an_ill_typed_gguf_metadata_key_is_named(tmp_path, own_cache, key, value, expected):
    path = tmp_path / "odd.gguf"
    write_gguf(path, metadata={key: value})
    with pytest.raises(ConfigError) as err:
        gemma4_nb.load(path, progress=False)
    assert f"GGUF metadata {key!r} should be {expected}" in str(err.value), str(err.value)
