"""MLA decode through flashinfer 0.5.3's `BatchMLAPagedAttentionWrapper` (FA3 kernels on Hopper), with the interface
of the reference `kernels.mla.mla_decode_torch` plus a page size.

flashinfer is imported lazily: it is an optional GPU dependency (`pip install flashinfer-python==0.5.3`, the `gpu`
extra). Its kernels are compiled with nvcc on first use (about 10 s per dtype) and cached under ~/.cache/flashinfer.
Only decode goes through flashinfer; prefill and extend go through `kernels.mla_extend` (SDPA on GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

FLASHINFER_VERSION = "0.5.3"
_WORKSPACE_BYTES = 128 * 1024 * 1024  # flashinfer's recommended split-KV scratch size


def import_flashinfer():
    """The flashinfer module, or ImportError naming the package to install."""
    try:
        import flashinfer
    except ImportError as err:
        raise ImportError(f"flashinfer is not importable ({err}); install it with "
                          f"`pip install flashinfer-python=={FLASHINFER_VERSION}` (the `gpu` extra of wideep), "
                          "or choose --attention-backend triton") from err
    return flashinfer


def _page_layout(page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """flashinfer's view of a batch: (qo_indptr `[B + 1]`, kv_indptr `[B + 1]`, kv_indices `[pages used]`,
    kv_lens `[B]`), all int32 on page_table's device. Reads the used pages by a mask: a device sync."""
    b = page_table.shape[0]
    dev = page_table.device
    lens = seq_lens.to(torch.int32)
    pages = (lens + page_size - 1) // page_size  # [B]
    kv_indptr = torch.zeros(b + 1, dtype=torch.int32, device=dev)
    kv_indptr[1:] = pages.cumsum(0)
    used = torch.arange(page_table.shape[1], device=dev)[None, :] < pages[:, None]
    kv_indices = page_table[used].to(torch.int32)  # row by row, as kv_indptr counts them
    qo_indptr = torch.arange(b + 1, dtype=torch.int32, device=dev)  # one query token per sequence
    return qo_indptr, kv_indptr, kv_indices, lens


@dataclass
class _GraphWrapper:
    """A wrapper in flashinfer's CUDA-graph mode, bound to the static page_table `[B, max_pages]` and seq_lens `[B]`
    of one captured batch size: its index buffers (`[B + 1]`, `[B * max_pages]`, `[B]` int32) never move, so a
    graph captured over `run` stays valid while `plan` refills them before each replay."""

    wrapper: Any
    page_table: torch.Tensor
    seq_lens: torch.Tensor


class FlashInferMLADecode:
    """Callable `(q_latent, q_rope, kv_cache, page_table, seq_lens, scale) -> out`, shapes as `mla_decode_triton`.

    flashinfer splits work in a host-side `plan` (it copies the page layout to the host: a device sync) and then
    `run`s. Every layer of one forward pass attends over the same page table, so the plan is made once, for the first
    layer, and reused while the same page_table and seq_lens tensors come back unchanged (same objects, same
    in-place version counters): a new batch, or an in-place edit of either tensor, plans again.

    CUDA graphs: `plan_graph` binds a second wrapper, in flashinfer's cuda-graph mode, to the static page_table and
    seq_lens of one batch size and plans it from their current contents (outside the graph); calls with exactly
    those tensors then run on it without planning, as the captured graph does.
    """

    def __init__(self, device: torch.device | str, page_size: int = 1):
        flashinfer = import_flashinfer()
        self.device = torch.device(device)
        self.page_size = page_size
        workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.int8, device=self.device)
        self._workspace = workspace  # split-KV scratch, shared: eager and graph runs never overlap (one stream)
        self._wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(workspace, backend="auto")
        self._planned: tuple | None = None  # (page_table, seq_lens, their versions and the shapes) of the plan
        self._graphs: dict[int, _GraphWrapper] = {}  # by batch size

    def _plan(self, page_table, seq_lens, heads, r, d_r, scale, dtype) -> None:
        meta = (page_table._version, seq_lens._version, heads, r, d_r, scale, dtype)
        if self._planned is not None:
            planned_table, planned_lens, planned_meta = self._planned
            if planned_table is page_table and planned_lens is seq_lens and planned_meta == meta:
                return
        qo_indptr, kv_indptr, kv_indices, lens = _page_layout(page_table, seq_lens, self.page_size)
        self._wrapper.plan(qo_indptr, kv_indptr, kv_indices, lens, heads, r, d_r, self.page_size,
                           False, scale, dtype, dtype)
        self._planned = (page_table, seq_lens, meta)

    def plan_graph(self, page_table: torch.Tensor, seq_lens: torch.Tensor, heads: int, r: int, d_r: int,
                   scale: float, dtype: torch.dtype) -> None:
        """Plans the graph wrapper of batch size B for the current contents of the static page_table
        `[B, max_pages]` and seq_lens `[B]` (int64, each >= 1); makes the wrapper first when these tensors are new.
        Host-side (copies the layout to the host): call it outside the graph, before capture and every replay."""
        b, width = page_table.shape
        bound = self._graphs.get(b)
        if bound is None or bound.page_table is not page_table or bound.seq_lens is not seq_lens:
            flashinfer = import_flashinfer()
            dev = page_table.device
            wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(
                self._workspace, use_cuda_graph=True,
                qo_indptr=torch.zeros(b + 1, dtype=torch.int32, device=dev),
                kv_indptr=torch.zeros(b + 1, dtype=torch.int32, device=dev),
                kv_indices=torch.zeros(max(b * width, 1), dtype=torch.int32, device=dev),
                kv_len_arr=torch.zeros(b, dtype=torch.int32, device=dev), backend="auto")
            bound = self._graphs[b] = _GraphWrapper(wrapper, page_table, seq_lens)
        qo_indptr, kv_indptr, kv_indices, lens = _page_layout(page_table, seq_lens, self.page_size)
        bound.wrapper.plan(qo_indptr, kv_indptr, kv_indices, lens, heads, r, d_r, self.page_size, False, scale,
                           dtype, dtype)

    def __call__(
        self,
        q_latent: torch.Tensor,
        q_rope: torch.Tensor,
        kv_cache: torch.Tensor,
        page_table: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q_latent: `[B, H, r]`; q_rope: `[B, H, d_r]`; kv_cache: `[num_pages * page_size, r + d_r]`; all bfloat16 or
        float16 with unit stride on the last dim. page_table: `[B, max_pages]` int page ids; seq_lens: `[B]` int,
        each >= 1. Returns `[B, H, r]` in q's dtype."""
        b, h, r = q_latent.shape
        d_r = q_rope.shape[2]
        if kv_cache.dim() != 2 or kv_cache.shape[1] != r + d_r:
            raise ValueError(f"kv_cache: want [slots, {r + d_r}], got {tuple(kv_cache.shape)}")
        if not (q_latent.dtype == q_rope.dtype == kv_cache.dtype) or q_latent.dtype not in (torch.bfloat16,
                                                                                              torch.float16):
            raise ValueError(f"flashinfer MLA wants bfloat16 or float16 throughout, got q_latent {q_latent.dtype}, "
                             f"q_rope {q_rope.dtype}, kv_cache {kv_cache.dtype}")
        if kv_cache.stride(-1) != 1:
            raise ValueError(f"kv_cache needs unit stride on its last dim, got {kv_cache.stride()}")
        if b == 0:
            return torch.empty_like(q_latent)
        bound = self._graphs.get(b)
        if bound is not None and bound.page_table is page_table and bound.seq_lens is seq_lens:
            wrapper = bound.wrapper  # planned by plan_graph, outside the graph being captured
        else:
            self._plan(page_table, seq_lens, h, r, d_r, scale, q_latent.dtype)
            wrapper = self._wrapper
        # Column views of the one [slots, r + d_r] cache: flashinfer takes each cache's page and row strides, so
        # the latent and rope parts need no copy.
        ckv = kv_cache[:, :r].unflatten(0, (-1, self.page_size))  # [num_pages, page_size, r]
        kpe = kv_cache[:, r:].unflatten(0, (-1, self.page_size))  # [num_pages, page_size, d_r]
        return wrapper.run(q_latent.contiguous(), q_rope.contiguous(), ckv, kpe)
