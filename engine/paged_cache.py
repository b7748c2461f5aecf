"""The paged latent KV cache: fixed-size pages of `page_size` token rows, handed out to requests one page at a time.

Token t of a sequence lives in slot `pages[t // page_size] * page_size + t % page_size` of the buffer. The batch's
`page_table` holds page ids (`[B, max_pages]`), the layout the decode backends read with their `page_size`; with a
page size of 1 a page id is a slot id and the table is exactly the slot table of `engine.kv_cache`.
"""

from __future__ import annotations

import math

import torch

from engine.batch import ForwardBatch
from engine.errors import WideepError


def pages_for_memory(free_bytes: int, total_bytes: int, mem_fraction_static: float, bytes_per_page: int) -> int:
    """Pages that fit when weights plus KV cache may take `mem_fraction_static` of the device (sglang's meaning).

    What is already used (`total - free`: weights, workspace) counts against the fraction, so the cache gets
    `free - total * (1 - fraction)` bytes. Arguments are what `torch.cuda.mem_get_info` returns, in bytes.
    """
    if not 0.0 < mem_fraction_static < 1.0:
        raise WideepError(f"--mem-fraction-static must lie in (0, 1), found {mem_fraction_static}")
    budget = free_bytes - total_bytes * (1.0 - mem_fraction_static)
    pages = int(budget // bytes_per_page)
    if pages < 1:
        raise WideepError(f"--mem-fraction-static {mem_fraction_static}: {free_bytes / 2**30:.2f} GiB free of "
                          f"{total_bytes / 2**30:.2f} GiB leaves no room for one KV page; raise the fraction")
    return pages


class PagedLatentKVCache:
    """buffer: `[layers, (num_pages + 1) * page_size, kv_cache_dim]`; pages are allocated per request (`rid`).

    Pages `0 .. num_pages - 1` are the requests'. One more, `scratch_page` (= num_pages), is never handed out: the
    padding rows of a CUDA-graph decode batch (`engine.cuda_graph`) write their latents there and read only it.
    Accounting is exact and ignores the scratch page: `num_free_pages + sum(pages held) == num_pages` at all times.
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        if page_size < 1:
            raise WideepError(f"--page-size must be >= 1, found {page_size}")
        if num_pages < 1:
            raise WideepError("the KV cache needs at least one page; raise --max-total-tokens")
        self.buffer = torch.zeros(num_layers, (num_pages + 1) * page_size, dim, dtype=dtype, device=device)
        self.page_size = page_size
        self.num_pages = num_pages
        self.scratch_page = num_pages
        # A stack on the host: allocation is bookkeeping, not device work. Low page ids come out first.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._pages: dict[int, list[int]] = {}

    @property
    def capacity(self) -> int:
        """Token rows the requests may hold (the scratch page not counted)."""
        return self.num_pages * self.page_size

    @property
    def scratch_slot(self) -> int:
        """The first slot of the scratch page: where a padding row writes its latent."""
        return self.scratch_page * self.page_size

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def layer(self, i: int) -> torch.Tensor:
        """`[(num_pages + 1) * page_size, kv_cache_dim]` view of layer i (what attention writes and reads)."""
        return self.buffer[i]

    def pages_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)

    def pages_of(self, rid: int) -> list[int]:
        """The pages request `rid` holds, in sequence order (empty if none)."""
        return self._pages.get(rid, [])

    def extra_pages(self, rid: int, num_tokens: int) -> int:
        """Pages `rid` still lacks to hold `num_tokens` tokens."""
        return max(self.pages_needed(num_tokens) - len(self.pages_of(rid)), 0)

    def reserve(self, rid: int, num_tokens: int) -> None:
        """Grows `rid`'s page list to hold `num_tokens` tokens; raises if the free pages do not suffice."""
        extra = self.extra_pages(rid, num_tokens)
        if extra > len(self._free):
            raise WideepError(f"KV cache full: request {rid} wants {extra} pages, {len(self._free)} free of "
                              f"{self.num_pages}; raise --max-total-tokens or --mem-fraction-static")
        got = [self._free.pop() for _ in range(extra)]
        self._pages.setdefault(rid, []).extend(got)

    def release(self, rid: int) -> int:
        """Returns all of `rid`'s pages to the pool; the number returned."""
        pages = self._pages.pop(rid, [])
        self._free.extend(reversed(pages))
        return len(pages)

    def build_batch(self, rids: list[int], new_tokens: list[list[int]], prefix_lens: list[int],
                    device: torch.device | str) -> ForwardBatch:
        """The step's batch: sequence b is request rids[b] running new_tokens[b] after prefix_lens[b] cached ones.

        Each request must already hold pages for prefix + new tokens (`reserve`). The batch's `page_table` is
        `[B, max_pages]` int64 page ids (0-padded) with `page_size` set; `out_slots` `[T]` int64 are the slots
        the new tokens are written to.
        """
        p = self.page_size
        lens = [a + len(t) for a, t in zip(prefix_lens, new_tokens)]
        width = max((self.pages_needed(n) for n in lens), default=0)
        table = torch.zeros(len(rids), width, dtype=torch.int64)
        out: list[int] = []
        for b, rid in enumerate(rids):
            pages = self._pages[rid][: self.pages_needed(lens[b])]
            if len(pages) < self.pages_needed(lens[b]):
                raise RuntimeError(f"request {rid} holds {len(pages)} pages, needs {self.pages_needed(lens[b])}")
            table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int64)
            out.extend(pages[t // p] * p + t % p for t in range(prefix_lens[b], lens[b]))
        return ForwardBatch.assemble(new_tokens, prefix_lens, table, out, device, page_size=p)
