"""Memory planning: how many bytes weights, KV cache and activations need, and whether they fit.

The runtime asks before it loads weights and before each request, and refuses with the numbers
instead of letting the kernel die of an out-of-memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..errors import Gemma4Error
from ..kernels.ops import layer_blocks_bytes
from ..kernels.qweight import FORMATS, matrix_bytes
from ..kernels.torch_ops import score_block_elements
from .checkpoint import expected_tensors
from .config import ModelConfig
from .kv_cache import DEFAULT_CHUNK, DEFAULT_MAX_ROLLBACK
from .memory_limits import limits_free
from .quant import fmt_for

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
KV_BYTES = {**DTYPE_BYTES, "int8": 1}  # int8 adds a 4-byte scale per token and head

GiB = 1 << 30


class MemoryPlanError(Gemma4Error):
    """A model or request needs more memory than the device has available."""


@dataclass
class MemoryPlan:
    weights: int
    kv_sliding: int
    kv_full: int
    activations: int

    @property
    def kv(self) -> int:
        return self.kv_sliding + self.kv_full

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations

    def describe(self) -> str:
        return (f"weights {self.weights / GiB:.2f} GiB + KV cache {self.kv / GiB:.2f} GiB "
                f"(sliding {self.kv_sliding / GiB:.2f}, full {self.kv_full / GiB:.2f}) + activations "
                f"{self.activations / GiB:.2f} GiB = {self.total / GiB:.2f} GiB")


def _kv_layer_bytes(heads: int, dim: int, positions: int, kv_format: str, tensors: int) -> int:
    per = heads * dim * KV_BYTES[kv_format] + (heads * 4 if kv_format == "int8" else 0)
    return int(positions * per * tensors)


def weight_bytes(cfg: ModelConfig, weights: str, rest: str = "fp32", device: str = "cpu") -> int:
    """Bytes of every tensor the model loads (the media embedders included) with ``weights`` a
    dtype (``"bf16"``...) or a quantized format (``"int8"``, ``"int4"``). Under a quantized
    format each tensor takes the format :func:`~.quant.fmt_for` gives it, at the bytes of
    :func:`~gemma4_nb.kernels.qweight.matrix_bytes`; the tensors it leaves unquantized (norms,
    media embedders) are held in ``rest``, the activation dtype. On the CPU with fp32 activations
    (where the fused decode kernels run), the layers' small matrices (the 270M's) also hold their
    codes in sixteen-row blocks (:func:`~gemma4_nb.kernels.ops.layer_blocks_bytes`)."""
    total = 0
    for name, shape in expected_tensors(cfg).items():
        n = math.prod(shape)
        if weights in DTYPE_BYTES:
            total += n * DTYPE_BYTES[weights]
            continue
        fmt = fmt_for(name, shape, weights)
        total += matrix_bytes(fmt, shape) if fmt else n * DTYPE_BYTES[rest]
        if fmt and device == "cpu" and rest == "fp32" and ".layers." in name and name.endswith("_proj.weight"):
            total += layer_blocks_bytes(fmt, shape)
    return int(total)


def plan_memory(cfg: ModelConfig, *, context: int, weights: str = "bf16", kv: str = "bf16",
                compute: str | None = None, chunk: int = DEFAULT_CHUNK, max_rollback: int = DEFAULT_MAX_ROLLBACK,
                prefill_chunk: int = 512, device: str = "cpu") -> MemoryPlan:
    """Bytes for ``context`` positions of one sequence with the given formats (``compute``: the
    activation dtype; by default the weights' dtype, bf16 for quantized weights)."""
    compute = compute or ("bf16" if weights in FORMATS else weights)
    compute_bytes = KV_BYTES[compute]
    w = weight_bytes(cfg, weights, rest=compute, device=torch.device(device).type)
    sliding = full = 0
    biggest_layer_kv = 0
    for s in cfg.layers:
        if not s.owns_kv:
            continue
        tensors = 1 if s.k_eq_v else 2
        if s.window is not None:
            kept = min(context, s.window + max_rollback + 2 * chunk)
        else:
            kept = context
        kept = -(-kept // chunk) * chunk
        b = _kv_layer_bytes(s.num_kv_heads, s.head_dim, kept, kv, tensors)
        if s.window is not None:
            sliding += b
        else:
            full += b
        # attention reads a layer's K/V as one tensor in the compute dtype (K rebuilt for K=V)
        biggest_layer_kv = max(biggest_layer_kv, int(kept * s.num_kv_heads * s.head_dim * compute_bytes * 3))
    t = min(prefill_chunk, context)
    inter = max(s.intermediate_size for s in cfg.layers)
    qdim = max(cfg.num_heads * s.head_dim for s in cfg.layers)
    hidden_acts = t * (4 * cfg.hidden_size + 3 * qdim + 3 * inter) * 4
    scores = score_block_elements(device) * 4 * 3
    logits = cfg.vocab_size * 4 * 2
    return MemoryPlan(w, sliding, full, hidden_acts + scores + logits + biggest_layer_kv)


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes that can still be allocated on ``device``: the one free-memory probe of the runtime
    (the load-time checks, the weight-format choice, each request). On the CPU the smallest of
    MemAvailable and what the process's cgroup and rlimits still allow (:mod:`.memory_limits`)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    host = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if host is None:
        try:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            host = 1 << 62  # unknown: do not refuse
    limited = limits_free()
    return host if limited is None else min(host, limited)


def format_table(cfg: ModelConfig, contexts=(8192, 32768, 131072, 262144), weight_formats=("bf16", "int8", "int4"),
                 kv_formats=("bf16", "int8")) -> str:
    """A Markdown table of total memory per context, weight format and KV format."""
    head = "| context | KV format | KV sliding | KV full | " + " | ".join(f"total, {w} weights" for w in weight_formats) + " |"
    lines = [head, "|" + "---:|" * (4 + len(weight_formats))]
    for ctx in contexts:
        for kvf in kv_formats:
            plans = [plan_memory(cfg, context=ctx, weights=w, kv=kvf) for w in weight_formats]
            p0 = plans[0]
            cells = " | ".join(f"{p.total / GiB:.1f} GiB" for p in plans)
            lines.append(f"| {ctx:,} | {kvf} | {p0.kv_sliding / GiB:.2f} GiB | {p0.kv_full / GiB:.2f} GiB | {cells} |")
    weights = ", ".join(f"{w} {plan_memory(cfg, context=1, weights=w).weights / GiB:.1f} GiB" for w in weight_formats)
    return "\n".join(lines) + f"\n\nWeights alone: {weights}."
