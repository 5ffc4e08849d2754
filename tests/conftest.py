"""Shared fixtures: tiny random Gemma 4 checkpoints written by transformers (the reference).

No test touches the network: the hub is forced offline before anything imports it.
"""

from __future__ import annotations

import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from gemma4_nb.devtools.tiny import write_tokenizer

# Three shapes: window shorter than every test prompt, K=V full layers, head_dim differing
# between sliding and full layers, sharded and single-file weights, KV sharing, no softcap.
VARIANTS = {
    "a": dict(
        text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                  num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
                  final_logit_softcapping=30.0, max_position_embeddings=512),
        shard="60KB",
    ),
    "b": dict(
        text=dict(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=8,
                  num_attention_heads=6, num_key_value_heads=3, head_dim=24, global_head_dim=48,
                  num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=5,
                  final_logit_softcapping=20.0, max_position_embeddings=1024,
                  layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"],
                  rope_parameters={
                      "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0},
                      "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 200000.0},
                  }),
        shard=None,
    ),
    "c": dict(
        text=dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=32, global_head_dim=64,
                  attention_k_eq_v=False, sliding_window=12, final_logit_softcapping=None,
                  num_kv_shared_layers=2, use_double_wide_mlp=True, max_position_embeddings=512,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                               "full_attention", "sliding_attention", "full_attention"]),
        shard=None,
    ),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every weight (norms and layer scalars too) a distinct random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))


@pytest.fixture(scope="session", autouse=True)
def conversion_cache(tmp_path_factory):
    """GGUF conversions go to a per-session directory, never the user's ~/.cache."""
    path = tmp_path_factory.mktemp("gemma4nb-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("GEMMA4_NB_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(path, 512)
    return path


def make_hf_checkpoint(out_dir, variant: str, tokenizer_dir, seed: int = 0):
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    spec = VARIANTS[variant]
    cfg = Gemma4UnifiedConfig(text_config=dict(spec["text"]), vision_config=None, audio_config=None)
    torch.manual_seed(seed)
    model = Gemma4UnifiedForConditionalGeneration(cfg).eval()
    randomize_(model, seed)
    kwargs = {"max_shard_size": spec["shard"]} if spec["shard"] else {}
    model.save_pretrained(out_dir, **kwargs)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out_dir / f.name)
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory, tokenizer_dir):
    """variant -> (checkpoint directory, the transformers model that wrote it)."""
    out = {}
    for name in VARIANTS:
        path = tmp_path_factory.mktemp(f"ckpt_{name}")
        out[name] = (path, make_hf_checkpoint(path, name, tokenizer_dir, seed=ord(name)))
    return out


@pytest.fixture(scope="session")
def tiny_dir(hf_checkpoints):
    """A small checkpoint for tests that need any working model."""
    return hf_checkpoints["a"][0]


@pytest.fixture
def fresh_copy(tmp_path):
    """Copy a checkpoint directory so a test may damage it."""

    def copy(src):
        dst = tmp_path / "ckpt"
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture
def lab(tmp_path):
    """A real JupyterLab server (test_browser_e2e.serve) for the browser tests: ``(url, root)``."""
    from test_browser_e2e import serve

    yield from serve(tmp_path, "jupyterlab", ["--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
                                              "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"])
