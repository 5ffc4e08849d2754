"""The ops the model calls: the torch reference kernels, with quantized weights and fused CPU
kernels behind the same calls.

A weight is either a tensor (the torch path, any device) or a :class:`~gemma4_nb.kernels.qweight.QWeight`:

* on the CPU, a QWeight runs the numba kernels of :mod:`.cpu_numba` (dequantization fused into the
  matrix-vector or small matrix-matrix product; gate/up/GELU fused; the head fused with top-k);
  a prompt of more than :func:`integer_batch` positions dequantizes blocks of rows and multiplies them
  with torch's GEMM (compute-bound, so the dequantization is a small extra), in bf16 for int4
  weights on a CPU that multiplies bf16 natively, else in fp32 (:func:`prefill_dtype`);
* on CUDA, :mod:`.gpu` runs it (a fused-dequantization Triton kernel for decode-sized batches,
  dequantized blocks and cuBLAS for prefill), and attention runs SDPA (head_dim 512 included);
* elsewhere, a QWeight is dequantized block by block and multiplied with torch.

``fused=True`` (set by the model when its weights are quantized on the CPU) also sends a decode
step's attention to the numba kernel; fp32/bf16 models keep the torch reference everywhere.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch

from . import gpu as _gpu
from . import torch_ops as _ref
from .qweight import QWeight
from .torch_ops import RopePair, RopeTable, apply_rope, attention_mask, gelu_tanh, rms_norm, score_block_elements, softcap  # noqa: F401

SMALL_BATCH = 16  # up to this many positions: numba products; above: dequantized blocks + torch GEMM
# ... and up to WIDE_ROW_BATCH[fmt] for rows of at least WIDE_ROW weights (Gemma 4 12B's are 3,840
# and up). The integer kernels cost per position, the dequantized blocks a fixed cost per weight
# plus a cheaper GEMM per position; on one core the two crossed at ~24 positions for the 270M's
# 640-weight rows, and for the 12B's 3,840-weight rows at ~70 (int8, fp32 GEMM) and ~110 positions
# (int4, bf16 GEMM) (docs/kernels.md).
WIDE_ROW, WIDE_ROW_BATCH = 2560, {"int8": 64, "int4": 112}
DEQUANT_BLOCK_ELEMENTS = 1 << 22  # elements of one dequantized block (16 MiB in fp32)
PREFILL_ENV = "GEMMA4_NB_PREFILL"  # "auto" (default), "bf16" or "fp32": the dtype of CPU prefill products

_threads = None
_modules = None  # (cpu_numba, cpu_decode), imported on first use (numba is imported lazily)
_pinned = None  # the thread count numba keeps while torch runs single-threaded (numba_threads_only)


def sync_threads() -> None:
    """numba's thread count follows torch's (the runtime's setting, ``torch.set_num_threads``)."""
    global _threads
    want = _pinned or torch.get_num_threads()
    if want != _threads:
        import numba

        numba.set_num_threads(max(1, min(want, numba.config.NUMBA_NUM_THREADS)))
        _threads = want


def _nb():
    """The numba kernels, with numba's thread count following torch's."""
    global _modules
    if _modules is None:
        from . import cpu_decode, cpu_numba

        _modules = (cpu_numba, cpu_decode)
    sync_threads()
    return _modules[0]


@contextmanager
def numba_threads_only():
    """Inside, torch runs single-threaded and numba keeps the configured thread count: for forwards
    of a few positions on quantized CPU weights, where numba's kernels do the work and torch only
    small ops between them. torch's OpenMP threads spin for a while after every parallel op, and
    on a machine with as many cores as threads that spinning takes the cores numba's next kernel
    needs: a 7-position verification forward of the 270M ran 3-5x slower with torch on 2 threads."""
    global _pinned
    want = _pinned or torch.get_num_threads()
    if want == 1 or _pinned is not None:
        yield
        return
    _pinned = want
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(want)
        _pinned = None


def _decode():
    _nb()  # thread count
    return _modules[1]


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def native_bf16() -> bool:
    """The CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16), so torch's bf16 GEMM (oneDNN)
    runs faster than its fp32 one instead of emulating bf16."""
    try:
        import llvmlite.binding as llvm
    except ImportError:
        return False
    features = llvm.get_host_cpu_features()
    return bool(features.get("avx512bf16") or features.get("amx-bf16"))


def prefill_dtype(fmt: str = "int4") -> torch.dtype:
    """The dtype of prefill products with ``fmt`` (int8/int4) weights on the CPU.

    bf16 runs torch's GEMM 2.5-3.5x faster on a CPU that multiplies bf16 natively
    (:func:`native_bf16`: AVX512-BF16 or AMX), but torch's CPU GEMM rounds each product's output to
    bf16. For int4 weights that rounding is small beside the weights' own (the 270M's top-1
    agreement with fp32 stays 98.4% against a 95% target), for int8 it is not (99.6% -> 98.4%,
    against 99%). So by default (``$GEMMA4_NB_PREFILL`` unset or ``auto``) int4 prefills in bf16
    where the CPU has native bf16, and everything else in fp32; ``bf16`` or ``fp32`` forces one
    for every format (``fp32`` is the exact reference the tests compare with)."""
    import os

    asked = os.environ.get(PREFILL_ENV, "").strip().lower()
    if asked == "bf16":
        return torch.bfloat16
    if asked == "fp32":
        return torch.float32
    if asked not in ("", "auto"):
        _warn_prefill_setting(asked)
    return torch.bfloat16 if fmt == "int4" and native_bf16() else torch.float32


@lru_cache(maxsize=None)
def _warn_prefill_setting(asked: str) -> None:
    """Once per value: a misspelt setting must not stop a generation, nor go unnoticed."""
    import warnings

    warnings.warn(f"${PREFILL_ENV}={asked!r} is not a prefill dtype: use auto, bf16 or fp32 (auto is used)",
                  stacklevel=4)


def integer_batch(in_features: int, fmt: str = "int8") -> int:
    """The most positions a product with ``fmt`` rows of ``in_features`` weights runs on the
    integer kernels; more go through dequantized blocks and torch's GEMM."""
    return WIDE_ROW_BATCH.get(fmt, SMALL_BATCH) if in_features >= WIDE_ROW else SMALL_BATCH


def fused_cpu(weight) -> bool:
    return isinstance(weight, QWeight) and weight.device.type == "cpu" and numba_available()


def as_array(x: torch.Tensor) -> np.ndarray:
    """fp32 C-contiguous numpy view of ``x`` (a copy only when the dtype or layout differs)."""
    if x.dtype is torch.float32 and x.is_contiguous() and not x.requires_grad:
        return x.numpy()
    return x.detach().to(torch.float32).contiguous().numpy()


_np = as_array


_block_buffers = threading.local()  # per thread: the reused output buffer of dequantized_blocks


def _block_buffer(elements: int, dtype: np.dtype) -> np.ndarray:
    """A reused flat buffer of at least ``elements``: a fresh 16 MiB array per block costs its page
    faults on first touch, which took longer than the dequantization itself."""
    key = np.dtype(dtype).str
    buf = getattr(_block_buffers, key, None)
    if buf is None or buf.size < elements:
        buf = np.empty(max(elements, DEQUANT_BLOCK_ELEMENTS), dtype=dtype)
        setattr(_block_buffers, key, buf)
    return buf


def dequantized_blocks(w: QWeight, dtype: torch.dtype = torch.float32):
    """``(r0, r1, rows)`` blocks of a quantized weight in ``dtype`` (fp32 or bf16). On the CPU every
    block is written into one reused buffer: a block is valid until the next one is asked for."""
    rows = max(1, DEQUANT_BLOCK_ELEMENTS // w.shape[1])
    on_cpu = fused_cpu(w) and not w.planes
    bf16 = dtype == torch.bfloat16
    for r0 in range(0, w.shape[0], rows):
        r1 = min(w.shape[0], r0 + rows)
        if on_cpu:
            buf = _block_buffer((r1 - r0) * w.shape[1], np.uint16 if bf16 else np.float32)
            out = buf[: (r1 - r0) * w.shape[1]].reshape(r1 - r0, w.shape[1])
            if w.fmt == "int4":
                _nb().dequant_rows_int4(w.codes.numpy(), w.scales.numpy(), r0, out)
            else:
                _nb().dequant_rows_int8(w.codes.numpy(), w.scales.numpy(), r0, out)
            block = torch.from_numpy(out)
            yield r0, r1, (block.view(torch.bfloat16) if bf16 else block)
        else:
            yield r0, r1, w.dequantize(slice(r0, r1)).to(dtype)


def qlinear(x: torch.Tensor, w: QWeight) -> torch.Tensor:
    if x.device.type == "cuda":
        return _gpu.qlinear(x, w)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    t = x2.shape[0]
    if fused_cpu(w) and t <= integer_batch(k, w.fmt):
        out = np.empty((t, w.shape[0]), dtype=np.float32)
        _nb().gemm(_np(x2), kernel_weight(w), out)
        y = torch.from_numpy(out)
    else:
        dtype = prefill_dtype(w.fmt) if fused_cpu(w) else torch.float32
        xf = x2.to(dtype)
        y = torch.empty((t, w.shape[0]), dtype=torch.float32, device=x.device)
        for r0, r1, block in dequantized_blocks(w, dtype):
            y[:, r0:r1] = xf @ block.t()
    return y.to(x.dtype).reshape(*lead, w.shape[0])


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    """``x @ weight.T`` for a ``[out, in]`` weight, quantized or not."""
    if isinstance(weight, QWeight):
        return qlinear(x, weight)
    return _ref.linear(x, weight)


def gated_mlp(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """``down(gelu_tanh(gate(x)) * up(x))``; gate, up and GELU in one kernel for quantized weights."""
    if not isinstance(gate, QWeight) and not isinstance(down, QWeight):
        return _ref.gated_mlp(x, gate, up, down)
    x2 = x.reshape(-1, x.shape[-1])
    if fused_cpu(gate) and fused_cpu(up) and x2.shape[0] <= integer_batch(x2.shape[1], gate.fmt):
        act = np.empty((x2.shape[0], gate.shape[0]), dtype=np.float32)
        _nb().gate_up_gelu(_np(x2), kernel_weight(gate), kernel_weight(up), act)
        h = torch.from_numpy(act).to(x.dtype).reshape(*x.shape[:-1], gate.shape[0])
    else:
        h = gelu_tanh(linear(x, gate)) * linear(x, up)
    return linear(h, down)


def attention(q, k, v, q_pos, k_pos, window, scale, cap=None, blocks=None, *, fused: bool = False):
    """Grouped-query attention (see :func:`torch_ops.attention`). With ``fused`` on the CPU, the
    query positions run the numba decode kernel (each K/V row read once per KV head), all in one
    call, each computing exactly as a decode step would: drafted and plain greedy decoding agree
    bit for bit."""
    if fused and blocks is None and q.device.type == "cpu":
        qp = q_pos.start if isinstance(q_pos, range) else int(q_pos[0])
        k0 = k_pos.start if isinstance(k_pos, range) else int(k_pos[0])
        los = [0 if window is None else max(0, qp + t - window + 1 - k0) for t in range(q.shape[1])]
        his = [min(k.shape[1], qp + t - k0 + 1) for t in range(q.shape[1])]
        out = _nb().decode_attention_rows(np.ascontiguousarray(_np(q).transpose(1, 0, 2)), _np(k), _np(v), los, his,
                                          scale, cap)
        return torch.from_numpy(out).to(v.dtype)
    if q.device.type == "cuda":
        return _gpu.attention(q, k, v, q_pos, k_pos, window, scale, cap, blocks)
    return _ref.attention(q, k, v, q_pos, k_pos, window, scale, cap, blocks)


def attention_chunks(q, view, scale, cap=None, window: int | None = None, keys_from=None) -> torch.Tensor:
    """The last ``T`` positions' queries (``q``: ``[Hq, T, D]``) over a chunked cache's storage
    (``view`` from :meth:`KVCache.chunk_view`, whose keys end with those positions): no contiguous
    K/V copy is made. Each query sees the keys up to its own position (and within ``window``),
    all in one call of the kernel a decode step runs. A K=V layer's view has no keys
    (``view[0]`` None): ``keys_from`` ``(key norm weight [D], cos, sin)``, the RoPE tables of the
    view's key positions, rebuilds them in the kernel. An int8 cache's rows are read as stored,
    with their scales. Returns ``[T, Hq, Dv]``."""
    q = np.ascontiguousarray(_np(q).transpose(1, 0, 2))
    return torch.from_numpy(attention_chunks_array(q, view, scale, cap, window, keys_from))


def attention_chunks_array(q: np.ndarray, view, scale, cap=None, window: int | None = None,
                           keys_from=None) -> np.ndarray:
    """:func:`attention_chunks` on numpy queries ``q`` ``[T, Hq, D]`` (fp32, C-contiguous), returning
    numpy ``[T, Hq, Dv]``: the decode step's form, with no torch call around the kernel."""
    kd, vd, ks, vs, skip, n, keys = view[:7]
    scales = None
    if len(view) > 7 and view[8] is not None:  # an int8 cache: each row's scale
        scales = (_np(view[8]) if view[7] is None else _np(view[7]), _np(view[8]))
    t_n = q.shape[0]
    skips, ns = [], []
    for t in range(t_n):
        pos = keys.stop - t_n + t  # this query's position: it sees keys keys.start .. pos
        start = 0 if window is None else max(0, pos - window + 1 - keys.start)
        skips.append(skip + start)
        ns.append(pos + 1 - keys.start - start)
    rebuild = None
    if kd is None:
        if keys_from is None:
            raise ValueError("a K=V layer's chunk view needs keys_from (the key norm weight and RoPE tables)")
        kw, cos, sin = keys_from
        rebuild = (_np(kw), _np(cos), _np(sin), [s_ - skip for s_ in skips])
        kd, ks = vd, vs
    return _nb().decode_attention_positions(q, kd.numpy(), vd.numpy(), ks.numpy(), vs.numpy(), skips, ns, scale, cap,
                                            keys_from=rebuild, scales=scales)


def kernel_weight(w: QWeight, blocks: bool = False) -> tuple:
    """A quantized weight as the fused kernels take it: ``(codes, scales, low, kind)``, numpy views
    (no copy, built once per weight). ``codes``: uint8 ``[N, K]`` (int8 codes viewed as bytes) or
    ``[N, K // 2]`` (int4 and the high plane of the nibble-plane layout); ``scales``: fp32 per group,
    or int4's super-block bytes viewed as fp32; ``low``: the low plane of the nibble-plane layout,
    else a placeholder; ``kind``: ``cpu_numba.INT8``, ``INT4`` or ``INT8_PLANES``. One tuple type
    for every format, so each kernel compiles once.

    ``blocks``: a layer's matrix, whose products (decode steps and verifications alike) run
    sixteen rows at a time where that is faster (int8/int4 rows of at most ``BLOCK_WIDTH`` weights,
    512-bit VNNI): ``low`` then holds a copy of the codes in that order
    (:func:`.simd_blocks.block_codes`; the 270M's int4 layers: 50 MB more)."""
    key = "_kernel_view_blocks" if blocks else "_kernel_view"
    kw = w.__dict__.get(key)
    if kw is None:
        from .cpu_numba import INT4, INT8, INT8_PLANES

        codes = w.codes.numpy()
        codes = codes.view(np.uint8) if codes.dtype == np.int8 else codes
        scales = w.scales.numpy()
        if w.super_blocks:
            scales = scales.view(np.float32)
        low = w.low.numpy() if w.planes else np.zeros((1, 1), dtype=np.uint8)
        kind = INT4 if w.fmt == "int4" else (INT8_PLANES if w.planes else INT8)
        if blocks and kind != INT8_PLANES and (kind == INT8 or w.super_blocks) and layer_blocks_bytes(w.fmt, w.shape):
            from .simd_blocks import block_codes

            if w.block_codes is None:
                w.block_codes = block_codes(codes, kind == INT4, None if kind == INT4 else scales)
            low = w.block_codes
        kw = (codes, scales, low, kind)
        w.__dict__[key] = kw
    return kw


def layer_blocks_bytes(fmt: str, shape) -> int:
    """Bytes of the sixteen-row copy :func:`kernel_weight` adds to a layer's ``fmt`` matrix of
    ``shape`` ``[out, in]`` on this CPU (0 where its products run on the rows): int4's codes, or
    int8's codes and scales."""
    from .cpu_numba import BLOCK_ROWS, BLOCK_WIDTH
    from .simd import WIDE

    rows, cols = shape
    if not WIDE or fmt not in ("int8", "int4") or rows % BLOCK_ROWS or cols > BLOCK_WIDTH or cols % 32:
        return 0
    return rows * cols // 2 if fmt == "int4" else rows * (cols + cols // 32 * 4)


class DecodeLayerArgs:
    """Everything the fused decode kernels of one layer take besides the activations: the quantized
    matrices as kernel tuples, norm weights with the family's offset added (fp32), flags."""

    MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "up", "down")

    def __init__(self, cfg, spec, w) -> None:
        present = [w[m] for m in self.MATRICES if w[m] is not None]
        # every matrix quantized on the CPU (a width that is not a multiple of 32 stays a tensor)
        self.ok = all(fused_cpu(m) for m in present) and w["q_proj"] is not None
        if not self.ok:
            return
        off = cfg.family.norm_offset
        hd = spec.head_dim

        def norm(name, size):
            t = w[name]
            return np.ones(size, dtype=np.float32) if t is None else (t.float() + off).numpy().astype(np.float32)

        placeholder = kernel_weight(w["q_proj"], blocks=True)
        self.wq = placeholder
        self.wk = kernel_weight(w["k_proj"], blocks=True) if spec.owns_kv else placeholder
        self.wv = kernel_weight(w["v_proj"], blocks=True) if spec.owns_kv and not spec.k_eq_v else placeholder
        self.wo, self.wg, self.wu, self.wd = (kernel_weight(w[m], blocks=True) for m in ("o_proj", "gate", "up", "down"))
        hidden = cfg.hidden_size
        self.in_norm, self.q_norm, self.k_norm = norm("input_norm", hidden), norm("q_norm", hd), norm("k_norm", hd)
        self.post_attn_norm, self.pre_ffn_norm = norm("post_attn_norm", hidden), norm("pre_ffn_norm", hidden)
        self.post_ffn_norm = norm("post_ffn_norm", hidden)
        self.layer_scalar = float(w["layer_scalar"].float().reshape(-1)[0]) if w["layer_scalar"] is not None else 1.0
        self.kv_mode = 0 if not spec.owns_kv else (2 if spec.k_eq_v else 1)
        self.v_norm = bool(cfg.family.has_v_norm)
        self.eps = float(cfg.rms_norm_eps)
        self.q_shape = (cfg.num_heads, hd)
        self.kv_shape = (spec.num_kv_heads, hd)


def decode_attention_inputs(a: DecodeLayerArgs, x: torch.Tensor, rope):
    """Fused norm + q/k/v projections + q/k norms + RoPE (+ v norm) for a few positions ``x``
    ``[T, hidden]``: ``(q [T, Hq, D], k [T, Hkv, D] | None, v [T, Hkv, D] | None)``, as
    :meth:`GemmaModel.qkv` returns them."""
    q, k, v = decode_attention_input_arrays(a, _np(x), rope_arrays(rope))
    return (torch.from_numpy(q), None if k is None else torch.from_numpy(k),
            None if v is None else torch.from_numpy(v))


def decode_attention_input_arrays(a: DecodeLayerArgs, x: np.ndarray, rope: tuple[np.ndarray, np.ndarray]):
    """:func:`decode_attention_inputs` on numpy ``x`` and ``rope`` (:func:`rope_arrays`), returning
    numpy arrays."""
    cos, sin = rope
    t = x.shape[0]
    q = np.empty((t, *a.q_shape), dtype=np.float32)
    k = np.empty((t, *a.kv_shape), dtype=np.float32)
    v = np.empty((t, *a.kv_shape), dtype=np.float32)
    _decode().attention_inputs(x, a.in_norm, a.eps, a.wq, a.wk, a.wv, a.q_norm, a.k_norm, cos, sin, a.kv_mode,
                               a.v_norm, q, k, v)
    if a.kv_mode == 0:
        return q, None, None
    return q, (k if a.kv_mode == 1 else None), v


def rope_arrays(rope) -> tuple[np.ndarray, np.ndarray]:
    """A ``(cos, sin)`` pair of ``[T, pairs]`` tensors as fp32 numpy. A :class:`RopePair` keeps
    them, so the layers of a forward that share it (one per RoPE kind) convert it once, not every
    layer of a decode step again."""
    arrays = getattr(rope, "arrays", None)
    if arrays is None:
        cos, sin = rope
        t = cos.shape[0]
        arrays = (_np(cos.reshape(t, -1)), _np(sin.reshape(t, -1)))
        if isinstance(rope, RopePair):
            rope.arrays = arrays
    return arrays


def decode_attention_output_and_mlp(a: DecodeLayerArgs, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Fused output projection + sandwich norms + residuals + gated MLP + layer scalar (``x``
    ``[T, hidden]``, ``attn`` ``[T, Hq * D]``)."""
    return torch.from_numpy(decode_output_and_mlp_array(a, _np(x), _np(attn)))


def decode_output_and_mlp_array(a: DecodeLayerArgs, x: np.ndarray, attn: np.ndarray) -> np.ndarray:
    """:func:`decode_attention_output_and_mlp` on numpy arrays."""
    out = np.empty(x.shape, dtype=np.float32)
    _decode().attention_output_and_mlp(x, attn, a.wo, a.post_attn_norm, a.pre_ffn_norm, a.wg, a.wu,
                                       a.wd, a.post_ffn_norm, a.layer_scalar, a.eps, out)
    return out


def embedding(weight, ids: torch.Tensor, factor: float) -> torch.Tensor:
    """``weight[ids] * factor`` (``ids`` 1-D): rows of a quantized matrix on the CPU dequantized by
    one numba call, the same values as :meth:`QWeight.dequantize`'s; otherwise torch's lookup."""
    if fused_cpu(weight) and weight.dtype == torch.float32 and ids.dim() == 1 and ids.device.type == "cpu":
        out = np.empty((ids.shape[0], weight.shape[1]), dtype=np.float32)
        _nb().embed_rows(kernel_weight(weight), ids.numpy().astype(np.int64, copy=False), factor, out)
        return torch.from_numpy(out)
    return weight[ids] * factor


def head_logits(hidden: torch.Tensor, head, cap: float | None) -> torch.Tensor:
    """Soft-capped fp32 logits ``[N, vocab]`` of final hidden states ``[N, hidden]``. A quantized
    head on the CPU multiplies activations quantized as every product's (two int8 parts, about 15
    bits, for int8 weights; see kernels/simd.py), as :func:`head_topk` does."""
    h = hidden.reshape(-1, hidden.shape[-1])
    if fused_cpu(head) and h.shape[0] <= integer_batch(h.shape[1], head.fmt):
        out = np.empty((h.shape[0], head.shape[0]), dtype=np.float32)
        _nb().gemm(_np(h), kernel_weight(head), out)
        return softcap(torch.from_numpy(out), cap)
    return softcap(linear(h, head).float(), cap)


def head_topk(hidden: torch.Tensor, head, cap: float | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (values, token ids) of the soft-capped logits of one position ``hidden``
    (``[hidden]`` or ``[1, hidden]``): :func:`head_topk_rows` of that one row."""
    vals, ids = head_topk_rows(hidden.reshape(1, -1), head, cap, k)
    return vals[0], ids[0]


def head_topk_rows(hidden: torch.Tensor, head, cap: float | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` ``(values [N, k], token ids [N, k])`` of the soft-capped logits of each position of
    ``hidden`` ``[N, hidden]``. For a quantized head on the CPU the logits are never materialized
    and each head row is read once for all positions (a verification's positions); otherwise they
    are computed with :func:`linear` and ranked with torch."""
    h = hidden.reshape(-1, hidden.shape[-1])
    if fused_cpu(head):
        row_err = policy = None
        if head.planes:
            row_err = head.row_err.numpy()
            policy = head.__dict__.setdefault("_screen_policy", _nb().ScreenPolicy())
        vals, ids = _nb().head_topk(_np(h), kernel_weight(head), k, cap, row_err=row_err, policy=policy)
        return torch.from_numpy(vals), torch.from_numpy(ids)
    return torch.topk(head_logits(h, head, cap), k, dim=-1)
