"""Models where users keep them: a fake Ollama store (manifests and blobs named by their real
sha256, as Ollama writes them) and LM Studio folders, both holding the embedded model's real GGUF;
`gemma4-nb models`; and the same through `%gemma model` / `%gemma config quant=` in a real kernel."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
from gguf_helpers import write_gguf

import gemma4_nb
from gemma4_nb.errors import CheckpointError, ModelNotFoundError
from gemma4_nb.runtime.local_stores import _ollama_parts, verify_blob
from gemma4_nb.runtime.resolve import embedded_model, locate

MODEL = "application/vnd.ollama.image.model"
PROJECTOR = "application/vnd.ollama.image.projector"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def add_blob(store: Path, data: bytes | Path) -> dict:
    """A blob named by its sha256 (a real file linked in, or bytes), as its manifest layer."""
    blobs = store / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    if isinstance(data, Path):
        digest, size = _sha256(data), data.stat().st_size
        target = blobs / f"sha256-{digest}"
        if not target.exists():
            target.symlink_to(data)  # Ollama's blobs are plain files; a link keeps the test light
    else:
        digest, size = hashlib.sha256(data).hexdigest(), len(data)
        (blobs / f"sha256-{digest}").write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": size}


def add_manifest(store: Path, name: str, tag: str, layers: list[tuple[str, dict]],
                 namespace: str = "library", host: str = "registry.ollama.ai") -> Path:
    config = add_blob(store, b'{"model_format":"gguf","model_family":"gemma3"}')
    doc = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
           "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
           "layers": [{"mediaType": media, **layer} for media, layer in layers]}
    path = store / "manifests" / host / namespace / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def embedded_gguf():
    """The embedded model's file, found before any test moves $HOME (its cache is under $HOME)."""
    return embedded_model()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "small.gguf"
    write_gguf(path)
    return path


@pytest.fixture(scope="module")
def ollama_store(tmp_path_factory, small_gguf, embedded_gguf):
    """gemma3:270m (the embedded GGUF with a projector layer), a damaged, a truncated and a
    partly pulled model, a user's namespaced model, and one stored as tensors (not GGUF)."""
    store = tmp_path_factory.mktemp("ollama") / "models"
    template = add_blob(store, b"{{ .Prompt }}")
    add_manifest(store, "gemma3", "270m", [(MODEL, add_blob(store, embedded_gguf)),
                                           ("application/vnd.ollama.image.template", template),
                                           (PROJECTOR, add_blob(store, small_gguf))])
    good = small_gguf.read_bytes() + b"\1" * 32  # (not the projector's blob, which links to small_gguf)
    damaged = add_blob(store, good)
    blob = store / "blobs" / ("sha256-" + damaged["digest"].split(":")[1])
    blob.write_bytes(good[:-1] + b"\2")  # same size, one byte changed
    add_manifest(store, "gemma3", "damaged", [(MODEL, damaged)])
    truncated = add_blob(store, good + b"\0" * 64)
    blob = store / "blobs" / ("sha256-" + truncated["digest"].split(":")[1])
    blob.write_bytes((good + b"\0" * 64)[:1000])
    add_manifest(store, "gemma3", "truncated", [(MODEL, truncated)])
    pulling = {"digest": "sha256:" + "ab" * 32, "size": 123456}
    (store / "blobs" / ("sha256-" + "ab" * 32 + "-partial")).write_bytes(b"\0" * 1000)
    add_manifest(store, "gemma3", "pulling", [(MODEL, pulling)])
    add_manifest(store, "mine", "latest", [(MODEL, add_blob(store, small_gguf))], namespace="someone")
    add_manifest(store, "tensors", "latest", [("application/vnd.ollama.image.tensor; name=x; dtype=BF16", template)])
    return store


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty home (no Ollama, LM Studio or Hugging Face cache of the user's own)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def store_cache(tmp_path_factory):
    """The GGUF conversions of these tests' links to the embedded file (named apart from it, so
    converted apart from it): kept out of the session's cache, which test_gguf.py inspects."""
    return tmp_path_factory.mktemp("stores-cache")


@pytest.fixture
def ollama(ollama_store, home, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama_store))
    return ollama_store


def test_ollama_names_as_ollama_reads_them():
    assert _ollama_parts("gemma4:12b") == ("registry.ollama.ai", "library", "gemma4", "12b")
    assert _ollama_parts("gemma4") == ("registry.ollama.ai", "library", "gemma4", "latest")
    assert _ollama_parts("someone/mine:q4") == ("registry.ollama.ai", "someone", "mine", "q4")
    assert _ollama_parts("hf.co/org/repo-GGUF:Q4_K_M") == ("hf.co", "org", "repo-GGUF", "Q4_K_M")
    for bad in ("", "gemma4:", "a/b/c/d", "../x", "/gemma4"):
        with pytest.raises(ModelNotFoundError, match="not an Ollama model name"):
            _ollama_parts(bad)


def test_an_ollama_model_loads_from_its_blob(ollama, home, store_cache, embedded_gguf, monkeypatch):
    found = locate("ollama:gemma3:270m")
    blobs = ollama / "blobs"
    assert found.path == blobs / f"sha256-{_sha256(embedded_gguf)}"
    assert found.projector is not None and found.projector.parent == blobs
    direct = gemma4_nb.load(embedded_gguf, device="cpu", dtype="fp32", progress=False)
    monkeypatch.setenv("GEMMA4_NB_CACHE", str(store_cache))
    model = gemma4_nb.load("ollama:gemma3:270m", device="cpu", dtype="fp32", progress=False)
    assert model.source == found.path and model.projector == found.projector and model.name == "ollama:gemma3:270m"
    prompt = "import pandas as pd\n"
    assert model.generate(prompt, max_new_tokens=8, temperature=0) == direct.generate(prompt, max_new_tokens=8,
                                                                                       temperature=0)


def test_a_damaged_or_partial_blob_is_named(ollama, home):
    with pytest.raises(CheckpointError, match=r"sha256-\w{64} \(a blob of ollama:gemma3:damaged\) does not match its "
                                              r"sha256 digest: the file is damaged; pull it again with `ollama pull"):
        gemma4_nb.load("ollama:gemma3:damaged", progress=False)
    with pytest.raises(CheckpointError, match=r"sha256-\w{64} \(a blob of ollama:gemma3:truncated\) is 1,000 bytes "
                                              r"but its manifest says [\d,]+: the file is truncated"):
        gemma4_nb.load("ollama:gemma3:truncated", progress=False)
    with pytest.raises(CheckpointError, match=r"sha256-(ab){32} \(a blob of ollama:gemma3:pulling\) is only partly "
                                              r"downloaded; pull it again with `ollama pull gemma3:pulling`"):
        gemma4_nb.load("ollama:gemma3:pulling", progress=False)
    with pytest.raises(CheckpointError, match=r"ollama:tensors:latest has no GGUF model layer \(its layers: tensor\)"):
        gemma4_nb.load("ollama:tensors", progress=False)


def test_a_missing_model_names_what_is_there(ollama, home, monkeypatch):
    with pytest.raises(ModelNotFoundError) as err:
        gemma4_nb.load("ollama:gemma4:12b", progress=False)
    msg = str(err.value)
    assert "ollama:gemma4:12b is not in Ollama's store" in msg and "`ollama pull gemma4:12b`" in msg
    assert "gemma3:270m" in msg and "someone/mine:latest" in msg
    monkeypatch.setenv("OLLAMA_MODELS", str(home / "nowhere"))
    with pytest.raises(ModelNotFoundError, match="no Ollama store at .*nowhere.* set \\$OLLAMA_MODELS"):
        gemma4_nb.load("ollama:gemma4:12b", progress=False)
    with pytest.raises(ModelNotFoundError, match="for a model in Ollama write ollama:gemma4:12b"):
        gemma4_nb.load("gemma4:12b", progress=False)


def test_a_store_this_user_cannot_read_is_skipped(ollama, monkeypatch):
    """The Linux service's store belongs to the `ollama` user: a permission error there is no crash
    (as root, chmod cannot deny anything, so the denial is simulated)."""
    from gemma4_nb.runtime import local_stores

    locked = Path("/nonexistent-locked/ollama/models")
    monkeypatch.setattr(local_stores, "ollama_stores", lambda: [locked, ollama])
    real_is_dir, real_is_file = Path.is_dir, Path.is_file

    def denied(real):
        def check(self):
            if str(self).startswith(str(locked)):
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)
        return check

    monkeypatch.setattr(Path, "is_dir", denied(real_is_dir))
    monkeypatch.setattr(Path, "is_file", denied(real_is_file))
    assert locate("ollama:gemma3:270m").path.parent == ollama / "blobs"
    assert "ollama:gemma3:270m" in [m.ref for m in local_stores.list_ollama()]


def test_a_blob_is_hashed_once_while_it_is_unchanged(tmp_path, small_gguf):
    data = small_gguf.read_bytes()
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    verify_blob(blob, digest, len(data), "x")  # hashed, remembered
    stat = blob.stat()
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # changed behind the size and time it was checked at
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    verify_blob(blob, digest, len(data), "x")  # not hashed again
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # touched: hashed again
    with pytest.raises(CheckpointError, match="does not match its sha256 digest"):
        verify_blob(blob, digest, len(data), "x")


def _lmstudio_folder(root: Path, small_gguf: Path, embedded_gguf: Path, publisher="lmstudio-community",
                     repo="gemma-3-270m-GGUF") -> Path:
    folder = root / publisher / repo
    folder.mkdir(parents=True)
    # named as the embedded file is, so its conversion is the session's own (the cache key is name and target)
    (folder / embedded_gguf.name).symlink_to(embedded_gguf)
    shutil.copy(small_gguf, folder / "mmproj-gemma-3-270m-f16.gguf")
    return folder


def test_lm_studio_folders(home, small_gguf, embedded_gguf):
    folder = _lmstudio_folder(home / ".lmstudio" / "models", small_gguf, embedded_gguf)
    for ref in ("lmstudio:lmstudio-community/gemma-3-270m-GGUF", "lmstudio-community/gemma-3-270m-GGUF", str(folder)):
        found = locate(ref)
        assert found.path == folder / embedded_gguf.name and found.projector.name.startswith("mmproj"), ref
    model = gemma4_nb.load("lmstudio-community/gemma-3-270m-GGUF", device="cpu", dtype="fp32", progress=False)
    assert model.config.model_type == "gemma3_text" and model.projector == folder / "mmproj-gemma-3-270m-f16.gguf"
    assert locate(str(folder / embedded_gguf.name)).projector.name == "mmproj-gemma-3-270m-f16.gguf"
    with pytest.raises(ModelNotFoundError, match="is a projector .* not a model"):
        locate(str(folder / "mmproj-gemma-3-270m-f16.gguf"))
    shutil.copy(small_gguf, folder / "gemma-3-270m-Q8_0.gguf")
    with pytest.raises(ModelNotFoundError, match="holds 2 GGUF files: gemma-3-270m-Q8_0.gguf, gemma-3-270m-q4_k_m.gguf; "
                                                 "pass the path of the one to load"):
        locate("lmstudio:lmstudio-community/gemma-3-270m-GGUF")
    with pytest.raises(ModelNotFoundError, match="lmstudio:someone/else is not in LM Studio's models .* models there: "
                                                 ".*gemma-3-270m-Q8_0.gguf, .*gemma-3-270m-q4_k_m.gguf"):
        locate("lmstudio:someone/else")  # a folder of two models lists them by path


def test_lm_studio_older_and_moved_folders(home, small_gguf, embedded_gguf, tmp_path):
    _lmstudio_folder(home / ".cache" / "lm-studio" / "models", small_gguf, embedded_gguf)
    assert locate("lmstudio:lmstudio-community/gemma-3-270m-GGUF").path.parent.parent.parent.name == "models"
    moved = tmp_path / "elsewhere"
    _lmstudio_folder(moved, small_gguf, embedded_gguf, repo="moved-GGUF")
    (home / ".lmstudio").mkdir()
    (home / ".lmstudio" / "settings.json").write_text(json.dumps({"downloadsFolder": str(moved)}))
    assert locate("lmstudio-community/moved-GGUF").path.parent == moved / "lmstudio-community" / "moved-GGUF"


def test_the_models_command_lists_every_store(ollama_store, home, small_gguf, embedded_gguf, tiny_dir):
    _lmstudio_folder(home / ".lmstudio" / "models", small_gguf, embedded_gguf)
    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--google--gemma-4-tiny-test"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = dict(os.environ, HOME=str(home), OLLAMA_MODELS=str(ollama_store), HF_HUB_CACHE=str(repo.parent))
    out = subprocess.run([sys.executable, "-m", "gemma4_nb", "models"], capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    size = embedded_gguf.stat().st_size
    assert "GGUF Q4_K_M (gemma3) + projector" in rows["ollama:gemma3:270m"], out.stdout
    assert f" {(size + small_gguf.stat().st_size) / 2 ** 20:.1f} MiB " in rows["ollama:gemma3:270m"]
    assert "GGUF (gemma3)" in rows["ollama:someone/mine:latest"]  # a file without general.file_type
    assert "blob missing or partial" in rows["ollama:gemma3:pulling"]
    assert "not a GGUF model" in rows["ollama:tensors:latest"]
    assert "GGUF Q4_K_M (gemma3) + projector" in rows["lmstudio:lmstudio-community/gemma-3-270m-GGUF"]
    assert "safetensors (gemma4_unified)" in rows["google/gemma-4-tiny-test"], out.stdout


def test_in_a_real_kernel(ollama_store, tiny_dir, tmp_path, store_cache):
    """`%gemma config quant=` and `%gemma model ollama:...` as a user types them; the free-memory
    probe set so that only int4 fits the tiny model (a 12B on a 16 GB machine, scaled down)."""
    from test_notebook_kernel import run_cells, text_of

    probe = (
        "import gemma4_nb.runtime.model as m\n"
        "from gemma4_nb.runtime.config import load_config\n"
        "from gemma4_nb.runtime.memory import plan_memory\n"
        "from gemma4_nb.runtime.weight_choice import COMFORTABLE\n"
        f"cfg = load_config({str(tiny_dir)!r})\n"
        "p = {f: plan_memory(cfg, context=cfg.max_position_embeddings, weights=f, kv='fp32', compute='fp32').total "
        "for f in ('int8', 'int4')}\n"
        "real = m.available_memory\n"
        "m.available_memory = lambda device: int((p['int4'] + p['int8']) / 2 / COMFORTABLE)"
    )
    cells = run_cells([
        "%load_ext gemma4_nb",
        f"%gemma model {tiny_dir}",
        probe,
        "%%gemma --max-new-tokens 3 --temperature 0\nhi",
        "%gemma status",
        "%gemma config quant=int5",
        "%gemma config quant=bf16",
        "%%gemma --max-new-tokens 3 --temperature 0\nhi",
        "%gemma status",
        "m.available_memory = real\n%gemma config quant=auto",
        "%gemma model ollama:gemma3:270m",
        "%%gemma --max-new-tokens 3 --temperature 0\nhi",
        "%gemma status",
        "%gemma model ollama:gemma3:damaged",
        "%%gemma --max-new-tokens 3\nhi",
        "%gemma model ollama:gemma4:12b",
        "%%gemma --max-new-tokens 3\nhi",
    ], tmp_path, env={"OLLAMA_MODELS": str(ollama_store), "GEMMA4_NB_CACHE": str(store_cache)})
    out = [text_of(c) for c in cells]
    assert not any(o.get("output_type") == "error" for c in cells for o in c.outputs), out
    assert "gemma4-nb: int4 weights on cpu" in out[3], out[3]  # chosen with no setting, said in one line
    assert "int4 weights" in out[4]
    assert "quant must be one of auto, bf16, fp32, int8, int4" in out[5]
    assert "quant = bf16" in out[6] and "reloads with quant=bf16" in out[6]
    assert "gemma4-nb: bf16 weights (quant='bf16')" in out[7] and "torch.bfloat16" in out[8]
    assert "int4 weights" not in out[8]
    assert "<gemma4_nb.Model ollama:gemma3:270m: gemma3_text" in out[12]
    assert "ollama:gemma3:damaged) does not match its sha256 digest" in out[14]
    assert "ollama:gemma4:12b is not in Ollama's store" in out[16] and "gemma3:270m" in out[16]
