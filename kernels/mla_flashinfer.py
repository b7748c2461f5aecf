"""MLA decode through flashinfer 0.5.3's `BatchMLAPagedAttentionWrapper` (FA3 kernels on Hopper), with the interface
of the reference `kernels.mla.mla_decode_torch` plus a page size.

flashinfer is imported lazily: it is an optional GPU dependency (`pip install flashinfer-python==0.5.3`, the `gpu`
extra). Its kernels are compiled with nvcc on first use (about 10 s per dtype) and cached under ~/.cache/flashinfer.
Only decode goes through flashinfer; prefill and extend keep `kernels.mla.mla_extend_torch`.
"""

from __future__ import annotations

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


class FlashInferMLADecode:
    """Callable `(q_latent, q_rope, kv_cache, page_table, seq_lens, scale) -> out`, shapes as `mla_decode_triton`.

    flashinfer splits work in a host-side `plan` (it copies the page layout to the host: a device sync) and then
    `run`s. Every layer of one forward pass attends over the same page table, so the plan is made once, for the first
    layer, and reused while the same page_table and seq_lens tensors come back unchanged (same objects, same
    in-place version counters): a new batch, or an in-place edit of either tensor, plans again.
    """

    def __init__(self, device: torch.device | str, page_size: int = 1):
        flashinfer = import_flashinfer()
        self.device = torch.device(device)
        self.page_size = page_size
        workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.int8, device=self.device)
        self._wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(workspace, backend="auto")
        self._planned: tuple | None = None  # (page_table, seq_lens, their versions and the shapes) of the plan

    def _plan(self, page_table, seq_lens, heads, r, d_r, scale, dtype) -> None:
        meta = (page_table._version, seq_lens._version, heads, r, d_r, scale, dtype)
        if self._planned is not None:
            planned_table, planned_lens, planned_meta = self._planned
            if planned_table is page_table and planned_lens is seq_lens and planned_meta == meta:
                return
        b = page_table.shape[0]
        dev = page_table.device
        lens = seq_lens.to(torch.int32)
        pages = (lens + self.page_size - 1) // self.page_size  # [B]
        kv_indptr = torch.zeros(b + 1, dtype=torch.int32, device=dev)
        kv_indptr[1:] = pages.cumsum(0)
        used = torch.arange(page_table.shape[1], device=dev)[None, :] < pages[:, None]
        kv_indices = page_table[used].to(torch.int32)  # row by row, as kv_indptr counts them
        qo_indptr = torch.arange(b + 1, dtype=torch.int32, device=dev)  # one query token per sequence
        self._wrapper.plan(qo_indptr, kv_indptr, kv_indices, lens, heads, r, d_r, self.page_size,
                           False, scale, dtype, dtype)
        self._planned = (page_table, seq_lens, meta)

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
        self._plan(page_table, seq_lens, h, r, d_r, scale, q_latent.dtype)
        # Column views of the one [slots, r + d_r] cache: flashinfer takes each cache's page and row strides, so
        # the latent and rope parts need no copy.
        ckv = kv_cache[:, :r].unflatten(0, (-1, self.page_size))  # [num_pages, page_size, r]
        kpe = kv_cache[:, r:].unflatten(0, (-1, self.page_size))  # [num_pages, page_size, d_r]
        return self._wrapper.run(q_latent.contiguous(), q_rope.contiguous(), ckv, kpe)
