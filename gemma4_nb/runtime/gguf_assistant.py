"""Gemma 4's MTP assistant as a GGUF (llama.cpp's ``gemma4-assistant``): found beside a GGUF model
and loaded as the safetensors assistant is (:mod:`.mtp`). It is small (a few layers), so its
tensors are read from the file at every load, dequantized to the activation dtype (or int8 beside
a quantized target on the CPU, as :func:`.mtp.load_assistant` does); nothing is cached."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..kernels.qweight import quantize_weight
from .checkpoint import canonical_name
from .gguf_file import ASSISTANT_ARCH, FLOAT_TYPES, GGUFFile, gguf_assistant_config, hf_name, read_architecture
from .mtp import MTPDrafter, assistant_tensors, check_pair, parse_assistant_config


def is_assistant_gguf(path: Path) -> bool:
    return read_architecture(path) == ASSISTANT_ARCH  # the header's first key: the model beside is not parsed


def find_assistant_gguf(model_gguf: Path) -> Path | None:
    """A ``gemma4-assistant`` GGUF in the same folder as the model's GGUF (LM Studio and a plain
    download keep them side by side), or None."""
    model_gguf = Path(model_gguf)
    for candidate in sorted(model_gguf.parent.glob("*.gguf")):
        if candidate != model_gguf and is_assistant_gguf(candidate):
            return candidate
    return None


def load_gguf_assistant(path: Path, target, dtype: torch.dtype, device, quant: str | None = None) -> MTPDrafter:
    """The drafter in the GGUF at ``path`` for the ``target`` config (checked as a pair first)."""
    g = GGUFFile(path)
    if g.architecture != ASSISTANT_ARCH:
        raise CheckpointError(f"{path}: not an MTP assistant GGUF (its architecture is {g.architecture!r}, "
                              f"expected {ASSISTANT_ARCH!r})")
    acfg = parse_assistant_config(gguf_assistant_config(g), str(path))
    check_pair(acfg, target, str(path))
    infos = {hf: info for name, info in g.tensors.items() if (hf := hf_name(name)) is not None}
    expected = assistant_tensors(acfg)
    missing = [n for n in expected if n not in infos]
    wrong = [f"{infos[n].name}: {list(infos[n].shape)} (expected {list(s)})"
             for n, s in expected.items() if n in infos and tuple(infos[n].shape) != tuple(s)]
    if missing or wrong:
        raise CheckpointError(f"{path}: the assistant's tensors do not match its metadata (missing: "
                              f"{', '.join(missing[:6]) or 'none'}; wrong shape: {', '.join(wrong[:6]) or 'none'}); "
                              "convert it again")
    from .checkpoint import check_finite
    from .quant import fmt_for

    weights = {}
    for name in expected:
        info = infos[name]
        t = g.tensor(info)
        check_finite(info.name, t, path)
        f = fmt_for(name, tuple(t.shape), quant) if quant else None
        if f is not None:
            weights[canonical_name(acfg.text, name)] = quantize_weight(t, "int8", dtype,
                                                                       search=info.qtype.name not in FLOAT_TYPES)
        else:
            weights[canonical_name(acfg.text, name)] = t.to(dtype).to(device)
    return MTPDrafter(acfg, weights, source=Path(path))
