"""The KV cache: fixed-size chunks allocated on demand from per-geometry pools.

The model talks to a cache through a narrow interface:

* ``length`` -- how many positions are committed;
* ``begin(t)`` -- a forward of ``t`` tokens starts; returns their positions (a ``range``);
* ``update(layer, k, v)`` -- store this forward's K/V (``[kv_heads, t, head_dim]``; ``k=None`` for
  K=V layers, which keep one tensor) and return everything the layer may attend to,
  ``(k_all | None, v_all, key_positions)`` with the positions as a ``range``;
* ``read(layer)`` -- the same without storing (layers that share another layer's K/V);
* ``commit()`` -- the forward finished: its positions are committed, and sliding-window layers
  hand back chunks no query can see any more. A forward that fails before ``commit`` leaves the
  committed state as it was;
* ``truncate(n)`` -- forget every position from ``n`` on (speculative-decoding rollback, prefix reuse).

Sliding layers keep ``window + max_rollback`` positions (rounded to chunks): their memory is
bounded at any context length. Full layers keep every position. With ``kv_dtype="int8"`` each
token and head is stored as int8 with one scale (the fused CPU decode reads them as stored,
through :meth:`KVCache.chunk_view`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from ..errors import Gemma4Error
from .config import ModelConfig

DEFAULT_CHUNK = 256
DEFAULT_MAX_ROLLBACK = 64


class CacheRollbackError(Gemma4Error):
    """A truncation reached positions a sliding-window layer has already let go of."""


class ChunkView(NamedTuple):
    """A layer's visible K/V in the cache's own storage (:meth:`KVCache.chunk_view`): rows ``skip ..
    skip + n - 1`` of the chunks ``*_slots`` of ``*_data`` ``[chunks, chunk, heads, dim]`` laid end
    to end, at positions ``keys``. An int8 cache adds each row's scale, ``*_scale`` ``[chunks,
    chunk, heads]`` (None otherwise)."""

    k_data: torch.Tensor | None  # None for a K=V layer: the reader rebuilds keys from the values
    v_data: torch.Tensor
    k_slots: torch.Tensor | None
    v_slots: torch.Tensor
    skip: int
    n: int
    keys: range
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


class ChunkPool:
    """Storage for chunks of ``chunk`` positions x ``heads`` x ``dim``; grows by doubling."""

    def __init__(self, chunk: int, heads: int, dim: int, dtype: torch.dtype, device, quantized: bool,
                 pinned: bool = False) -> None:
        self.chunk, self.heads, self.dim = chunk, heads, dim
        self.dtype, self.device, self.quantized = dtype, torch.device(device), quantized
        self.pinned = pinned  # page-locked host memory (offload target on CUDA machines)
        self.data = torch.empty((0, chunk, heads, dim), dtype=torch.int8 if quantized else dtype, device=self.device)
        self.scale = torch.empty((0, chunk, heads), dtype=torch.float32, device=self.device) if quantized else None
        self.free: list[int] = []
        self._array = self._as_array()

    @property
    def capacity(self) -> int:
        return self.data.shape[0]

    def _grow(self) -> None:
        old = self.capacity
        new = max(4, 2 * old)

        def grown(t: torch.Tensor) -> torch.Tensor:
            out = torch.empty((new, *t.shape[1:]), dtype=t.dtype, device=t.device, pin_memory=self.pinned)
            out[:old] = t
            return out

        self.data = grown(self.data)
        self._array = self._as_array()
        if self.scale is not None:
            self.scale = grown(self.scale)
        self.free.extend(range(new - 1, old - 1, -1))

    def alloc(self) -> int:
        if not self.free:
            self._grow()
        return self.free.pop()

    def release(self, slots) -> None:
        self.free.extend(slots)

    def _as_array(self) -> np.ndarray | None:
        """``data`` as a numpy view where rows can be stored as they are (fp32/fp16 on the CPU)."""
        if self.quantized or self.device.type != "cpu" or self.dtype not in (torch.float32, torch.float16):
            return None
        return self.data.numpy()

    def write(self, slot: int, offset: int, x: torch.Tensor | np.ndarray) -> None:
        """Store ``x`` (``[n, heads, dim]``, a tensor or an fp32 array) at positions
        ``offset:offset+n`` of chunk ``slot``."""
        n = x.shape[0]
        if self._array is not None and (isinstance(x, np.ndarray) or x.dtype == self.dtype):
            # a numpy copy: no torch dispatch (a decode step writes twice per layer)
            self._array[slot, offset : offset + n] = x if isinstance(x, np.ndarray) else x.numpy()
            return
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if self.quantized:
            xf = x.float()
            scale = xf.abs().amax(-1).clamp_min(1e-12) / 127.0
            self.data[slot, offset : offset + n] = torch.round(xf / scale[..., None]).clamp_(-127, 127).to(torch.int8)
            self.scale[slot, offset : offset + n] = scale
        else:
            self.data[slot, offset : offset + n] = x.to(self.dtype)

    def copy_slot(self, src: "ChunkPool", src_slot: int, dst_slot: int) -> None:
        self.data[dst_slot].copy_(src.data[src_slot], non_blocking=True)
        if self.scale is not None:
            self.scale[dst_slot].copy_(src.scale[src_slot], non_blocking=True)

    def fetch(self, slots: list[int] | torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The chunks' raw storage, flattened to ``[len(slots) * chunk, heads, dim]``, on ``device``."""
        index = slots if isinstance(slots, torch.Tensor) else torch.tensor(slots, device=self.device)
        data = self.data.index_select(0, index).flatten(0, 1)
        scale = self.scale.index_select(0, index).flatten(0, 1) if self.scale is not None else None
        if self.device != torch.device(device):
            data = data.to(device, non_blocking=True)
            scale = scale.to(device, non_blocking=True) if scale is not None else None
        return data, scale

    def decode(self, data: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """Stored values as ``[heads, positions, dim]`` in the compute dtype."""
        if scale is not None:
            data = (data.float() * scale[..., None]).to(self.dtype)
        return data.transpose(0, 1)

    def nbytes_per_chunk(self) -> int:
        n = self.chunk * self.heads * self.dim * self.data.element_size()
        return n + (self.chunk * self.heads * 4 if self.quantized else 0)

    def nbytes_allocated(self) -> int:
        return self.capacity * self.nbytes_per_chunk()


@dataclass
class _LayerKV:
    kind: str
    window: int | None
    k_pool: ChunkPool | None  # None for K=V layers
    v_pool: ChunkPool
    slots: list[int] = field(default_factory=list)  # on the device, oldest first (K, V interleaved)
    host_slots: list[int] = field(default_factory=list)  # offloaded chunks, older than `slots`
    host_pool: ChunkPool | None = None
    index_cache: dict = field(default_factory=dict)
    first: int = 0  # position where the oldest chunk starts (a multiple of the chunk size)

    @property
    def per_chunk(self) -> int:
        return 1 if self.k_pool is None else 2

    @property
    def n_chunks(self) -> int:
        return (len(self.host_slots) + len(self.slots)) // self.per_chunk


class KVCache:
    """Chunked KV cache for one sequence (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, device="cpu", dtype: torch.dtype = torch.float32, *,
                 chunk: int = DEFAULT_CHUNK, kv_dtype: str | None = None,
                 max_rollback: int = DEFAULT_MAX_ROLLBACK, offload_after: int | None = None) -> None:
        """``offload_after``: full-layer chunks that end more than this many positions before the
        newest one move to (pinned, on CUDA) host memory and are copied back when read."""
        if kv_dtype not in (None, "int8"):
            raise Gemma4Error(f"kv_dtype {kv_dtype!r} is not supported (None for the model dtype, or 'int8')")
        self.cfg, self.chunk, self.max_rollback, self.offload_after = cfg, chunk, max_rollback, offload_after
        self.device, self.dtype, self.kv_dtype = torch.device(device), dtype, kv_dtype
        self.length = 0
        self._end = 0  # end of the forward in progress
        self.pools: dict[tuple, ChunkPool] = {}
        self.layers: list[_LayerKV | None] = []
        for spec in cfg.layers:
            if not spec.owns_kv:
                self.layers.append(None)
                continue
            pool = self._pool(spec.kind, spec.num_kv_heads, spec.head_dim)
            host = None
            if offload_after is not None and spec.kind == "full":
                host = self._pool("host", spec.num_kv_heads, spec.head_dim, torch.device("cpu"))
            self.layers.append(_LayerKV(spec.kind, spec.window, None if spec.k_eq_v else pool, pool, host_pool=host))

    def _pool(self, kind: str, heads: int, dim: int, device=None) -> ChunkPool:
        key = (kind, heads, dim)
        if key not in self.pools:
            device = device or self.device
            pinned = device.type == "cpu" and self.device.type == "cuda"
            self.pools[key] = ChunkPool(self.chunk, heads, dim, self.dtype, device, self.kv_dtype == "int8", pinned)
        return self.pools[key]

    # -- the interface the model uses --------------------------------------------------------

    def begin(self, t: int) -> range:
        self._end = self.length + t
        return range(self.length, self._end)

    def update(self, layer: int, k: torch.Tensor | None, v: torch.Tensor, gather: bool = True):
        """Store the forward's new K/V (``[heads, T, dim]``; ``k`` None for a K=V layer) and return
        the layer's visible ``(k, v, positions)``. ``gather=False`` stores without building the
        contiguous K/V (fused kernels then read the chunks through :meth:`chunk_view`) and returns
        None."""
        lay = self.layers[layer]
        self._store(lay, None if k is None else k.transpose(0, 1), v.transpose(0, 1))
        return self._read(lay, self._end) if gather else None

    def store_rows(self, layer: int, k: np.ndarray | torch.Tensor | None, v: np.ndarray | torch.Tensor) -> None:
        """Store the forward's new K/V given position first (``[T, heads, dim]``, numpy fp32 or
        tensors; ``k`` None for a K=V layer): the fused decode step's form of :meth:`update`."""
        self._store(self.layers[layer], k, v)

    def _store(self, lay: _LayerKV, k, v) -> None:
        start, end = self.length, self._end
        assert v.shape[0] == end - start, "storing must follow begin() with the same length"
        need = -(-(end - lay.first) // self.chunk)
        while lay.n_chunks < need:
            lay.slots.append(lay.v_pool.alloc())
        offloaded = len(lay.host_slots) // lay.per_chunk  # new positions always land on the device
        pos = start
        while pos < end:  # write chunk by chunk
            c, off = divmod(pos - lay.first, self.chunk)
            c -= offloaded
            n = min(self.chunk - off, end - pos)
            rows = slice(pos - start, pos - start + n)
            if lay.k_pool is None:
                lay.v_pool.write(lay.slots[c], off, v[rows])
            else:
                lay.k_pool.write(lay.slots[2 * c], off, k[rows])
                lay.v_pool.write(lay.slots[2 * c + 1], off, v[rows])
            pos += n

    def in_place(self, layer: int) -> bool:
        """Whether :meth:`chunk_view` can show this layer's K/V (every chunk on the device)."""
        lay = self.layers[layer]
        return lay is not None and not lay.host_slots

    def read(self, layer: int):
        return self._read(self.layers[layer], self._end)

    def span(self, layer: int, start: int, end: int):
        """``(k | None, v, positions)`` of committed positions ``[start, end)`` of ``layer`` (``start``
        is raised to the oldest position still held). For readers outside the model's own forward,
        such as the MTP drafter, which attends to the target's K/V without adding any."""
        lay = self.layers[layer]
        if lay is None:
            raise ValueError(f"layer {layer} keeps no K/V of its own (it shares another layer's)")
        start, end = max(start, lay.first), min(end, self.length)
        skip, n = start - lay.first, max(end - start, 0)
        v = self._gather(lay, lay.v_pool, lay.per_chunk - 1, skip, n)
        k = None if lay.k_pool is None else self._gather(lay, lay.k_pool, 0, skip, n)
        return k, v, range(start, start + n)

    def _read(self, lay: _LayerKV, end: int):
        # sliding layers only need the window of the earliest query of this forward
        lo = lay.first
        if lay.window is not None:
            lo = max(lo, self.length - lay.window + 1)
        skip, n = lo - lay.first, end - lo
        if lay.k_pool is None:
            return None, self._gather(lay, lay.v_pool, 0, skip, n), range(lo, end)
        return self._gather(lay, lay.k_pool, 0, skip, n), self._gather(lay, lay.v_pool, 1, skip, n), range(lo, end)

    def chunk_view(self, layer: int) -> ChunkView | None:
        """For fused decode kernels: the layer's visible K/V where they are stored (see
        :class:`ChunkView`); a K=V layer stores no keys. None where a layer's chunks are not all
        on the device (some offloaded to the host)."""
        lay = self.layers[layer]
        if lay is None or lay.host_slots:
            return None
        lo = lay.first
        if lay.window is not None:
            lo = max(lo, self.length - lay.window + 1)
        key = ("view", tuple(lay.slots))
        if lay.index_cache.get("view", (None,))[0] != key:
            slots = torch.tensor(lay.slots, dtype=torch.int64)
            ks = None if lay.k_pool is None else slots[0::2].contiguous()
            vs = slots if lay.k_pool is None else slots[1::2].contiguous()
            lay.index_cache["view"] = (key, ks, vs)
        _, ks, vs = lay.index_cache["view"]
        k_pool, v_pool = lay.k_pool, lay.v_pool
        return ChunkView(None if k_pool is None else k_pool.data, v_pool.data, ks, vs, lo - lay.first, self._end - lo,
                         range(lo, self._end), None if k_pool is None else k_pool.scale, v_pool.scale)

    def _index(self, lay: _LayerKV, which: int, host: bool) -> torch.Tensor:
        """Slot indices as a tensor on the pool's device, rebuilt only when the slot list changed
        (no host-to-device copy per layer per decode step)."""
        slots = (lay.host_slots if host else lay.slots)[which :: lay.per_chunk]
        key = (which, host)
        cached = lay.index_cache.get(key)
        if cached is None or cached[0] != slots:
            device = lay.host_pool.device if host else lay.v_pool.device
            cached = (slots, torch.tensor(slots, device=device))
            lay.index_cache[key] = cached
        return cached[1]

    def _gather(self, lay: _LayerKV, pool: ChunkPool, which: int, skip: int, n: int) -> torch.Tensor:
        parts = []
        if lay.host_slots:
            parts.append(lay.host_pool.fetch(self._index(lay, which, True), self.device))
        if lay.slots:
            parts.append(pool.fetch(self._index(lay, which, False), self.device))
        data = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        scale = None
        if pool.quantized:
            scale = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
            scale = scale[skip : skip + n]
        return pool.decode(data[skip : skip + n], scale)

    def commit(self) -> None:
        self.length = self._end
        for lay in self.layers:
            if lay is not None and lay.window is not None:
                keep_from = self.length - lay.window - self.max_rollback
                self._drop_before(lay, keep_from)
            elif lay is not None and lay.host_pool is not None:
                self._offload(lay)

    def _offload(self, lay: _LayerKV) -> None:
        """Move the oldest device chunks that ended ``offload_after`` positions ago to host memory."""
        per = lay.per_chunk
        while len(lay.slots) > per:
            end_of_oldest = lay.first + (len(lay.host_slots) // per + 1) * self.chunk
            if end_of_oldest > self.length - self.offload_after:
                break
            for slot in lay.slots[:per]:
                host = lay.host_pool.alloc()
                lay.host_pool.copy_slot(lay.v_pool, slot, host)
                lay.host_slots.append(host)
            lay.v_pool.release(lay.slots[:per])
            del lay.slots[:per]

    def _drop_before(self, lay: _LayerKV, position: int) -> None:
        per = lay.per_chunk
        whole = max(0, (position - lay.first) // self.chunk)
        if whole:
            lay.v_pool.release(lay.slots[: whole * per])
            del lay.slots[: whole * per]
            lay.first += whole * self.chunk

    def truncate(self, n: int) -> None:
        """Forget positions ``n`` and later. Raises CacheRollbackError if a sliding layer no longer
        holds the window that position ``n`` needs (the caller then recomputes from scratch)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {n}")
        for lay in self.layers:
            if lay is not None and lay.window is not None and n > 0 and lay.first > max(0, n - lay.window):
                raise CacheRollbackError(
                    f"cannot roll back to position {n}: sliding layers keep positions from {lay.first} on"
                )
        self.length = self._end = n
        for lay in self.layers:
            if lay is None:
                continue
            keep = -(-(n - lay.first) // self.chunk) * lay.per_chunk if n > lay.first else 0
            on_host = len(lay.host_slots)
            if keep < on_host:
                lay.host_pool.release(lay.host_slots[keep:])
                del lay.host_slots[keep:]
            lay.v_pool.release(lay.slots[max(0, keep - on_host) :])
            del lay.slots[max(0, keep - on_host) :]
            if not lay.slots and not lay.host_slots:
                lay.first = (n // self.chunk) * self.chunk

    def can_truncate(self, n: int) -> bool:
        return all(lay is None or lay.window is None or n == 0 or lay.first <= max(0, n - lay.window)
                   for lay in self.layers)

    def reset(self) -> None:
        self.truncate(0)

    # -- accounting ---------------------------------------------------------------------------

    def memory(self) -> dict[str, int]:
        """Bytes held by each layer type's chunks (allocated to layers), plus pool totals."""
        out = {"sliding": 0, "full": 0, "full_offloaded": 0}
        for lay in self.layers:
            if lay is not None:
                out[lay.kind] += len(lay.slots) * lay.v_pool.nbytes_per_chunk()
                out["full_offloaded"] += len(lay.host_slots) * lay.v_pool.nbytes_per_chunk()
        out["pool_allocated"] = sum(p.nbytes_allocated() for k, p in self.pools.items() if k[0] != "host")
        return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """One KV cache and the keys of the positions it holds (token ids; media positions carry the
    digest of their image or clip), reused by the next request that shares a prefix (chat
    history, notebook context that stays the same across cells)."""

    def __init__(self, make_cache) -> None:
        self._make = make_cache
        self.kv: KVCache | None = None
        self.ids: list = []

    def prepare(self, keys: list, atomic: list[tuple[int, int]] = ()) -> int:
        """Keep the longest cached prefix of ``keys`` (at least one position is left to run, for
        its logits; never part of an ``atomic`` span such as an image) and return its length.
        Starts over when the cache cannot roll back that far."""
        if self.kv is None:
            self.kv = self._make()
        keep = min(common_prefix(self.ids, keys), len(keys) - 1)
        for start, stop in atomic:
            if start < keep < stop:
                keep = start
        if keep < self.kv.length and not self.kv.can_truncate(keep):
            keep = 0
        self.kv.truncate(min(keep, self.kv.length))
        self.ids = self.ids[: self.kv.length]
        return self.kv.length

    def truncate(self, n: int) -> None:
        """Roll back to ``n`` positions (rejected drafts)."""
        self.kv.truncate(n)
        del self.ids[n:]

    def appended(self, keys: list) -> None:
        """Record positions that a committed forward added."""
        self.ids.extend(keys)
        assert len(self.ids) == self.kv.length

    def clear(self) -> None:
        self.kv = None
        self.ids = []
