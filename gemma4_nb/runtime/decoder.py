"""The Gemma text decoder: one functional implementation driven by :class:`ModelConfig`.

Weights live in a flat dict keyed by canonical names (the checkpoint names without the text
prefix). Layers call the kernels in :mod:`gemma4_nb.kernels`; nothing here depends on how a
weight is stored, so quantized weights and fused kernels plug in behind the same calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..kernels import ops
from ..kernels.qweight import to_planes
from .config import LayerSpec, ModelConfig
from .kv_cache import DEFAULT_CHUNK, DEFAULT_MAX_ROLLBACK, KVCache
from .multimodal import Embedders


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None  # [N, vocab] fp32 for the requested positions
    hidden: torch.Tensor  # [N, hidden] final-normed hidden state for the same positions


@dataclass
class SoftTokens:
    """Embeddings that replace the token embeddings at ``mask`` positions (images, audio)."""

    mask: torch.Tensor  # bool [T]
    embeddings: torch.Tensor  # [mask.sum(), hidden]
    blocks: torch.Tensor | None = None  # long [T]: image block ids, bidirectional on sliding layers


class GemmaModel:
    # heads with at least this many rows (vocabularies) are screened on the CPU (see _screened_head)
    SCREENED_HEAD_MIN_ROWS = 32768

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
        self.cfg = cfg
        self.weights = weights
        self.embed_weight = weights["embed_tokens.weight"]
        self.lm_head = weights.get("lm_head.weight", self.embed_weight)
        self.dtype = self.embed_weight.dtype
        self.device = self.embed_weight.device
        # The reference casts the sqrt(hidden) scale to the weight dtype before multiplying.
        self.embed_scale = torch.tensor(cfg.embed_scale).to(self.dtype)
        self._embed_factor = float(self.embed_scale)
        self.layer_weights = [self._layer_weights(s) for s in cfg.layers]
        self.fused = ops.fused_cpu(self.lm_head)  # quantized weights on the CPU: numba kernels
        if (self.fused and self.lm_head.fmt == "int8" and not self.lm_head.planes
                and self.lm_head.shape[0] >= self.SCREENED_HEAD_MIN_ROWS):
            self._screened_head()
        self._key_norms = {}  # K=V layers' key norm weights for the fused attention, built on first use
        # forwards of at most this many positions run on the integer kernels (torch single-threaded)
        fmt = getattr(self.layer_weights[0]["q_proj"], "fmt", "int8")
        self.integer_batch = ops.integer_batch(cfg.hidden_size, fmt)
        # the fused decode kernels' per-layer arguments, made now: they hold the small matrices'
        # codes in sixteen-row blocks (counted by the memory planner), so memory after load is
        # memory while decoding
        self._decode_args = None
        if self.fused and self.dtype == torch.float32:
            self._decode_args = [ops.DecodeLayerArgs(cfg, s, self.layer_weights[s.index]) for s in cfg.layers]
        self.embedders = Embedders(cfg, weights) if (cfg.vision or cfg.audio) else None
        self.rope_tables = {s.rope: ops.RopeTable(s.rope.inv_freq(), s.rope.rotated_pairs, self.dtype, self.device)
                      for s in cfg.layers}

    def _screened_head(self) -> None:
        """Store an int8 vocabulary head as nibble planes (same bytes; see ``kernels.qweight.to_planes``):
        greedy and top-k decoding then read about half of it per token, exactly. A tied embedding
        is the same tensor, converted once."""
        planes = to_planes(self.lm_head)
        for name in ("lm_head.weight", "embed_tokens.weight"):
            if self.weights.get(name) is self.lm_head:
                self.weights[name] = planes
        if self.embed_weight is self.lm_head:
            self.embed_weight = planes
        self.lm_head = planes

    def _layer_weights(self, spec: LayerSpec) -> dict[str, torch.Tensor | None]:
        p = f"layers.{spec.index}."
        get = self.weights.get
        return {
            "input_norm": get(p + "input_layernorm.weight"),
            "q_proj": get(p + "self_attn.q_proj.weight"),
            "q_norm": get(p + "self_attn.q_norm.weight"),
            "k_proj": get(p + "self_attn.k_proj.weight"),
            "k_norm": get(p + "self_attn.k_norm.weight"),
            "v_proj": get(p + "self_attn.v_proj.weight"),
            "o_proj": get(p + "self_attn.o_proj.weight"),
            "post_attn_norm": get(p + "post_attention_layernorm.weight"),
            "pre_ffn_norm": get(p + "pre_feedforward_layernorm.weight"),
            "post_ffn_norm": get(p + "post_feedforward_layernorm.weight"),
            "gate": get(p + "mlp.gate_proj.weight"),
            "up": get(p + "mlp.up_proj.weight"),
            "down": get(p + "mlp.down_proj.weight"),
            "layer_scalar": get(p + "layer_scalar"),
        }

    def new_cache(self, *, chunk: int = DEFAULT_CHUNK, kv_dtype: str | None = None,
                  max_rollback: int = DEFAULT_MAX_ROLLBACK, offload_after: int | None = None) -> KVCache:
        return KVCache(self.cfg, self.device, self.dtype, chunk=chunk, kv_dtype=kv_dtype,
                       max_rollback=max_rollback, offload_after=offload_after)

    # -- pieces -------------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor, soft: SoftTokens | None = None) -> torch.Tensor:
        if soft is not None:
            ids = torch.where(soft.mask, self.cfg.pad_token_id, ids)
        if self.fused:  # one numba call for a quantized table's rows
            x = ops.embedding(self.embed_weight, ids, self._embed_factor)
        else:
            x = self.embed_weight[ids] * self.embed_scale
        if soft is not None:
            x = x.clone()
            x[soft.mask] = soft.embeddings.to(x.dtype)
        return x

    def norm(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        return ops.rms_norm(x, weight, self.cfg.rms_norm_eps, self.cfg.family.norm_offset)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return ops.head_logits(hidden, self.lm_head, self.cfg.final_softcap)

    def top_k(self, hidden: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` (soft-capped logits, token ids) of one position's final hidden state, without
        materializing every logit when the head is quantized on the CPU."""
        return ops.head_topk(hidden, self.lm_head, self.cfg.final_softcap, k)

    def top_k_rows(self, hidden: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`top_k` of every position of ``hidden`` ``[N, hidden]``: ``(values [N, k], ids
        [N, k])``; a quantized head on the CPU reads each of its rows once for all positions."""
        return ops.head_topk_rows(hidden, self.lm_head, self.cfg.final_softcap, k)

    def rope_at(self, layer: int, positions: range) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of layer ``layer``'s RoPE at ``positions``."""
        return self.rope_tables[self.cfg.layers[layer].rope].get(positions)

    def _key_norm(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s key norm weight with the family's offset, fp32 (built once): a K=V
        layer's keys are ``rope(v * weight)``."""
        kw = self._key_norms.get(layer)
        if kw is None:
            kw = self._key_norms[layer] = (self.layer_weights[layer]["k_norm"].float()
                                           + self.cfg.family.norm_offset).contiguous()
        return kw

    def keys_from_values(self, layer: int, v: torch.Tensor, rope, seq_dim: int = 1) -> torch.Tensor:
        """K=V layers store V = rmsnorm(k_proj(x)) once; K = rope(V * k_norm weight) is rebuilt from
        it (``rope``: cos/sin of V's positions; ``seq_dim``: V's position axis)."""
        cos, sin = rope
        return ops.apply_rope((v.float() * self._key_norm(layer)).to(self.dtype), cos, sin, seq_dim=seq_dim)

    def qkv(self, spec: LayerSpec, w, h, rope):
        """Projections of one layer: ``q`` ``[T, Hq, D]`` (normed, rotated) and this layer's new
        ``k``, ``v`` ``[T, Hkv, D]`` (None for a layer reading another layer's K/V; ``k`` None for
        a K=V layer, whose ``v`` is the weight-free norm of the raw projection)."""
        cfg = self.cfg
        t = h.shape[0]
        cos, sin = rope
        q = ops.linear(h, w["q_proj"]).view(t, cfg.num_heads, spec.head_dim)
        q = ops.apply_rope(self.norm(q, w["q_norm"]), cos, sin)
        if not spec.owns_kv:
            return q, None, None
        raw = ops.linear(h, w["k_proj"]).view(t, spec.num_kv_heads, spec.head_dim)
        if spec.k_eq_v:
            return q, None, ops.rms_norm(raw, None, cfg.rms_norm_eps)
        v = ops.linear(h, w["v_proj"]).view(t, spec.num_kv_heads, spec.head_dim)
        k = ops.apply_rope(self.norm(raw, w["k_norm"]), cos, sin)
        if cfg.family.has_v_norm:
            v = ops.rms_norm(v, None, cfg.rms_norm_eps)
        return q, k, v

    def _attend(self, spec: LayerSpec, q, k, v, q_pos, cache, blocks=None) -> torch.Tensor:
        """Store this layer's K/V and attend: ``[T, Hq * D]``."""
        cfg = self.cfg
        t = q.shape[0]
        # a fused decode step (or a verification's few positions) reads K/V straight from the
        # cache's chunks (no contiguous copy; an int8 cache's rows as stored, with their scales)
        direct = (self.fused and t <= self.integer_batch and blocks is None
                  and getattr(cache, "chunk_view", None) is not None)
        k_all = v_all = k_pos = None
        if spec.owns_kv:
            stored = cache.update(spec.index, None if k is None else k.transpose(0, 1), v.transpose(0, 1),
                                  gather=not direct)
            if stored is not None:
                k_all, v_all, k_pos = stored
        elif not direct:
            k_all, v_all, k_pos = cache.read(spec.kv_source)
        view = cache.chunk_view(spec.kv_source) if direct else None
        if view is not None:
            keys_from = None
            if view[0] is None:  # K=V: the kernel rebuilds the keys from the values
                keys_from = (self._key_norm(spec.kv_source), *self.rope_at(spec.kv_source, view[6]))
            out = ops.attention_chunks(q.transpose(0, 1), view, cfg.query_scale, cfg.attn_softcap, spec.window,
                                       keys_from)
            return out.reshape(t, cfg.num_heads * spec.head_dim)
        if v_all is None:  # not representable as chunks after all: gather
            k_all, v_all, k_pos = cache.read(spec.kv_source)
        if k_all is None:
            k_all = self.keys_from_values(spec.kv_source, v_all, self.rope_at(spec.kv_source, k_pos))
        # images attend to themselves both ways on sliding layers only (full layers stay causal)
        out = ops.attention(q.transpose(0, 1), k_all, v_all, q_pos, k_pos, spec.window, cfg.query_scale,
                            cfg.attn_softcap, blocks if spec.kind == "sliding" else None,
                            fused=self.fused and t <= self.integer_batch)
        return out.reshape(t, cfg.num_heads * spec.head_dim)

    def layer_output(self, w, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The rest of a layer after attention (``attn``: ``[T, Hq * D]``): the output projection,
        the sandwich norms and residuals, the gated MLP, the layer scalar."""
        x = x + self.norm(ops.linear(attn, w["o_proj"]), w["post_attn_norm"])
        mlp = ops.gated_mlp(self.norm(x, w["pre_ffn_norm"]), w["gate"], w["up"], w["down"])
        x = x + self.norm(mlp, w["post_ffn_norm"])
        return x if w["layer_scalar"] is None else x * w["layer_scalar"]

    def layer(self, spec: LayerSpec, x: torch.Tensor, rope, q_pos, cache, blocks=None) -> torch.Tensor:
        """One decoder layer on ``x`` ``[T, hidden]`` (``cache``: anything with the KV cache's
        ``update``/``read`` interface). A decode step on quantized CPU weights runs the two fused
        kernels of :mod:`gemma4_nb.kernels.cpu_decode` instead of the pieces, and so do the few
        positions of a verification (up to :attr:`integer_batch`)."""
        w = self.layer_weights[spec.index]
        if self.fused and x.shape[0] <= self.integer_batch and blocks is None and x.dtype == torch.float32:
            if self._decode_args is None:
                self._decode_args = [ops.DecodeLayerArgs(self.cfg, s, self.layer_weights[s.index]) for s in self.cfg.layers]
            args = self._decode_args[spec.index]
            if args.ok:
                if getattr(cache, "store_rows", None) is not None and cache.in_place(spec.kv_source):
                    return torch.from_numpy(self._fused_layer(spec, args, ops.as_array(x), rope, cache))
                q, k, v = ops.decode_attention_inputs(args, x, rope)
                return ops.decode_attention_output_and_mlp(args, x, self._attend(spec, q, k, v, q_pos, cache))
        q, k, v = self.qkv(spec, w, self.norm(x, w["input_norm"]), rope)
        return self.layer_output(w, x, self._attend(spec, q, k, v, q_pos, cache, blocks))

    def _fused_layer(self, spec: LayerSpec, args, x: np.ndarray, rope, cache) -> np.ndarray:
        """:meth:`layer` for a few positions on quantized CPU weights over a cache read in place, in
        numpy from end to end: q/k/v straight into the cache's chunks, the attention over them, the
        rest of the layer. The torch calls around the kernels cost a small model's decode step a
        few milliseconds (docs/benchmarks.md, seventh session)."""
        q, k, v = ops.decode_attention_input_arrays(args, x, ops.rope_arrays(rope))
        if spec.owns_kv:
            cache.store_rows(spec.index, k, v)
        view = cache.chunk_view(spec.kv_source)
        keys_from = None
        if view.k_data is None:  # K=V: the kernel rebuilds the keys from the values
            keys_from = (self._key_norm(spec.kv_source), *self.rope_at(spec.kv_source, view.keys))
        attn = ops.attention_chunks_array(q, view, self.cfg.query_scale, self.cfg.attn_softcap, spec.window, keys_from)
        return ops.decode_output_and_mlp_array(args, x, attn.reshape(x.shape[0], -1))

    # -- forward ------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        cache,
        *,
        soft: SoftTokens | None = None,
        outputs: str = "last",
        logits: bool = True,
    ) -> ForwardOutput:
        """Run ``ids`` (1-D, the next positions after ``cache.length``) through the decoder.

        ``outputs``: ``"last"`` returns the last position only, ``"all"`` every position.
        The cache is updated and committed. A few positions on quantized CPU weights run with torch
        single-threaded (:func:`~gemma4_nb.kernels.ops.numba_threads_only`).
        """
        if self.fused and ids.shape[0] <= self.integer_batch:
            with ops.numba_threads_only():
                return self._forward(ids, cache, soft, outputs, logits)
        return self._forward(ids, cache, soft, outputs, logits)

    def _forward(self, ids, cache, soft, outputs, logits) -> ForwardOutput:
        ids = ids.to(self.device)
        q_pos = cache.begin(ids.shape[0])
        x = self.embed(ids, soft)
        ropes = {r: table.get(q_pos) for r, table in self.rope_tables.items()}
        blocks = None
        if soft is not None and soft.blocks is not None and bool((soft.blocks >= 0).any()):
            blocks = soft.blocks.to(self.device)
        for spec in self.cfg.layers:
            x = self.layer(spec, x, ropes[spec.rope], q_pos, cache, blocks)
        cache.commit()
        if outputs == "last":
            x = x[-1:]
        hidden = self.norm(x, self.weights["norm.weight"])
        return ForwardOutput(self.logits(hidden) if logits else None, hidden)
