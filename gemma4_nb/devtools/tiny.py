"""Tiny random Gemma 4 checkpoints in the official Hugging Face layout.

For smoke tests, demos on a machine without real weights, and test fixtures: ``config.json``
(``gemma4_unified``), ``model.safetensors`` with random weights under the official tensor names,
``generation_config.json``, and a small byte-fallback BPE tokenizer trained here with Gemma 4's
special tokens, plus the Gemma 4 turn-format chat template. The text it generates is noise.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from ..runtime.checkpoint import expected_tensors
from ..runtime.config import parse_config

SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>",
    "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>',
    "<|image|>", "<|audio|>", "<|image>", "<image|>", "<|audio>", "<audio|>",
]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

_CORPUS = """
import pandas as pd
import numpy as np
import matplotlib.pyplot as plt
df = pd.read_csv("sales.csv")
df.groupby("region")["revenue"].sum().sort_values(ascending=False)
df["growth"] = df.groupby("region")["revenue"].pct_change()
df.describe()
df.head(10)
df.plot(x="date", y="revenue", kind="line")
plt.show()
The quick brown fox jumps over the lazy dog. Grouped-query attention shares each key and value
head among several query heads, which keeps the cache small. Explain the result in two lines.
Which region had the highest revenue growth last quarter? Plot it.
def mean(values):
    return sum(values) / len(values)
for i in range(10):
    print(i, i * i)
"""


def build_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A byte-fallback BPE tokenizer with Gemma 4's special tokens at fixed low ids (pad 0, eos 1, bos 2)."""
    tok = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Training with the byte tokens listed as special reserves their ids right after the control
    # tokens; they are then turned back into ordinary vocabulary so decoding keeps them.
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + BYTE_TOKENS, show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True) * 4, trainer)
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)])
    return tok
    return tok


def chat_template() -> str:
    return resources.files("gemma4_nb").joinpath("data/gemma4_chat_template.jinja").read_text(encoding="utf-8")


def write_tokenizer(out_dir: Path, vocab_size: int = 512) -> Tokenizer:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos_token": True, "model_max_length": 1_000_000,
        "extra_special_tokens": {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                                 "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"},
    }, indent=2))
    (out_dir / "chat_template.jinja").write_text(chat_template(), encoding="utf-8")
    return tok


def tiny_config(**text_overrides) -> dict:
    """A ``gemma4_unified`` config.json dict with a tiny text model (overridable)."""
    text = {
        "model_type": "gemma4_unified_text",
        "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "sliding_window": 16, "final_logit_softcapping": 30.0,
        "attention_k_eq_v": True, "num_kv_shared_layers": 0, "use_double_wide_mlp": False,
        "use_bidirectional_attention": "vision", "tie_word_embeddings": True,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
    }
    global_head_dim = text_overrides.pop("global_head_dim", 32)
    num_global_kv = text_overrides.pop("num_global_key_value_heads", 1)
    text.update(text_overrides)
    n = text["num_hidden_layers"]
    text.setdefault("layer_types", ["full_attention" if (i + 1) % 6 == 0 or i == n - 1 else "sliding_attention" for i in range(n)])
    override = {"head_dim": global_head_dim}
    if text["attention_k_eq_v"]:
        override["num_key_value_heads"] = num_global_kv
    text["per_layer_config"] = {str(i): override for i, t in enumerate(text["layer_types"]) if t == "full_attention"}
    return {"model_type": "gemma4_unified", "architectures": ["Gemma4UnifiedForConditionalGeneration"],
            "text_config": text, "vision_config": None, "audio_config": None, "tie_word_embeddings": True}


def random_weights(config: dict, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Random tensors under the official names; norms and layer scalars jittered around 1."""
    cfg = parse_config(config)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_tensors(cfg).items():
        if name.endswith("norm.weight") or name.endswith("layer_scalar"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[name] = std * torch.randn(shape, generator=gen)
    return out


def write_tiny_checkpoint(out_dir: Path, seed: int = 0, **text_overrides) -> Path:
    """Write a complete tiny random checkpoint (weights, config, tokenizer, template) to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_config(**text_overrides)
    tok = write_tokenizer(out_dir, config["text_config"]["vocab_size"])
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_weights(config, seed), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 2, "pad_token_id": 0, "eos_token_id": [1, tok.token_to_id("<turn|>")],
        "do_sample": True, "temperature": 1.0, "top_k": 64, "top_p": 0.95,
    }, indent=2))
    return out_dir
