"""Quantized weights in the runtime: which tensors get which format, streaming quantization while
a checkpoint loads, and saving and reloading quantized checkpoints.

The format itself (:class:`~gemma4_nb.kernels.qweight.QWeight`: int8 and int4 codes with a scale
per group of 32 weights) lives with the kernels that read it, in :mod:`gemma4_nb.kernels.qweight`.

Weights from a GGUF file are already quantized: :mod:`.gguf_weights` repacks them once (Q4_K
blocks become int4 and Q8_0/Q4_0 blocks int8 straight from the file's bytes, without loss; Q4_0
becomes int4 keeping its codes, see :data:`BLOCK_MAPPINGS`; other types are quantized from their
values with a scale search); ``int4`` keeps int8 for tensors the GGUF stores with more than 4 bits
(see :func:`fmt_for`).

Quantization runs while the checkpoint streams in, a block of rows at a time, so the peak memory
of a load stays near the quantized size plus one block. Quantized checkpoints are saved as
safetensors with a format marker, so quantization runs once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError, Gemma4Error
from ..kernels.qweight import FORMATS as QUANT_FORMATS
from ..kernels.qweight import GROUP, QWeight, from_q4_0_int4, from_q4_0_int8, from_q4_k, from_q8_0, quantize
from .progress import LoadProgress, as_progress

# version 2: int4 in super-blocks (4.625 bits a weight); version 1 stored int4 with an fp32 scale
# and minimum per group (6 bits) and is refused; its int8 is the same as version 2's
FORMAT_VERSION = 2
MARKER_FILE = "gemma4_nb_quant.json"
ROW_BLOCK = 8192  # rows converted at a time while streaming (bounds the temporary fp32 copy)


# quant= values that ask for unquantized weights in that dtype (a quantized GGUF then dequantized)
UNQUANTIZED = ("bf16", "fp32")


def check_quant(quant) -> str | None:
    if quant is None or quant in UNQUANTIZED:
        return quant
    if quant not in QUANT_FORMATS:
        raise Gemma4Error(f"quant {quant!r} is not supported: use 'int8', 'int4', 'bf16', 'fp32' or None (a "
                          "checkpoint's own format: unquantized safetensors, a GGUF's own blocks)")
    return quant


# GGUF types stored with more than 4 bits per weight: under int4 these tensors stay int8
WIDE_GGUF_TYPES = ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K", "F32", "F16", "BF16")


def fmt_for(name: str, shape: tuple[int, ...], fmt: str, source_type: str | None = None) -> str | None:
    """The format a tensor gets under ``quant=fmt``: the decoder's matrices (projections, MLP,
    embedding/head) are quantized; norms, scalars and the media embedders stay in the model dtype.
    Under int4, a tensor the GGUF source stores with more than 4 bits (``source_type`` in
    :data:`WIDE_GGUF_TYPES`, e.g. Q5_0/Q6_K/Q8_0 in a Q4_K_M file) stays int8: int4 never goes below
    the precision the GGUF's own mixture chose for it.
    Under int4 the embedding / vocabulary head stays int8, as llama.cpp's Q4_K_M keeps it at 8 or 6
    bits: logits come straight out of it (int4 there alone cost the 270M half its greedy agreement).
    A width that is not a multiple of 32 stays unquantized."""
    if len(shape) != 2 or shape[1] % GROUP:
        return None
    head = name.endswith("embed_tokens.weight") or name == "lm_head.weight"
    if not (head or name.endswith("_proj.weight")) or "vision" in name or "audio" in name:
        return None
    if head or source_type in WIDE_GGUF_TYPES:
        return "int8"
    return fmt


# -- streaming load ----------------------------------------------------------------------------

# GGUF block types whose bytes map to a format without quantizing again: (type, format) -> the
# mapping. Exact but for Q4_0 -> int4, whose per-group scales become 8-bit multiples of a
# super-block scale (its codes kept; error about 1% of a quantization step, docs/gguf.md).
BLOCK_MAPPINGS = {("Q4_K", "int4"): from_q4_k, ("Q8_0", "int8"): from_q8_0,
                  ("Q4_0", "int8"): from_q4_0_int8, ("Q4_0", "int4"): from_q4_0_int4}


def load_quantized_from_shards(cfg, shards, names, fmt: str, dtype: torch.dtype, progress: bool | LoadProgress = True,
                               stage: str = "loading weights") -> dict:
    """Stream ``names`` from safetensors shards: each matrix is read ``ROW_BLOCK`` rows at a time
    and quantized, so only one block is ever held in full precision. Each tensor done is a step of
    ``stage`` for ``progress``."""
    from safetensors import SafetensorError

    from .checkpoint import canonical_name

    out: dict = {}
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(shards.weight_map[name], []).append(name)
    bar = as_progress(progress).stage(f"{stage} ({fmt})", len(names))
    try:
        for path, file_names in by_file.items():
            for name in file_names:
                # the shard is opened per tensor: closing it unmaps the pages read so far, so the
                # resident set holds at most one tensor's file pages, not the whole shard's
                with shards.open(path) as handle:
                    try:
                        sl = handle.get_slice(name)
                        shape = tuple(sl.get_shape())
                        f = fmt_for(name, shape, fmt)
                        if f is None:
                            out[canonical_name(cfg, name)] = handle.get_tensor(name).to(dtype)
                        else:
                            out[canonical_name(cfg, name)] = _quantize_streamed(shards, path, name, shape, f, False, dtype)
                    except (SafetensorError, OSError, ValueError) as exc:
                        raise CheckpointError(f"{path}: cannot read tensor {name} ({exc}); the shard may be corrupt") from None
                bar.update(1)
    finally:
        bar.close()
    return out


def _quantize_streamed(shards, path, name, shape, fmt: str, search: bool, dtype) -> QWeight:
    """Quantize one tensor ``ROW_BLOCK`` rows at a time into preallocated storage. The shard is
    reopened per block: closing it unmaps the pages read, so at most one block of the checkpoint
    is resident (in the file's dtype, plus its fp32 copy) however large the tensor."""
    codes = scales = None
    for r in range(0, shape[0], ROW_BLOCK):
        with shards.open(path) as handle:
            c, s, _ = quantize(handle.get_slice(name)[r : r + ROW_BLOCK], fmt, search)
        if codes is None:  # the layout of the first block, for every row
            codes = torch.empty((shape[0], c.shape[1]), dtype=c.dtype)
            scales = torch.empty((shape[0], s.shape[1]), dtype=s.dtype)
        codes[r : r + len(c)] = c
        scales[r : r + len(c)] = s
    return QWeight(fmt, codes, scales, None, tuple(shape), dtype)


# -- saving and reloading ----------------------------------------------------------------------

def is_quantized_dir(model_dir: Path) -> bool:
    return (Path(model_dir) / MARKER_FILE).is_file()


def read_marker(model_dir: Path) -> dict:
    path = Path(model_dir) / MARKER_FILE
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a valid quantization marker ({exc}); quantize the model again") from None
    version, fmt = marker.get("version"), marker.get("format")
    if version == 1 and fmt == "int4":
        raise CheckpointError(
            f"{model_dir} holds int4 weights in an earlier gemma4-nb layout (an fp32 scale and minimum per 32 "
            "weights) that this version no longer reads; it stores int4 in 4.6 bits a weight now. Re-save it "
            f"from the original checkpoint: gemma4_nb.load(<original>, quant='int4').save_quantized({str(model_dir)!r})"
        )
    if version not in (1, FORMAT_VERSION) or fmt not in QUANT_FORMATS:
        raise CheckpointError(
            f"{model_dir}: quantized with an incompatible gemma4-nb (format {marker.get('format')!r}, version "
            f"{marker.get('version')!r}; this version reads version {FORMAT_VERSION}). Quantize the original "
            "checkpoint again with load(..., quant=...) and save_quantized()"
        )
    return marker


def save_quantized(weights: dict, fmt: str, source_dir: Path, out_dir: Path) -> Path:
    """Write a model directory: quantized weights (``name.qcodes`` / ``name.qscales``, other tensors
    as they are), the config, tokenizer and templates of ``source_dir``, and the format marker."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    source_dir = Path(source_dir)
    if out_dir.resolve() == source_dir.resolve():
        raise Gemma4Error(f"{out_dir} is the source checkpoint; save the quantized model to another directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, formats = {}, {}
    for name, t in weights.items():
        if isinstance(t, QWeight):
            if t.fmt == "int4" and not t.super_blocks:
                raise Gemma4Error("int4 weights on a GPU hold expanded scales; save the quantized model from a CPU "
                                  "load (device='cpu')")
            tensors[name + ".qcodes"] = t.int8_codes().contiguous().cpu() if t.planes else t.codes.contiguous().cpu()
            tensors[name + ".qscales"] = t.scales.contiguous().cpu()
            formats[name] = [t.fmt, list(t.shape)]
        else:
            tensors[name] = t.contiguous().cpu()
    for f in source_dir.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (
                "model.safetensors.index.json", MARKER_FILE):
            shutil.copy(f, out_dir / f.name)
    save_file(tensors, str(out_dir / "model.safetensors"),
              metadata={"format": "pt", "gemma4_nb_quant": fmt, "gemma4_nb_quant_version": str(FORMAT_VERSION)})
    (out_dir / MARKER_FILE).write_text(json.dumps({"format": fmt, "version": FORMAT_VERSION, "tensors": formats}, indent=1))
    return out_dir


def load_saved_quantized(cfg, model_dir: Path, dtype: torch.dtype, quant: str | None,
                         progress: bool | LoadProgress = True) -> dict:
    """Load a directory written by :func:`save_quantized` (memory-mapped, no requantization);
    each tensor read is a step reported to ``progress``."""
    from safetensors import SafetensorError, safe_open

    from .checkpoint import canonical_name, expected_tensors

    marker = read_marker(model_dir)
    if quant is not None and quant != marker["format"]:
        raise Gemma4Error(
            f"{model_dir} holds {marker['format']} weights but quant={quant!r} was asked for; pass "
            f"quant={marker['format']!r} (or None), or quantize the original checkpoint")
    path = Path(model_dir) / "model.safetensors"
    formats = marker["tensors"]
    planes = set(marker.get("planes") or ())  # an int8 head stored in nibble planes (a repacked GGUF)
    out: dict = {}
    expected = expected_tensors(cfg)
    try:
        with safe_open(str(path), framework="pt") as handle, \
                as_progress(progress).stage(f"loading weights ({marker['format']})", len(expected)) as bar:
            keys = set(handle.keys())
            missing = []
            for name, shape in expected.items():
                canon = canonical_name(cfg, name)
                if canon in formats:
                    f, saved_shape = formats[canon]
                    if tuple(saved_shape) != tuple(shape):
                        raise CheckpointError(f"{path}: {name} was saved as {saved_shape}, config expects {list(shape)}")
                    planed = [handle.get_tensor(canon + ".qlow"), handle.get_tensor(canon + ".qrowerr")] \
                        if canon in planes else []
                    out[canon] = QWeight(f, handle.get_tensor(canon + ".qcodes"), handle.get_tensor(canon + ".qscales"),
                                         None, tuple(shape), dtype, *planed)
                elif canon in keys:
                    out[canon] = handle.get_tensor(canon).to(dtype)
                else:
                    missing.append(name)
                bar.update()
            if missing:
                raise CheckpointError(f"{path}: the quantized checkpoint lacks {len(missing)} tensors, e.g. "
                                      f"{missing[0]}; save it again")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read the quantized weights ({exc}); save them again") from None
    return out


def weights_nbytes(weights: dict) -> int:
    return sum(t.nbytes if isinstance(t, QWeight) else t.numel() * t.element_size() for t in weights.values())
