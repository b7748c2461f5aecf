"""The `deepep` dispatcher: expert parallelism over DeepEP's V1 API (`deep_ep.Buffer`, tag v1.2.1).

DeepEP is not on PyPI; it is imported when this backend is built, and its absence is a `WideepError` pointing to the
README's "DeepEP" section. Shapes: T tokens on this rank, K = top-k, H hidden, L = num_local_slots (slot p lives on
rank p // L), E = L x world slots in all, R rows received in normal mode (one per token per destination rank),
N (received row, local slot) pairs, M = world x max_dispatch_tokens_per_rank rows per slot in the masked layout.

Two kernel families, chosen per step by `--deepep-mode` (`deepep_layout.uses_low_latency`):
- normal (prefill): `get_dispatch_layout` + `dispatch` hand each rank its rows once per token (`[R, H]`, with the
  token's top-k as local slot ids); they are grouped per slot here into the contiguous layout `[N, H]`, exactly as the
  torch backend's receiver does. DeepEP's normal `combine` adds rows *without* weights, so each received row's local
  expert outputs are first weighted and summed in top-k order here (fp32, rounded to bf16); the combine then adds
  those partial sums over ranks in rank order in fp32, the torch backend's sum term for term. Start/wait run on
  DeepEP's communication stream with `async_finish` events; the dispatch blocks the host once, inside DeepEP, for the
  received counts.
- low-latency (decode): `low_latency_dispatch` hands the masked layout `[L, M, H]` (FP8 with per-token 1x128
  scales by default, or bf16) plus counts; `low_latency_combine` applies the top-k weights itself (fp32 over k in
  top-k order, rounded once). Start/wait are the kernel's send and `return_recv_hook` receive halves. No host sync;
  a rank with more than `max_dispatch_tokens_per_rank` tokens is refused with a `WideepError`. Every shape and
  every host value on this path comes from T (a tensor's shape) or the configuration, never from a tensor's
  contents, so decode steps can be captured in CUDA graphs (`engine.cuda_graph`); the one host-side step, cleaning
  the buffer after a multi-node normal step, runs before each replay (`before_graph_replay`).
The handles go back to the caller. The one piece of state kept between calls is the buffer's: whether a multi-node
normal step used the RDMA buffer that low-latency kernels need cleaned (`DeepEPBuffer`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from engine.errors import WideepError
from parallel.deepep_layout import (
    LOW_LATENCY_MAX_TOPK,
    HostInts,
    check_deepep_settings,
    check_low_latency_tokens,
    fold_step_sizes,
    group_received,
    missing_deep_ep_error,
    plan_fold,
    quantize_per_token,
    take_rows,
    uses_low_latency,
)
from parallel.dispatcher import DispatchedTokens, Dispatcher, register_dispatcher


def import_deep_ep() -> Any:
    """The `deep_ep` module, or a `WideepError` saying how to get it."""
    try:
        import deep_ep
    except ImportError as err:
        raise missing_deep_ep_error(err) from None
    return deep_ep


class DeepEPBuffer:
    """One `deep_ep.Buffer` sized from the configuration; dispatchers of that configuration may share it.

    group: the EP process group (every rank builds its buffer at the same time: the constructor is collective).
    hidden_size: H; num_slots: E, expert slots over all ranks; max_dispatch_tokens_per_rank: the low-latency limit.
    normal / low_latency: which kernel families will run (their buffers are sized by DeepEP's size hints).
    """

    def __init__(self, group: dist.ProcessGroup, *, hidden_size: int, num_slots: int,
                 max_dispatch_tokens_per_rank: int, normal: bool, low_latency: bool) -> None:
        deep_ep = import_deep_ep()
        world = group.size()
        self.group = group
        self.hidden_size = hidden_size
        self.num_slots = num_slots
        self.max_dispatch_tokens_per_rank = max_dispatch_tokens_per_rank
        self.normal = normal
        self.low_latency = low_latency
        nvl_bytes = rdma_bytes = 0
        if normal:
            # bf16 rows are the largest that travel (FP8 rows plus their scales are about half).
            hidden_bytes = hidden_size * 2
            for config in (deep_ep.Buffer.get_dispatch_config(world), deep_ep.Buffer.get_combine_config(world)):
                nvl_bytes = max(nvl_bytes, config.get_nvl_buffer_size_hint(hidden_bytes, world))
                rdma_bytes = max(rdma_bytes, config.get_rdma_buffer_size_hint(hidden_bytes, world))
        if low_latency:
            rdma_bytes = max(rdma_bytes, deep_ep.Buffer.get_low_latency_rdma_size_hint(
                max_dispatch_tokens_per_rank, hidden_size, world, num_slots))
        # explicitly_destroy: the destructor would otherwise free the buffers with a cross-rank barrier whenever
        # Python collects it, which hangs once a peer has exited; `destroy()` is called on a clean shutdown.
        self.buffer = deep_ep.Buffer(
            group, nvl_bytes, rdma_bytes, low_latency_mode=low_latency,
            num_qps_per_rank=max(1, num_slots // world) if low_latency else 1, explicitly_destroy=True,
        )
        self._ll_needs_clean = False

    def capture(self) -> Any:
        """A DeepEP event on the current stream, for `previous_event`."""
        return type(self.buffer).capture()

    def after_normal(self) -> None:
        """Across nodes the normal kernels use the RDMA buffer the low-latency kernels expect partly zeroed."""
        if self.low_latency and self.buffer.runtime.get_num_rdma_ranks() > 1:
            self._ll_needs_clean = True

    def before_low_latency(self) -> None:
        """Clean the low-latency buffer if a multi-node normal step dirtied it, on every rank before any peer's next
        low-latency send can land (hence the sync and the barrier). All ranks switch modes at the same step."""
        if not self._ll_needs_clean:
            return
        self.buffer.clean_low_latency_buffer(self.max_dispatch_tokens_per_rank, self.hidden_size, self.num_slots)
        torch.cuda.current_stream().synchronize()
        dist.barrier(group=self.group)
        self._ll_needs_clean = False

    def destroy(self) -> None:
        """Free the buffers; collective (a barrier across ranks inside DeepEP). Safe to call twice."""
        if self.buffer is not None:
            self.buffer.destroy()
            self.buffer = None


@dataclass(frozen=True)
class NormalHandle:
    """What a normal-mode combine needs; returned to the caller.

    deepep: DeepEP's dispatch handle. row: `[R, K]` int64 expert row of each (received row, k), -1 elsewhere.
    weights: `[R, K]` float32 received top-k weights. step_sizes: the fold's step sizes on their way to the host.
    num_rows: N, the rows `y` must have.
    """

    deepep: tuple
    row: torch.Tensor
    weights: torch.Tensor
    step_sizes: HostInts
    num_rows: int


@dataclass(frozen=True)
class LowLatencyHandle:
    """What a low-latency combine needs; returned to the caller.

    deepep: DeepEP's dispatch handle. topk_ids: `[T, K]` int64 and topk_weights: `[T, K]` float32, this rank's
    routing (the combine weights at home). shape: (L, M, H), the masked shape `y` must have.
    """

    deepep: tuple
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    shape: tuple[int, int, int]


@dataclass
class _NormalDispatchPending:
    """A posted normal dispatch (between `dispatch_start` and `dispatch_wait`); tensors live on DeepEP's stream."""

    event: Any
    recv_x: torch.Tensor  # [R, H] bf16 or e4m3
    recv_scales: torch.Tensor | None  # [R, H/128] float32 with FP8 dispatch
    recv_ids: torch.Tensor  # [R, K] int64 local slot ids, -1 elsewhere
    recv_weights: torch.Tensor  # [R, K] float32
    num_pairs: int  # N, from DeepEP's per-slot counts
    deepep: tuple


@dataclass
class _LowLatencyDispatchPending:
    """A low-latency dispatch whose sends are posted; `hook()` receives."""

    hook: Callable[[], None]
    recv: Any  # [L, M, H] bf16, or (e4m3 [L, M, H], float32 scales [L, M, H/128] column-major)
    counts: torch.Tensor  # [L] int32 valid rows per slot
    handle: LowLatencyHandle


@dataclass
class _CombinePending:
    """A posted combine: wait on `event` (normal) or call `hook` (low-latency), then `out` `[T, H]` is ready."""

    out: torch.Tensor
    event: Any = None
    hook: Callable[[], None] | None = None


@register_dispatcher("deepep")
class DeepEPDispatcher(Dispatcher):
    """EP dispatch/combine through DeepEP's normal and low-latency kernels.

    state: this rank's `ParallelState` (its `group` is the EP group) unless `group` is given.
    num_local_slots: L. hidden_size: H. dtype: must be bfloat16 (DeepEP's combine sums bf16 only).
    deepep_mode: auto | normal | low_latency (`--deepep-mode`). fp8_dispatch: tokens travel as e4m3 with 1x128
    scales (`--deepep-fp8-dispatch`), handed to the experts in `DispatchedTokens.scales`.
    max_dispatch_tokens_per_rank: low-latency capacity per rank (`--deepep-max-dispatch-tokens-per-rank`).
    buffer: a `DeepEPBuffer` of this configuration to share (default: one is built, and freed by `close`).
    """

    def __init__(
        self,
        state: Any = None,
        *,
        num_local_slots: int,
        hidden_size: int,
        dtype: torch.dtype,
        deepep_mode: str = "auto",
        fp8_dispatch: bool = True,
        max_dispatch_tokens_per_rank: int = 128,
        group: dist.ProcessGroup | None = None,
        buffer: DeepEPBuffer | None = None,
        **_: Any,
    ) -> None:
        import_deep_ep()  # first: without DeepEP nothing else matters
        self.group = group if group is not None else getattr(state, "group", None)
        if self.group is None:
            if not dist.is_initialized():
                raise WideepError("--moe-a2a-backend deepep needs a process group: build a ParallelState first")
            self.group = dist.group.WORLD
        world = self.group.size()
        if num_local_slots < 1:
            raise WideepError(f"num_local_slots {num_local_slots} must be at least 1")
        num_slots = num_local_slots * world
        check_deepep_settings(world=world, hidden_size=hidden_size, dtype=dtype, deepep_mode=deepep_mode,
                              fp8_dispatch=fp8_dispatch, num_slots=num_slots, max_tokens=max_dispatch_tokens_per_rank)
        self.num_local_slots = num_local_slots
        self.num_slots = num_slots
        self.world_size = world
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.deepep_mode = deepep_mode
        self.fp8_dispatch = fp8_dispatch
        self.max_dispatch_tokens_per_rank = max_dispatch_tokens_per_rank
        normal, low_latency = deepep_mode != "low_latency", deepep_mode != "normal"
        if buffer is None:
            buffer = DeepEPBuffer(self.group, hidden_size=hidden_size, num_slots=num_slots,
                                  max_dispatch_tokens_per_rank=max_dispatch_tokens_per_rank, normal=normal,
                                  low_latency=low_latency)
            self._owns_buffer = True
        else:
            fits = (buffer.hidden_size == hidden_size and buffer.num_slots == num_slots
                    and buffer.max_dispatch_tokens_per_rank == max_dispatch_tokens_per_rank
                    and (buffer.normal or not normal) and (buffer.low_latency or not low_latency))
            if not fits:
                raise ValueError("the shared DeepEPBuffer was sized for another configuration")
            self._owns_buffer = False
        self.buffer = buffer

    def close(self) -> None:
        """Free the DeepEP buffer this dispatcher built (collective: every rank calls it on a clean shutdown)."""
        if self._owns_buffer:
            self.buffer.destroy()

    # ---- CUDA graphs --------------------------------------------------------------------------------------------

    def graph_unsupported(self, mode: str) -> str | None:
        if uses_low_latency(self.deepep_mode, mode):
            return None
        return (f"DeepEP's normal kernels (--deepep-mode {self.deepep_mode} in {mode} steps) read the received "
                "counts on the host")

    @property
    def graph_max_tokens(self) -> int:
        return self.max_dispatch_tokens_per_rank

    def before_graph_replay(self, mode: str) -> None:
        if uses_low_latency(self.deepep_mode, mode):
            self.buffer.before_low_latency()

    def agree_max(self, value: int) -> int:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else "cpu"
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    # ---- dispatch -----------------------------------------------------------------------------------------------

    def dispatch_start(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, mode: str = "prefill"
    ) -> _NormalDispatchPending | _LowLatencyDispatchPending:
        """x: `[T, H]` bf16; topk_ids: `[T, K]` int64 slots in [0, E), -1 = none; topk_weights: `[T, K]` float32.
        mode: the step's job-wide mode ("prefill" / "decode"); with `--deepep-mode auto` it picks the kernels.

        Normal: posts layout and dispatch on DeepEP's stream (the host waits inside DeepEP for the received counts).
        Low-latency: refuses more than `max_dispatch_tokens_per_rank` tokens, then posts the sends.
        """
        self._check_inputs(x, topk_ids, topk_weights)
        topk_ids, topk_weights = topk_ids.contiguous(), topk_weights.contiguous()
        if uses_low_latency(self.deepep_mode, mode):
            return self._low_latency_dispatch_start(x, topk_ids, topk_weights)
        return self._normal_dispatch_start(x, topk_ids, topk_weights)

    def dispatch_wait(self, pending) -> tuple[DispatchedTokens, NormalHandle | LowLatencyHandle]:
        """Normal: contiguous tokens (hidden `[N, H]`, tokens_per_expert `[L]`, scales `[N, H/128]` with FP8).
        Low-latency: masked tokens (hidden `[L, M, H]`, tokens_per_expert `[L]`, scales `[L, M, H/128]` with FP8,
        a column-major view as DeepEP returns it). tokens_per_expert is int64. Returns the handle for combine."""
        if isinstance(pending, _LowLatencyDispatchPending):
            pending.hook()
            hidden, scales = pending.recv if isinstance(pending.recv, tuple) else (pending.recv, None)
            return DispatchedTokens("masked", hidden, pending.counts.to(torch.int64), scales), pending.handle
        pending.event.current_stream_wait()
        src_row, tokens_per_slot, row = group_received(pending.recv_ids, self.num_local_slots, pending.num_pairs)
        hidden = take_rows(pending.recv_x, src_row)
        scales = pending.recv_scales[src_row] if pending.recv_scales is not None else None
        handle = NormalHandle(pending.deepep, row, pending.recv_weights, HostInts.start(fold_step_sizes(row)),
                              pending.num_pairs)
        return DispatchedTokens("contiguous", hidden, tokens_per_slot, scales), handle

    def _normal_dispatch_start(self, x, topk_ids, topk_weights) -> _NormalDispatchPending:
        buf = self.buffer
        send = quantize_per_token(x) if self.fp8_dispatch else x
        previous = buf.capture()  # DeepEP's stream waits for the routing (and the quantization) queued so far
        per_rank, per_rdma_rank, per_slot, in_rank, event = buf.buffer.get_dispatch_layout(
            topk_ids, self.num_slots, previous_event=previous, async_finish=True, allocate_on_comm_stream=True)
        recv_x, recv_ids, recv_weights, counts, deepep_handle, event = buf.buffer.dispatch(
            send, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_slot, topk_idx=topk_ids, topk_weights=topk_weights, previous_event=event,
            async_finish=True, allocate_on_comm_stream=True)
        buf.after_normal()
        recv_x, recv_scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
        return _NormalDispatchPending(event, recv_x, recv_scales, recv_ids, recv_weights, sum(counts), deepep_handle)

    def _low_latency_dispatch_start(self, x, topk_ids, topk_weights) -> _LowLatencyDispatchPending:
        check_low_latency_tokens(x.shape[0], self.max_dispatch_tokens_per_rank)
        if topk_ids.shape[1] > LOW_LATENCY_MAX_TOPK:
            raise WideepError(f"DeepEP's low-latency kernels take at most {LOW_LATENCY_MAX_TOPK} experts per token, "
                              f"not {topk_ids.shape[1]}; use --deepep-mode normal")
        self.buffer.before_low_latency()
        recv, counts, deepep_handle, _, hook = self.buffer.buffer.low_latency_dispatch(
            x, topk_ids, self.max_dispatch_tokens_per_rank, self.num_slots, use_fp8=self.fp8_dispatch,
            async_finish=False, return_recv_hook=True)
        shape = (self.num_local_slots, self.world_size * self.max_dispatch_tokens_per_rank, self.hidden_size)
        return _LowLatencyDispatchPending(hook, recv, counts,
                                          LowLatencyHandle(deepep_handle, topk_ids, topk_weights, shape))

    # ---- combine ------------------------------------------------------------------------------------------------

    def combine_start(self, y: torch.Tensor, handle: NormalHandle | LowLatencyHandle) -> _CombinePending:
        """y: the expert outputs in bf16, row for row with the dispatched tokens: `[N, H]` (normal) or `[L, M, H]`
        (low-latency; rows past each slot's count are ignored). Posts the return."""
        if isinstance(handle, LowLatencyHandle):
            self._check_y(y, handle.shape)
            out, _, hook = self.buffer.buffer.low_latency_combine(
                y.contiguous(), handle.topk_ids, handle.topk_weights, handle.deepep, async_finish=False,
                return_recv_hook=True)
            return _CombinePending(out, hook=hook)
        self._check_y(y, (handle.num_rows, self.hidden_size))
        # The weighted top-k sum happens here because DeepEP's normal combine adds rows without weights.
        partial = plan_fold(handle.row, handle.weights, handle.step_sizes.get()).apply(y)  # [R, H]
        buf = self.buffer
        out, _, event = buf.buffer.combine(partial, handle.deepep, previous_event=buf.capture(),
                                           async_finish=True, allocate_on_comm_stream=True)
        buf.after_normal()
        return _CombinePending(out, event=event)

    def combine_wait(self, pending: _CombinePending) -> torch.Tensor:
        """Returns `[T, H]` bf16: each token's expert outputs, weighted and summed."""
        if pending.hook is not None:
            pending.hook()
        else:
            pending.event.current_stream_wait()
        return pending.out

    # ---- checks -------------------------------------------------------------------------------------------------

    def _check_inputs(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.hidden_size or x.dtype != self.dtype or not x.is_contiguous():
            raise WideepError(f"dispatch got x {tuple(x.shape)} {x.dtype}; expected contiguous [T, {self.hidden_size}]"
                              f" {self.dtype}")
        if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_ids.dtype != torch.int64:
            raise WideepError(f"dispatch got topk_ids {tuple(topk_ids.shape)} {topk_ids.dtype}; expected [T, K] int64")
        if topk_weights.shape != topk_ids.shape or topk_weights.dtype != torch.float32:
            raise WideepError(f"dispatch got topk_weights {tuple(topk_weights.shape)} {topk_weights.dtype}; expected "
                              f"{tuple(topk_ids.shape)} float32")

    def _check_y(self, y: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(y.shape) != tuple(shape) or y.dtype != torch.bfloat16:
            raise WideepError(f"combine got y {tuple(y.shape)} {y.dtype}; expected {list(shape)} bfloat16")

