"""``gemma4-nb bench --compare transformers``: transformers' ``generate`` on the same weights, in
the same process and run, as the baseline for the GPU path's speed.

transformers is a test/benchmark dependency only: it is imported inside these functions and
nowhere else in the package. Quantized weights are given to transformers dequantized (in the
activation dtype): the comparison is gemma4-nb's int8/int4 path against transformers in bf16.
"""

from __future__ import annotations

import time

import torch

from ..errors import Gemma4Error


def transformers_model(net, hf_config: dict):
    """A transformers model (the class the config's ``architectures`` names) holding ``net``'s
    weights (quantized ones dequantized to ``net.dtype``), on ``net.device``, in eval mode."""
    try:
        import transformers
    except ImportError:
        raise Gemma4Error("--compare transformers needs transformers: pip install 'gemma4-nb[test]'") from None
    from ..kernels.qweight import QWeight
    from ..runtime.checkpoint import canonical_name, expected_tensors

    arch = (hf_config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch or "", None)
    if cls is None:
        raise Gemma4Error(f"transformers {transformers.__version__} has no model class {arch!r} for this config")
    fields = {k: v for k, v in hf_config.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(hf_config["model_type"], **fields)
    with torch.device(net.device):
        model = cls._from_config(config, dtype=net.dtype).eval()
    own = model.state_dict()  # the model's parameters and persistent buffers (no copies)
    filled = set()
    with torch.no_grad():
        for name in expected_tensors(net.cfg):
            if name not in own:
                raise Gemma4Error(f"transformers' {arch} has no tensor {name}")
            t = net.weights[canonical_name(net.cfg, name)]
            own[name].copy_(t.dequantize() if isinstance(t, QWeight) else t)  # one matrix at a time
            filled.add(name)
    unfilled = [n for n in own if n not in filled and not n.endswith("lm_head.weight")]
    if unfilled:
        raise Gemma4Error(f"transformers' {arch} expects weights gemma4-nb does not hold, e.g. {unfilled[0]}")
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def generate_speed(model, ids: list[int], decode: int) -> dict:
    """Greedy ``generate`` of ``decode`` tokens after the prompt ``ids``: time to the first token
    (``max_new_tokens=1``) and decode tokens/s from the difference with ``1 + decode`` tokens."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(n: int) -> float:
        _sync(device)
        t = time.perf_counter()
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        _sync(device)
        assert out.shape[1] == len(ids) + n
        return time.perf_counter() - t

    timed(2)  # warm-up
    first = timed(1)
    total = timed(1 + decode)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"prompt": len(ids), "ttft_s": first, "prefill_tok_s": len(ids) / first,
            "decode_tok_s": decode / max(total - first, 1e-9), "peak_gpu_gib": peak, "engine": "transformers"}
