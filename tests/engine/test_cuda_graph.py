"""CUDA-graph decode on the CPU: the graph runner with its stand-in graphs (`EagerGraph`) runs all its logic
(bucketing, padding, static buffers, scratch page, output slicing, recapture on wider tables) and must give the eager
decode's logits and tokens exactly."""

import logging

import pytest
import torch
import torch.nn.functional as F

from engine.build import ModelSource, build_model
from engine.cb_runner import ContinuousConfig, ContinuousRunner
from engine.cuda_graph import DecodeGraphRunner, EagerGraph, capture_sizes
from engine.errors import WideepError
from engine.paged_cache import PagedLatentKVCache
from engine.runner import Request
from engine.sampling import SamplingParams

PROMPT_LENS = [3, 9, 1, 14, 6, 2, 11, 5]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from make_checkpoint import write_checkpoint

    from engine.presets import tiny

    ckpt = write_checkpoint(tiny(), tmp_path_factory.mktemp("ckpt") / "model", seed=4, progress=False)
    return build_model(ModelSource.resolve(str(ckpt)), device=torch.device("cpu"), dtype=torch.float32,
                       progress=False)


def prompts(vocab: int, lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def test_capture_sizes():
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192,
                                  208, 224, 240, 256]
    assert capture_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1) == [1]
    with pytest.raises(WideepError, match="--cuda-graph-max-bs"):
        capture_sizes(0)
    with pytest.raises(WideepError, match="--cuda-graph-max-bs"):
        ContinuousConfig(cuda_graph_max_bs=0)


@pytest.mark.parametrize("page_size", [1, 4])
def test_padded_static_decode_equals_eager_forward(model, page_size):
    """Prefill 8 sequences eagerly, then decode subsets of 1..8 of them both ways: the same logits, and the padding
    rows write only the scratch page.

    Exact equality needs the same reduction lengths and GEMM shapes on both sides: the eager batch is given a page
    table as wide as the graphs' (attention reduces over as many masked positions), and where no row is padded the
    logits are bitwise equal. Padded batches differ by fp32 rounding only: CPU GEMMs round a row differently
    depending on how many rows they are given, eager batches of different sizes as much as graph and eager."""
    cfg = model.cfg
    cache = PagedLatentKVCache(cfg.num_hidden_layers, 64, page_size, cfg.kv_cache_dim, model.dtype, model.device)
    seqs = prompts(cfg.vocab_size)
    for rid, p in enumerate(seqs):
        cache.reserve(rid, len(p) + 1)
        model.forward(cache.build_batch([rid], [p], [0], model.device), cache)
    graphs = DecodeGraphRunner(model, cache, [1, 2, 4, 8], max_pages=cache.pages_needed(16),
                               use_cuda_graphs=False)
    assert all(isinstance(g, EagerGraph) for g in graphs.graphs.values())
    for rids in ([0], [3, 1], [2, 5, 7], [0, 1, 2, 3, 4], [7, 6, 5, 4, 3, 2, 1, 0]):
        def batch(rids=rids):
            return cache.build_batch(rids, [[seqs[r][-1] + 1] for r in rids], [len(seqs[r]) for r in rids],
                                     model.device)

        wide = batch()
        wide.page_table = F.pad(wide.page_table, (0, graphs.max_pages - wide.page_table.shape[1]))
        want = model.forward(wide, cache)
        before = cache.buffer.clone()
        got = graphs.run(batch())
        assert got.shape == want.shape == (len(rids), cfg.vocab_size)
        if len(rids) in graphs.sizes:
            assert torch.equal(got, want)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        changed = (cache.buffer != before).any(-1).any(0).nonzero().squeeze(1)  # slots written differently
        allowed = set(batch().out_slots.tolist()) | set(range(cache.scratch_slot, cache.scratch_slot + page_size))
        assert set(changed.tolist()) <= allowed
        assert graphs.seq_lens[len(rids):].eq(1).all()
        assert graphs.out_slots[len(rids):].eq(cache.scratch_slot).all()
        assert graphs.page_table[len(rids):, 0].eq(cache.scratch_page).all()


def test_scratch_page_stays_out_of_the_accounting():
    cache = PagedLatentKVCache(2, 5, 4, 3, torch.float32, "cpu")
    assert cache.scratch_page == 5 and cache.scratch_slot == 20
    assert cache.buffer.shape == (2, 24, 3) and cache.capacity == 20
    cache.reserve(0, 20)  # every page a request may have
    assert sorted(cache.pages_of(0)) == [0, 1, 2, 3, 4] and cache.num_free_pages == 0
    with pytest.raises(WideepError, match="KV cache full"):
        cache.reserve(1, 1)
    assert cache.release(0) == 5 and cache.num_free_pages == 5


def run_job(model, reqs, **config):
    runner = ContinuousRunner(model, ContinuousConfig(max_running_requests=8, chunked_prefill_size=16, **config))
    runner.generate(reqs)
    return runner


def make_requests(vocab, new_tokens, lens=PROMPT_LENS, seed=0):
    return [Request(i, p, SamplingParams(max_new_tokens=n, ignore_eos=True))
            for i, (p, n) in enumerate(zip(prompts(vocab, lens, seed), new_tokens))]


@pytest.mark.parametrize("page_size", [1, 4])
def test_continuous_runner_graph_decode_equals_eager(model, page_size):
    """Requests of different lengths finish at different steps, so decode batches shrink through 8, 7, ..., 1:
    most are padded (7 -> 8, 5 -> 8, 3 -> 4). The graph path's tokens are the eager path's, and the cache's
    accounting is exact at the end."""
    new = [12, 3, 9, 5, 1, 7, 10, 2]
    eager = make_requests(model.cfg.vocab_size, new)
    ref = run_job(model, eager, page_size=page_size)
    assert not ref.stats.cuda_graph and ref.stats.graph_decode_steps == 0
    reqs = make_requests(model.cfg.vocab_size, new)
    runner = run_job(model, reqs, page_size=page_size, emulate_cuda_graph=True, cuda_graph_max_bs=8)
    assert [r.output_ids for r in reqs] == [r.output_ids for r in eager]
    assert runner.stats.cuda_graph and runner.stats.cuda_graph_sizes == [1, 2, 4, 8]
    assert runner.stats.graph_decode_steps == runner.stats.decode_steps > 0
    cache = runner.cache
    assert cache.num_free_pages == cache.num_pages and cache.scratch_page not in cache._free
    assert runner.graphs.max_pages >= max(cache.pages_needed(len(r.input_ids) + r.params.max_new_tokens)
                                          for r in reqs)


def test_larger_batches_decode_eagerly_and_graph_sizes_follow_the_caps(model):
    reqs = make_requests(model.cfg.vocab_size, [4] * 8)
    runner = run_job(model, reqs, emulate_cuda_graph=True, cuda_graph_max_bs=4)
    assert runner.stats.cuda_graph_sizes == [1, 2, 4]
    assert 0 < runner.stats.graph_decode_steps < runner.stats.decode_steps  # batches of 8 ran eagerly
    eager = make_requests(model.cfg.vocab_size, [4] * 8)
    run_job(model, eager)
    assert [r.output_ids for r in reqs] == [r.output_ids for r in eager]
    capped = ContinuousRunner(model, ContinuousConfig(max_running_requests=3, emulate_cuda_graph=True))
    capped.generate(make_requests(model.cfg.vocab_size, [2, 2]))
    assert capped.stats.cuda_graph_sizes == [1, 2, 3]  # never more rows than can run together


def test_graphs_are_kept_for_shorter_jobs_and_recaptured_for_wider_tables(model):
    runner = ContinuousRunner(model, ContinuousConfig(max_running_requests=4, page_size=4, max_total_tokens=512,
                                                      emulate_cuda_graph=True, cuda_graph_max_bs=4))
    runner.generate(make_requests(model.cfg.vocab_size, [3, 3], lens=[5, 6]))
    first = runner.graphs
    assert first.max_pages == 4  # 9 tokens: 3 pages, rounded up to a power of two
    runner.generate(make_requests(model.cfg.vocab_size, [2], lens=[4]))
    assert runner.graphs is first
    long = make_requests(model.cfg.vocab_size, [6, 4], lens=[30, 3], seed=1)
    runner.generate(long)
    assert runner.graphs is not first and runner.graphs.max_pages == 16  # 36 tokens: 9 pages -> 16
    assert runner.graphs.batches[4].max_seq_len == 64  # the rotary table was extended before capture
    eager = make_requests(model.cfg.vocab_size, [6, 4], lens=[30, 3], seed=1)
    ContinuousRunner(model, ContinuousConfig(page_size=4)).generate(eager)
    assert [r.output_ids for r in long] == [r.output_ids for r in eager]


def test_eager_decode_says_once_why(model, caplog):
    with caplog.at_level(logging.INFO, logger="wideep"):
        runner = ContinuousRunner(model, ContinuousConfig(emulate_cuda_graph=True, disable_cuda_graph=True))
        runner.generate(make_requests(model.cfg.vocab_size, [2, 2]))
        runner.generate(make_requests(model.cfg.vocab_size, [2, 2]))
        ContinuousRunner(model).generate(make_requests(model.cfg.vocab_size, [2]))
    lines = [r.getMessage() for r in caplog.records if "run eagerly" in r.getMessage()]
    assert len(lines) == 2 and "--disable-cuda-graph" in lines[0] and "not a CUDA device" in lines[1]
    assert not runner.stats.cuda_graph and runner.stats.graph_decode_steps == 0


def test_flags_reach_the_runner(model):
    import argparse

    from engine.cli_args import add_model_args, make_runner
    from parallel.step_sync import LocalStepSync

    parser = argparse.ArgumentParser()
    add_model_args(parser, default_model="tiny")
    args = parser.parse_args(["--runtime", "continuous", "--cuda-graph-max-bs", "16", "--disable-cuda-graph"])
    runner = make_runner(args, model, 0, LocalStepSync(), None)
    assert runner.config.cuda_graph_max_bs == 16 and runner.config.disable_cuda_graph
    default = make_runner(parser.parse_args(["--runtime", "continuous"]), model, 0, LocalStepSync(), None)
    assert default.config.cuda_graph_max_bs == 256 and not default.config.disable_cuda_graph
    with pytest.raises(WideepError, match="--cuda-graph-max-bs must be >= 1"):
        make_runner(parser.parse_args(["--runtime", "continuous", "--cuda-graph-max-bs", "0"]), model, 0,
                    LocalStepSync(), None)


def test_why_decode_stays_eager(model):
    from engine.cuda_graph import graphs_unsupported
    from parallel.dispatcher import Dispatcher, LocalDispatcher

    assert graphs_unsupported(model, on_cuda=False) is None
    assert "not a CUDA device" in graphs_unsupported(model)

    class HostSized(LocalDispatcher):  # what the torch all-to-all is: split sizes read on the host
        graph_unsupported = Dispatcher.graph_unsupported

    local = model.dispatcher
    layers = model.moe_layers()
    try:
        model.dispatcher = HostSized(local.num_local_slots)
        assert "reads token counts on the host" in graphs_unsupported(model, on_cuda=False)
        model.dispatcher = local
        layers[0].recorder = object()
        assert "expert-load recording" in graphs_unsupported(model, on_cuda=False)
    finally:
        model.dispatcher = local
        layers[0].recorder = None
