"""Model configuration: ``config.json`` parsed into one plain description of the text decoder.

Every architectural number comes from the checkpoint's config. What differs between model
families (norm weight offset, query scaling, K=V, layer scalars, softcap, checkpoint names) is
held as data in :data:`FAMILIES`, so one implementation in :mod:`gemma4_nb.runtime.decoder` serves them all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Family:
    """What a model family does differently, as data."""

    name: str
    norm_offset: float  # RMSNorm multiplies by (offset + w): 0 for Gemma 4, 1 for Gemma 3
    has_v_norm: bool  # weight-free RMSNorm on V
    has_layer_scalar: bool  # per-layer scalar multiplying the residual stream
    supports_k_eq_v: bool  # full layers may share one projection for K and V
    scales_queries: bool  # attention scale query_pre_attn_scalar**-0.5 (Gemma 3) instead of 1.0


GEMMA4 = Family(
    "gemma4", norm_offset=0.0, has_v_norm=True, has_layer_scalar=True, supports_k_eq_v=True, scales_queries=False
)

GEMMA3 = Family(
    "gemma3", norm_offset=1.0, has_v_norm=False, has_layer_scalar=False, supports_k_eq_v=False, scales_queries=True
)

FAMILIES = {"gemma4": GEMMA4, "gemma3": GEMMA3}

# model_type -> (family, where the text config lives, checkpoint prefix of text weights)
MODEL_TYPES: dict[str, tuple[Family, str | None, str]] = {
    "gemma4_unified": (GEMMA4, "text_config", "model.language_model."),
    "gemma4_unified_text": (GEMMA4, None, "model."),
    "gemma3": (GEMMA3, "text_config", "model.language_model."),
    "gemma3_text": (GEMMA3, None, "model."),
}

SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")


@dataclass(frozen=True)
class Rope:
    """Rotate-half RoPE: ``inv_freq[j] = theta ** (-2j / head_dim)`` for the rotated pairs, 0 above."""

    theta: float
    head_dim: int
    rotated_pairs: int
    factor: float = 1.0

    def inv_freq(self) -> torch.Tensor:
        j = torch.arange(0, 2 * self.rotated_pairs, 2, dtype=torch.int64).float()
        rotated = 1.0 / (self.theta ** (j / self.head_dim))
        zeros = torch.zeros(self.head_dim // 2 - self.rotated_pairs, dtype=torch.float32)
        return torch.cat((rotated, zeros)) / self.factor


@dataclass(frozen=True)
class LayerSpec:
    index: int
    kind: str  # "sliding" or "full"
    head_dim: int
    num_kv_heads: int
    window: int | None  # keys visible when q - window < k <= q; None for full attention
    k_eq_v: bool  # no v_proj: V is the raw k_proj output
    rope: Rope
    intermediate_size: int
    kv_source: int  # layer whose K/V this layer attends to (itself unless KV-shared)

    @property
    def owns_kv(self) -> bool:
        return self.kv_source == self.index


@dataclass(frozen=True)
class VisionSpec:
    """The encoder-free image embedder: 48x48 patches -> LN -> Linear -> LN -> +2D table -> LN -> RMSNorm -> Linear."""

    patch_size: int  # model patch side in pixels (patch_size * pooling_kernel_size = 48)
    embed_dim: int
    posemb_size: int
    proj_dim: int  # input width of the final projection (output_proj_dims)
    rms_norm_eps: float
    layer_norm_eps: float = 1e-5

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3


@dataclass(frozen=True)
class AudioSpec:
    """Raw 16 kHz audio: one token per ``samples_per_token`` samples -> RMSNorm -> Linear."""

    samples_per_token: int
    rms_norm_eps: float


@dataclass(frozen=True)
class MediaTokens:
    image: int
    boi: int
    eoi: int
    audio: int
    boa: int
    eoa: int


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    family: Family
    weight_prefix: str
    vocab_size: int
    hidden_size: int
    num_heads: int
    layers: tuple[LayerSpec, ...]
    rms_norm_eps: float
    query_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    pad_token_id: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    vision: VisionSpec | None = None
    audio: AudioSpec | None = None
    media_tokens: MediaTokens | None = None
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    def layer_kinds(self) -> list[str]:
        return [spec.kind for spec in self.layers]

    def parameter_count(self) -> int:
        h = self.hidden_size
        n = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        for s in self.layers:
            n += self.num_heads * s.head_dim * h * 2 + 4 * h + s.head_dim + 1
            if s.owns_kv:
                n += s.num_kv_heads * s.head_dim * h * (1 if s.k_eq_v else 2) + s.head_dim
            n += 3 * s.intermediate_size * h
        return n


def _as_id_list(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _legacy_rope_parameters(text: dict) -> dict:
    """Older configs: ``rope_theta`` (full layers), ``rope_local_base_freq`` and ``rope_scaling``."""
    full = {"rope_type": "default", "rope_theta": float(text.get("rope_theta", 1_000_000.0))}
    scaling = text.get("rope_scaling")
    if scaling:
        full.update(scaling)
        full["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    sliding = {"rope_type": "default", "rope_theta": float(text.get("rope_local_base_freq", 10_000.0))}
    return {"full_attention": full, "sliding_attention": sliding}


def _need(text: dict, key: str, where: str):
    if key not in text:
        raise ConfigError(f"{where}: required field '{key}' is missing from the config")
    return text[key]


def parse_config(data: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Turn a ``config.json`` dict into a :class:`ModelConfig`, or raise :class:`ConfigError`."""
    model_type = data.get("model_type")
    if model_type not in MODEL_TYPES:
        supported = ", ".join(sorted(MODEL_TYPES))
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not supported. Supported model types: {supported}."
        )
    family, text_key, prefix = MODEL_TYPES[model_type]
    text = data if text_key is None else data.get(text_key)
    if not isinstance(text, dict):
        raise ConfigError(f"{where}: '{text_key}' is missing; a {model_type} config nests the text model there")

    activation = text.get("hidden_activation", "gelu_pytorch_tanh")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(f"{where}: hidden_activation {activation!r} is not supported (expected gelu tanh)")
    if text.get("attention_bias", False):
        raise ConfigError(f"{where}: attention_bias=true is not supported by this runtime")
    if text.get("use_bidirectional_attention") == "all":
        raise ConfigError(
            f"{where}: use_bidirectional_attention='all' describes an encoder (embedding) model, "
            "which cannot generate text"
        )

    n_layers = int(_need(text, "num_hidden_layers", where))
    hidden = int(_need(text, "hidden_size", where))
    n_heads = int(_need(text, "num_attention_heads", where))
    head_dim = int(text.get("head_dim") or hidden // n_heads)
    n_kv = int(text.get("num_key_value_heads", n_heads))
    intermediate = int(_need(text, "intermediate_size", where))
    window = int(text.get("sliding_window") or 0) or None

    layer_types = text.get("layer_types")
    if layer_types is None:
        pattern = int(text.get("sliding_window_pattern", 6))
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]
    layer_types = list(layer_types)
    if len(layer_types) != n_layers:
        raise ConfigError(f"{where}: layer_types has {len(layer_types)} entries for {n_layers} layers")
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ConfigError(f"{where}: unknown layer types {unknown}")
    layer_types[-1] = "full_attention"  # the reference forces the last layer to full attention

    k_eq_v = bool(text.get("attention_k_eq_v", False)) and family.supports_k_eq_v

    # Per-layer overrides: serialized as `per_layer_config`, or derived from the global fields.
    overrides: dict[int, dict] = {}
    if "per_layer_config" in text and text["per_layer_config"] is not None:
        overrides = {int(k): dict(v) for k, v in text["per_layer_config"].items()}
    elif family is GEMMA4:
        full_override: dict[str, Any] = {"head_dim": int(text.get("global_head_dim", 512))}
        if k_eq_v and text.get("num_global_key_value_heads") is not None:
            full_override["num_key_value_heads"] = int(text["num_global_key_value_heads"])
        overrides = {i: full_override for i, t in enumerate(layer_types) if t == "full_attention"}

    rope_params = text.get("rope_parameters") or _legacy_rope_parameters(text)
    n_shared = int(text.get("num_kv_shared_layers", 0) or 0)
    double_wide = bool(text.get("use_double_wide_mlp", False))
    first_shared = n_layers - n_shared

    def layer_field(i: int, key: str, default):
        return int(overrides.get(i, {}).get(key, default))

    def rope_for(kind: str, hd: int) -> Rope:
        params = rope_params.get(kind)
        if params is None:
            raise ConfigError(f"{where}: rope_parameters has no entry for {kind}")
        rope_type = params.get("rope_type", "default")
        theta = float(params.get("rope_theta", 10_000.0))
        if rope_type == "default":
            return Rope(theta, hd, hd // 2)
        if rope_type == "linear":
            return Rope(theta, hd, hd // 2, float(params.get("factor", 1.0)))
        if rope_type == "proportional":
            pairs = int(float(params.get("partial_rotary_factor", 1.0)) * hd // 2)
            return Rope(theta, hd, pairs, float(params.get("factor", 1.0)))
        raise ConfigError(f"{where}: rope_type {rope_type!r} is not supported (default, linear, proportional)")

    # KV sharing: from `first_shared` on, layers reuse the K/V of the last earlier layer of their type.
    last_owner: dict[str, int] = {}
    specs = []
    for i, t in enumerate(layer_types):
        kind = "sliding" if t == "sliding_attention" else "full"
        hd = layer_field(i, "head_dim", head_dim)
        shared = i >= first_shared
        if shared and t not in last_owner:
            raise ConfigError(f"{where}: KV-shared layer {i} has no earlier {t} layer to share with")
        specs.append(
            LayerSpec(
                index=i,
                kind=kind,
                head_dim=hd,
                num_kv_heads=layer_field(i, "num_key_value_heads", n_kv),
                window=window if kind == "sliding" else None,
                k_eq_v=k_eq_v and kind == "full",
                rope=rope_for(t, hd),
                intermediate_size=intermediate * (2 if (double_wide and shared) else 1),
                kv_source=last_owner[t] if shared else i,
            )
        )
        if not shared:
            last_owner[t] = i
    for s in specs:
        if n_heads % s.num_kv_heads:
            raise ConfigError(f"{where}: layer {s.index}: {n_heads} query heads not divisible by {s.num_kv_heads} KV heads")

    query_scale = float(text.get("query_pre_attn_scalar", head_dim)) ** -0.5 if family.scales_queries else 1.0

    eos = _as_id_list(text.get("eos_token_id", data.get("eos_token_id", 1)))
    vision = audio = media_tokens = None
    if text_key is not None and family is GEMMA4:
        vc, ac = data.get("vision_config"), data.get("audio_config")
        if isinstance(vc, dict):
            vision = VisionSpec(
                patch_size=int(vc.get("patch_size", 16)) * int(vc.get("pooling_kernel_size", 3)),
                embed_dim=int(vc.get("mm_embed_dim", 3840)), posemb_size=int(vc.get("mm_posemb_size", 1120)),
                proj_dim=int(vc.get("output_proj_dims", 3840)), rms_norm_eps=float(vc.get("rms_norm_eps", 1e-6)))
        if isinstance(ac, dict):
            audio = AudioSpec(int(ac.get("audio_embed_dim", 640)), float(ac.get("rms_norm_eps", 1e-6)))
        media_tokens = MediaTokens(
            image=int(data.get("image_token_id", 258880)), boi=int(data.get("boi_token_id", 255999)),
            eoi=int(data.get("eoi_token_id", 258882)), audio=int(data.get("audio_token_id", 258881)),
            boa=int(data.get("boa_token_id", 256000)), eoa=int(data.get("eoa_token_index", 258883)))
    return ModelConfig(
        model_type=model_type,
        family=family,
        weight_prefix=prefix,
        vocab_size=int(_need(text, "vocab_size", where)),
        hidden_size=hidden,
        num_heads=n_heads,
        layers=tuple(specs),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        query_scale=query_scale,
        attn_softcap=(float(text["attn_logit_softcapping"]) if text.get("attn_logit_softcapping") else None),
        final_softcap=(float(text["final_logit_softcapping"]) if text.get("final_logit_softcapping") else None),
        max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", text.get("tie_word_embeddings", True))),
        pad_token_id=int(text.get("pad_token_id", 0) or 0),
        bos_token_id=text.get("bos_token_id", 2),
        eos_token_ids=eos,
        vision=vision,
        audio=audio,
        media_tokens=media_tokens,
        raw=data,
    )


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir}: no config.json; is this a Hugging Face model directory?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as JSON ({exc}); the file may be corrupt, download it again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return parse_config(data, where=str(path))
