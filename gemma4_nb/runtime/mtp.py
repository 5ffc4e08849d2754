"""Gemma 4's multi-token-prediction drafter (``gemma4_unified_assistant``).

The assistant is a small decoder (four layers for the 12B) with no K/V projections: its queries
attend to the target's own KV cache -- its sliding layers to the target's last sliding layer that
stores K/V, its full layer to the target's last full one -- so it adds no cache memory and needs
no prefill. One draft step, at a fixed position ``q`` (the position of the last committed token,
the same for all k drafts of a round)::

    z = pre_projection(concat(target_embed(token) * sqrt(H_target), h))
    z = layers(z)            # query-only attention to the target's K/V at positions < q
    u = norm(z)
    logits = u @ E_draft^T   # tied head, no softcap (or the centroid-masked head)
    h = post_projection(u)   # fed back with the drafted token for the next step

``h`` starts as the target's final (normed) hidden state at ``q - 1``. Sliding layers see the
``window + 1`` keys before ``q`` (the reference's inclusive bidirectional window, read backwards
from the query). The drafter is built from the same :class:`~gemma4_nb.runtime.decoder.GemmaModel` layers
as the target: only where its K/V come from differs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, ModelNotFoundError
from ..kernels import ops
from .checkpoint import check_checkpoint, expected_tensors, find_shards, load_tensors
from .config import GEMMA4, ModelConfig, parse_config
from .decoder import GemmaModel
from .speculative import DraftContext

ASSISTANT_TYPE = "gemma4_unified_assistant"
ENV_VAR = "GEMMA4_NB_ASSISTANT"
# Layers of the drafter name where their K/V come from with these stand-in indices.
_KV_FROM_TARGET = {"sliding": -1, "full": -2}


@dataclass(frozen=True)
class AssistantConfig:
    text: ModelConfig  # the drafter's decoder; its layers own no K/V
    backbone_hidden_size: int  # the target's hidden size
    ordered_embeddings: bool  # the centroid-masked draft head
    num_centroids: int
    centroid_top_k: int
    window: int | None  # the sliding window of the drafter's sliding layers


def parse_assistant_config(data: dict, where: str = "config.json") -> AssistantConfig:
    if data.get("model_type") != ASSISTANT_TYPE:
        raise ConfigError(f"{where}: model_type {data.get('model_type')!r} is not an MTP assistant ({ASSISTANT_TYPE})")
    text = data.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError(f"{where}: 'text_config' is missing; an assistant config nests its decoder there")
    # Every layer of the assistant reads the target's K/V; parse it as a decoder of K/V-owning
    # layers, then point each layer at the target. KV-shared layers may have a double-wide MLP.
    text = dict(text, model_type="gemma4_unified_text", num_kv_shared_layers=0)
    if text.pop("use_double_wide_mlp", False):
        text["intermediate_size"] = 2 * int(text.get("intermediate_size", 0))
    cfg = parse_config(text, where)
    # the visible span of the target's K/V is cut before attention (_TargetKV), so no window here
    window = next((s.window for s in cfg.layers if s.window), None)
    layers = tuple(dataclasses.replace(s, kv_source=_KV_FROM_TARGET[s.kind], window=None) for s in cfg.layers)
    cfg = dataclasses.replace(cfg, layers=layers)
    return AssistantConfig(
        text=cfg,
        backbone_hidden_size=int(data.get("backbone_hidden_size", 3840)),
        ordered_embeddings=bool(data.get("use_ordered_embeddings", False)),
        num_centroids=int(data.get("num_centroids", 2048)),
        centroid_top_k=int(data.get("centroid_intermediate_top_k", 32)),
        window=window,
    )


def assistant_tensors(acfg: AssistantConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every tensor the drafter needs."""
    cfg, h = acfg.text, acfg.text.hidden_size
    out = expected_tensors(cfg)  # layers own no K/V, so no k/v projections are expected
    out["pre_projection.weight"] = (h, 2 * acfg.backbone_hidden_size)
    out["post_projection.weight"] = (acfg.backbone_hidden_size, h)
    if acfg.ordered_embeddings:
        out["masked_embedding.centroids.weight"] = (acfg.num_centroids, h)
        out["masked_embedding.token_ordering"] = (cfg.vocab_size,)
    return out


def check_pair(acfg: AssistantConfig, target: ModelConfig, where: str) -> None:
    """Refuse a drafter that was not trained for this target, naming every mismatch."""
    problems = []
    if target.family is not GEMMA4:
        problems.append(f"the target is a {target.family.name} model; MTP assistants draft for Gemma 4 only")
    if acfg.backbone_hidden_size != target.hidden_size:
        problems.append(f"backbone hidden size {acfg.backbone_hidden_size} != target hidden size {target.hidden_size}")
    if acfg.text.vocab_size != target.vocab_size:
        problems.append(f"vocabulary {acfg.text.vocab_size} != target vocabulary {target.vocab_size}")
    for kind in ("sliding", "full"):
        mine = [s for s in acfg.text.layers if s.kind == kind]
        theirs = [s for s in target.layers if s.kind == kind]
        if mine and not theirs:
            problems.append(f"the drafter has {kind} layers but the target has none")
        elif mine:
            t = theirs[-1]
            for s in mine:
                if (s.head_dim, s.num_kv_heads) != (t.head_dim, t.num_kv_heads):
                    problems.append(f"{kind} layer {s.index}: head_dim {s.head_dim} x {s.num_kv_heads} KV heads, "
                                    f"target {t.head_dim} x {t.num_kv_heads}")
                    break
    if acfg.ordered_embeddings and acfg.text.vocab_size % acfg.num_centroids:
        problems.append(f"vocabulary {acfg.text.vocab_size} is not a multiple of {acfg.num_centroids} centroids")
    if problems:
        raise ConfigError(f"{where}: this MTP assistant does not match the target model:\n  - "
                          + "\n  - ".join(problems) + "\nUse the assistant published with this model "
                          "(for google/gemma-4-12B-it: google/gemma-4-12B-it-assistant), or drafting='prompt_lookup'.")


class _TargetKV:
    """The target's K/V as the drafter's layers read them (the ``cache.read`` interface)."""

    def __init__(self, net: GemmaModel, cache, q: int, window: int | None) -> None:
        self.spans = {}
        for kind, key in _KV_FROM_TARGET.items():
            owners = [s.kv_source for s in net.cfg.layers if s.kind == kind]
            if not owners:
                continue
            layer = owners[-1]
            start = max(0, q - 1 - window) if (kind == "sliding" and window) else 0
            k, v, pos = cache.span(layer, start, q)
            if k is None:
                k = net.keys_from_values(layer, v, net.rope_at(layer, pos))
            self.spans[key] = (k, v, pos)

    def read(self, key: int):
        return self.spans[key]


class MTPDrafter:
    """Proposes k tokens per round from the target's hidden state and KV cache (greedy drafts)."""

    cost_aware = True  # drafting costs real time: the draft length follows measured costs

    def __init__(self, acfg: AssistantConfig, weights: dict[str, torch.Tensor], source: Path | None = None) -> None:
        self.acfg, self.source = acfg, source
        self.net = GemmaModel(acfg.text, weights)
        self.pre = weights["pre_projection.weight"]
        self.post = weights["post_projection.weight"]
        self.centroids = weights.get("masked_embedding.centroids.weight")
        if self.centroids is not None:
            per = acfg.text.vocab_size // acfg.num_centroids
            self.clusters = weights["masked_embedding.token_ordering"].long().view(acfg.num_centroids, per)

    def __repr__(self) -> str:
        cfg = self.acfg.text
        name = (_hub_repo_of(self.source) or self.source.name) if self.source else ""
        return (f"<MTPDrafter {name}: {cfg.num_layers} layers, "
                f"width {cfg.hidden_size}, {cfg.parameter_count() / 1e6:.0f}M params>")

    def head(self, u: torch.Tensor) -> torch.Tensor:
        """Draft logits ``[1, vocab]`` (fp32). The centroid head scores only the tokens of the
        ``top_k`` best centroids; the rest get the lowest selected score minus one, as in the reference."""
        if self.centroids is None:
            return ops.linear(u, self.net.lm_head).float()
        top = torch.topk(ops.linear(u, self.centroids)[0], self.acfg.centroid_top_k).indices
        ids = self.clusters[top].reshape(-1)
        scores = ops.linear(u, self.net.lm_head[ids])[0].float()
        out = torch.full((1, self.acfg.text.vocab_size), float(scores.min()) - 1.0, device=u.device)
        out[0, ids] = scores
        return out

    @torch.inference_mode()
    def steps(self, token: int, target: DraftContext, k: int, logits: bool = True):
        """Yield ``(logits, token)`` for ``k`` greedy draft steps after ``token``. ``logits=False``
        yields None for the logits where the token can be had without them (a quantized plain
        head: its screened top-1)."""
        net = self.net
        if net.fused:  # quantized on the CPU: numba's kernels do the work (see ops.numba_threads_only)
            with ops.numba_threads_only():
                yield from self._steps(token, target, k, logits)
        else:
            yield from self._steps(token, target, k, logits)

    def _steps(self, token: int, target: DraftContext, k: int, logits: bool):
        net, tnet = self.net, target.net
        q = target.cache.length  # the position of `token`, the last committed token
        kv = _TargetKV(tnet, target.cache, q, self.acfg.window)
        q_pos = torch.tensor([q], device=net.device)
        ropes = {r: table.get(range(q, q + 1)) for r, table in net.rope_tables.items()}
        h = target.hidden.reshape(1, -1).to(net.dtype)
        for _ in range(k):
            e = tnet.embed(torch.tensor([token], device=tnet.device)).to(net.dtype)
            x = ops.linear(torch.cat([e, h], dim=-1), self.pre)
            for spec in net.cfg.layers:
                x = net.layer(spec, x, ropes[spec.rope], q_pos, kv)
            u = net.norm(x, net.weights["norm.weight"])
            if logits or self.centroids is not None or not net.fused:
                out = self.head(u)[0]
                token = int(torch.argmax(out))
            else:
                out, token = None, int(net.top_k(u[0], 1)[1][0])
            h = ops.linear(u, self.post)
            yield out, token

    def propose(self, tokens: list[int], k: int, target: DraftContext | None = None) -> list[int]:
        if target is None or k <= 0:
            return []
        return [t for _, t in self.steps(tokens[-1], target, k, logits=False)]


# -- finding and loading ----------------------------------------------------------------------


def is_assistant_dir(path: Path) -> bool:
    try:
        data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("model_type") == ASSISTANT_TYPE


def _hub_repo_of(path: Path) -> str | None:
    """``.../models--org--name/snapshots/<rev>`` (the Hugging Face cache layout) -> ``org/name``."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i].startswith("models--") and i + 1 < len(parts) and parts[i + 1] == "snapshots":
            return parts[i][len("models--"):].replace("--", "/")
    return None


def find_assistant(model_dir: Path) -> Path | None:
    """The drafter next to a target: ``$GEMMA4_NB_ASSISTANT``; a ``assistant/`` folder inside the
    target's directory; a sibling ``<name>-assistant`` directory; or, for a target in the Hugging
    Face cache, ``<repo>-assistant`` in the same cache (never downloaded here)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return resolve_assistant(env)
    model_dir = Path(model_dir)
    for candidate in (model_dir / "assistant", model_dir.parent / f"{model_dir.name}-assistant"):
        if is_assistant_dir(candidate):
            return candidate
    repo = _hub_repo_of(model_dir)
    if repo:
        try:
            return resolve_assistant(f"{repo}-assistant")
        except ModelNotFoundError:
            return None
    return None


def resolve_assistant(ref: str | os.PathLike, *, download: bool = False) -> Path:
    from .resolve import resolve_model

    path = resolve_model(str(ref), download=download)
    if path.suffix == ".gguf" or not is_assistant_dir(path):
        raise ConfigError(f"{path}: not an MTP assistant checkpoint (config.json model_type must be {ASSISTANT_TYPE})")
    return path


def load_assistant(path: Path, target: ModelConfig, dtype: torch.dtype, device, progress=True,
                   quant: str | None = None) -> MTPDrafter:
    """The drafter at ``path`` for ``target``, in ``dtype``; ``quant="int8"``: its matrices int8 (the
    CPU path of a quantized target, where a draft step otherwise reads the drafter's fp32 head)."""
    path = Path(path)
    config_path = path / "config.json"
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{config_path}: cannot be read ({exc})") from None
    acfg = parse_assistant_config(data, str(config_path))
    check_pair(acfg, target, str(path))
    shards = find_shards(path)
    expected = assistant_tensors(acfg)
    check_checkpoint(acfg.text, shards, expected)
    if quant:
        from .quant import load_quantized_from_shards

        weights = load_quantized_from_shards(acfg.text, shards, list(expected), quant, dtype, progress,
                                             stage="loading the MTP assistant")
    else:
        weights = load_tensors(acfg.text, shards, list(expected), dtype, device, progress,
                               stage="loading the MTP assistant")
    return MTPDrafter(acfg, weights, source=path)
