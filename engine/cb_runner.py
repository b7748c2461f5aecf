"""The continuous-batching runner: model + `Scheduler` + `PagedLatentKVCache`, with `engine.runner.Runner`'s surface.

Each step the scheduler picks runs (prefill chunks or decodes, see `engine.scheduler` for the policy); this module
turns them into a `ForwardBatch` (positions, page table, sequence lengths), runs the model, samples the runs that
end their sequence and hands the step back to the scheduler. Under data-parallel attention every rank joins every
step, with an empty batch when it has nothing to run, and all ranks agree on the step's mode through `StepSync`,
exactly as the static runner does.

Decode steps replay CUDA graphs (`engine.cuda_graph`) where they can: on a CUDA device, with the `local` dispatcher
or DeepEP's low-latency kernels, up to `--cuda-graph-max-bs` sequences; the graphs are captured at the start of a
`generate` (on every rank together) for page tables as wide as the job's longest request. Anything else decodes
eagerly, and the runner says once why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.batch import ForwardBatch
from engine.cuda_graph import DEFAULT_MAX_BS, DecodeGraphRunner, capture_sizes, graphs_unsupported
from engine.errors import WideepError
from engine.model import DeepseekV3
from engine.paged_cache import PagedLatentKVCache, pages_for_memory
from engine.runner import Request, StepStats, check_requests, run_agreed_steps, sample_next
from engine.scheduler import Plan, Scheduler, SchedulerConfig
from parallel.step_sync import LocalStepSync, StepSync

log = logging.getLogger("wideep")


@dataclass(frozen=True)
class ContinuousConfig:
    """max_total_tokens: KV cache size in tokens (None: from free memory on GPUs; on the CPU, what the requests of
    the first `generate` could ever hold, so that nothing is retracted). mem_fraction_static: share of the GPU that
    weights and KV cache may take when sizing from free memory. cuda_graph_max_bs: the largest decode batch run as
    a CUDA graph (`--cuda-graph-max-bs`; capped by max_running_requests and by DeepEP's per-rank token limit);
    disable_cuda_graph: decode eagerly always (`--disable-cuda-graph`). emulate_cuda_graph: off CUDA, run decode
    through the graph runner with its stand-in graphs (padding, static buffers, scratch page): for tests."""

    max_running_requests: int = 64
    chunked_prefill_size: int = 8192
    page_size: int = 1
    max_total_tokens: int | None = None
    mem_fraction_static: float = 0.85
    seed: int = 0
    cuda_graph_max_bs: int = DEFAULT_MAX_BS
    disable_cuda_graph: bool = False
    emulate_cuda_graph: bool = False

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise WideepError(f"--page-size must be >= 1, found {self.page_size}")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise WideepError(f"--max-total-tokens must hold at least one page ({self.page_size} tokens)")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise WideepError(f"--mem-fraction-static must lie in (0, 1), found {self.mem_fraction_static}")
        SchedulerConfig(self.max_running_requests, self.chunked_prefill_size)  # validates both flags
        capture_sizes(self.cuda_graph_max_bs)  # validates --cuda-graph-max-bs


@dataclass
class ContinuousStats(StepStats):
    """StepStats plus what continuous batching adds: peak running requests, retractions, KV pages in use."""

    peak_running: int = 0
    retractions: int = 0
    peak_pages_used: int = 0
    num_pages: int = 0
    cuda_graph: bool = False  # decode steps may replay CUDA graphs (the last generate's setting)
    cuda_graph_sizes: list[int] = field(default_factory=list)  # the batch sizes captured
    graph_decode_steps: int = 0  # decode steps that replayed a graph

    @property
    def peak_kv_use(self) -> float:
        return self.peak_pages_used / max(self.num_pages, 1)


class ContinuousRunner:
    """Runs requests to completion on one model by continuous batching; `on_step(num_new_tokens)` reports progress."""

    def __init__(self, model: DeepseekV3, config: ContinuousConfig = ContinuousConfig(),
                 sync: StepSync | None = None, on_step_end: Callable[[int], None] | None = None):
        """on_step_end(step): called on every rank after every step, idle ones too, with the job-wide step index."""
        self.model = model
        self.config = config
        self.sync = sync or LocalStepSync()
        self.on_step_end = on_step_end
        self.eos = model.cfg.eos_token_id
        self.stats = ContinuousStats()
        self.cache: PagedLatentKVCache | None = None
        self.graphs: DecodeGraphRunner | None = None
        self._eager_logged = False
        self._step = 0

    def _num_pages(self, requests: list[Request]) -> int:
        cfg, p = self.config, self.config.page_size
        if cfg.max_total_tokens is not None:
            return cfg.max_total_tokens // p
        if self.model.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.model.device)
            per_page = (self.model.cfg.num_hidden_layers * p * self.model.cfg.kv_cache_dim
                        * self.model.dtype.itemsize)
            # One page of the budget is the cache's scratch page (CUDA-graph padding).
            return max(pages_for_memory(free, total, cfg.mem_fraction_static, per_page) - 1, 1)
        return max(sum(-(-r.max_tokens // p) for r in requests), 1)

    def _cache_for(self, requests: list[Request]) -> PagedLatentKVCache:
        # Sized once (from the flags, or from the free memory before the cache takes it), except on the CPU without
        # --max-total-tokens, where a later, larger job grows it.
        grows = self.config.max_total_tokens is None and self.model.device.type != "cuda"
        if self.cache is None or (grows and self.cache.num_pages < self._num_pages(requests)):
            pages = self._num_pages(requests)
            self.cache = self.graphs = None  # free the old buffer (and the graphs over it) before taking the new one
            cfg = self.model.cfg
            self.cache = PagedLatentKVCache(cfg.num_hidden_layers, pages, self.config.page_size, cfg.kv_cache_dim,
                                            self.model.dtype, self.model.device)
        self.stats.num_pages = self.cache.num_pages
        return self.cache

    def generate(
        self,
        requests: list[Request],
        prompt_logits: bool = False,
        on_step: Callable[[int], None] | None = None,
    ) -> list[Request]:
        """Runs `requests` (this rank's share; possibly none) to completion, joining every step of the job."""
        check_requests(requests, self.model.cfg.vocab_size)
        on_step = on_step or (lambda n: None)
        cache = self._cache_for(requests)
        self._prepare_graphs(requests, cache)
        sched = Scheduler(SchedulerConfig(self.config.max_running_requests, self.config.chunked_prefill_size), cache)
        for r in requests:
            sched.add(r)
        pieces: dict[int, list[torch.Tensor]] = {}  # prompt logits gathered chunk by chunk
        def run(plan: Plan | None, mode: str) -> None:
            self._run(plan, mode, cache, pieces if prompt_logits else None, on_step)
            if plan is not None:
                self.stats.peak_running = max(self.stats.peak_running, len(sched.running))
                sched.step_done(plan)

        self._step = run_agreed_steps(self.sync, self._step, sched.next_step, run, self.on_step_end)
        self.stats.retractions += sched.num_retractions
        return requests

    def _run(self, plan: Plan | None, mode: str, cache: PagedLatentKVCache,
             pieces: dict[int, list[torch.Tensor]] | None, on_step: Callable[[int], None]) -> None:
        start = time.perf_counter()
        if plan is None:
            # Nothing of our own: join the step's collectives with zero tokens.
            self.model.forward(ForwardBatch.empty(self.model.device, mode), cache)
            self.stats.idle_steps += 1
            return
        self.stats.peak_pages_used = max(self.stats.peak_pages_used, cache.num_pages - cache.num_free_pages)
        batch = cache.build_batch([r.req.rid for r in plan.runs], [r.tokens for r in plan.runs],
                                  [r.start for r in plan.runs], self.model.device)
        batch.mode = mode
        # Prompt logits only while a request's prompt is first being run (a re-prefill after retraction already
        # has them); its last prompt token may come as a one-token decode run after a chunk that stopped short.
        want_all = pieces is not None and any(
            r.req.prompt_logits is None and r.start < len(r.req.input_ids) for r in plan.runs)
        if self.graphs is not None and mode == "decode" and not want_all and self.graphs.fits(batch):
            logits = self.graphs.run(batch)  # [B, vocab], a view of the graph's output: sampled before the next step
            self.stats.graph_decode_steps += 1
        else:
            logits = self.model.forward(batch, cache, all_logits=want_all)
        if want_all:
            for r, chunk in zip(plan.runs, logits.split(batch.extend_lens)):
                if r.req.prompt_logits is None and r.start < len(r.req.input_ids):
                    if r.start == 0:  # a prompt retracted part-way starts over
                        pieces[r.req.rid] = []
                    pieces[r.req.rid].append(chunk[: len(r.req.input_ids) - r.start].cpu())
                    if r.start + len(r.tokens) >= len(r.req.input_ids):
                        r.req.prompt_logits = torch.cat(pieces.pop(r.req.rid))
            logits = logits[batch.last_token_index]
        done = [i for i, r in enumerate(plan.runs) if r.sample]
        self._append([plan.runs[i].req for i in done], logits[done] if done else logits[:0])
        elapsed = time.perf_counter() - start
        if plan.prefill:
            self.stats.prefill_steps += 1
            self.stats.prefill_tokens += batch.num_tokens
            self.stats.prefill_s += elapsed
        else:
            self.stats.decode_steps += 1
            self.stats.decode_tokens += len(plan.runs)
            self.stats.decode_s += elapsed
        on_step(len(done))

    def _prepare_graphs(self, requests: list[Request], cache: PagedLatentKVCache) -> None:
        """Captures the decode graphs this job needs, unless the ones held serve it (or graphs do not apply here).

        Under expert parallelism every rank comes here at the start of the same `generate`; the width of the page
        table and the decision to capture again are agreed over the dispatcher's ranks, so all of them capture the
        same sizes in the same order (the warm-ups run collectives).
        """
        cfg, model = self.config, self.model
        on_cuda = model.device.type == "cuda"
        if cfg.disable_cuda_graph:
            reason = "--disable-cuda-graph"
        elif not on_cuda and not cfg.emulate_cuda_graph:
            reason = f"the model runs on {model.device}, not a CUDA device"
        else:
            reason = graphs_unsupported(model, on_cuda=on_cuda)
        if reason is not None:
            if not self._eager_logged:
                log.info("decode steps run eagerly, without CUDA graphs: %s", reason)
                self._eager_logged = True
            self.graphs = None
            self.stats.cuda_graph, self.stats.cuda_graph_sizes = False, []
            return
        dispatcher = model.dispatcher
        max_bs = min(cfg.cuda_graph_max_bs, cfg.max_running_requests)
        if dispatcher.graph_max_tokens is not None:  # a padded batch brings max_bs tokens to the dispatcher
            max_bs = min(max_bs, dispatcher.graph_max_tokens)
        longest = max((cache.pages_needed(r.max_tokens) for r in requests), default=1)
        need = dispatcher.agree_max(min(longest, cache.num_pages))
        held = self.graphs
        stale = (held is None or held.cache is not cache or need > held.max_pages
                 or held.key != DecodeGraphRunner.state_key(model, cache))
        if dispatcher.agree_max(int(stale)):
            # Widths grow by powers of two, so a run of longer and longer jobs captures O(log) times.
            width = min(1 << (need - 1).bit_length(), max(cache.num_pages, need))
            self.graphs = None  # release the old graphs' pool before capturing the new ones
            self.graphs = DecodeGraphRunner(model, cache, capture_sizes(max_bs), width, use_cuda_graphs=on_cuda)
        self.stats.cuda_graph, self.stats.cuda_graph_sizes = True, list(self.graphs.sizes)

    def _append(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """logits: `[len(reqs), vocab]` float32 of each request's last token."""
        if not reqs:
            return
        tokens = sample_next(reqs, logits, self.config.seed)
        for r, tok in zip(reqs, tokens):
            r.output_ids.append(tok)
            done = len(r.output_ids) >= r.params.max_new_tokens
            if not r.params.ignore_eos and tok == self.eos:
                done = True
            r.finished = done
