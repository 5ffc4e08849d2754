"""KV cache for incremental decoding.

The model talks to a cache through four calls, so the chunked cache can replace this one:

* ``length`` -- how many positions are committed;
* ``update(layer, k, v)`` -- append this forward's K/V (``[kv_heads, T, head_dim]``) for a layer and
  return everything that layer may attend to, with the key positions;
* ``read(layer)`` -- the same without appending (layers that share another layer's K/V);
* ``commit(n)`` -- the forward is done: ``n`` more positions are committed;
* ``truncate(n)`` -- forget every position from ``n`` on.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class _Buffer:
    """A growable ``[heads, capacity, dim]`` tensor (capacity doubles: amortized O(1) append)."""

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.used = 0

    def append(self, x: torch.Tensor, at: int) -> torch.Tensor:
        need = at + x.shape[1]
        if self.data is None or need > self.data.shape[1]:
            cap = max(need, 2 * (self.data.shape[1] if self.data is not None else 16))
            grown = x.new_empty((x.shape[0], cap, x.shape[2]))
            if self.data is not None:
                grown[:, :at] = self.data[:, :at]
            self.data = grown
        self.data[:, at:need] = x
        self.used = need
        return self.data[:, :need]

    def view(self) -> torch.Tensor:
        assert self.data is not None, "layer has no cached K/V yet"
        return self.data[:, : self.used]


class SimpleKVCache:
    """Every position of every layer, contiguous per layer. Memory grows with the context."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.length = 0
        self._k = [_Buffer() for _ in cfg.layers]
        self._v = [_Buffer() for _ in cfg.layers]

    def _positions(self, n: int) -> torch.Tensor:
        return torch.arange(n, device=self.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        k_all = self._k[layer].append(k, self.length)
        v_all = self._v[layer].append(v, self.length)
        return k_all, v_all, self._positions(k_all.shape[1])

    def read(self, layer: int):
        k_all = self._k[layer].view()
        return k_all, self._v[layer].view(), self._positions(k_all.shape[1])

    def commit(self, n: int) -> None:
        self.length += n

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {n}")
        self.length = n
        for buf in (*self._k, *self._v):
            buf.used = min(buf.used, n)

    def nbytes(self) -> int:
        return sum(b.data.numel() * b.data.element_size() for b in (*self._k, *self._v) if b.data is not None)
