"""Rank worker: the `deepep` dispatcher against the `torch` one and direct references, every mode, on every rank.

Run under torchrun: `python -m torch.distributed.run --nproc-per-node W tests/parallel/_deepep_checks.py real|fake`.
`real` uses DeepEP on one GPU per rank (NCCL); `fake` puts `_fake_deep_ep` in place of `deep_ep` on the CPU (gloo).
Prints `rank R ok` at the end; any failed check raises.

Every token carries its identity in its last 256 channels (source rank + 1, then token + 1: exact in bf16 and in FP8
with per-128-channel scales), so the rows each slot received can be checked against the global routing whatever
order the kernels put them in. The "experts" multiply each row by (local slot + 1), so combine must bring every
output back to the right token and weight it with the right k.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

HIDDEN, SLOTS, TOPK, MAX_TOKENS = 2048, 4, 4, 32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are empty or zero)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den else (a - b).norm().item()


def make_inputs(rank: int, world: int, tokens: int, scenario: str, device) -> tuple:
    """x `[T, H]` bf16 tagged with (rank, token); topk_ids `[T, K]` int64 (-1 = none); weights `[T, K]` float32."""
    g = torch.Generator().manual_seed(1000 * rank + tokens + len(scenario))
    x = torch.randn(tokens, HIDDEN, generator=g)
    x[:, -256:-128] = rank + 1
    x[:, -128:] = torch.arange(1, tokens + 1).unsqueeze(1)
    slots = world * SLOTS
    if scenario == "one-rank":  # every token's experts on rank 0
        ids = torch.stack([torch.randperm(SLOTS, generator=g)[:TOPK] for _ in range(tokens)]) if tokens else \
            torch.empty(0, TOPK, dtype=torch.int64)
    else:
        ids = torch.rand(tokens, slots, generator=g).topk(TOPK, dim=1).indices
        ids[torch.rand(tokens, TOPK, generator=g) < 0.15] = -1  # some slots unused
        if tokens:
            ids[0] = -1  # a token with no expert at all
    weights = torch.rand(tokens, TOPK, generator=g)
    return x.to(torch.bfloat16).to(device), ids.to(device), weights.to(device)


def experts(tokens):
    """Stand-in expert MLPs: row * (local slot + 1), in bf16, answering in the tokens' layout."""
    from parallel.deepep_layout import dequantize_tokens

    tokens = dequantize_tokens(tokens)
    if tokens.layout == "masked":
        scale = torch.arange(1, SLOTS + 1, device=tokens.hidden.device).view(-1, 1, 1)
        return tokens.hidden * scale
    slot = torch.repeat_interleave(torch.arange(SLOTS, device=tokens.hidden.device), tokens.tokens_per_expert)
    return tokens.hidden * (slot + 1).unsqueeze(1)


def home_reference(x, ids, weights):
    """What a weighted top-k combine must give at home: sum_k w * bf16(x * (local slot + 1)), fp32, k order."""
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for k in range(ids.shape[1]):
        y = x * (ids[:, k] % SLOTS + 1).unsqueeze(1)
        acc += torch.where(ids[:, k:k + 1] >= 0, weights[:, k:k + 1] * y.float(), 0.0)
    return acc.to(torch.bfloat16)


def check_rows(tokens, rank, world, everyone, fp8: bool, what: str) -> None:
    """The rows each local slot got are exactly the (rank, token) pairs routed to it, with those tokens' values."""
    from parallel.deepep_layout import dequantize_tokens, masked_to_contiguous

    if tokens.layout == "masked":
        tokens = masked_to_contiguous(tokens)
    rows = dequantize_tokens(tokens).hidden.float().cpu()
    counts = tokens.tokens_per_expert.cpu().tolist()
    src_rank = rows[:, -256].round().long() - 1
    src_token = rows[:, -1].round().long() - 1
    start = 0
    for e, n in enumerate(counts):
        slot = rank * SLOTS + e
        want = sorted((r, t) for r, (_, ids_r, _) in enumerate(everyone)
                      for t in range(ids_r.shape[0]) if slot in ids_r[t].tolist())
        got = sorted(zip(src_rank[start:start + n].tolist(), src_token[start:start + n].tolist()))
        assert got == want, f"{what}: slot {slot} got {got[:8]}..., want {want[:8]}..."
        for i in range(start, start + n):
            source = everyone[int(src_rank[i])][0][int(src_token[i])].float()
            err = rel(rows[i], source)
            assert err < (3e-2 if fp8 else 0.0) or torch.equal(rows[i], source), f"{what}: row error {err}"
        start += n


def main() -> None:
    kind = sys.argv[1]
    if kind == "fake":
        import _fake_deep_ep

        sys.modules["deep_ep"] = _fake_deep_ep
    from engine.errors import WideepError
    from parallel.deepep import DeepEPBuffer, DeepEPDispatcher
    from parallel.launch import detect_launch_env
    from parallel.state import destroy_parallel, init_parallel
    from parallel.torch_a2a import TorchAllToAllDispatcher

    env = detect_launch_env(os.environ)
    state = init_parallel(env, ep_size=env.world_size, timeout_s=120, device_kind="cpu" if kind == "fake" else "cuda")
    rank, world, dev = state.rank, state.world_size, state.device
    common = {"num_local_slots": SLOTS, "hidden_size": HIDDEN, "dtype": torch.bfloat16}
    reference = TorchAllToAllDispatcher(state, **common)
    shared = DeepEPBuffer(state.group, hidden_size=HIDDEN, num_slots=SLOTS * world,
                          max_dispatch_tokens_per_rank=MAX_TOKENS, normal=True, low_latency=True)
    dispatchers = {(mode, fp8): DeepEPDispatcher(state, **common, deepep_mode=mode, fp8_dispatch=fp8,
                                                 max_dispatch_tokens_per_rank=MAX_TOKENS, buffer=shared)
                   for mode in ("normal", "low_latency", "auto") for fp8 in (False, True)}
    # (scenario, tokens per rank): rank 1 idle in the first; everything to rank 0's slots in the second.
    scenarios = [("random", [MAX_TOKENS, 0, 17, 5]), ("one-rank", [9, 31, 1, 32]), ("random", [200, 120, 3, 64])]
    for scenario, sizes in scenarios:
        x, ids, weights = make_inputs(rank, world, sizes[rank % 4], scenario, dev)
        everyone = [None] * world
        dist.all_gather_object(everyone, (x.cpu(), ids.cpu(), weights.cpu()), group=state.group)
        ref_tokens, ref_handle = reference.dispatch(x, ids, weights, "prefill")
        ref_out = reference.combine(experts(ref_tokens), ref_handle)
        home = home_reference(x, ids, weights)
        fits_ll = max(sizes[r % 4] for r in range(world)) <= MAX_TOKENS
        for (mode, fp8), dispatcher in dispatchers.items():
            for step in ("prefill", "decode"):
                low_latency = mode == "low_latency" or (mode == "auto" and step == "decode")
                if low_latency and not fits_ll:
                    continue
                what = f"{scenario} {sizes} {mode} fp8={fp8} {step}"
                tokens, handle = dispatcher.dispatch(x, ids, weights, step)
                assert tokens.layout == ("masked" if low_latency else "contiguous"), what
                assert (tokens.scales is not None) == fp8, what
                check_rows(tokens, rank, world, everyone, fp8, what)
                out = dispatcher.combine(experts(tokens), handle)
                assert out.shape == x.shape and out.dtype == torch.bfloat16, what
                if fp8:
                    err = rel(out, home)
                    assert err < 5e-2, f"{what}: combine error {err} against the home reference"
                elif low_latency:  # weighted by DeepEP over all k at once: the home reference, up to rounding
                    err = rel(out, home)
                    assert err < 5e-3, f"{what}: combine error {err} against the home reference"
                else:  # the torch backend's sum, term for term
                    assert torch.equal(out, ref_out), f"{what}: differs from the torch backend by {rel(out, ref_out)}"
    # Too many tokens for a low-latency step: refused on every rank before anything is sent.
    x, ids, weights = make_inputs(rank, world, MAX_TOKENS + 1, "random", dev)
    try:
        dispatchers[("low_latency", True)].dispatch(x, ids, weights, "decode")
    except WideepError as err:
        assert "--deepep-max-dispatch-tokens-per-rank" in str(err), err
    else:
        raise AssertionError("a low-latency step over the token limit was not refused")
    x, ids, weights = make_inputs(rank, world, 3, "random", dev)
    low_latency = dispatchers[("low_latency", True)]
    tokens, handle = low_latency.dispatch(x, ids, weights, "decode")  # nothing was posted: still usable
    assert rel(low_latency.combine(experts(tokens), handle), home_reference(x, ids, weights)) < 5e-2
    if dev.type == "cuda":
        torch.cuda.synchronize()
    shared.destroy()
    destroy_parallel(state)
    print(f"rank {rank} ok", flush=True)


if __name__ == "__main__":
    main()
