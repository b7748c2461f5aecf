"""Decode over the latent cache (absorbed MLA) against recomputing from scratch; batching must not change results."""

import torch

from engine.batch import ForwardBatch
from engine.dummy import dummy_weights
from engine.model import DeepseekV3
from engine.presets import tiny
from engine.runner import Request, Runner, RunnerConfig
from engine.sampling import SamplingParams


def make_model(cfg=None):
    cfg = cfg or tiny()
    return DeepseekV3(cfg, dummy_weights(cfg, dtype=torch.float32, seed=5))


def recompute_logits(model, seq):
    cache = model.new_kv_cache(len(seq))
    batch = ForwardBatch.build([seq], [0], [cache.alloc(len(seq))], "cpu")
    return model.forward(batch, cache)[0]


def test_cached_decode_equals_recompute():
    model = make_model()
    prompt = [7, 3, 200, 41, 9]
    req = Request(0, prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))
    Runner(model).generate([req])
    seq = list(prompt)
    for tok in req.output_ids:
        logits = recompute_logits(model, seq)
        assert int(logits.argmax()) == tok
        seq.append(tok)


def test_decode_step_logits_match_extend_path():
    """One absorbed decode step gives the logits the non-absorbed prefill gives for the same position."""
    model = make_model(tiny().replace(q_lora_rank=None))
    seq = [11, 22, 33, 44, 55, 66]
    cache = model.new_kv_cache(len(seq))
    slots = cache.alloc(len(seq))
    model.forward(ForwardBatch.build([seq[:-1]], [0], [slots], "cpu"), cache)
    step = ForwardBatch.build([[seq[-1]]], [len(seq) - 1], [slots], "cpu")
    assert step.decode
    got = model.forward(step, cache)[0]
    want = recompute_logits(model, seq)
    assert ((got - want).norm() / want.norm()) < 1e-5


def test_batching_and_prefill_grouping_do_not_change_outputs():
    model = make_model()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (1, 9, 4, 17, 2)]

    def run(config):
        reqs = [Request(i, p, SamplingParams(max_new_tokens=5, ignore_eos=True)) for i, p in enumerate(prompts)]
        Runner(model, config).generate(reqs)
        return [r.output_ids for r in reqs]

    alone = run(RunnerConfig(max_running_requests=1))
    together = run(RunnerConfig(max_running_requests=8))
    tight = run(RunnerConfig(max_running_requests=3, max_prefill_tokens=5))
    assert alone == together == tight


def test_stops_at_eos_unless_ignored():
    model = make_model()
    prompt = [5, 6, 7]
    probe = Request(0, prompt, SamplingParams(max_new_tokens=3, ignore_eos=True))
    Runner(model).generate([probe])
    eos_model = make_model()
    eos_model.cfg = model.cfg.replace(eos_token_id=probe.output_ids[1])
    runner = Runner(eos_model)
    stop = Request(0, prompt, SamplingParams(max_new_tokens=3))
    runner.generate([stop])
    assert stop.output_ids == probe.output_ids[:2] and stop.finished


def test_idle_step_with_zero_tokens():
    """An expert-parallel rank with no requests still runs every step with an empty batch."""
    model = make_model()
    cache = model.new_kv_cache(4)
    out = model.forward(ForwardBatch.build([], [], [], "cpu"), cache)
    assert out.shape == (0, model.cfg.vocab_size)
