"""A CPU stand-in for DeepEP's V1 `deep_ep` module, so `parallel.deepep` runs in CI without GPUs.

Only the calls `parallel.deepep` makes, with the results DeepEP v1.2.1's docstrings and kernels give them (shapes,
dtypes, received order, -1 handling, what is weighted where), moved between ranks with `all_to_all_single` on gloo.
Low-latency results are filled in only when the receive hook runs, as with `return_recv_hook=True`, so a dispatcher
that forgets the hook reads garbage. The real kernels are checked on GPUs by tests/parallel/test_gpu_deepep.py.
Shapes: T tokens, K top-k, H hidden, W ranks, L local experts, M = W x max tokens per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

_NORMAL_WORLDS = (2, 4, 8, 16, 24, 32, 64, 128, 144, 160)
_LL_HIDDEN = (2048, 2560, 4096, 5120, 6144, 7168, 8192)


class Config:
    """Tuning parameters; the size hints are only checked to be asked for."""

    def __init__(self, num_sms: int = 20, *chunks: int) -> None:
        self.num_sms, self.chunks = num_sms, chunks

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 1 << 20

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 0


class EventOverlap:
    """Work here is done when the call returns; waiting is a no-op."""

    def current_stream_wait(self) -> None:
        pass


class _Runtime:
    def get_num_rdma_ranks(self) -> int:
        return 1


def _exchange(group, rows: torch.Tensor, send_splits: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Rows `[S, ...]` grouped by destination rank -> the rows received `[R, ...]`, grouped by source rank."""
    world = group.size()
    counts = torch.tensor(send_splits, dtype=torch.int64)
    recv_counts = torch.empty(world, dtype=torch.int64)
    dist.all_to_all_single(recv_counts, counts, group=group)
    recv_splits = recv_counts.tolist()
    as_bytes = rows.dtype == torch.float8_e4m3fn  # gloo moves bytes, not e4m3
    send = rows.view(torch.uint8) if as_bytes else rows
    recv = send.new_empty(sum(recv_splits), *rows.shape[1:])
    dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=group)
    return (recv.view(torch.float8_e4m3fn) if as_bytes else recv), recv_splits


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t, h = x.shape
    groups = x.float().view(t, h // 128, 128)
    amax = groups.abs().amax(-1).clamp(min=1e-4)
    return (groups * (448.0 / amax).unsqueeze(-1)).to(torch.float8_e4m3fn).view(t, h), amax / 448.0


@dataclass
class _NormalHandle:
    send_token: torch.Tensor  # [S] token of each sent row, by destination rank then token
    send_splits: list[int]
    recv_splits: list[int]
    num_tokens: int


class Buffer:
    num_sms = 20

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True,
                 allow_mnnvl: bool = False, explicitly_destroy: bool = False, comm=None) -> None:
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self.runtime = _Runtime()
        self.destroyed = False
        dist.barrier(group=group)  # the real constructor is collective too

    @staticmethod
    def capture() -> EventOverlap:
        return EventOverlap()

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        assert num_ranks in _NORMAL_WORLDS, f"Unsupported number of EP ranks: {num_ranks}"
        return Config()

    get_combine_config = get_dispatch_config

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        return 2 * num_ranks * num_max_dispatch_tokens_per_rank * (hidden * 2 + 16)

    def destroy(self) -> None:
        assert self.explicitly_destroy and not self.destroyed
        dist.barrier(group=self.group)
        self.destroyed = True

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        assert self.low_latency_mode

    # ---- normal ----

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        assert topk_idx.dtype == torch.int64 and topk_idx.dim() == 2 and topk_idx.is_contiguous()
        assert not allocate_on_comm_stream or (previous_event is not None and async_finish)
        w = self.group_size
        local = num_experts // w
        dest = torch.where(topk_idx >= 0, topk_idx // local, w)
        in_rank = torch.zeros(topk_idx.shape[0], w + 1, dtype=torch.bool).scatter_(1, dest, True)[:, :w]
        per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).int()
        return in_rank.sum(0).int(), None, per_expert, in_rank.contiguous(), EventOverlap()

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None, topk_idx=None, topk_weights=None,
                 expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None, async_finish=False,
                 allocate_on_comm_stream=False):
        assert handle is None and topk_idx is not None and num_worst_tokens == 0
        assert not allocate_on_comm_stream or (previous_event is not None and async_finish)
        x, scales = x if isinstance(x, tuple) else (x, None)
        assert x.is_contiguous() and (x.shape[1] * x.element_size()) % 16 == 0
        assert scales is None or (x.element_size() == 1 and scales.dtype == torch.float32)
        assert topk_weights.dtype == torch.float32
        w = self.group_size
        local = num_tokens_per_expert.numel() // w
        pairs = is_token_in_rank.t().nonzero()  # (destination rank, token): by rank, then token
        dest, token = pairs[:, 0], pairs[:, 1]
        splits = torch.bincount(dest, minlength=w).tolist()
        ids = topk_idx[token] - dest.unsqueeze(1) * local
        mine = (topk_idx[token] >= 0) & (ids >= 0) & (ids < local)
        recv_x, recv_splits = _exchange(self.group, x[token], splits)
        recv_scales = _exchange(self.group, scales[token], splits)[0] if scales is not None else None
        recv_ids = _exchange(self.group, torch.where(mine, ids, -1), splits)[0]
        recv_weights = _exchange(self.group, torch.where(mine, topk_weights[token], 0.0), splits)[0]
        counts = [int((recv_ids == e).sum()) for e in range(local)]
        out_x = (recv_x, recv_scales) if scales is not None else recv_x
        return (out_x, recv_ids, recv_weights, counts, _NormalHandle(token, splits, recv_splits, x.shape[0]),
                EventOverlap())

    def combine(self, x, handle, topk_weights=None, bias=None, config=None, previous_event=None, async_finish=False,
                allocate_on_comm_stream=False):
        assert x.dtype == torch.bfloat16 and x.shape[0] == sum(handle.recv_splits), "Unsupported type"
        assert not allocate_on_comm_stream or (previous_event is not None and async_finish)
        back, _ = _exchange(self.group, x, handle.recv_splits)  # [S, H], by destination rank, then token
        out = torch.zeros(handle.num_tokens, x.shape[1], dtype=torch.float32)
        start = 0
        for n in handle.send_splits:  # rank order, unweighted, fp32, as the kernel adds them
            out[handle.send_token[start:start + n]] += back[start:start + n].float()
            start += n
        return out.to(torch.bfloat16), None, EventOverlap()

    # ---- low latency ----

    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8=True, round_scale=False, use_ue8m0=False, async_finish=False,
                             return_recv_hook=False):
        assert self.low_latency_mode and not (async_finish and return_recv_hook)
        assert x.dtype == torch.bfloat16 and x.is_contiguous() and x.shape[1] in _LL_HIDDEN
        assert x.shape[0] <= num_max_dispatch_tokens_per_rank and topk_idx.dtype == torch.int64
        w, h = self.group_size, x.shape[1]
        local, m = num_experts // w, w * num_max_dispatch_tokens_per_rank
        packed = torch.full((local, m, h), float("nan")).to(torch.float8_e4m3fn if use_fp8 else torch.bfloat16)
        scales = torch.full((local, h // 128, m), float("nan")).transpose(1, 2) if use_fp8 else None
        count = torch.full((local,), -1, dtype=torch.int32)
        src_info = torch.full((local, m), -1, dtype=torch.int32)
        layout_range = torch.zeros(local, w, dtype=torch.int64)

        def receive() -> None:
            flat = topk_idx.reshape(-1)
            pick = (flat >= 0).nonzero().squeeze(1)
            expert, token = flat[pick], pick // topk_idx.shape[1]
            order = torch.argsort(expert, stable=True)  # by destination rank, then expert, then token
            expert, token = expert[order], token[order]
            splits = torch.bincount(expert // local, minlength=w).tolist()
            rows = x[token]
            got_e, recv_splits = _exchange(self.group, expert % local, splits)
            got_t = _exchange(self.group, token, splits)[0]
            if use_fp8:
                q, s = _quantize(rows)
                got_x, got_s = _exchange(self.group, q, splits)[0], _exchange(self.group, s, splits)[0]
            else:
                got_x, got_s = _exchange(self.group, rows, splits)[0], None
            src = torch.repeat_interleave(torch.arange(w), torch.tensor(recv_splits))
            for e in range(local):
                n = 0
                for j in range(w):  # rows of each expert grouped by source rank, as layout_range describes
                    sel = ((got_e == e) & (src == j)).nonzero().squeeze(1)
                    packed[e, n:n + sel.numel()] = got_x[sel]
                    if got_s is not None:
                        scales[e, n:n + sel.numel()] = got_s[sel]
                    src_info[e, n:n + sel.numel()] = got_t[sel].int()
                    layout_range[e, j] = (n << 32) | sel.numel()
                    n += sel.numel()
                count[e] = n

        handle = (src_info, layout_range, num_max_dispatch_tokens_per_rank, h, num_experts)
        if not return_recv_hook:
            receive()
        recv = (packed, scales) if use_fp8 else packed
        return recv, count, handle, EventOverlap(), (receive if return_recv_hook else None)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False,
                            async_finish=False, return_recv_hook=False, out=None, combine_wait_recv_cost_stats=None):
        src_info, layout_range, max_tokens, h, num_experts = handle
        w = self.group_size
        local = num_experts // w
        assert x.dtype == torch.bfloat16 and tuple(x.shape) == (local, w * max_tokens, h)
        combined = torch.full((topk_idx.shape[0], h), float("nan"), dtype=torch.bfloat16)

        def receive() -> None:
            rows, tokens, experts, splits = [], [], [], []
            for j in range(w):
                n = 0
                for e in range(local):
                    begin, num = int(layout_range[e, j]) >> 32, int(layout_range[e, j]) & 0xFFFFFFFF
                    rows.append(x[e, begin:begin + num])
                    tokens.append(src_info[e, begin:begin + num].long())
                    experts.append(torch.full((num,), self.rank * local + e, dtype=torch.int64))
                    n += num
                splits.append(n)
            got_x, _ = _exchange(self.group, torch.cat(rows), splits)
            got_t = _exchange(self.group, torch.cat(tokens), splits)[0]
            got_e = _exchange(self.group, torch.cat(experts), splits)[0]
            acc = torch.zeros(topk_idx.shape[0], h, dtype=torch.float32)
            for k in range(topk_idx.shape[1]):  # weighted, in top-k order, fp32, rounded once
                for i in range(got_t.numel()):
                    t = int(got_t[i])
                    if int(topk_idx[t, k]) == int(got_e[i]):
                        acc[t] += topk_weights[t, k] * got_x[i].float()
            combined.copy_(acc.to(torch.bfloat16))

        if not return_recv_hook:
            receive()
        return combined, EventOverlap(), (receive if return_recv_hook else None)
