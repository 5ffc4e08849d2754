"""Weight-only quantization: int8 and int4, each with a scale per group of 32 weights.

A quantized matrix is a :class:`QWeight`: packed codes and fp32 scales in the layout the CPU
kernels (:mod:`gemma4_nb.kernels.cpu_numba`) read directly.

* ``int8`` (like ggml's Q8_0): ``codes`` int8 ``[out, in]``, ``scales`` fp32 ``[out, in // 32]``;
  ``w = code * scale`` with ``scale = max|group| / 127``. (One scale per output channel, as first
  planned, measured 94.5% greedy agreement on the embedded 270M instead of 99.6%: its GGUF weights
  are already block-quantized with a scale per 32 weights, which per-channel scales cannot
  represent. Groups of 32 cost 12.5% more bytes than per-channel scales.)
* ``int4`` (like ggml's Q4_1): ``codes`` uint8 ``[out, in // 2]``, ``scales`` and ``mins`` fp32
  ``[out, in // 32]``; ``w = q * scale + min`` with ``q`` in 0..15; byte ``j`` of a group holds
  weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble (as Q4_0/Q4_1 do).

Weights converted from a GGUF file are already quantized; there the quantizers search the scale
(``search=True``) and reproduce Q8_0/Q5_0 blocks in int8 and Q4_K blocks in int4 exactly, and
``int4`` keeps int8 for tensors the GGUF stores with more than 4 bits (see :func:`fmt_for`).

Quantization runs while the checkpoint streams in, a block of rows at a time, so the peak memory
of a load stays near the quantized size plus one block. Quantized checkpoints are saved as
safetensors with a format marker, so quantization runs once.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, Gemma4Error

QUANT_FORMATS = ("int8", "int4")
GROUP = 32
FORMAT_VERSION = 1
MARKER_FILE = "gemma4_nb_quant.json"
ROW_BLOCK = 8192  # rows converted at a time while streaming (bounds the temporary fp32 copy)


def check_quant(quant) -> str | None:
    if quant is None:
        return None
    if quant not in QUANT_FORMATS:
        raise Gemma4Error(f"quant {quant!r} is not supported: use 'int8', 'int4' or None (unquantized weights)")
    return quant


@dataclass
class QWeight:
    """A quantized ``[out, in]`` weight. ``dtype`` is the dtype of what it computes with."""

    fmt: str
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None  # int4 only
    shape: tuple[int, int]
    dtype: torch.dtype = torch.float32
    # int8 only, "nibble planes" layout (see to_planes): ``codes`` then holds the high nibbles,
    # ``low`` the low nibbles, ``row_err`` three norms per row for the head's error bounds
    low: torch.Tensor | None = None
    row_err: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def planes(self) -> bool:
        return self.low is not None

    @property
    def nbytes(self) -> int:
        parts = (self.codes, self.scales, self.mins, self.low, self.row_err)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def int8_codes(self, rows=None) -> torch.Tensor:
        """The int8 codes (rebuilt from the nibble planes in that layout)."""
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        if not self.planes:
            return pick(self.codes)
        high, low = _unpack_nibbles(pick(self.codes)), _unpack_nibbles(pick(self.low))
        return ((high.to(torch.int16) - 8) * 16 + low).to(torch.int8)

    def dequantize(self, rows=None) -> torch.Tensor:
        """The weight (or ``rows`` of it: an index tensor or a slice) in ``self.dtype``."""
        pick = (lambda t: t) if rows is None else (lambda t: None if t is None else t[rows])
        codes = self.int8_codes(rows) if self.planes else pick(self.codes)
        return dequantize(self.fmt, codes, pick(self.scales), pick(self.mins)).to(self.dtype)

    def __getitem__(self, rows) -> torch.Tensor:  # embedding lookups: rows dequantized
        return self.dequantize(rows)

    def to(self, device=None, dtype=None) -> "QWeight":
        move = (lambda t: None if t is None else t.to(device))
        return QWeight(self.fmt, self.codes.to(device), self.scales.to(device), move(self.mins), self.shape,
                       dtype or self.dtype, move(self.low), move(self.row_err))


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``[..., K // 2]`` bytes -> ``[..., K]`` nibbles in the int4 group order (byte ``j`` of a
    group of 16 bytes holds value ``j`` low and value ``j + 16`` high)."""
    lead, half = packed.shape[:-1], packed.shape[-1]
    g = packed.view(*lead, half // 16, 16)
    return torch.cat((g & 15, g >> 4), dim=-1).reshape(*lead, half * 2)


def to_planes(w: QWeight) -> QWeight:
    """An int8 weight in the "nibble planes" layout, for the vocabulary head: each code split into
    its high nibble (``code >> 4``, stored + 8) and low nibble (``code & 15``), each plane packed two
    per byte like int4. The exact dot product reads both planes (the same bytes as int8); an
    estimate from the high plane alone reads half of them, with a known error bound per row
    (``row_err``: the norm of the low nibbles' distance from 7.5, times the scales), so the head can
    screen every row cheaply and compute exactly only the rows that may be in the top-k."""
    import numpy as np

    from ..kernels import cpu_numba as nb

    if w.fmt != "int8" or w.planes:
        raise Gemma4Error(f"to_planes needs an int8 weight in the plain layout, got {w.fmt}")
    rows, cols = w.shape
    high = np.empty((rows, cols // 2), dtype=np.uint8)
    low = np.empty((rows, cols // 2), dtype=np.uint8)
    err = np.empty((rows, 3), dtype=np.float32)
    nb.split_int8_planes(w.codes.numpy(), w.scales.numpy(), high, low, err)
    return QWeight("int8", torch.from_numpy(high), w.scales, None, w.shape, w.dtype, torch.from_numpy(low),
                   torch.from_numpy(err))


def quantize(w: torch.Tensor, fmt: str, search: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(codes, scales, mins)`` of a 2-D weight in format ``fmt`` (numba, parallel over rows).
    ``search``: try several scales per group and keep the best (for already-quantized weights)."""
    import numpy as np

    from ..kernels import cpu_numba as nb

    if fmt not in QUANT_FORMATS:
        raise Gemma4Error(f"unknown quant format {fmt!r}")
    out, inp = w.shape
    if inp % GROUP:
        raise Gemma4Error(f"{fmt} needs the input width to be a multiple of {GROUP}, got a {tuple(w.shape)} weight")
    x = w.detach().to(torch.float32).contiguous().numpy()
    scales = np.empty((out, inp // GROUP), dtype=np.float32)
    if fmt == "int8":
        codes = np.empty((out, inp), dtype=np.int8)
        nb.quantize_int8_rows(x, search, codes, scales)
        return torch.from_numpy(codes), torch.from_numpy(scales), None
    codes = np.empty((out, inp // 2), dtype=np.uint8)
    mins = np.empty((out, inp // GROUP), dtype=np.float32)
    nb.quantize_int4_rows(x, search, codes, scales, mins)
    return torch.from_numpy(codes), torch.from_numpy(scales), torch.from_numpy(mins)


def dequantize(fmt: str, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 weight from its parts (plain torch: the reference the kernels are tested against)."""
    lead = codes.shape[:-1]
    groups = scales.shape[-1]
    if fmt == "int8":
        return (codes.float().view(*lead, groups, GROUP) * scales[..., None]).reshape(*lead, groups * GROUP)
    lo = (codes & 15).view(*lead, groups, 16)
    hi = (codes >> 4).view(*lead, groups, 16)
    q = torch.cat((lo, hi), dim=-1).float()
    return (q * scales[..., None] + mins[..., None]).reshape(*lead, groups * GROUP)


def quantize_weight(w: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float32, search: bool = False) -> QWeight:
    codes, scales, mins = quantize(w, fmt, search)
    return QWeight(fmt, codes, scales, mins, tuple(w.shape), dtype)


# GGUF types stored with more than 4 bits per weight: under int4 these tensors stay int8
WIDE_GGUF_TYPES = ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K")


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

def load_quantized_from_shards(cfg, shards, names, fmt: str, dtype: torch.dtype, progress: bool = True) -> dict:
    """Stream ``names`` from safetensors shards: each matrix is read ``ROW_BLOCK`` rows at a time
    and quantized, so only one block is ever held in full precision."""
    from safetensors import SafetensorError
    from tqdm.auto import tqdm

    from .checkpoint import canonical_name

    out: dict = {}
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(shards.weight_map[name], []).append(name)
    sources = gguf_source_types(shards.model_dir)
    search = bool(sources)  # converted from a GGUF: the weights are already block-quantized
    bar = tqdm(total=len(names), desc=f"Loading weights ({fmt})", unit="tensor", disable=not progress, leave=False)
    try:
        for path, file_names in by_file.items():
            for name in file_names:
                # the shard is opened per tensor: closing it unmaps the pages read so far, so the
                # resident set holds at most one tensor's file pages, not the whole shard's
                with shards.open(path) as handle:
                    try:
                        sl = handle.get_slice(name)
                        shape = tuple(sl.get_shape())
                        f = fmt_for(name, shape, fmt, sources.get(name))
                        if f is None:
                            out[canonical_name(cfg, name)] = handle.get_tensor(name).to(dtype)
                        else:
                            out[canonical_name(cfg, name)] = _quantize_streamed(shards, path, name, shape, f, search, dtype)
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
    rows, cols = shape
    codes = torch.empty((rows, cols if fmt == "int8" else cols // 2), dtype=torch.int8 if fmt == "int8" else torch.uint8)
    scales = torch.empty((rows, cols // GROUP), dtype=torch.float32)
    mins = torch.empty((rows, cols // GROUP), dtype=torch.float32) if fmt == "int4" else None
    for r in range(0, rows, ROW_BLOCK):
        with shards.open(path) as handle:
            c, s, m = quantize(handle.get_slice(name)[r : r + ROW_BLOCK], fmt, search)
        codes[r : r + len(c)] = c
        scales[r : r + len(c)] = s
        if mins is not None:
            mins[r : r + len(c)] = m
    return QWeight(fmt, codes, scales, mins, tuple(shape), dtype)


def gguf_source_types(model_dir: Path) -> dict[str, str]:
    """Checkpoint name -> GGUF type, for a directory converted from a GGUF file (else empty)."""
    from .gguf_file import SOURCE_TYPES_FILE

    path = Path(model_dir) / SOURCE_TYPES_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


# -- saving and reloading ----------------------------------------------------------------------

def is_quantized_dir(model_dir: Path) -> bool:
    return (Path(model_dir) / MARKER_FILE).is_file()


def read_marker(model_dir: Path) -> dict:
    path = Path(model_dir) / MARKER_FILE
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a valid quantization marker ({exc}); quantize the model again") from None
    if marker.get("version") != FORMAT_VERSION or marker.get("format") not in QUANT_FORMATS:
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
            tensors[name + ".qcodes"] = t.int8_codes().contiguous().cpu() if t.planes else t.codes.contiguous().cpu()
            tensors[name + ".qscales"] = t.scales.contiguous().cpu()
            if t.mins is not None:
                tensors[name + ".qmins"] = t.mins.contiguous().cpu()
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


def load_saved_quantized(cfg, model_dir: Path, dtype: torch.dtype, quant: str | None, progress: bool = True) -> dict:
    """Load a directory written by :func:`save_quantized` (memory-mapped, no requantization)."""
    from safetensors import SafetensorError, safe_open

    from .checkpoint import canonical_name, expected_tensors

    marker = read_marker(model_dir)
    if quant is not None and quant != marker["format"]:
        raise Gemma4Error(
            f"{model_dir} holds {marker['format']} weights but quant={quant!r} was asked for; pass "
            f"quant={marker['format']!r} (or None), or quantize the original checkpoint")
    path = Path(model_dir) / "model.safetensors"
    formats = marker["tensors"]
    out: dict = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            missing = []
            for name, shape in expected_tensors(cfg).items():
                canon = canonical_name(cfg, name)
                if canon in formats:
                    f, saved_shape = formats[canon]
                    if tuple(saved_shape) != tuple(shape):
                        raise CheckpointError(f"{path}: {name} was saved as {saved_shape}, config expects {list(shape)}")
                    mins = handle.get_tensor(canon + ".qmins") if f == "int4" else None
                    out[canon] = QWeight(f, handle.get_tensor(canon + ".qcodes"), handle.get_tensor(canon + ".qscales"),
                                         mins, tuple(shape), dtype)
                elif canon in keys:
                    out[canon] = handle.get_tensor(canon).to(dtype)
                else:
                    missing.append(name)
            if missing:
                raise CheckpointError(f"{path}: the quantized checkpoint lacks {len(missing)} tensors, e.g. "
                                      f"{missing[0]}; save it again")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read the quantized weights ({exc}); save them again") from None
    return out


def weights_nbytes(weights: dict) -> int:
    return sum(t.nbytes if isinstance(t, QWeight) else t.numel() * t.element_size() for t in weights.values())
