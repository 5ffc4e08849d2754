"""Named model shapes with random weights: Gemma 4 12B and its MTP assistant, for measuring speed
and memory at the size users run without downloading anything (random weights generate noise;
the speed is what is measured)."""

from __future__ import annotations

import torch

from ..runtime.checkpoint import expected_tensors
from ..runtime.config import parse_config
from ..runtime.decoder import GemmaModel
from .tiny import tiny_config

SHAPES = {
    "gemma4-12b": dict(vocab_size=262144, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                       num_global_key_value_heads=1, sliding_window=1024, max_position_embeddings=262144),
}


# google/gemma-4-12B-it-assistant's shape: 4 query-only layers of width 1024 reading the 12B's K/V.
MTP_12B = dict(vocab_size=262144, hidden_size=1024, intermediate_size=8192, num_hidden_layers=4,
               num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
               num_global_key_value_heads=1, sliding_window=1024, max_position_embeddings=262144,
               layer_types=["sliding_attention"] * 3 + ["full_attention"])


def random_model(shape: str, device: str, dtype: torch.dtype, layers: int | None = None) -> GemmaModel:
    """The shape with random weights (``layers``: only the first N of its layers)."""
    shape_cfg = dict(SHAPES[shape])
    if layers:
        shape_cfg["num_hidden_layers"] = layers
    cfg = parse_config(tiny_config(**shape_cfg))
    return GemmaModel(cfg, random_weights(expected_tensors(cfg), cfg.weight_prefix, device, dtype, seed=0))


def random_weights(expected: dict, prefix: str, device, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors for ``expected`` (checkpoint name -> shape), keyed by runtime name: norms and
    layer scalars near 1, matrices small, a centroid head's token ordering a permutation."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, dims in expected.items():
        key = name[len(prefix):] if name.startswith(prefix) else name
        if name.endswith("token_ordering"):
            weights[key] = torch.randperm(dims[0], generator=gen, device=device)
            continue
        t = torch.randn(dims, generator=gen, device=device, dtype=dtype)
        weights[key] = 1 + 0.1 * t if (name.endswith("norm.weight") or name.endswith("layer_scalar")) else t * 0.02
    return weights


def random_quantized_model(shape: str, fmt: str, seed: int = 0, layers: int | None = None) -> GemmaModel:
    """A model of ``shape`` with random ``fmt`` weights built directly in the quantized layout
    (random codes and scales): no full-precision copy is ever held, so the 12B shape fits in about
    8 GiB (int4) on a CPU machine. ``layers``: only the first N of its layers."""
    from ..kernels.layout import GROUP, META, SUPER, SUPER_SCALE
    from ..kernels.qweight import QWeight
    from ..runtime.quant import fmt_for

    shape_cfg = dict(SHAPES[shape])
    if layers:
        shape_cfg["num_hidden_layers"] = layers
    cfg = parse_config(tiny_config(**shape_cfg))
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, dims in expected_tensors(cfg).items():
        key = name[len(cfg.weight_prefix):] if name.startswith(cfg.weight_prefix) else name
        f = fmt_for(name, dims, fmt)
        if f is None:
            t = torch.randn(dims, generator=gen)
            weights[key] = 1 + 0.1 * t if (name.endswith("norm.weight") or name.endswith("layer_scalar")) else t * 0.02
            continue
        out, inp = dims
        step = 0.02 * 3 / (127 if f == "int8" else 7.5)  # about the spread of 0.02 * randn
        if f == "int8":
            codes = torch.randint(-127, 128, (out, inp), generator=gen, dtype=torch.int8)
            scales = torch.full((out, inp // GROUP), step) * (0.5 + torch.rand((out, inp // GROUP), generator=gen))
        else:  # super-blocks: scales d * sc about one step (sc 64..191), minimums dmin * 120 = 7.5 steps
            codes = torch.randint(0, 256, (out, inp // 2), generator=gen, dtype=torch.uint8)
            blocks = -(-(inp // GROUP) // SUPER)
            scales = torch.randint(0, 256, (out, blocks, META), generator=gen, dtype=torch.uint8)
            scales[..., 4:4 + SUPER] = torch.randint(64, 192, (out, blocks, SUPER), generator=gen, dtype=torch.uint8)
            scales[..., 4 + SUPER:] = 120
            d = torch.full((out, blocks, 1), step / 128 * SUPER_SCALE, dtype=torch.float16)
            dmin = torch.full((out, blocks, 1), step / 16 * SUPER_SCALE, dtype=torch.float16)
            scales[..., 0:2] = d.view(torch.uint8)
            scales[..., 2:4] = dmin.view(torch.uint8)
            scales = scales.reshape(out, blocks * META)
        weights[key] = QWeight(f, codes, scales, None, tuple(dims), torch.float32)
    return GemmaModel(cfg, weights)


def random_assistant(target: GemmaModel, centroids: bool, dtype: torch.dtype, quant: str | None = None):
    """Gemma 4 12B's MTP assistant with random weights for ``target`` (``quant``: its matrices
    quantized, as ``load`` does beside quantized weights on the CPU)."""
    from ..kernels.qweight import quantize_weight
    from ..runtime.mtp import MTPDrafter, assistant_tensors, check_pair, parse_assistant_config
    from ..runtime.quant import fmt_for

    data = {"model_type": "gemma4_unified_assistant", "text_config": tiny_config(**MTP_12B)["text_config"],
            "backbone_hidden_size": target.cfg.hidden_size, "use_ordered_embeddings": centroids,
            "num_centroids": 2048, "centroid_intermediate_top_k": 32}
    acfg = parse_assistant_config(data)
    check_pair(acfg, target.cfg, "--mtp-cost")
    expected = assistant_tensors(acfg)
    weights = random_weights(expected, acfg.text.weight_prefix, target.device, dtype, seed=1)
    if quant:
        prefix = acfg.text.weight_prefix
        for name, dims in expected.items():
            key = name[len(prefix):] if name.startswith(prefix) else name
            if fmt_for(name, dims, quant):
                weights[key] = quantize_weight(weights[key], fmt_for(name, dims, quant), dtype)
    return MTPDrafter(acfg, weights)


def on_device(net: GemmaModel, device, dtype: torch.dtype) -> GemmaModel:
    """``net`` with its weights on ``device``: quantized ones keep their codes and compute in
    ``dtype``, floating-point tensors are cast to ``dtype`` (the CUDA path of a random quantized
    model, which is built on the CPU)."""
    from ..kernels.qweight import QWeight

    def moved(t):
        if isinstance(t, QWeight):
            return t.to(device, dtype)
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)

    return GemmaModel(net.cfg, {k: moved(t) for k, t in net.weights.items()})
