"""Which format a checkpoint's weights load in: bf16 (unquantized), int8 or int4.

The setting comes from ``load(quant=...)``, else ``$GEMMA4_NB_QUANT``, else ``auto`` (the notebook's
``%gemma config quant=`` and ``gemma4-nb generate --quant`` pass it to ``load``). ``auto`` takes the
widest format whose weights, KV cache and activations for :data:`PLANNED_CONTEXT` tokens (the
memory planner's numbers) fit in :data:`COMFORTABLE` of the device's free memory (the planner's one
free-memory probe), leaving the rest to the notebook's own data; when none does, int4 still loads
if its weights fit (``load``'s own limit; each request's KV cache is checked when it comes), and
when even they do not, the load is refused with what each format needs.

- Devices: a ``device`` given is the only one tried. Without one, a CUDA GPU is tried first (the
  quantized formats run there too, with the Triton kernel), then the CPU (the fused numba kernels).
- A GGUF file keeps the format it was stored in, and a directory written by
  ``Model.save_quantized`` its saved format, unless a format is forced.
- An explicit ``dtype`` (``"bf16"``, ``"fp32"``) without ``quant`` asks for unquantized weights in
  that dtype: ``auto`` does not quantize them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import Gemma4Error
from .config import ModelConfig
from .memory import GiB, MemoryPlanError, plan_memory, weight_bytes

QUANT_ENV = "GEMMA4_NB_QUANT"
QUANT_SETTINGS = ("auto", "bf16", "fp32", "int8", "int4")
PLANNED_CONTEXT = 32768  # a long notebook conversation; each request is checked again on its own
COMFORTABLE = 0.7  # of the free memory; the rest is left to the notebook's data and the system
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                "fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}


@dataclass(frozen=True)
class WeightChoice:
    """What ``load`` does with the weights."""

    quant: str | None  # "int8"/"int4": quantized while loading; None: unquantized, or the file's own format
    device: str | None  # None: load's own default
    dtype: str | None  # unquantized weights' (or quantized ones' activations') dtype; None: load's default
    note: str = ""  # one line: what auto chose and why ("" when nothing was chosen)


def quant_setting(quant) -> tuple[str, str]:
    """The weight-format setting and where it came from (``quant=``, ``$GEMMA4_NB_QUANT``, or the
    default ``auto``); a value outside :data:`QUANT_SETTINGS` is an error naming the allowed ones."""
    if quant is None:
        env = os.environ.get(QUANT_ENV, "").strip()
        if not env:
            return "auto", "the default"
        value, origin, shown = env.lower(), f"${QUANT_ENV}", f"${QUANT_ENV}={env!r}"
    else:
        value = quant.strip().lower() if isinstance(quant, str) else quant
        origin, shown = f"quant={quant!r}", f"quant={quant!r}"
    if value not in QUANT_SETTINGS:
        raise Gemma4Error(f"{shown} is not a weight format: use one of {', '.join(QUANT_SETTINGS)} "
                          "(auto: the widest that fits in memory)")
    return value, origin


def dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    if dtype not in _DTYPE_NAMES:
        raise Gemma4Error(f"dtype {dtype!r} is not supported; use 'bf16' or 'fp32'")
    return _DTYPE_NAMES[dtype]


def choose_weights(cfg: ModelConfig, *, quant=None, device=None, dtype=None, max_context: int | None = None,
                   stored: str | None = None, probe=None) -> WeightChoice:
    """The weight format, device and dtype to load ``cfg``'s checkpoint with.

    ``stored``: ``"gguf"`` for a GGUF file, the saved format for a ``save_quantized`` directory,
    None for a safetensors checkpoint. ``probe(device)``: free bytes on a device (the planner's
    :func:`~.memory.available_memory`; ``load`` passes its own so that one probe serves the whole
    load)."""
    if probe is None:
        from .memory import available_memory as probe
    setting, origin = quant_setting(quant)
    asked_dtype = dtype_name(dtype)
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise Gemma4Error("device='cuda' was asked for but PyTorch sees no CUDA GPU; use device='cpu'")
    if setting in ("int8", "int4"):
        return WeightChoice(setting, device, dtype, f"gemma4-nb: {setting} weights ({origin})")
    if setting in ("bf16", "fp32"):
        if stored not in (None, "gguf"):
            raise Gemma4Error(f"this directory holds {stored} weights (written by save_quantized) but {origin} asks "
                              f"for {setting}: load the original checkpoint for {setting} weights")
        if asked_dtype not in (None, setting):
            raise Gemma4Error(f"{origin} asks for {setting} weights but dtype={dtype!r}: give one of the two")
        return WeightChoice(None, device, setting, f"gemma4-nb: {setting} weights ({origin})")
    if stored is not None or asked_dtype is not None:
        return WeightChoice(None, device, dtype)  # the file's own format, or the dtype asked for
    return _widest_that_fits(cfg, device, min(max_context or cfg.max_position_embeddings, PLANNED_CONTEXT), probe)


def _widest_that_fits(cfg: ModelConfig, device, context: int, probe) -> WeightChoice:
    if device is not None:
        devices = [str(device)]
    else:
        devices = (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    tried = []  # (device, format, dtype, plan, free) in the order tried
    for dev in devices:
        kind = torch.device(dev).type
        free = probe(dev)
        for fmt in ("bf16", "int8", "int4") if kind in ("cpu", "cuda") else ("bf16",):
            if fmt == "bf16":  # unquantized: fp32 on the CPU when it fits twice over, as load() does
                act = "fp32" if kind == "cpu" and weight_bytes(cfg, "fp32") < free // 2 else "bf16"
            else:  # quantized: fp32 activations on the CPU, bf16 on a GPU (load's defaults)
                act = "fp32" if kind == "cpu" else "bf16"
            plan = plan_memory(cfg, context=context, weights=act if fmt == "bf16" else fmt, kv=act, compute=act,
                               device=kind)
            tried.append((dev, fmt, act, plan, free))
            if plan.total <= COMFORTABLE * free:
                return _chosen(tried, context, tight=False)
    last_dev = devices[-1]
    smallest = [t for t in tried if t[0] == last_dev][-1]
    if smallest[3].weights <= smallest[4]:  # load()'s own limit: the weights; each request is checked later
        return _chosen(tried, context, tight=True)
    dev, _, _, plan, free = smallest
    needs = {fmt: p for d, fmt, _, p, _ in tried if d == dev}
    listed = ", ".join(f"{p.weights / GiB:.1f} GiB in {fmt}" for fmt, p in needs.items())
    other = " or device='cpu'" if dev != "cpu" else ""
    raise MemoryPlanError(
        f"{cfg.model_type} weights need {listed} (plus {(plan.kv + plan.activations) / GiB:.1f} GiB for the KV cache "
        f"and activations of {context:,} tokens) but only {free / GiB:.1f} GiB is available on {dev}; free memory"
        f"{other}, or use a smaller model")


def _chosen(tried: list, context: int, *, tight: bool) -> WeightChoice:
    def label(fmt: str, act: str) -> str:  # unquantized weights are named by their dtype
        return act if fmt == "bf16" else fmt

    dev, fmt, act, plan, free = tried[-1]
    wider = [t for t in tried[:-1] if t[0] == dev and t[1] != fmt]
    why = f"; {label(wider[-1][1], wider[-1][2])} would take {wider[-1][3].total / GiB:.1f} GiB" if wider else ""
    if tight:
        note = (f"gemma4-nb: {label(fmt, act)} weights on {dev}: {plan.weights / GiB:.1f} GiB, {free / GiB:.1f} GiB "
                f"free: little to spare (the KV cache and activations for {context:,} tokens take "
                f"{(plan.kv + plan.activations) / GiB:.1f} GiB more; close other programs if the kernel dies{why})")
    else:
        note = (f"gemma4-nb: {label(fmt, act)} weights on {dev}: {plan.total / GiB:.1f} GiB with the KV cache for "
                f"{context:,} tokens, {free / GiB:.1f} GiB free (fits in {COMFORTABLE:.0%} of it{why})")
    note += f"; quant= or ${QUANT_ENV} chooses"
    return WeightChoice(None if fmt == "bf16" else fmt, dev, act, note)
