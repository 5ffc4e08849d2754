"""The quantized weight format the kernels read: int8 and int4, a scale per group of 32 weights.

A quantized ``[out, in]`` matrix is a :class:`QWeight`: packed codes and fp32 scales in the layout
the CPU kernels (:mod:`.cpu_numba`, :mod:`.simd`) and the GPU kernels (:mod:`.gpu`) read directly.

* ``int8`` (like ggml's Q8_0): ``codes`` int8 ``[out, in]``, ``scales`` fp32 ``[out, in // 32]``;
  ``w = code * scale`` with ``scale = max|group| / 127``. A scale per group rather than per output
  channel: GGUF weights are already block-quantized with a scale per 32 weights, which a
  per-channel scale cannot represent (the embedded 270M measured 94.5% greedy agreement with
  per-channel scales, 99.6% with groups).
* ``int4`` (like ggml's Q4_K): ``codes`` uint8 ``[out, in // 2]``, byte ``j`` of a group of 32
  holding weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble; ``w = q * scale
  - min`` with ``q`` in 0..15, and each group's scale and minimum stored in 8 bits relative to its
  *super-block* of 8 groups (256 weights): ``scale = d * sc``, ``min = dmin * mn``. ``scales`` is
  uint8 ``[out, S * 20]`` (``S = ceil(in / 256)`` super-blocks of 20 bytes: ``d`` and ``dmin`` as
  fp16 of the value times 4096, 8 ``sc``, 8 ``mn``; a last, partial super-block has unused
  entries; constants in :mod:`.layout`). 4.625 bits a
  weight (Q4_1's fp32 scale and minimum per group took 6); a Q4_K block (6-bit ``sc``/``mn``)
  maps to it without loss. ``mins`` is None. On CUDA the sub-scales are expanded to fp32 scales
  and minimums per group (``scales``/``mins`` ``[out, in // 32]``, :meth:`QWeight.to`), the
  layout :mod:`.gpu` reads.
* int8 "nibble planes" (:func:`to_planes`, the vocabulary head): the same bytes split so that a
  first pass can read half of them.

The quantizers run in numba; ``search=True`` tries several scales per group, which reproduces
already-quantized GGUF blocks (Q8_0/Q5_0 in int8, Q4_K in int4) exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .layout import GROUP, META, SUPER, SUPER_SCALE

FORMATS = ("int8", "int4")


def matrix_bytes(fmt: str, shape: tuple[int, int]) -> int:
    """Bytes of an ``[out, in]`` matrix in ``fmt`` with its scales: the one size rule every
    estimate uses (the memory planner, the loader's check). int8: 32 codes and an fp32 scale per
    group (9 bits a weight); int4: 16 bytes per group and 20 per super-block of 8 groups (4.625
    bits a weight when ``in`` is a multiple of 256)."""
    rows, cols = shape
    groups = cols // GROUP
    if fmt == "int8":
        return rows * (cols + 4 * groups)
    return rows * (cols // 2 + META * -(-groups // SUPER))


@dataclass
class QWeight:
    """A quantized ``[out, in]`` weight. ``dtype`` is the dtype of what it computes with."""

    fmt: str
    codes: torch.Tensor
    scales: torch.Tensor  # int8: fp32 per group; int4: super-block bytes (or fp32 per group, on CUDA)
    mins: torch.Tensor | None  # int4 with fp32 scales per group only
    shape: tuple[int, int]
    dtype: torch.dtype = torch.float32
    # int8 only, "nibble planes" layout (see to_planes): ``codes`` then holds the high nibbles,
    # ``low`` the low nibbles, ``row_err`` three norms per row for the head's error bounds
    low: torch.Tensor | None = None
    row_err: torch.Tensor | None = None
    # a layer's small int8/int4 matrix on a CPU with 512-bit VNNI: its codes again in sixteen-row
    # blocks (ops.kernel_weight, kernels/simd_blocks.py), made with the decoder
    block_codes: np.ndarray | None = None

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def planes(self) -> bool:
        return self.low is not None

    @property
    def nbytes(self) -> int:
        parts = (self.codes, self.scales, self.mins, self.low, self.row_err)
        copy = 0 if self.block_codes is None else self.block_codes.nbytes
        return sum(t.numel() * t.element_size() for t in parts if t is not None) + copy

    def int8_codes(self, rows=None) -> torch.Tensor:
        """The int8 codes (rebuilt from the nibble planes in that layout)."""
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        if not self.planes:
            return pick(self.codes)
        high, low = _unpack_nibbles(pick(self.codes)), _unpack_nibbles(pick(self.low))
        return ((high.to(torch.int16) - 8) * 16 + low).to(torch.int8)

    @property
    def super_blocks(self) -> bool:
        """int4 with its scales in super-blocks (the stored and CPU layout)."""
        return self.fmt == "int4" and self.scales.dtype == torch.uint8

    def group_scales(self, rows=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 ``(scales, mins)`` per group ``[rows, in // 32]`` (``mins`` None for int8), in the
        convention ``w = q * scale + min``."""
        pick = (lambda t: t) if rows is None else (lambda t: None if t is None else t[rows])
        if not self.super_blocks:
            return pick(self.scales), pick(self.mins)
        return expand_super_blocks(pick(self.scales), self.shape[1] // GROUP)

    def dequantize(self, rows=None) -> torch.Tensor:
        """The weight (or ``rows`` of it: an index tensor or a slice) in ``self.dtype``."""
        pick = (lambda t: t) if rows is None else (lambda t: None if t is None else t[rows])
        codes = self.int8_codes(rows) if self.planes else pick(self.codes)
        return dequantize(self.fmt, codes, *self.group_scales(rows)).to(self.dtype)

    def __getitem__(self, rows) -> torch.Tensor:  # embedding lookups: rows dequantized
        return self.dequantize(rows)

    def per_group(self) -> "QWeight":
        """The same weight with fp32 scales (and int4 minimums) per group: the layout the GPU
        kernels read."""
        if not self.super_blocks:
            return self
        scales, mins = self.group_scales()
        return QWeight(self.fmt, self.codes, scales, mins, self.shape, self.dtype)

    def to(self, device=None, dtype=None) -> "QWeight":
        """On ``device`` (computing in ``dtype``); int4 goes to CUDA per group (:meth:`per_group`)."""
        w = self.per_group() if device is not None and torch.device(device).type == "cuda" else self
        move = (lambda t: None if t is None else t.to(device))
        return QWeight(w.fmt, w.codes.to(device), w.scales.to(device), move(w.mins), w.shape,
                       dtype or w.dtype, move(w.low), move(w.row_err))


def expand_super_blocks(meta: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 super-block bytes ``[..., S * 20]`` -> fp32 ``(scales, mins)`` per group ``[..., groups]``
    (``w = q * scale + min``: the stored minimum is subtracted, so ``min = -dmin * mn``)."""
    lead = meta.shape[:-1]
    blocks = meta.reshape(*lead, -1, META)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float() / SUPER_SCALE  # [..., S, 1]
    dmin = blocks[..., 2:4].contiguous().view(torch.float16).float() / SUPER_SCALE
    sc = blocks[..., 4:4 + SUPER].float() * d
    mn = blocks[..., 4 + SUPER:4 + 2 * SUPER].float() * dmin
    return sc.reshape(*lead, -1)[..., :groups], -mn.reshape(*lead, -1)[..., :groups]


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

    from . import cpu_numba as nb

    if w.fmt != "int8" or w.planes:
        raise ValueError(f"to_planes needs an int8 weight in the plain layout, got {w.fmt}")
    rows, cols = w.shape
    high = np.empty((rows, cols // 2), dtype=np.uint8)
    low = np.empty((rows, cols // 2), dtype=np.uint8)
    err = np.empty((rows, 3), dtype=np.float32)
    nb.split_int8_planes(w.codes.numpy(), w.scales.numpy(), high, low, err)
    return QWeight("int8", torch.from_numpy(high), w.scales, None, w.shape, w.dtype, torch.from_numpy(low),
                   torch.from_numpy(err))


def quantize(w: torch.Tensor, fmt: str, search: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(codes, scales, mins)`` of a 2-D weight in format ``fmt`` (numba, parallel over rows; int4
    in super-blocks, ``mins`` None). ``search``: try several scales per group and keep the best
    (for already-quantized weights)."""
    import numpy as np

    from . import cpu_numba as nb

    if fmt not in FORMATS:
        raise ValueError(f"unknown quant format {fmt!r}")
    out, inp = w.shape
    if inp % GROUP:
        raise ValueError(f"{fmt} needs the input width to be a multiple of {GROUP}, got a {tuple(w.shape)} weight")
    x = w.detach().to(torch.float32).contiguous().numpy()
    scales = np.empty((out, inp // GROUP), dtype=np.float32)
    if fmt == "int8":
        codes = np.empty((out, inp), dtype=np.int8)
        nb.quantize_int8_rows(x, search, codes, scales)
        return torch.from_numpy(codes), torch.from_numpy(scales), None
    codes = np.empty((out, inp // 2), dtype=np.uint8)
    meta = np.zeros((out, -(-(inp // GROUP) // SUPER) * META), dtype=np.uint8)
    nb.quantize_int4_rows(x, search, codes, meta)
    return torch.from_numpy(codes), torch.from_numpy(meta), None


def dequantize(fmt: str, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 weight from its parts, with fp32 scales (and int4 minimums) per group (plain torch:
    the reference the kernels are tested against; see :meth:`QWeight.group_scales`)."""
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


# -- ggml's block formats, mapped without loss -------------------------------------------------

def from_q8_0(raw, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> QWeight:
    """int8 from ggml Q8_0 blocks (``raw``: uint8 ``[rows, in // 32 * 34]``: fp16 ``d``, 32 int8
    codes): the same codes, ``d`` as the fp32 scale."""
    import numpy as np

    rows, cols = shape
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // 32, 34)
    codes = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(rows, cols)
    scales = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16).reshape(rows, cols // 32).astype(np.float32)
    return QWeight("int8", torch.from_numpy(codes), torch.from_numpy(scales), None, (rows, cols), dtype)


def from_q4_k(raw, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> QWeight:
    """int4 from ggml Q4_K blocks (``raw``: uint8 ``[rows, in // 256 * 144]``: fp16 ``d``, fp16
    ``dmin``, 12 bytes of 6-bit sub-scales and minimums, 128 bytes of nibbles, where byte ``l`` of
    chunk ``c`` holds weight ``64c + l`` low and ``64c + 32 + l`` high; ``w = d * sc * q - dmin *
    m``): the same numbers in this format's super-blocks, without loss."""
    import numpy as np

    rows, cols = shape
    nb = cols // 256
    blocks = np.ascontiguousarray(raw).reshape(rows, nb, 144)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc6 = blocks[:, :, 4:16].astype(np.uint8)
    sc = np.empty((rows, nb, 8), dtype=np.uint8)
    mn = np.empty((rows, nb, 8), dtype=np.uint8)
    sc[..., :4], mn[..., :4] = sc6[..., 0:4] & 63, sc6[..., 4:8] & 63
    sc[..., 4:] = (sc6[..., 8:12] & 15) | ((sc6[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (sc6[..., 8:12] >> 4) | ((sc6[..., 4:8] >> 6) << 4)
    qs = blocks[:, :, 16:].reshape(rows, nb, 4, 32)
    q = np.stack((qs & 15, qs >> 4), axis=3).reshape(rows, nb, 8, 32)  # groups 2c (low), 2c + 1 (high)
    codes = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8).reshape(rows, cols // 2)
    meta = np.empty((rows, nb, META), dtype=np.uint8)
    meta[..., 0:2] = (d * SUPER_SCALE).astype(np.float16)[..., None].view(np.uint8)
    meta[..., 2:4] = (dmin * SUPER_SCALE).astype(np.float16)[..., None].view(np.uint8)
    meta[..., 4:4 + SUPER], meta[..., 4 + SUPER:] = sc, mn
    return QWeight("int4", torch.from_numpy(codes), torch.from_numpy(meta.reshape(rows, nb * META)), None,
                   (rows, cols), dtype)


def from_q4_0_int8(raw, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> QWeight:
    """int8 from ggml Q4_0 blocks (``raw``: uint8 ``[rows, in // 32 * 18]``: fp16 ``d``, 16 bytes
    of nibbles, byte ``j`` holding weight ``j`` low and ``j + 16`` high; ``w = d * (q - 8)``): the
    codes ``q - 8`` with ``d`` as the scale, without loss (at twice the bytes of int4)."""
    import numpy as np

    rows, cols = shape
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // 32, 18)
    qs = blocks[:, :, 2:]
    codes = (np.concatenate((qs & 15, qs >> 4), axis=2).astype(np.int8) - 8).reshape(rows, cols)
    scales = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16).reshape(rows, cols // 32).astype(np.float32)
    return QWeight("int8", torch.from_numpy(codes), torch.from_numpy(scales), None, (rows, cols), dtype)


def from_q4_0_int4(raw, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> QWeight:
    """int4 from ggml Q4_0 blocks, keeping their codes: the nibbles are laid out as this format's
    (byte ``j`` of a group: weight ``j`` low, ``j + 16`` high); a negative ``d`` flips a group's
    codes (``q -> 15 - q``), so each group is ``w = |d| * q' - c * |d|`` with ``c`` 8 or 7. What is
    not exact: ``|d|`` becomes an 8-bit multiple of its super-block's largest ``|d|`` / 255, and the
    offset the least-squares best for the rounded scale (``c|d| + 7.5 (s' - |d|)``), in 8 bits
    relative to the super-block's largest offset. The error is a fraction of a quantization step
    in groups near their super-block's largest scale (docs/gguf.md has the measurements)."""
    import numpy as np

    rows, cols = shape
    groups = cols // GROUP
    nsb = -(-groups // SUPER)
    blocks = np.ascontiguousarray(raw).reshape(rows, groups, 18)
    d = blocks[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[:, :, 2:]
    neg = d < 0
    codes = np.where(neg[..., None], 255 - qs, qs).astype(np.uint8)  # both nibbles flipped: 15 - q
    ad = np.abs(d)
    c = np.where(neg, 7.0, 8.0).astype(np.float32)
    pad = nsb * SUPER - groups
    ad_p = np.pad(ad, ((0, 0), (0, pad))).reshape(rows, nsb, SUPER)
    c_p = np.pad(c, ((0, 0), (0, pad))).reshape(rows, nsb, SUPER)
    d_super = _fp16_scale(ad_p.max(axis=2) / 255.0)
    sc = np.clip(np.rint(ad_p / np.where(d_super > 0, d_super, 1.0)[..., None]), 0, 255)
    approx = sc * d_super[..., None]
    offset = c_p * ad_p + 7.5 * (approx - ad_p)  # least squares over q' in 0..15, for the rounded scale
    offset = np.maximum(offset, 0.0)
    dmin = _fp16_scale(offset.max(axis=2) / 255.0)
    mn = np.clip(np.rint(offset / np.where(dmin > 0, dmin, 1.0)[..., None]), 0, 255)
    meta = np.zeros((rows, nsb, META), dtype=np.uint8)
    meta[..., 0:2] = (d_super * SUPER_SCALE).astype(np.float16)[..., None].view(np.uint8)
    meta[..., 2:4] = (dmin * SUPER_SCALE).astype(np.float16)[..., None].view(np.uint8)
    meta[..., 4:4 + SUPER], meta[..., 4 + SUPER:] = sc.astype(np.uint8), mn.astype(np.uint8)
    return QWeight("int4", torch.from_numpy(codes.reshape(rows, cols // 2)),
                   torch.from_numpy(meta.reshape(rows, nsb * META)), None, (rows, cols), dtype)


def _fp16_scale(x):
    """``x`` rounded to what a super-block stores (fp16 of ``x * SUPER_SCALE``), as fp32."""
    import numpy as np

    return ((x * SUPER_SCALE).astype(np.float16).astype(np.float32) / SUPER_SCALE).astype(np.float32)
