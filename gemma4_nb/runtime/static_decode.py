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

The step's math is the decoder's own (:meth:`GemmaModel.qkv`, :meth:`GemmaModel.layer_output`),
checked on the CPU (eagerly) against the model's forward; CUDA graph capture and replay
(``graphs=True``, the default on CUDA) are checked by a CUDA-only test of
``tests/test_static_decode.py``.
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
        self.rope = {r: table.get(range(0, self.capacity)) for r, table in net.rope_tables.items()}
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
                k = self.net.keys_from_values(spec.index, v, self.net.rope_at(spec.index, positions))
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
        """The step: the decoder's own layer math (:meth:`GemmaModel.qkv`,
        :meth:`GemmaModel.layer_output`) around attention over the fixed buffers."""
        net = self.net
        x = net.embed(self.tok)
        ropes = {r: (cos.index_select(0, self.pos), sin.index_select(0, self.pos)) for r, (cos, sin) in self.rope.items()}
        for spec in self.cfg.layers:
            w = net.layer_weights[spec.index]
            rope = ropes[spec.rope]
            q, k, v = net.qkv(spec, w, net.norm(x, w["input_norm"]), rope)
            if spec.owns_kv:
                if k is None:  # K=V: K computed once here, where the model rebuilds it at every read
                    k = net.keys_from_values(spec.index, v, rope, seq_dim=0)
                self._store(spec, k, v)
            x = net.layer_output(w, x, self._attention(spec, q, bucket).to(x.dtype))
        logits = net.logits(net.norm(x, net.weights["norm.weight"]))
        self.logits.copy_(logits)
        self.next_tok.copy_(logits.argmax(-1))

    def _store(self, spec, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write this position's K/V ``[1, Hkv, D]`` into the layer's buffers (ring slot for sliding layers)."""
        slot = self.pos if spec.window is None else self.pos % spec.window
        self.k[spec.index].index_copy_(1, slot, k.transpose(0, 1).to(self.net.dtype))
        self.v[spec.index].index_copy_(1, slot, v.transpose(0, 1).to(self.net.dtype))
        if spec.window is not None:
            self.ring_pos[spec.window].index_copy_(0, slot, self.pos)

    def _attention(self, spec, q: torch.Tensor, bucket: int) -> torch.Tensor:
        """Attention of this position's ``q`` ``[1, Hq, D]`` over the buffers of the layer that
        holds this layer's K/V: ``[1, Hq * D]``."""
        cfg = self.cfg
        src = cfg.layers[spec.kv_source]
        d, hkv = src.head_dim, src.num_kv_heads
        kb, vb = self.k[src.index], self.v[src.index]
        if src.window is None:
            kb, vb = kb[:, :bucket], vb[:, :bucket]
            visible = torch.arange(bucket, device=self.pos.device) <= self.pos
        else:  # the ring holds the newest `window` positions, all visible (the current one included)
            ring = self.ring_pos[src.window]
            visible = (ring >= 0) & (ring <= self.pos) & (ring > self.pos - (spec.window or src.window))
        qg = q[0].view(hkv, cfg.num_heads // hkv, d)
        if cfg.attn_softcap is None:
            with gpu.sdpa_backends(kb.device):
                out = F.scaled_dot_product_attention(qg[None], kb[None], vb[None], attn_mask=visible[None, None, None],
                                                     scale=cfg.query_scale)[0]
        else:
            s = ops.softcap(torch.matmul(qg.float(), kb.float().transpose(1, 2)) * cfg.query_scale, cfg.attn_softcap)
            s = s.masked_fill(~visible, -math.inf)
            out = torch.matmul(torch.softmax(s, dim=-1).to(vb.dtype), vb)
        return out.reshape(1, cfg.num_heads * vb.shape[2])
