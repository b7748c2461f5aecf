"""The latent KV cache: one row of `kv_lora_rank + qk_rope_head_dim` values per token per layer, in a slot pool.

Sequences own lists of slots (a page size of one token); attention reads a sequence's slots in order.
"""

from __future__ import annotations

import torch

from engine.errors import WideepError


class LatentKVCache:
    """buffer: `[layers, capacity, kv_cache_dim]`; slots are handed out and returned by `alloc` / `free`."""

    def __init__(self, num_layers: int, capacity: int, dim: int, dtype: torch.dtype, device: torch.device | str):
        self.buffer = torch.zeros(num_layers, capacity, dim, dtype=dtype, device=device)
        self.capacity = capacity
        # Kept on the host: allocation is bookkeeping, not device work.
        self._free = torch.arange(capacity - 1, -1, -1, dtype=torch.int64)
        self._num_free = capacity

    @property
    def num_free(self) -> int:
        return self._num_free

    def layer(self, i: int) -> torch.Tensor:
        """`[capacity, kv_cache_dim]` view of layer i."""
        return self.buffer[i]

    def alloc(self, n: int) -> torch.Tensor:
        """n free slots, `[n]` int64 on the host."""
        if n > self._num_free:
            raise WideepError(
                f"KV cache full: {n} token slots wanted, {self._num_free} free of {self.capacity}; "
                "lower the batch size or raise the cache size"
            )
        start = self._num_free - n
        slots = self._free[start : self._num_free].flip(0).clone()
        self._num_free = start
        return slots

    def free(self, slots: torch.Tensor) -> None:
        n = slots.numel()
        if self._num_free + n > self.capacity:
            raise RuntimeError("KV cache slots freed twice")
        self._free[self._num_free : self._num_free + n] = slots.flip(0).cpu()
        self._num_free += n
