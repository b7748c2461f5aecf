"""Seeded sampling: greedy/top-k/top-p semantics, the right distribution, and draws that depend only on the request."""

import pytest
import torch

from engine.cb_runner import ContinuousConfig, ContinuousRunner
from engine.dummy import dummy_weights
from engine.errors import WideepError
from engine.model import DeepseekV3
from engine.presets import tiny
from engine.runner import Request, Runner, RunnerConfig
from engine.sampling import SamplingParams, request_seed, sample, uniform_noise


def logits4():
    return torch.randn(4, 50, generator=torch.Generator().manual_seed(1))


def test_greedy_and_degenerate_cuts_take_the_argmax():
    logits = logits4()
    greedy = logits.argmax(-1)
    keys = ([3, 4, 5, 6], [0, 0, 0, 0])
    assert torch.equal(sample(logits, [SamplingParams()] * 4, *keys), greedy)
    assert torch.equal(sample(logits, [SamplingParams(temperature=1.0, top_k=1)] * 4, *keys), greedy)
    assert torch.equal(sample(logits, [SamplingParams(temperature=2.0, top_p=1e-6)] * 4, *keys), greedy)


def test_draws_are_a_function_of_seed_and_step():
    logits = logits4()
    hot = [SamplingParams(temperature=5.0)] * 4
    assert torch.equal(sample(logits, hot, [1, 2, 3, 4], [7, 7, 7, 7]), sample(logits, hot, [1, 2, 3, 4], [7, 7, 7, 7]))
    draws = torch.stack([sample(logits, hot, [s] * 4, [0] * 4) for s in range(20)])
    assert (draws != logits.argmax(-1)).any()
    steps = torch.stack([sample(logits, hot, [9] * 4, [k] * 4) for k in range(20)])
    assert len(set(steps[:, 0].tolist())) > 1  # the step index moves the stream on
    # A row's draw does not depend on the rows around it: batch of one == the same row in a batch of four.
    for i in range(4):
        alone = sample(logits[i : i + 1], hot[:1], [100 + i], [3])
        assert int(alone) == int(sample(logits, hot, [100, 101, 102, 103], [3] * 4)[i])


def test_top_k_never_leaves_the_best_tokens():
    logits = logits4()
    top3 = logits.topk(3, dim=-1).indices
    for s in range(20):
        picked = sample(logits, [SamplingParams(temperature=5.0, top_k=3)] * 4, [s] * 4, [0] * 4)
        assert (top3 == picked[:, None]).any(-1).all()


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sample(logits, [SamplingParams(temperature=1.0, top_p=0.7)], [s], [0])) for s in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7 so token 1 is still kept; 0.8 >= 0.7 stops before token 2


def test_frequencies_follow_the_tempered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 20000
    rows = logits.expand(n, -1)
    temp = 1.5
    picks = sample(rows, [SamplingParams(temperature=temp)] * n, list(range(n)), [0] * n)
    freq = torch.bincount(picks, minlength=5).float() / n
    want = (logits / temp).softmax(-1)
    assert (freq - want).abs().max() < 0.015, (freq, want)


def test_noise_is_uniform_and_in_range():
    u = uniform_noise(torch.arange(64), torch.zeros(64, dtype=torch.int64), 1000)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.var().item() - 1 / 12) < 0.005
    # Large seeds (above 32 bits) still change the stream.
    big = uniform_noise(torch.tensor([1 << 40]), torch.tensor([0]), 100)
    assert not torch.equal(big, uniform_noise(torch.tensor([0]), torch.tensor([0]), 100))


def test_request_seed_depends_on_job_seed_and_id():
    assert request_seed(0, 1) == request_seed(0, 1)
    assert len({request_seed(0, rid) for rid in range(100)}) == 100
    assert request_seed(0, 5) != request_seed(1, 5)


def test_negative_seed_is_refused():
    with pytest.raises(WideepError, match="seed"):
        SamplingParams(seed=-1)


@pytest.mark.parametrize("runtime", ["static", "continuous"])
def test_a_seeded_request_samples_the_same_alone_or_batched(runtime):
    """Per-request seeding: the text of a temperature-sampled request does not depend on its batch-mates."""
    cfg = tiny()
    model = DeepseekV3(cfg, dummy_weights(cfg, dtype=torch.float32, seed=5))
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9], [40, 41]]

    def run(which, max_running):
        params = SamplingParams(max_new_tokens=6, temperature=1.3, top_p=0.9, ignore_eos=True)
        reqs = [Request(i, prompts[i], params) for i in which]
        runner = (Runner(model, RunnerConfig(max_running_requests=max_running, seed=11)) if runtime == "static"
                  else ContinuousRunner(model, ContinuousConfig(max_running_requests=max_running, seed=11)))
        runner.generate(reqs)
        return {r.rid: r.output_ids for r in reqs}

    together = run(range(4), 4)
    for i in range(4):
        assert run([i], 1)[i] == together[i]
    assert len({tuple(v) for v in together.values()}) > 1
