"""CUDA-graph decode on GPUs: replayed graphs against the eager decode forward, through the Triton and flashinfer
attention backends at page sizes 1 and 16, in the continuous runtime, and with DeepEP's low-latency kernels on 2 GPUs.

Run with `pytest -m gpu tests/engine/test_gpu_cuda_graph.py` on a CUDA machine; skipped elsewhere.

Graph and eager decode are the same kernels on the same inputs except for two things: padded batches run GEMMs over
more rows (cuBLAS may pick another kernel, which rounds differently), and the attention kernels see the graph's
fixed page-table width (Triton's split count follows it). In bfloat16 logits agree to bf16 tolerance, and
teacher-forced greedy picks agree wherever the eager top two are not within that tolerance of each other. float32
models decode eagerly: their expert MLP is the torch reference, which reads row counts on the host.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.build import ModelSource, build_model
from engine.cb_runner import ContinuousConfig, ContinuousRunner
from engine.cuda_graph import CudaGraph, DecodeGraphRunner
from engine.paged_cache import PagedLatentKVCache
from engine.presets import tiny
from engine.runner import Request
from engine.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
REPO = Path(__file__).resolve().parents[2]
PROMPT_LENS = [3, 9, 1, 14, 6, 2, 11, 5]
# flashinfer's MLA kernels are built for kv_lora_rank 512 and a 64-channel rotary part only.
CONFIGS = {
    "triton": tiny(),
    "flashinfer": tiny().replace(num_attention_heads=16, kv_lora_rank=512, qk_rope_head_dim=64),
}


def backend_or_skip(name: str) -> None:
    if name == "flashinfer" and importlib.util.find_spec("flashinfer") is None:
        pytest.skip("flashinfer is not importable (pip install flashinfer-python==0.5.3)")


def load(tiny_checkpoint, backend: str, page_size: int, dtype: torch.dtype):
    ckpt = tiny_checkpoint(CONFIGS[backend], seed=7)
    return build_model(ModelSource.resolve(str(ckpt)), device=torch.device("cuda"), dtype=dtype,
                       attention_backend=backend, page_size=page_size, fp8_weights=False, progress=False)


def prompts(vocab: int, lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_graph_decode_logits_match_eager(tiny_checkpoint, backend, page_size):
    """bf16, teacher-forced: 8 prefilled sequences decode 3 steps in subsets of 1 to 8 (padded to 1, 2, 4, 8) both
    ways; each row's logits agree to bf16 tolerance and its greedy pick agrees unless the eager top two are close."""
    backend_or_skip(backend)
    model = load(tiny_checkpoint, backend, page_size, torch.bfloat16)
    cfg = model.cfg
    cache = PagedLatentKVCache(cfg.num_hidden_layers, 256 // page_size + 8, page_size, cfg.kv_cache_dim,
                               model.dtype, model.device)
    seqs = prompts(cfg.vocab_size)
    for rid, p in enumerate(seqs):
        cache.reserve(rid, len(p) + 3)
        model.forward(cache.build_batch([rid], [p], [0], model.device), cache)
    graphs = DecodeGraphRunner(model, cache, [1, 2, 4, 8], max_pages=cache.pages_needed(32), use_cuda_graphs=True)
    assert all(isinstance(g, CudaGraph) for g in graphs.graphs.values())
    subsets = ([0], [3, 1], [2, 5, 7], [0, 1, 2, 3, 4], [7, 6, 5, 4, 3, 2, 1, 0])
    for step in range(3):
        for rids in subsets:
            def batch(rids=rids, step=step):
                return cache.build_batch(rids, [[(seqs[r][-1] + 17 * step) % cfg.vocab_size] for r in rids],
                                         [len(seqs[r]) + step for r in rids], model.device)

            want = model.forward(batch(), cache)
            got = graphs.run(batch()).clone()
            assert got.shape == want.shape == (len(rids), cfg.vocab_size)
            err = (got - want).norm(dim=-1) / want.norm(dim=-1)
            assert err.max() < 2e-2, (backend, page_size, step, rids, err)
            top2 = want.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1]) > 0.05 * want.abs().amax(-1)
            assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear]), (step, rids)


def generate(model, new_tokens, page_size, **config):
    reqs = [Request(i, p, SamplingParams(max_new_tokens=n, ignore_eos=True))
            for i, (p, n) in enumerate(zip(prompts(model.cfg.vocab_size), new_tokens))]
    runner = ContinuousRunner(model, ContinuousConfig(max_running_requests=8, page_size=page_size,
                                                      max_total_tokens=2048, **config))
    runner.generate(reqs)
    return reqs, runner


def test_float32_experts_decode_eagerly_and_say_why(tiny_checkpoint, caplog):
    """float32 expert weights run the torch reference expert MLP (host-side row counts): graphs must not be tried,
    and the runner says why once."""
    model = load(tiny_checkpoint, "triton", 1, torch.float32)
    with caplog.at_level(logging.INFO, logger="wideep"):
        reqs, runner = generate(model, [3, 2], 1)
    assert not runner.stats.cuda_graph and runner.stats.graph_decode_steps == 0
    assert all(r.finished for r in reqs)
    assert "reference expert MLP" in caplog.text


@pytest.mark.parametrize("page_size", [1, 16])
def test_continuous_runner_graph_decode_reuses_graphs(tiny_checkpoint, page_size):
    """bf16 through Triton: every decode step of shrinking, padded batches replays a graph, and a second job of the
    same length reuses the graphs and gives the same tokens as the first (replay is deterministic)."""
    model = load(tiny_checkpoint, "triton", page_size, torch.bfloat16)
    new = [12, 3, 9, 5, 1, 7, 10, 2]
    reqs, runner = generate(model, new, page_size, cuda_graph_max_bs=8)
    assert runner.stats.cuda_graph_sizes == [1, 2, 4, 8]
    assert runner.stats.graph_decode_steps == runner.stats.decode_steps > 0
    assert runner.cache.num_free_pages == runner.cache.num_pages
    first = runner.graphs
    again = [Request(r.rid, r.input_ids, r.params) for r in reqs]
    runner.generate(again)
    assert runner.graphs is first and [r.output_ids for r in again] == [r.output_ids for r in reqs]


@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_continuous_runner_graph_decode_bf16(tiny_checkpoint, backend):
    """bf16 end to end at page size 16: every decode step replays a graph (flashinfer replans before each) and every
    request finishes. Tokens are not compared over whole generations in bf16: one near-tied pick, decided by
    rounding, would change all that follows; test_graph_decode_logits_match_eager checks the numbers."""
    backend_or_skip(backend)
    model = load(tiny_checkpoint, backend, 16, torch.bfloat16)
    new = [6, 3, 5, 4, 2, 6, 5, 3]
    reqs, runner = generate(model, new, 16)
    assert runner.stats.cuda_graph_sizes == [1, 2, 4, 8]  # the default 256, capped by 8 running requests
    assert runner.stats.graph_decode_steps == runner.stats.decode_steps > 0
    assert all(r.finished and len(r.output_ids) == n for r, n in zip(reqs, new))


@pytest.mark.skipif(importlib.util.find_spec("deep_ep") is None,
                    reason="needs deep_ep (DeepEP v1.2.1 built from source; see the README's DeepEP section)")
def test_deepep_low_latency_graph_decode_same_tokens_on_2_gpus(tmp_path):
    """`engine.generate` under torchrun on 2 GPUs, DP attention, DeepEP low-latency (bf16 dispatch): the continuous
    runtime with CUDA graphs gives the greedy tokens it gives without them. The ranks hold uneven shares (3 and 2
    prompts here), so one rank's graphs replay while the other runs smaller batches or idles eagerly."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, found {torch.cuda.device_count()}")
    from make_checkpoint import write_checkpoint

    # DeepEP's low-latency kernels are built for a few hidden sizes; 2048 is the smallest.
    ckpt = write_checkpoint(tiny().replace(n_routed_experts=32, hidden_size=2048), tmp_path / "ckpt", seed=5,
                            progress=False)
    lines = [json.dumps({"input_ids": p}) for p in prompts(512, [8, 3, 31, 1, 5])]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    # GPU.md: never create NVLink multicast objects on the shared machines.
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="0,1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))

    def run(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "engine.generate", "--model", str(ckpt), "--prompts-file", str(tmp_path / "prompts.jsonl"),
               "--max-new-tokens", "6", "--ignore-eos", "--device", "cuda", "--dtype", "bfloat16",
               "--ep-size", "2", "--enable-dp-attention", "--moe-a2a-backend", "deepep",
               "--deepep-mode", "low_latency", "--no-deepep-fp8-dispatch", "--runtime", "continuous",
               "--page-size", "16", "--max-prefill-tokens", "64", *extra]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
        log = f"exit {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-8000:]}"
        assert proc.returncode == 0, log
        tokens = [json.loads(x)["output_ids"] for x in proc.stdout.splitlines() if x.startswith('{"output_ids"')]
        assert len(tokens) == 5, log
        return tokens, proc.stderr

    eager, eager_log = run("--disable-cuda-graph")
    graphs, graph_log = run("--cuda-graph-max-bs", "8")
    assert "run eagerly, without CUDA graphs: --disable-cuda-graph" in eager_log
    assert "decode graphs captured for batch sizes [1, 2, 4, 8]" in graph_log, graph_log[-4000:]
    assert graphs == eager
