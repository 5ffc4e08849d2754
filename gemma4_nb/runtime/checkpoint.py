"""Safetensors checkpoints: find the shards, check every tensor, load them memory-mapped.

Checking comes before loading: all missing, unexpected and mis-shaped tensors are reported in
one :class:`~gemma4_nb.errors.CheckpointError`, and a truncated or corrupt shard is named. While
the weights load, every tensor (or block of rows, when quantization streams a matrix in) is
checked for NaN and infinity, and a damaged one is refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from .config import ModelConfig
from .progress import LoadProgress, as_progress

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors metadata of a file whose every tensor was checked finite when it was written (the
# GGUF conversion cache): loading it again skips the check, a pass over all its pages
CHECKED_FINITE = "gemma4_nb_checked_finite"


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every tensor the text decoder needs."""
    p, h = cfg.weight_prefix, cfg.hidden_size
    out: dict[str, tuple[int, ...]] = {f"{p}embed_tokens.weight": (cfg.vocab_size, h), f"{p}norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    for s in cfg.layers:
        lp = f"{p}layers.{s.index}."
        qd, kvd = cfg.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        out[lp + "self_attn.q_proj.weight"] = (qd, h)
        out[lp + "self_attn.q_norm.weight"] = (s.head_dim,)
        out[lp + "self_attn.o_proj.weight"] = (h, qd)
        if s.owns_kv:
            out[lp + "self_attn.k_proj.weight"] = (kvd, h)
            out[lp + "self_attn.k_norm.weight"] = (s.head_dim,)
            if not s.k_eq_v:
                out[lp + "self_attn.v_proj.weight"] = (kvd, h)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            out[lp + norm + ".weight"] = (h,)
        out[lp + "mlp.gate_proj.weight"] = (s.intermediate_size, h)
        out[lp + "mlp.up_proj.weight"] = (s.intermediate_size, h)
        out[lp + "mlp.down_proj.weight"] = (h, s.intermediate_size)
        if cfg.family.has_layer_scalar:
            out[lp + "layer_scalar"] = (1,)
    out.update(media_tensors(cfg))
    return out


def media_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The image and audio embedders' tensors, under their on-disk names (transformers renames
    ``model.vision_embedder.*`` to ``model.embed_vision.*`` in memory; the files keep these)."""
    out: dict[str, tuple[int, ...]] = {}
    v, h = cfg.vision, cfg.hidden_size
    if v is not None:
        e = "model.vision_embedder."
        out.update({e + "patch_ln1.weight": (v.patch_dim,), e + "patch_ln1.bias": (v.patch_dim,),
                    e + "patch_dense.weight": (v.embed_dim, v.patch_dim), e + "patch_dense.bias": (v.embed_dim,),
                    e + "patch_ln2.weight": (v.embed_dim,), e + "patch_ln2.bias": (v.embed_dim,),
                    e + "pos_embedding": (v.posemb_size, 2, v.embed_dim),
                    e + "pos_norm.weight": (v.embed_dim,), e + "pos_norm.bias": (v.embed_dim,),
                    "model.embed_vision.embedding_projection.weight": (h, v.proj_dim)})
    if cfg.audio is not None:
        out["model.embed_audio.embedding_projection.weight"] = (h, cfg.audio.samples_per_token)
    return out


def canonical_name(cfg: ModelConfig, checkpoint_name: str) -> str:
    """Checkpoint name -> the runtime's name (the text prefix removed)."""
    if checkpoint_name.startswith(cfg.weight_prefix):
        return checkpoint_name[len(cfg.weight_prefix) :]
    return checkpoint_name


def check_finite(name: str, tensor, where) -> None:
    """Refuse ``tensor`` when it holds NaN or infinity (a damaged file), naming it. One reduction
    pass: any NaN or infinity makes the fp32 sum non-finite; only then are the values counted."""
    if not tensor.is_floating_point() or torch.isfinite(tensor.sum(dtype=torch.float32)):
        return
    bad = ~torch.isfinite(tensor)
    count = int(bad.sum())
    if not count:  # finite values whose sum overflowed fp32
        return
    nans = int(torch.isnan(tensor).sum())
    first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
    raise CheckpointError(
        f"{where}: tensor {name} holds {count:,} non-finite values ({nans:,} NaN, {count - nans:,} infinite; the "
        f"first at index {list(first)}); the file is damaged: download or convert it again"
    )


def check_finite_weights(weights: dict, where) -> None:
    """``check_finite`` over loaded weights; a quantized weight's scales and offsets (its codes are
    integers). For weights loaded from files that were not read through :class:`Shards`."""
    for name, w in weights.items():
        parts = [(name, w)] if isinstance(w, torch.Tensor) else \
            [(f"{name} (scales)", getattr(w, "scales", None)), (f"{name} (offsets)", getattr(w, "mins", None))]
        for label, t in parts:
            if isinstance(t, torch.Tensor):
                check_finite(label, t, where)


class _CheckedSlice:
    """A safetensors slice whose rows are checked for NaN and infinity as they are read."""

    def __init__(self, inner, name: str, where) -> None:
        self.inner, self.name, self.where = inner, name, where

    def get_shape(self):
        return self.inner.get_shape()

    def get_dtype(self):
        return self.inner.get_dtype()

    def __getitem__(self, key):
        block = self.inner[key]
        check_finite(self.name, block, self.where)
        return block


class _CheckedFile:
    """A safetensors file opened for reading: every tensor read from it is checked (``check_finite``)."""

    def __init__(self, inner, path: Path, check: bool = True) -> None:
        self.inner, self.path = inner, path
        self.marked = (inner.metadata() or {}).get(CHECKED_FINITE) == "yes"  # checked when it was written
        self.checks_reads = check and not self.marked

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.inner.keys()

    def metadata(self):
        return self.inner.metadata()

    def get_tensor(self, name: str):
        tensor = self.inner.get_tensor(name)
        if self.checks_reads:
            check_finite(name, tensor, self.path)
        return tensor

    def get_slice(self, name: str):
        sl = self.inner.get_slice(name)
        return _CheckedSlice(sl, name, self.path) if self.checks_reads else sl


@dataclass
class Shards:
    """Which file holds each tensor, with the files opened lazily (memory-mapped); every tensor
    read through them is checked for NaN and infinity."""

    model_dir: Path
    weight_map: dict[str, Path]

    def open(self, path: Path, check: bool = True):
        """The file, its tensors checked as they are read unless ``check=False`` (the caller checks)."""
        try:
            return _CheckedFile(safe_open(str(path), framework="pt"), path, check)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: weight shard is missing; download the checkpoint again") from None
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: weight shard is truncated or corrupt ({exc}); delete it and download it again"
            ) from None


def find_shards(model_dir: Path) -> Shards:
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc}); download it again") from None
        return Shards(model_dir, {name: model_dir / fname for name, fname in weight_map.items()})
    files = [model_dir / SINGLE_FILE] if (model_dir / SINGLE_FILE).is_file() else sorted(model_dir.glob("*.safetensors"))
    if not files:
        others = [f.name for f in model_dir.glob("*.bin")] + [f.name for f in model_dir.glob("*.gguf")]
        hint = f" (found {', '.join(others)}; only safetensors checkpoints load here)" if others else ""
        raise CheckpointError(f"{model_dir}: no *.safetensors weights found{hint}")
    shards = Shards(model_dir, {})
    for f in files:
        with shards.open(f) as handle:
            for name in handle.keys():
                shards.weight_map[name] = f
    return shards


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    shown = items[:limit]
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {x}" for x in shown) + more


def check_checkpoint(cfg: ModelConfig, shards: Shards, expected: dict[str, tuple[int, ...]] | None = None) -> None:
    """Raise one CheckpointError listing every missing, unexpected and mis-shaped tensor
    (``expected``: name -> shape, by default :func:`expected_tensors`)."""
    expected = expected_tensors(cfg) if expected is None else expected
    problems: dict[str, list[str]] = {"missing": [], "unexpected": [], "wrong shape": [], "missing shard files": []}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        if name in shards.weight_map:
            by_file.setdefault(shards.weight_map[name], []).append(name)
        else:
            problems["missing"].append(name)
    for name in shards.weight_map:
        in_text = name.startswith(cfg.weight_prefix) or name == "lm_head.weight"
        if in_text and name not in expected and not (name == "lm_head.weight" and cfg.tie_word_embeddings):
            problems["unexpected"].append(name)
    for path, names in by_file.items():
        if not path.is_file():
            problems["missing shard files"].append(f"{path.name} (holds {len(names)} tensors, e.g. {names[0]})")
            continue
        with shards.open(path) as handle:
            for name in names:
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != expected[name]:
                    problems["wrong shape"].append(f"{name}: checkpoint {list(shape)}, config expects {list(expected[name])}")
    found = {k: v for k, v in problems.items() if v}
    if found:
        body = "\n".join(_listing(k, v) for k, v in found.items())
        raise CheckpointError(
            f"{shards.model_dir}: the weights do not match config.json ({cfg.model_type}):\n{body}\n"
            "Check that config.json and the weights come from the same checkpoint, and that every shard downloaded."
        )


def load_tensors(
    cfg: ModelConfig,
    shards: Shards,
    names: list[str],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    progress: bool | LoadProgress = True,
    stage: str = "loading weights",
) -> dict[str, torch.Tensor]:
    """Load ``names`` (checkpoint names) cast to ``dtype`` on ``device``, keyed by canonical name;
    each tensor read is reported to ``progress`` as a step of ``stage``."""
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(shards.weight_map[name], []).append(name)
    bar = as_progress(progress).stage(stage, len(names))
    try:
        for path, file_names in by_file.items():
            with shards.open(path, check=torch.device(device).type == "cpu") as handle:
                for name in file_names:
                    try:
                        tensor = handle.get_tensor(name)
                    except (SafetensorError, OSError, ValueError) as exc:
                        raise CheckpointError(f"{path}: cannot read tensor {name} ({exc}); the shard may be corrupt") from None
                    loaded = tensor.to(device=device, dtype=dtype)
                    if not handle.marked and not handle.checks_reads:  # on a GPU: checked there, nearly free
                        check_finite(name, loaded, path)
                    out[canonical_name(cfg, name)] = loaded
                    bar.update(1)
    finally:
        bar.close()
    return out


def load_checkpoint(
    cfg: ModelConfig, model_dir: Path, dtype: torch.dtype, device="cpu", progress: bool | LoadProgress = True
) -> dict[str, torch.Tensor]:
    """Check, then load, every tensor of the text decoder."""
    shards = find_shards(model_dir)
    check_checkpoint(cfg, shards)
    return load_tensors(cfg, shards, list(expected_tensors(cfg)), dtype, device, progress)
