"""Launcher of our Triton MLA decode kernel (`kernels/triton/mla_decode.py`): split-KV attention of one new token per
sequence over the paged latent cache, with the interface of the reference `kernels.mla.mla_decode_torch` plus a
page size."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from kernels.triton import is_hopper, num_sms
from kernels.triton import mla_decode as mla_jit


@dataclass(frozen=True)
class MLADecodeConfig:
    """Tiling of the split kernel. block_h: query heads per program (they share every latent row loaded);
    block_n: tokens per inner step; num_splits: KV splits per sequence (None: enough programs to fill the GPU).

    The default (16-bit inputs) sets gluon: on Hopper the Gluon kernel runs; elsewhere the Triton kernel with the
    rest of the fields, which serves 64 heads per program with two warpgroups: both products on the MMA units, each
    warpgroup accumulating half of the 512 latent columns (128 fp32 registers a thread), and each latent row is
    read twice for 128 heads (the second time mostly from L2). Three stages let the page-table loads run a block
    ahead of the row gathers they feed; two 64-token buffers (72 KB each, beside 72 KB of queries) fill shared
    memory. `python scripts/bench_mla.py --sweep` times the alternatives.

    lazy_rescale: keep each head's running max until it grows by more than 2^8 (the weights then stay below 256),
    so that most token blocks skip rescaling the `[block_h, r]` fp32 accumulator (128 multiplies a thread a block
    at the default tiling) and the MMA that follows does not wait on them; the result is the same up to rounding.

    split_qk: compute each `[block_h, block_n]` score tile once, half of its columns in each warpgroup. Without it
    Triton lays a product that feeds another product with all warps along M, and with 64 heads (one warpgroup's
    rows) both warpgroups compute the whole tile: the QK^T product (576 of the 1088 FLOP a score) runs twice, each
    time reading q and the rows from shared memory in narrow n32 MMAs. The kernel breaks that chain (see the loop).

    gluon: run the warp-specialized Gluon kernel of `kernels/triton/mla_decode_gluon.py` instead (a score
    warpgroup that also gathers the rows a block ahead, two output warpgroups of 256 latent channels each) where it
    applies: Hopper, 16-bit inputs, latent 512 + rope 64, 64 heads and 64 tokens a block; the Triton kernel (with
    the other fields) elsewhere. num_splits still applies.

    qk_in_branch (with split_qk): a copy of the score products in each arm of the last-block mask branch. Compiled
    for sm_90 (Triton 3.6), split_qk alone leaves the PV product in flight into the next block's score products and
    ptxas serialises every wgmma of the kernel (warning C7515: a wait after each of the 40 a block); with the copies
    each product's wgmmas run back to back (5 waits a block), at 255 registers and less shared memory (221,696
    bytes), but the PV product is waited before the next block's row gathers are issued. With block_n=32 and
    num_stages=5 it keeps three row buffers (184,832 bytes), so the gathers run two blocks ahead.
    """

    block_h: int = 64
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    num_splits: int | None = None
    lazy_rescale: bool = False
    split_qk: bool = False
    qk_in_branch: bool = False
    gluon: bool = False

    def __post_init__(self):
        if self.qk_in_branch and not self.split_qk:
            raise ValueError("qk_in_branch needs split_qk")

    def short(self) -> str:
        """A compact name: `h64 n64 w8 s3 splits=auto lazy splitqk qkbranch`."""
        flags = ((" lazy" if self.lazy_rescale else "") + (" splitqk" if self.split_qk else "")
                 + (" qkbranch" if self.qk_in_branch else "") + (" gluon" if self.gluon else ""))
        return (f"h{self.block_h} n{self.block_n} w{self.num_warps} s{self.num_stages} "
                f"splits={self.num_splits or 'auto'}{flags}")


def default_config(dtype: torch.dtype) -> MLADecodeConfig:
    """The tiling for this input dtype (float32 tiles are twice the bytes, so they are halved)."""
    if dtype == torch.float32:
        return MLADecodeConfig(block_h=16, block_n=16, num_warps=4, num_stages=1)
    # On Hopper the warp-specialized Gluon kernel: 1.4-1.7x the Triton kernel, 81-87% of flashinfer's speed on an
    # H200 (2026-11-21, commit 732e01a). Elsewhere the Triton sweep's winner (H200, commit cb541a8): 1.12x the
    # unsplit score tile.
    return MLADecodeConfig(num_stages=4, split_qk=True, gluon=True)


def pick_num_splits(batch: int, head_blocks: int, max_tokens: int, block_n: int, num_sms: int) -> int:
    """KV splits per sequence: as many as keep every multiprocessor busy with the whole grid in about one wave,
    never a split shorter than 4 blocks of tokens; 1 when the batch alone fills the GPU (then no combine pass)."""
    programs = batch * head_blocks
    longest = max(1, math.ceil(max_tokens / (4 * block_n)))
    return max(1, min(num_sms // max(programs, 1), longest))


def mla_decode_triton(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    page_size: int = 1,
    config: MLADecodeConfig | None = None,
) -> torch.Tensor:
    """One new token per sequence attends to its whole cached sequence (itself included).

    q_latent: `[B, H, r]` (q_nope times W_UK); q_rope: `[B, H, d_r]`, both with unit stride on the last dim;
    kv_cache: `[num_pages * page_size, r + d_r]` (latent, then rotated key), unit stride on the last dim, q's dtype;
    page_table: `[B, max_pages]` int32/int64 page ids of each sequence in order (with page_size 1: cache slots;
    entries past the sequence's last page are never read); seq_lens: `[B]` int32/int64, each in
    `[1, max_pages * page_size]` (not checked: that would sync with the device). A sequence of length 0 gets zeros.
    Returns `[B, H, r]` in q_latent's dtype (softmax and accumulation in float32).
    """
    if q_latent.dim() != 3 or q_rope.dim() != 3 or q_latent.shape[:2] != q_rope.shape[:2]:
        raise ValueError(f"q_latent [B, H, r] and q_rope [B, H, d_r] disagree: {tuple(q_latent.shape)}, "
                         f"{tuple(q_rope.shape)}")
    b, h, r = q_latent.shape
    d_r = q_rope.shape[2]
    if kv_cache.dim() != 2 or kv_cache.shape[1] != r + d_r:
        raise ValueError(f"kv_cache: want [slots, {r + d_r}] (r + d_r), got {tuple(kv_cache.shape)}")
    if not (q_latent.dtype == q_rope.dtype == kv_cache.dtype):
        raise ValueError(f"dtypes differ: q_latent {q_latent.dtype}, q_rope {q_rope.dtype}, kv_cache {kv_cache.dtype}")
    if q_latent.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype {q_latent.dtype}: want bfloat16, float16 or float32")
    for name, x in (("q_latent", q_latent), ("q_rope", q_rope), ("kv_cache", kv_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} needs unit stride on its last dim, got strides {x.stride()}")
    if page_table.dim() != 2 or page_table.shape[0] != b or page_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"page_table: want [{b}, max_pages] int32/int64, got {tuple(page_table.shape)} "
                         f"{page_table.dtype}")
    if seq_lens.shape != (b,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_lens: want [{b}] int32/int64, got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    devices = {x.device for x in (q_latent, q_rope, kv_cache, page_table, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    if page_size < 1:
        raise ValueError(f"page_size {page_size} must be >= 1")

    out = torch.empty_like(q_latent)
    if b == 0 or h == 0:
        return out
    cfg = config or default_config(q_latent.dtype)
    head_blocks = triton.cdiv(h, cfg.block_h)
    max_tokens = page_table.shape[1] * page_size
    sms = num_sms(q_latent.device, interpreted=8)  # any small number exercises the split path when interpreted
    splits = cfg.num_splits or pick_num_splits(b, head_blocks, max_tokens, cfg.block_n, sms)
    splits = max(1, min(splits, triton.cdiv(max(max_tokens, 1), cfg.block_n)))
    split_len = triton.cdiv(triton.cdiv(max(max_tokens, 1), splits), cfg.block_n) * cfg.block_n
    final = splits == 1
    if final:
        partial, lse = out, out  # lse is not touched when FINAL
        stride_partial = (out.stride(0), out.stride(1), 0)
        stride_lse = (0, 0)
    else:
        partial = torch.empty(b, h, splits, r, dtype=torch.float32, device=q_latent.device)
        lse = torch.empty(b, h, splits, dtype=torch.float32, device=q_latent.device)
        stride_partial = partial.stride()[:3]
        stride_lse = lse.stride()[:2]

    block_r, block_dr = max(16, triton.next_power_of_2(r)), max(16, triton.next_power_of_2(d_r))
    # Both split kernels take the same leading arguments.
    args = (q_latent, q_rope, kv_cache, page_table, seq_lens, partial, lse,
            q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1), kv_cache.stride(0),
            page_table.stride(0), *stride_partial, *stride_lse, h, split_len, scale * math.log2(math.e))
    grid = (head_blocks, b, splits)
    if cfg.gluon and _gluon_applies(q_latent, r, d_r, cfg):
        from kernels.triton.mla_decode_gluon import mla_decode_gluon_kernel

        mla_decode_gluon_kernel[grid](*args, RANK=r, ROPE_DIM=d_r, PAGE_SIZE=page_size, FINAL=final, STAGES=2,
                                      OUTPUT_REGS=GLUON_OUTPUT_REGS, num_warps=4)
    else:
        mla_jit.mla_decode_split_kernel[grid](
            *args, RANK=r, ROPE_DIM=d_r, PAGE_SIZE=page_size,
            BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, BLOCK_R=block_r, BLOCK_DR=block_dr,
            FINAL=final, DOT_PRECISION="ieee" if q_latent.dtype == torch.float32 else "tf32",
            LAZY_RESCALE=cfg.lazy_rescale, SPLIT_QK=cfg.split_qk, QK_IN_BRANCH=cfg.qk_in_branch,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    if not final:
        mla_jit.mla_decode_combine_kernel[(h, b)](
            partial, lse, out,
            *partial.stride()[:3],
            *lse.stride()[:2],
            out.stride(0), out.stride(1),
            splits,
            RANK=r, BLOCK_S=triton.next_power_of_2(splits), BLOCK_R=block_r,
            num_warps=4,
        )
    return out


GLUON_OUTPUT_REGS = 184  # registers a thread of each output warpgroup (a 64x256 fp32 accumulator and the rest)


def _gluon_applies(q: torch.Tensor, r: int, d_r: int, cfg: MLADecodeConfig) -> bool:
    """Whether the Gluon kernel can serve this call (otherwise the Triton kernel does)."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and (r, d_r) == (512, 64)
            and cfg.block_h == 64 and cfg.block_n == 64 and is_hopper(q.device))

