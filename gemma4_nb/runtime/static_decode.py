"""Opt-in decode steps with static shapes, replayed as CUDA graphs (experimental).

:class:`StaticDecoder` runs the model's decode step (one token) with every shape fixed, so that on
CUDA it can be captured once per *bucket* (the length of the full layers' K/V the step attends
to: 256, 512, 1024, ... up to the capacity) and replayed, which removes the per-kernel launch cost
that bounds a plain PyTorch decode step on a GPU:

* the position is a device tensor (RoPE rows are gathered with it, masks are computed from it);
* K/V live in buffers of fixed size that never reallocate: a ring of ``window`` positions for
  each sliding layer, ``capacity`` positions for each full layer (a step in bucket ``b`` reads
  only the first ``b``);
* K of a K=V layer is computed once when written (``rope(V * k_norm)``, what the model rebuilds
  at every read) rather than at every read.

It is separate from the model's own decode path (:meth:`GemmaModel.forward` with a chunked
:class:`~gemma4_nb.runtime.kv_cache.KVCache`) and supports plain sequential decoding only: no rollback
(speculative decoding), no soft tokens, no offload or int8 KV. Use: prefill with the model into a
KVCache, then ``dec = StaticDecoder(net, capacity); dec.load(cache); tok = dec.step(tok)``.
``gemma4-nb bench --cuda-graphs`` measures it.

Status: the step's math is checked on the CPU (eagerly) against the model's forward; the CUDA
graph capture and replay (``graphs=True``, the default on CUDA) are checked only by a CUDA test
that has not run yet (no GPU was available when it was written).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import Gemma4Error
from ..kernels import gpu, ops

MIN_BUCKET = 256


class StaticDecoder:
    def __init__(self, net, capacity: int, *, graphs: bool | None = None, min_bucket: int = MIN_BUCKET) -> None:
        """``capacity``: the most positions (prompt and generated) the decoder will hold.
        ``graphs``: capture CUDA graphs (default: when the model is on CUDA)."""
        cfg = net.cfg
        if graphs is None:
            graphs = net.device.type == "cuda"
        if graphs and net.device.type != "cuda":
            raise Gemma4Error("CUDA graphs need the model on a CUDA device")
        self.net, self.cfg, self.capacity, self.graphs = net, cfg, int(capacity), graphs
        dev, dtype = net.device, net.dtype
        self.buckets = []
        b = min_bucket
        while b < self.capacity:
            self.buckets.append(b)
            b *= 2
        self.buckets.append(self.capacity)
        # RoPE rows for every position the decoder may hold, per rope kind
        self.rope = {r: table.get(range(0, self.capacity)) for r, table in net._rope.items()}
        self.k, self.v = {}, {}
        self.ring_pos = {}  # sliding window -> [window] positions held in the ring (-1: empty)
        for spec in cfg.layers:
            if not spec.owns_kv:
                continue
            size = spec.window if spec.window is not None else self.capacity
            if spec.window is not None:
                self.ring_pos.setdefault(spec.window, torch.full((spec.window,), -1, dtype=torch.long, device=dev))
            shape = (spec.num_kv_heads, size, spec.head_dim)
            self.k[spec.index] = torch.zeros(shape, dtype=dtype, device=dev)
            self.v[spec.index] = torch.zeros(shape, dtype=dtype, device=dev)
        self.length = 0
        self.tok = torch.zeros(1, dtype=torch.long, device=dev)  # static inputs of the step
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.logits = torch.zeros((1, cfg.vocab_size), dtype=torch.float32, device=dev)  # static outputs
        self.next_tok = torch.zeros(1, dtype=torch.long, device=dev)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None

    # -- state -----------------------------------------------------------------------------------

    @torch.inference_mode()
    def load(self, cache) -> None:
        """Copy the committed K/V of a :class:`KVCache` (e.g. after a prefill) into the buffers."""
        n = cache.length
        if n >= self.capacity:
            raise Gemma4Error(f"the cache holds {n} positions; this decoder's capacity is {self.capacity}")
        for ring in self.ring_pos.values():
            ring.fill_(-1)
        for spec in self.cfg.layers:
            if not spec.owns_kv:
                continue
            start = 0 if spec.window is None else max(0, n - spec.window)
            k, v, positions = cache.span(spec.index, start, n)
            if positions.start != start or positions.stop != n:
                raise Gemma4Error(f"layer {spec.index} of the cache no longer holds positions {start}..{n - 1}")
            if k is None:
                k = self.net._keys_from_values(spec.index, v, positions)
            idx = torch.arange(start, n, device=self.pos.device)
            if spec.window is not None:
                self.ring_pos[spec.window][idx % spec.window] = idx
                idx = idx % spec.window
            self.k[spec.index].index_copy_(1, idx, k.to(self.net.dtype))
            self.v[spec.index].index_copy_(1, idx, v.to(self.net.dtype))
        self.length = n

    def bucket(self, length: int) -> int:
        for b in self.buckets:
            if b >= length:
                return b
        raise Gemma4Error(f"position {length - 1} is beyond this decoder's capacity of {self.capacity}")

    # -- the step --------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, tok) -> torch.Tensor:
        """Run token ``tok`` (an int or a one-element tensor) at the next position; returns the
        greedy next token (a one-element device tensor). ``self.logits`` holds the step's logits
        until the next step."""
        if self.length >= self.capacity:
            raise Gemma4Error(f"this decoder's capacity of {self.capacity} positions is full")
        self.tok.copy_(torch.as_tensor(tok).reshape(1))
        self.pos.fill_(self.length)
        bucket = self.bucket(self.length + 1)
        if self.graphs:
            self._graph(bucket).replay()
        else:
            self._run(bucket)
        self.length += 1
        return self.next_tok

    @torch.inference_mode()
    def prepare(self, last_length: int) -> None:
        """Capture the graphs of every bucket up to ``last_length`` positions now (capture runs
        the step at the current position, which only rewrites what it writes)."""
        if not self.graphs:
            return
        self.pos.fill_(self.length)
        for b in self.buckets:
            if b >= self.length + 1:
                self._graph(b)
            if b >= last_length:
                break

    def _graph(self, bucket: int):
        g = self._graphs.get(bucket)
        if g is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # compiles the Triton kernels, sets up cuBLAS, outside the capture
                    self._run(bucket)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                self._run(bucket)
            self._graphs[bucket] = g
        return g

    def _run(self, bucket: int) -> None:
        net = self.net
        x = net.embed(self.tok)
        ropes = {r: (cos.index_select(0, self.pos), sin.index_select(0, self.pos)) for r, (cos, sin) in self.rope.items()}
        for spec in self.cfg.layers:
            w = net.layer_weights[spec.index]
            attn = self._attention(spec, w, net.norm(x, w["input_norm"]), ropes[spec.rope], bucket)
            x = x + net.norm(attn, w["post_attn_norm"])
            mlp = ops.gated_mlp(net.norm(x, w["pre_ffn_norm"]), w["gate"], w["up"], w["down"])
            x = x + net.norm(mlp, w["post_ffn_norm"])
            if w["layer_scalar"] is not None:
                x = x * w["layer_scalar"]
        logits = net.logits(net.norm(x, net.weights["norm.weight"]))
        self.logits.copy_(logits)
        self.next_tok.copy_(logits.argmax(-1))

    def _attention(self, spec, w, h, rope, bucket: int) -> torch.Tensor:
        net, cfg = self.net, self.cfg
        d, hkv = spec.head_dim, spec.num_kv_heads
        cos, sin = rope
        q = ops.linear(h, w["q_proj"]).view(1, cfg.num_heads, d)
        q = ops.apply_rope(net.norm(q, w["q_norm"]), cos, sin)
        src = self.cfg.layers[spec.kv_source]
        if spec.owns_kv:
            raw = ops.linear(h, w["k_proj"]).view(1, hkv, d)
            if spec.k_eq_v:
                v = ops.rms_norm(raw, None, cfg.rms_norm_eps)
                wk = w["k_norm"].float() + cfg.family.norm_offset
                k = ops.apply_rope((v.float() * wk).to(net.dtype), cos, sin)
            else:
                v = ops.linear(h, w["v_proj"]).view(1, hkv, d)
                k = ops.apply_rope(net.norm(raw, w["k_norm"]), cos, sin)
                if cfg.family.has_v_norm:
                    v = ops.rms_norm(v, None, cfg.rms_norm_eps)
            slot = self.pos if spec.window is None else self.pos % spec.window
            self.k[spec.index].index_copy_(1, slot, k.transpose(0, 1).to(net.dtype))
            self.v[spec.index].index_copy_(1, slot, v.transpose(0, 1).to(net.dtype))
            if spec.window is not None:
                self.ring_pos[spec.window].index_copy_(0, slot, self.pos)
        kb, vb = self.k[src.index], self.v[src.index]
        if src.window is None:
            kb, vb = kb[:, :bucket], vb[:, :bucket]
            visible = torch.arange(bucket, device=self.pos.device) <= self.pos
        else:  # the ring holds the newest `window` positions, all visible (the current one included)
            ring = self.ring_pos[src.window]
            visible = (ring >= 0) & (ring <= self.pos) & (ring > self.pos - (spec.window or src.window))
        groups = cfg.num_heads // hkv
        qg = q[0].view(hkv, groups, d)
        if cfg.attn_softcap is None:
            with gpu._sdpa_backends(kb.device):
                out = F.scaled_dot_product_attention(qg[None], kb[None], vb[None], attn_mask=visible[None, None, None],
                                                     scale=cfg.query_scale)[0]
        else:
            s = ops.softcap(torch.matmul(qg.float(), kb.float().transpose(1, 2)) * cfg.query_scale, cfg.attn_softcap)
            s = s.masked_fill(~visible, -math.inf)
            out = torch.matmul(torch.softmax(s, dim=-1).to(vb.dtype), vb)
        return ops.linear(out.reshape(1, cfg.num_heads * vb.shape[2]).to(h.dtype), w["o_proj"])
