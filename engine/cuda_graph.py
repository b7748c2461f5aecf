"""CUDA-graph decode: the decode forward captured once per batch size, replayed over static buffers.

A decode step of b sequences is padded to the smallest captured size `bs >= b`. The real rows are copied into the
static buffers (input_ids, positions, out_slots, seq_lens `[max_bs]`, page_table `[max_bs, max_pages]`); padding
rows decode token 0 at position 0 with seq_len 1, writing and reading only the cache's scratch page, and their
logits are dropped. The captured forward takes the logits of every row (a decode batch has T == B), so nothing is
built on the host inside the graph.

Sizes: 1, 2, 4, 8, then every 8 up to 64 and every 16 above, up to the largest (`--cuda-graph-max-bs`, always
captured itself). They are captured largest first into one shared memory pool (a smaller graph reuses the larger
ones' blocks), each after one eager warm-up at that size (Triton and flashinfer compile, cuBLAS picks its kernels,
DeepEP runs its collectives). Under expert parallelism every rank captures the same sizes in the same order, so the
warm-ups' collectives line up.

The page-table width is fixed at capture: the caller passes the longest sequence the job can reach, in pages, and
makes a new runner when a later job needs wider. Off CUDA (or with `use_cuda_graphs=False`) the same object runs
with `EagerGraph`, which records the forward at "capture" and re-runs it on the static buffers at "replay": every
piece of this module but the capture itself is exercised by the CPU tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from engine.batch import ForwardBatch
from engine.errors import WideepError
from engine.model import DeepseekV3
from engine.paged_cache import PagedLatentKVCache

log = logging.getLogger("wideep")

# Decode batches larger than this are rare next to --max-running-requests' usual values, and every captured size
# costs capture time and a little pool memory; SGLang's default for DeepSeek-V3 on one H100 node is in this range.
DEFAULT_MAX_BS = 256


def capture_sizes(max_bs: int) -> list[int]:
    """Ascending batch sizes to capture: 1, 2, 4, 8, every 8 up to 64, every 16 above, and `max_bs` itself."""
    if max_bs < 1:
        raise WideepError(f"--cuda-graph-max-bs must be >= 1, found {max_bs}")
    grid = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, max_bs + 1, 16))
    return sorted({s for s in grid if s <= max_bs} | {max_bs})


def graphs_unsupported(model: DeepseekV3, *, on_cuda: bool = True) -> str | None:
    """Why the decode steps of `model` cannot be captured (None: they can). on_cuda: real CUDA graphs are wanted
    (False: the CPU emulation, which needs everything but the device)."""
    if on_cuda and model.device.type != "cuda":
        return f"the model runs on {model.device}, not a CUDA device"
    reason = model.dispatcher.graph_unsupported("decode")
    if reason is not None:
        return reason
    moe = model.moe_layers()
    if on_cuda and any(not layer.triton_experts() for layer in moe):
        return (f"{str(moe[0].weights.w13.dtype).removeprefix('torch.')} expert weights run the torch reference "
                "expert MLP, which reads the per-expert row counts on the host (the Triton grouped GEMMs serve "
                "bfloat16, float16 and FP8)")
    if any(layer.recorder is not None for layer in moe):
        return "expert-load recording (EPLB) counts each step into a row of its own, which a graph would fix"
    if any(layer.redundant and layer.dispatch_algorithm == "random" for layer in moe):
        return "--ep-dispatch-algorithm random draws from a generator every step"
    return None


class Graph(Protocol):
    def replay(self) -> torch.Tensor:
        """Runs the captured forward on the static buffers; returns its output (`[bs, vocab]` float32)."""


class CudaGraph:
    """`fn` captured in a `torch.cuda.CUDAGraph` on `stream`, allocating from `pool`; replay returns the output
    tensor captured (the same storage every time: read it before the next replay)."""

    def __init__(self, fn: Callable[[], torch.Tensor], pool, stream: torch.cuda.Stream):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.out = fn()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


class EagerGraph:
    """The stand-in where CUDA graphs are unavailable: "capture" records `fn`, replay runs it on the static
    buffers as they are now."""

    def __init__(self, fn: Callable[[], torch.Tensor]):
        self.fn = fn

    def replay(self) -> torch.Tensor:
        return self.fn()


class DecodeGraphRunner:
    """Captured decode forwards of `model` over `cache`, for batch sizes `sizes` and page tables of `max_pages`.

    use_cuda_graphs: capture real CUDA graphs (the model must be on a CUDA device); False: `EagerGraph`s.
    `key` says what the graphs hold by address (the cache buffer, the rotary table, the expert placement): when it
    changes, the graphs are stale and the runner must be rebuilt.
    """

    def __init__(self, model: DeepseekV3, cache: PagedLatentKVCache, sizes: list[int], max_pages: int,
                 use_cuda_graphs: bool):
        if not sizes or sizes != sorted(set(sizes)):
            raise ValueError(f"sizes must be ascending and distinct, got {sizes}")
        if max_pages < 1:
            raise ValueError(f"max_pages must be >= 1, got {max_pages}")
        if use_cuda_graphs and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {model.device}")
        self.model = model
        self.cache = cache
        self.sizes = sizes
        self.max_pages = max_pages
        self.use_cuda_graphs = use_cuda_graphs
        max_bs, dev = sizes[-1], model.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)  # [max_bs]
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)  # [max_bs]
        self.out_slots = torch.zeros(max_bs, dtype=torch.int64, device=dev)  # [max_bs]
        self.seq_lens = torch.ones(max_bs, dtype=torch.int64, device=dev)  # [max_bs]
        self.page_table = torch.zeros(max_bs, max_pages, dtype=torch.int64, device=dev)  # [max_bs, max_pages]
        # One batch object per size over views of the buffers: the attention backend binds its graph plans to these
        # very tensors (kernels.attention_backend.AttentionBackend.plan_graph).
        bound = max_pages * cache.page_size
        self.batches = {bs: ForwardBatch.graph_decode(self.input_ids[:bs], self.positions[:bs], self.out_slots[:bs],
                                                      self.page_table[:bs], self.seq_lens[:bs], cache.page_size, bound)
                        for bs in sizes}
        self.graphs: dict[int, Graph] = {}
        self._capture()
        self.key = self.state_key(model, cache)

    @staticmethod
    def state_key(model: DeepseekV3, cache: PagedLatentKVCache) -> tuple:
        """What the captured graphs read by address; a runner whose `key` differs from this is stale."""
        return cache.buffer.data_ptr(), model.rope.cos.data_ptr(), model.rope.sin.data_ptr(), id(model.placement)

    @property
    def max_bs(self) -> int:
        return self.sizes[-1]

    def fits(self, batch: ForwardBatch) -> bool:
        """Whether `batch` (a decode batch) can replay a graph: no more rows than the largest size, a page table
        no wider than the captured one."""
        return batch.decode and batch.num_seqs <= self.max_bs and batch.page_table.shape[1] <= self.max_pages

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """batch: a decode batch that `fits` -> float32 logits `[B, vocab]` of its B sequences (a view of the
        graph's output: read it before the next replay)."""
        if not self.fits(batch):
            raise ValueError(f"batch of {batch.num_seqs} rows and {batch.page_table.shape[1]} pages does not fit "
                             f"graphs of {self.max_bs} rows and {self.max_pages} pages")
        b = batch.num_seqs
        bs = next(s for s in self.sizes if s >= b)
        self._load(batch, bs)
        self._before_replay(bs)
        return self.graphs[bs].replay()[:b]

    def _load(self, batch: ForwardBatch, bs: int) -> None:
        """Copies the real rows into the static buffers and makes rows `b..bs-1` padding."""
        b, width = batch.num_seqs, batch.page_table.shape[1]
        self.input_ids[:b].copy_(batch.input_ids, non_blocking=True)
        self.positions[:b].copy_(batch.positions, non_blocking=True)
        self.out_slots[:b].copy_(batch.out_slots, non_blocking=True)
        self.seq_lens[:b].copy_(batch.seq_lens, non_blocking=True)
        self.page_table[:b, :width].copy_(batch.page_table, non_blocking=True)
        self.page_table[:b, width:].zero_()  # never read (past each sequence), but in range and deterministic
        self._pad(b, bs)

    def _pad(self, start: int, stop: int) -> None:
        """Rows `start..stop-1` decode token 0 at position 0, one token long, on the scratch page."""
        self.input_ids[start:stop] = 0
        self.positions[start:stop] = 0
        self.out_slots[start:stop] = self.cache.scratch_slot
        self.seq_lens[start:stop] = 1
        self.page_table[start:stop] = 0
        self.page_table[start:stop, 0] = self.cache.scratch_page

    def _before_replay(self, bs: int) -> None:
        """Host-side work outside the graph: the attention backend's plan for this replay's page table, and the
        dispatcher's (DeepEP cleans its low-latency buffer after a multi-node normal step)."""
        m, cfg = self.model, self.model.cfg
        batch = self.batches[bs]
        m.attention_backend.plan_graph(batch.page_table, batch.seq_lens, num_heads=cfg.num_attention_heads,
                                       kv_lora_rank=cfg.kv_lora_rank, rope_dim=cfg.qk_rope_head_dim,
                                       scale=cfg.softmax_scale, dtype=m.dtype)
        m.dispatcher.before_graph_replay("decode")

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None
        stream = torch.cuda.Stream(self.model.device) if self.use_cuda_graphs else None
        for bs in reversed(self.sizes):  # largest first: the smaller graphs fit in the pool the larger ones left
            batch = self.batches[bs]
            self._pad(0, self.max_bs)

            def forward(batch: ForwardBatch = batch) -> torch.Tensor:
                return self.model.forward(batch, self.cache)

            self._before_replay(bs)
            if self.use_cuda_graphs:
                # Warm up on the capture stream: lazy initialisations (cuBLAS handles, Triton and flashinfer
                # compilation, DeepEP's first collectives) must happen outside the capture.
                stream.wait_stream(torch.cuda.current_stream(self.model.device))
                with torch.cuda.stream(stream):
                    forward()
                stream.synchronize()
                self.graphs[bs] = CudaGraph(forward, pool, stream)
                torch.cuda.current_stream(self.model.device).wait_stream(stream)
            else:
                forward()
                self.graphs[bs] = EagerGraph(forward)
        log.info("decode graphs %s for batch sizes %s, page tables of %d pages (%d tokens)",
                 "captured" if self.use_cuda_graphs else "emulated", self.sizes, self.max_pages,
                 self.max_pages * self.cache.page_size)
