"""A GGUF's weights in the runtime's formats, without an fp32 copy.

Quantized loads repack the file once into the runtime's int8/int4 format and cache the result as a
directory :func:`~.quant.load_saved_quantized` reads (the layout :func:`~.quant.save_quantized`
writes), so later loads are memory-mapped. Each tensor is converted a block of rows at a time,
read from the file and written at its place in the output, so the memory a repack needs is one
block, not the model. Block types with an exact counterpart are mapped byte for byte
(:data:`~.quant.BLOCK_MAPPINGS`: Q8_0 and Q4_0 to int8, Q4_K to int4, Q4_0 to int4 keeping its
codes); the others are dequantized a block at a time and quantized again with the scale search
(``search=True``, which reproduces already block-quantized values closely).

Unquantized loads (a F32/F16/BF16 file, or ``quant="fp32"``/``"bf16"``) read the tensors from the
file at every load, dequantized to the model dtype.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..kernels.layout import GROUP, META, SUPER
from ..kernels.qweight import expand_super_blocks, quantize
from .checkpoint import canonical_name, check_finite, expected_tensors
from .config import ModelConfig
from .gguf_file import ARCHITECTURES, CONFIG_TENSORS, FLOAT_TYPES, GGUFFile, TensorInfo, hf_name
from .progress import LoadProgress, as_progress

BLOCK_ELEMENTS = 16 << 20  # weights converted at a time (64 MB in fp32)
WEIGHTS_FILE = "model.safetensors"
FOUR_BIT_TYPES = ("Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS")


def own_format(g: GGUFFile) -> str | None:
    """The format a GGUF keeps by default: None (plain tensors) when its matrices are F32/F16/BF16,
    int4 when any is stored in 4 bits (a Q4_K_M or Q4_0 file; its wider tensors stay int8, see
    :func:`~.quant.fmt_for`), else int8 (Q8_0, Q6_K, Q5_K files)."""
    types = {info.qtype.name for name, info in g.tensors.items()
             if (hf := hf_name(name)) is not None and hf.endswith("_proj.weight")}
    if types <= set(FLOAT_TYPES):
        return None
    return "int4" if types & set(FOUR_BIT_TYPES) else "int8"


def checked_tensors(g: GGUFFile, cfg: ModelConfig) -> dict[str, TensorInfo]:
    """Hugging Face name -> the file's tensor, for every tensor the config expects; one error lists
    every missing and mis-shaped tensor, and a type this runtime cannot read is named."""
    infos = g.by_hf_name()
    unknown = [n for n in g.tensors if hf_name(n) is None and n not in CONFIG_TENSORS]
    if unknown:
        raise CheckpointError(f"{g.path}: tensors this runtime does not know: {', '.join(unknown[:8])}")
    expected = expected_tensors(cfg)
    missing = [n for n in expected if n not in infos]
    wrong = [f"{infos[n].name}: file {list(infos[n].shape)}, config expects {list(s)}"
             for n, s in expected.items() if n in infos and tuple(infos[n].shape) != tuple(s)]
    if missing or wrong:
        listing = "; ".join(([f"missing {len(missing)}: {', '.join(missing[:6])}"] if missing else []) +
                            ([f"wrong shape {len(wrong)}: {', '.join(wrong[:6])}"] if wrong else []))
        raise CheckpointError(f"{g.path}: the tensors do not match the file's own metadata ({listing}); "
                              "the file is damaged or was written by an incompatible converter")
    for name in expected:
        g.check_type(infos[name])
    return {name: infos[name] for name in expected}


def _rows_per_block(info: TensorInfo) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, info.shape[-1]))


def _plain_block(g: GGUFFile, name: str, info: TensorInfo, raw: np.ndarray) -> torch.Tensor:
    """Rows of a tensor as fp32 in the Hugging Face convention, refused by name if not finite."""
    try:
        t = g.dequantized(info, raw)
    except (ValueError, RuntimeError) as exc:  # a size that does not match the shape or the type
        raise CheckpointError(f"{g.path}: tensor {info.name} cannot be read ({exc}); the file is damaged") from None
    check_finite(info.name, t, g.path)
    if ARCHITECTURES[g.architecture].norms_store_one_plus_w and name.endswith("norm.weight"):
        t = t - 1.0  # back to the Hugging Face convention, where the model adds the 1
    return t


def plain_weights(g: GGUFFile, cfg: ModelConfig, dtype: torch.dtype,
                  progress: bool | LoadProgress = False) -> dict[str, torch.Tensor]:
    """Every tensor the decoder needs, dequantized to ``dtype`` (canonical names), a block of rows
    at a time so that only one block is ever in fp32; the file's bytes read are ``progress``'s steps."""
    out = {}
    tensors = checked_tensors(g, cfg)
    with as_progress(progress).stage(f"reading {g.path.name}", sum(i.nbytes for i in tensors.values()), "B") as bar:
        for name, info in tensors.items():
            rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
            if len(info.shape) == 1:
                raw = g.rows(info)
                out[canonical_name(cfg, name)] = _plain_block(g, name, info, raw).to(dtype)
                bar.update(raw.nbytes)
                continue
            t = torch.empty(info.shape, dtype=dtype)
            step = _rows_per_block(info)
            for r in range(0, rows, step):
                raw = g.rows(info, r, r + step)
                t[r : r + step] = _plain_block(g, name, info, raw)
                bar.update(raw.nbytes)
            out[canonical_name(cfg, name)] = t
    return out


# -- repacking into a quantized directory --------------------------------------------------------

_ST_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.float32: "F32"}


def _layout(name: str, info: TensorInfo, fmt: str | None,
            planes: bool = False) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The safetensors entries of one tensor: codes and scales of a quantized matrix (an int8
    vocabulary head in nibble planes: high, low, scales, row norms), else itself."""
    if fmt is None:
        return [(name, torch.float32, tuple(info.shape))]
    rows, cols = info.shape
    if planes:
        return [(name + ".qcodes", torch.uint8, (rows, cols // 2)), (name + ".qlow", torch.uint8, (rows, cols // 2)),
                (name + ".qscales", torch.float32, (rows, cols // GROUP)), (name + ".qrowerr", torch.float32, (rows, 3))]
    if fmt == "int8":
        return [(name + ".qcodes", torch.int8, (rows, cols)), (name + ".qscales", torch.float32, (rows, cols // GROUP))]
    return [(name + ".qcodes", torch.uint8, (rows, cols // 2)),
            (name + ".qscales", torch.uint8, (rows, -(-(cols // GROUP) // SUPER) * META))]


def repack(g: GGUFFile, cfg: ModelConfig, fmt: str, out_dir: Path, progress: bool | LoadProgress = False) -> None:
    """Write ``out_dir/model.safetensors`` and the quantization marker: every matrix in ``fmt``
    (or int8, as :func:`~.quant.fmt_for` decides), the rest in fp32, converted a block of rows at a
    time and written in place (the header first, from the shapes alone). The file's bytes
    converted are ``progress``'s steps."""
    from .decoder import GemmaModel
    from .quant import BLOCK_MAPPINGS, FORMAT_VERSION, MARKER_FILE, fmt_for

    tensors = checked_tensors(g, cfg)
    head = "lm_head.weight" if "lm_head.weight" in tensors else next(n for n in tensors if n.endswith("embed_tokens.weight"))
    plan = []  # (hf name, info, format or None, entries)
    planes = []  # the vocabulary head, stored in the nibble planes the decoder screens it with on the CPU
    for name, info in tensors.items():
        f = fmt_for(name, tuple(info.shape), fmt, info.qtype.name)
        split = name == head and f == "int8" and info.shape[0] >= GemmaModel.SCREENED_HEAD_MIN_ROWS
        if split:
            planes.append(canonical_name(cfg, name))
        plan.append((name, info, f, _layout(canonical_name(cfg, name), info, f, split)))
    header, offset = {}, 0
    for _, _, _, entries in plan:
        for key, dtype, shape in entries:
            n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
    header["__metadata__"] = {"format": "pt", "gemma4_nb_quant": fmt, "gemma4_nb_quant_version": str(FORMAT_VERSION),
                              "source": g.path.name}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    base = 8 + len(blob)
    path = Path(out_dir) / WEIGHTS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    bar = as_progress(progress).stage(f"repacking {g.path.name} as {fmt}", sum(p[1].nbytes for p in plan), "B")
    try:
        os.pwrite(fd, len(blob).to_bytes(8, "little") + blob, 0)
        for name, info, f, entries in plan:
            starts = [base + header[key]["data_offsets"][0] for key, _, _ in entries]
            rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
            step = _rows_per_block(info) if f is not None else rows
            for r in range(0, rows, step):
                raw = g.rows(info, r, r + step)
                parts = _convert(g, name, info, f, raw, BLOCK_MAPPINGS)
                if len(entries) == 4:  # nibble planes (kernels.qweight.to_planes), block by block
                    parts = _split_planes(*parts)
                for start, (key, dtype, shape), part in zip(starts, entries, parts):
                    row_bytes = part[0].nbytes if part.dim() > 1 else 0
                    _pwrite_all(fd, part.contiguous().numpy().tobytes(), start + r * row_bytes)
                bar.update(raw.nbytes)
        os.ftruncate(fd, base + offset)
    finally:
        bar.close()
        os.close(fd)
    formats = {canonical_name(cfg, name): [f, list(info.shape)] for name, info, f, _ in plan if f is not None}
    (Path(out_dir) / MARKER_FILE).write_text(json.dumps(
        {"format": fmt, "version": FORMAT_VERSION, "tensors": formats, "planes": planes, "source": g.path.name},
        indent=1))


def _split_planes(codes: torch.Tensor, scales: torch.Tensor) -> list[torch.Tensor]:
    """int8 rows -> ``[high, low, scales, row norms]`` as :func:`~..kernels.qweight.to_planes` lays them out."""
    from ..kernels import cpu_numba as nb

    rows, cols = codes.shape
    high = np.empty((rows, cols // 2), dtype=np.uint8)
    low = np.empty((rows, cols // 2), dtype=np.uint8)
    err = np.empty((rows, 3), dtype=np.float32)
    nb.split_int8_planes(codes.numpy(), scales.numpy(), high, low, err)
    return [torch.from_numpy(high), torch.from_numpy(low), scales, torch.from_numpy(err)]


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _convert(g: GGUFFile, name: str, info: TensorInfo, f: str | None, raw: np.ndarray, mappings) -> list[torch.Tensor]:
    """Rows of one tensor in their stored form: ``[codes, scales]`` of a quantized matrix (mapped
    from the blocks when :data:`~.quant.BLOCK_MAPPINGS` has the pair, else quantized again), or
    ``[fp32 values]``."""
    if f is None:
        return [_plain_block(g, name, info, raw)]
    shape = (raw.shape[0], info.shape[1])
    mapping = mappings.get((info.qtype.name, f))
    if mapping is not None:
        try:
            w = mapping(raw, shape)
        except ValueError as exc:
            raise CheckpointError(f"{g.path}: tensor {info.name} cannot be read ({exc}); the file is damaged") from None
        scales = w.scales if f == "int8" else expand_super_blocks(w.scales, shape[1] // GROUP)[0]
        check_finite(f"{info.name} (scales)", scales, g.path)
        return [w.codes, w.scales]
    codes, scales, _ = quantize(_plain_block(g, name, info, raw), f, search=info.qtype.name not in FLOAT_TYPES)
    return [codes, scales]
