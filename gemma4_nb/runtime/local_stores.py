"""Models already on this machine in other tools' stores: Ollama's manifests and blobs, LM Studio's
model folders, the Hugging Face cache. Read only: nothing is downloaded, moved or written there.

Ollama (``ollama:<name>[:<tag>]``, the name as ``ollama pull`` takes it): a manifest at
``<store>/manifests/<host>/<namespace>/<model>/<tag>`` (defaults ``registry.ollama.ai``,
``library``, ``latest``) lists layers by media type and sha256 digest; the model layer
(``application/vnd.ollama.image.model``) is a GGUF file at ``<store>/blobs/sha256-<hex>``, the
projector layer (``application/vnd.ollama.image.projector``) the vision/audio file. The store is
``$OLLAMA_MODELS``, else ``~/.ollama/models`` (and the Linux service's
``/usr/share/ollama/.ollama/models``). A blob is checked against its manifest: its size every time,
its sha256 once (remembered by size and modification time in gemma4-nb's cache).

LM Studio (``lmstudio:<publisher>/<repo>`` or a bare ``<publisher>/<repo>`` that is not in the
Hugging Face cache): ``<models>/<publisher>/<repo>/*.gguf``, with ``mmproj*.gguf`` beside the model
as its projector; ``<models>`` is ``downloadsFolder`` of LM Studio's ``settings.json`` when set,
``~/.lmstudio/models``, or the older ``~/.cache/lm-studio/models``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, ModelNotFoundError

OLLAMA_PREFIX = "ollama:"
LMSTUDIO_PREFIX = "lmstudio:"
OLLAMA_ENV = "OLLAMA_MODELS"
OLLAMA_HOST, OLLAMA_NAMESPACE, OLLAMA_TAG = "registry.ollama.ai", "library", "latest"
OLLAMA_MODEL_MEDIA = "application/vnd.ollama.image.model"
OLLAMA_PROJECTOR_MEDIA = "application/vnd.ollama.image.projector"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class LocalModel:
    """One model found in a store: what to pass to ``load()``, its files, size and format."""

    store: str  # "ollama", "lmstudio" or "hf"
    ref: str  # what load() takes: "ollama:gemma4:12b", "lmstudio:pub/repo", "google/gemma-4-12B-it"
    path: Path  # the GGUF file (an Ollama blob) or the model directory
    projector: Path | None = None  # the mmproj GGUF (images, audio), when there is one
    size: int = 0  # bytes on disk, the projector included
    format: str = ""  # "GGUF Q4_K_M (gemma4)", "safetensors (gemma4)"...


def _is_dir(path: Path) -> bool:
    """``Path.is_dir`` that is False, not an error, behind a folder this user cannot read (the
    Linux service's Ollama store is the ``ollama`` user's own)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def is_gguf(path: Path) -> bool:
    """A GGUF file by its name or, for blobs without one (Ollama's), by its first bytes."""
    path = Path(path)
    if not _is_file(path):
        return False
    if path.suffix == ".gguf":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_format(path: Path) -> str:
    """``GGUF <file type> (<architecture>)`` from the file's header, or why it cannot be read."""
    from gguf import LlamaFileType

    from .gguf_file import GGUFFile

    try:
        meta = GGUFFile(path).metadata
    except CheckpointError as exc:
        return f"unreadable GGUF ({str(exc).removeprefix(str(path) + ': ')})"
    arch = meta.get("general.architecture", "?")
    ftype = meta.get("general.file_type")
    try:
        kind = " " + LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        kind = "" if ftype is None else f" file type {ftype}"
    return f"GGUF{kind} ({arch})"


# -- Ollama ------------------------------------------------------------------------------------

def ollama_stores() -> list[Path]:
    """Where Ollama keeps models: ``$OLLAMA_MODELS`` alone when set, else the user's and the Linux
    service's default stores."""
    env = os.environ.get(OLLAMA_ENV)
    if env:
        return [Path(env).expanduser()]
    return [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def _ollama_parts(name: str) -> tuple[str, str, str, str]:
    """``[host/][namespace/]model[:tag]`` with Ollama's defaults filled in."""
    head, sep, tail = name.rpartition(":")
    base, tag = (head, tail) if sep and "/" not in tail else (name, "")
    parts = base.split("/")
    if not name or not all(parts) or len(parts) > 3 or (sep and not tag and "/" not in tail) or ".." in name:
        raise ModelNotFoundError(f"{OLLAMA_PREFIX}{name} is not an Ollama model name: use ollama:<name>[:<tag>], "
                                 "e.g. ollama:gemma4:12b")
    host, namespace = OLLAMA_HOST, OLLAMA_NAMESPACE
    if len(parts) == 3:
        host, namespace = parts[0], parts[1]
    elif len(parts) == 2:
        namespace = parts[0]
    return host, namespace, parts[-1], tag or OLLAMA_TAG


def _ollama_display(host: str, namespace: str, model: str, tag: str) -> str:
    """The shortest name Ollama itself shows (``gemma4:12b``, ``user/model:tag``)."""
    prefix = "" if host == OLLAMA_HOST else f"{host}/"
    prefix += "" if namespace == OLLAMA_NAMESPACE and not prefix else f"{namespace}/"
    return f"{prefix}{model}:{tag}"


def _manifest_files(store: Path):
    """(display name, manifest path) of every manifest in a store."""
    root = store / "manifests"
    if not _is_dir(root):
        return
    for path in sorted(root.glob("*/*/*/*")):
        if _is_file(path):
            host, namespace, model, tag = path.relative_to(root).parts
            yield _ollama_display(host, namespace, model, tag), path


def _find_manifest(stores: list[Path], parts: tuple[str, str, str, str]) -> Path | None:
    for store in stores:
        exact = store.joinpath("manifests", *parts)
        if _is_file(exact):
            return exact
        wanted = [p.lower() for p in parts]  # Ollama's names are case-insensitive
        for _, path in _manifest_files(store):
            if [p.lower() for p in path.relative_to(store / "manifests").parts] == wanted:
                return path
    return None


def _read_manifest(path: Path) -> list[dict]:
    try:
        layers = json.loads(path.read_text(encoding="utf-8"))["layers"]
        if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
            raise TypeError("layers is not a list of objects")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable Ollama manifest ({exc}); pull the model again with ollama") from None
    return layers


def _layer_blob(store: Path, layer: dict, manifest: Path) -> tuple[Path, str, int]:
    digest, size = str(layer.get("digest", "")), layer.get("size")
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or len(hexdigest) != 64 or not isinstance(size, int):
        raise CheckpointError(f"{manifest}: layer {digest or '?'} has no sha256 digest and size; pull the model again")
    return store / "blobs" / f"sha256-{hexdigest}", hexdigest, size


def resolve_ollama(name: str) -> LocalModel:
    """The GGUF blob (and projector) of an Ollama model, checked against its manifest."""
    parts = _ollama_parts(name)
    stores = ollama_stores()
    manifest = _find_manifest(stores, parts)
    shown = _ollama_display(*parts)
    if manifest is None:
        there = [n for s in stores for n, _ in _manifest_files(s)]
        where = " or ".join(str(s) for s in stores)
        if not any(_is_dir(s / "manifests") for s in stores):
            raise ModelNotFoundError(f"no Ollama store at {where}: install Ollama and `ollama pull {shown}`, "
                                     f"or set ${OLLAMA_ENV} to where Ollama keeps its models")
        raise ModelNotFoundError(f"{OLLAMA_PREFIX}{shown} is not in Ollama's store ({where}); models there: "
                                 f"{', '.join(there) or 'none'}. Pull it with `ollama pull {shown}`")
    store = manifest.parents[4]
    layers = _read_manifest(manifest)
    models = [x for x in layers if x.get("mediaType") == OLLAMA_MODEL_MEDIA]
    if not models:
        kinds = sorted({str(x.get("mediaType", "?")).partition(";")[0].rpartition(".")[2] for x in layers})
        raise CheckpointError(f"{OLLAMA_PREFIX}{shown} has no GGUF model layer (its layers: {', '.join(kinds)}); "
                              "gemma4-nb reads Ollama models stored as one GGUF file")
    path, hexdigest, size = _layer_blob(store, models[0], manifest)
    verify_blob(path, hexdigest, size, shown)
    projector = None
    for layer in layers:
        if layer.get("mediaType") == OLLAMA_PROJECTOR_MEDIA:
            projector, p_hex, p_size = _layer_blob(store, layer, manifest)
            verify_blob(projector, p_hex, p_size, shown)
            break
    return LocalModel("ollama", f"{OLLAMA_PREFIX}{shown}", path, projector,
                      size + (projector.stat().st_size if projector else 0))


def _verified_dir() -> Path:
    from .gguf_file import cache_root

    return cache_root().parent / "verified-blobs"


def verify_blob(path: Path, hexdigest: str, size: int, shown: str) -> None:
    """The blob is there, has the manifest's size, and (checked once, then remembered while its
    size and modification time stay the same) hashes to its sha256 digest."""
    again = f"pull it again with `ollama pull {shown}`"
    if not _is_file(path):
        partial = sorted(path.parent.glob(path.name + "-partial*"))
        state = "only partly downloaded" if partial else "missing"
        raise CheckpointError(f"{path} (a blob of {OLLAMA_PREFIX}{shown}) is {state}; {again}")
    st = path.stat()
    if st.st_size != size:
        raise CheckpointError(f"{path} (a blob of {OLLAMA_PREFIX}{shown}) is {st.st_size:,} bytes but its manifest "
                              f"says {size:,}: the file is {'truncated' if st.st_size < size else 'damaged'}; {again}")
    stamp = f"{st.st_size} {st.st_mtime_ns}"
    record = _verified_dir() / hexdigest
    try:
        if record.read_text() == stamp:
            return
    except OSError:
        pass
    if size > 1 << 30:
        print(f"gemma4-nb: checking {path.name} against its sha256 once ({size / (1 << 30):.1f} GiB)",
              file=sys.stderr, flush=True)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} (a blob of {OLLAMA_PREFIX}{shown}): {exc}") from None
    if h.hexdigest() != hexdigest:
        raise CheckpointError(f"{path} (a blob of {OLLAMA_PREFIX}{shown}) does not match its sha256 digest: the file "
                              f"is damaged; {again}")
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(stamp)
    except OSError:  # a read-only cache: the check runs again next time
        pass


def list_ollama() -> list[LocalModel]:
    found = []
    for store in ollama_stores():
        for shown, manifest in _manifest_files(store):
            try:
                layers = _read_manifest(manifest)
            except CheckpointError:
                continue
            model = next((x for x in layers if x.get("mediaType") == OLLAMA_MODEL_MEDIA), None)
            projector = next((x for x in layers if x.get("mediaType") == OLLAMA_PROJECTOR_MEDIA), None)
            if model is None:
                found.append(LocalModel("ollama", f"{OLLAMA_PREFIX}{shown}", manifest, None,
                                        sum(int(x.get("size") or 0) for x in layers), "not a GGUF model"))
                continue
            try:
                path, _, size = _layer_blob(store, model, manifest)
                proj = _layer_blob(store, projector, manifest)[0] if projector else None
            except CheckpointError:
                continue
            fmt = gguf_format(path) if path.is_file() and path.stat().st_size == size else "blob missing or partial"
            found.append(LocalModel("ollama", f"{OLLAMA_PREFIX}{shown}", path, proj,
                                    size + int(projector.get("size") or 0) if projector else size, fmt))
    return found


# -- LM Studio ---------------------------------------------------------------------------------

def lmstudio_roots() -> list[Path]:
    """LM Studio's model folders that exist: its configured downloads folder, ``~/.lmstudio/models``
    (or the home ``~/.lmstudio-home-pointer`` names), the older ``~/.cache/lm-studio/models``."""
    home = Path.home() / ".lmstudio"
    try:
        pointed = (Path.home() / ".lmstudio-home-pointer").read_text(encoding="utf-8").strip()
        home = Path(pointed) if pointed else home
    except OSError:
        pass
    roots = []
    try:
        folder = json.loads((home / "settings.json").read_text(encoding="utf-8")).get("downloadsFolder")
        if isinstance(folder, str) and folder:
            roots.append(Path(folder).expanduser())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        pass
    roots += [home / "models", Path.home() / ".cache" / "lm-studio" / "models"]
    unique = []
    for r in roots:
        if _is_dir(r) and r not in unique:
            unique.append(r)
    return unique


def gguf_role(path: Path) -> str:
    """What a GGUF in a model folder is: ``"projector"`` (llama.cpp's ``mmproj*.gguf``, architecture
    ``clip``), ``"assistant"`` (a ``gemma4-assistant``, the drafter of the model beside it) or
    ``"model"``; from the name and the first key of the header."""
    from .gguf_file import ASSISTANT_ARCH, PROJECTOR_ARCH, read_architecture

    if "mmproj" in path.name.lower():
        return "projector"
    arch = read_architecture(path)
    return "projector" if arch == PROJECTOR_ARCH else "assistant" if arch == ASSISTANT_ARCH else "model"


def is_projector(path: Path) -> bool:
    """llama.cpp's projector files (vision/audio): named ``mmproj*.gguf``, architecture ``clip``."""
    return gguf_role(path) == "projector"


def pick_gguf(folder: Path, label: str) -> tuple[Path, Path | None]:
    """The one model GGUF of a folder and its projector (``mmproj*.gguf``), or an error listing
    the choices when the folder holds several models (e.g. quantizations). A Gemma 4 MTP
    assistant GGUF beside the model is not a model to pick: loading the model finds it."""
    ggufs = sorted(p for p in folder.glob("*.gguf") if p.is_file())
    roles = {p: gguf_role(p) for p in ggufs}
    models = [p for p in ggufs if roles[p] == "model"]
    projectors = [p for p in ggufs if roles[p] == "projector"]
    if not models:
        raise ModelNotFoundError(f"{label} ({folder}) holds no model GGUF file")
    if len(models) > 1:
        raise ModelNotFoundError(f"{label} ({folder}) holds {len(models)} GGUF files: "
                                 f"{', '.join(p.name for p in models)}; pass the path of the one to load")
    # several projectors: the f16 one reads like the model's own precision more often than not
    projector = next((p for p in projectors if "f16" in p.name.lower()), projectors[0] if projectors else None)
    return models[0], projector


def resolve_lmstudio(name: str, *, required: bool) -> LocalModel | None:
    """``<publisher>/<repo>`` in LM Studio's folders (None when absent and not ``required``)."""
    parts = name.strip("/").split("/")
    if len(parts) != 2 or not all(parts) or ".." in parts:
        raise ModelNotFoundError(f"{LMSTUDIO_PREFIX}{name} is not an LM Studio model: use "
                                 "lmstudio:<publisher>/<repo>, e.g. lmstudio:lmstudio-community/gemma-4-12B-it-GGUF")
    roots = lmstudio_roots()
    for root in roots:
        folder = root / parts[0] / parts[1]
        if _is_dir(folder):
            path, projector = pick_gguf(folder, f"LM Studio's {name}")
            return LocalModel("lmstudio", f"{LMSTUDIO_PREFIX}{name}", path, projector)
    if not required:
        return None
    there = [m.ref for m in list_lmstudio()]
    where = ", ".join(str(r) for r in roots) or "no LM Studio models folder (~/.lmstudio/models) on this machine"
    raise ModelNotFoundError(f"{LMSTUDIO_PREFIX}{name} is not in LM Studio's models ({where}); models there: "
                             f"{', '.join(there) or 'none'}")


def list_lmstudio() -> list[LocalModel]:
    found = []
    for root in lmstudio_roots():
        for folder in sorted(p for p in root.glob("*/*") if p.is_dir()):
            ggufs = sorted(p for p in folder.glob("*.gguf") if p.is_file())
            roles = {p: gguf_role(p) for p in ggufs}
            projectors = [p for p in ggufs if roles[p] == "projector"]
            models = [p for p in ggufs if roles[p] == "model"]
            name = f"{folder.parent.name}/{folder.name}"
            for path in models:
                several = len(models) > 1
                found.append(LocalModel("lmstudio", str(path) if several else f"{LMSTUDIO_PREFIX}{name}", path,
                                        projectors[0] if projectors else None,
                                        path.stat().st_size + sum(p.stat().st_size for p in projectors[:1]),
                                        gguf_format(path)))
    return found


# -- the Hugging Face cache --------------------------------------------------------------------

def list_hf_cache() -> list[LocalModel]:
    """Model repos in the local Hugging Face cache, each at its newest snapshot."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except (CacheNotFound, OSError, ValueError):
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        rev = max(repo.revisions, key=lambda r: r.last_modified)
        names = {f.file_name for f in rev.files}
        try:
            model_type = json.loads((rev.snapshot_path / "config.json").read_text(encoding="utf-8")).get("model_type", "?")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            model_type = "?"
        kind = ("safetensors" if any(n.endswith(".safetensors") for n in names) else
                "GGUF" if any(n.endswith(".gguf") for n in names) else "other files")
        found.append(LocalModel("hf", repo.repo_id, rev.snapshot_path, None, rev.size_on_disk, f"{kind} ({model_type})"))
    return found


def list_local_models() -> list[LocalModel]:
    """Every model found on this machine: the Hugging Face cache, Ollama, LM Studio."""
    return list_hf_cache() + list_ollama() + list_lmstudio()
