"""The bookkeeping around DeepEP's kernels that needs no DeepEP: settings checks, FP8 rows, grouping and folds.

Pure torch on any device, so every piece is tested on the CPU; `parallel.deepep` calls these around the kernels.
Shapes: T tokens on this rank, K = top-k, H hidden, L = expert slots on this rank, R rows received by this rank in
normal mode (one per token per destination rank), N (received row, local slot) pairs (the rows the experts compute),
M rows per slot in the masked layout (low-latency mode: world x `--deepep-max-dispatch-tokens-per-rank`).

Facts about DeepEP used here are those of its V1 API, tag v1.2.1 (see `parallel.deepep`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import WideepError
from parallel.config import DEEPEP_MODES
from parallel.dispatcher import DispatchedTokens
from parallel.torch_a2a import SegmentSum, _group_by_slot, _plan_segment_sum

# EP sizes with a tuned normal-mode config (`Buffer.get_dispatch_config`): 2, 4, 8 over NVLink within a node, the
# multiples of 8 across nodes.
NORMAL_WORLD_SIZES = (2, 4, 8, 16, 24, 32, 64, 128, 144, 160)
# Hidden sizes the low-latency kernels are compiled for (csrc/kernels/launch.cuh, SWITCH_HIDDEN).
LOW_LATENCY_HIDDEN_SIZES = (2048, 2560, 4096, 5120, 6144, 7168, 8192)
LOW_LATENCY_MAX_TOPK = 11
FP8_GROUP = 128  # channels per scale: DeepEP's FP8 rows carry one float32 scale per 128 channels of a token
FP8_MAX = 448.0  # largest finite e4m3 value
README_HINT = "see the README's \"DeepEP\" section"


def missing_deep_ep_error(cause: BaseException) -> WideepError:
    """The error for `--moe-a2a-backend deepep` when `import deep_ep` fails (cause: that ImportError)."""
    return WideepError(
        f"--moe-a2a-backend deepep needs DeepEP's V1 API (the deep_ep module), which could not be imported ({cause}). "
        "It is not on PyPI (the 'deep-ep' package there is an incomplete source drop): build it from "
        "github.com/deepseek-ai/DeepEP at tag v1.2.1 against the nvidia-nvshmem wheel; " + README_HINT
        + ". Or use --moe-a2a-backend torch."
    )


def uses_low_latency(deepep_mode: str, step_mode: str) -> bool:
    """Whether a step runs DeepEP's low-latency kernels: `--deepep-mode` low_latency always, normal never, auto for
    decode steps (`step_mode`, the job-wide mode every rank agreed on, so all ranks choose alike)."""
    if deepep_mode not in DEEPEP_MODES:
        raise WideepError(f"--deepep-mode {deepep_mode!r}: choose one of {', '.join(DEEPEP_MODES)}")
    if step_mode not in ("prefill", "decode"):
        raise ValueError(f"step mode {step_mode!r} is neither 'prefill' nor 'decode'")
    return deepep_mode == "low_latency" or (deepep_mode == "auto" and step_mode == "decode")


def check_low_latency_tokens(num_tokens: int, max_tokens: int) -> None:
    """Low-latency buffers hold `max_tokens` per rank; more would be cut off, so they are refused, naming the flag."""
    if num_tokens > max_tokens:
        raise WideepError(
            f"this rank has {num_tokens} tokens in a DeepEP low-latency step, more than "
            f"--deepep-max-dispatch-tokens-per-rank {max_tokens}; raise that flag to at least {num_tokens} (every rank "
            "must use the same value), or lower --max-running-requests, or use --deepep-mode auto so that prefill "
            "steps run the normal kernels"
        )


def check_deepep_settings(
    *, world: int, hidden_size: int, dtype: torch.dtype, deepep_mode: str, fp8_dispatch: bool, num_slots: int,
    max_tokens: int,
) -> None:
    """Refuse, before any buffer is allocated, what DeepEP v1.2.1's kernels cannot run; each message names the flag.

    world: EP ranks; num_slots: expert slots over all ranks; max_tokens: `--deepep-max-dispatch-tokens-per-rank`.
    """
    if deepep_mode not in DEEPEP_MODES:
        raise WideepError(f"--deepep-mode {deepep_mode!r}: choose one of {', '.join(DEEPEP_MODES)}")
    if dtype != torch.bfloat16:
        raise WideepError(
            f"--moe-a2a-backend deepep moves bfloat16 activations (its combine kernels sum bfloat16 only), but the "
            f"model runs in {dtype}; use --dtype bfloat16, or --moe-a2a-backend torch"
        )
    if num_slots % world:
        raise WideepError(f"{num_slots} expert slots do not split over {world} ranks (--ep-size)")
    normal = deepep_mode in ("auto", "normal")
    low_latency = deepep_mode in ("auto", "low_latency")
    if normal and world not in NORMAL_WORLD_SIZES:
        raise WideepError(
            f"DeepEP's normal kernels (--deepep-mode {deepep_mode}) run on {', '.join(map(str, NORMAL_WORLD_SIZES))} "
            f"ranks, not --ep-size {world}; use --moe-a2a-backend torch"
        )
    if low_latency and (world < 2 or (world > 8 and world % 8)):
        raise WideepError(
            f"DeepEP's low-latency kernels (--deepep-mode {deepep_mode}) need 2 to 8 ranks or a multiple of 8, not "
            f"--ep-size {world}; use --moe-a2a-backend torch"
        )
    if hidden_size % 8:
        raise WideepError(f"DeepEP moves rows in 16-byte pieces: hidden size {hidden_size} must be a multiple of 8")
    if low_latency and hidden_size not in LOW_LATENCY_HIDDEN_SIZES:
        raise WideepError(
            f"DeepEP v1.2.1's low-latency kernels are built for hidden sizes {LOW_LATENCY_HIDDEN_SIZES}, not "
            f"{hidden_size}; use --deepep-mode normal (or --moe-a2a-backend torch)"
        )
    if fp8_dispatch and hidden_size % FP8_GROUP:
        raise WideepError(
            f"FP8 dispatch scales every {FP8_GROUP} channels: hidden size {hidden_size} is not a multiple of "
            f"{FP8_GROUP}; pass --no-deepep-fp8-dispatch"
        )
    if max_tokens < 1 or (world * max_tokens) % 4:
        raise WideepError(
            f"--deepep-max-dispatch-tokens-per-rank {max_tokens}: must be at least 1, and times --ep-size {world} a "
            "multiple of 4 (DeepEP's low-latency layout)"
        )


# ---- FP8 rows -------------------------------------------------------------------------------------------------------


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: `[T, H]` (H a multiple of 128) -> (e4m3 `[T, H]`, float32 scales `[T, H/128]`), x ~= q * scale.

    The scaling of DeepEP's own FP8 dispatch (amax / 448 per 128 channels, amax floored at 1e-4), done here for the
    normal-mode kernels, which move FP8 rows but do not make them.
    """
    t, h = x.shape
    groups = x.float().view(t, h // FP8_GROUP, FP8_GROUP)
    amax = groups.abs().amax(dim=-1).clamp(min=1e-4)  # [T, H/128]
    q = (groups * (FP8_MAX / amax).unsqueeze(-1)).to(torch.float8_e4m3fn).view(t, h)
    return q, amax / FP8_MAX


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q: `[..., H]` e4m3; scales: `[..., H/128]` float32 (any strides, e.g. DeepEP's column-major low-latency
    scales) -> `[..., H]` in `dtype`, formed in fp32."""
    *lead, h = q.shape
    groups = q.float().view(*lead, h // FP8_GROUP, FP8_GROUP) * scales.float().unsqueeze(-1)
    return groups.view(*lead, h).to(dtype)


def dequantize_tokens(tokens: DispatchedTokens, dtype: torch.dtype = torch.bfloat16) -> DispatchedTokens:
    """The same tokens with `hidden` in `dtype` and no scales, for expert MLPs that take bf16 rows.

    Tokens without scales come back unchanged. Masked rows past a slot's count are dequantized too (garbage in,
    garbage out; the expert MLPs read only the valid rows).
    """
    if tokens.scales is None:
        return tokens
    hidden = dequantize_rows(tokens.hidden, tokens.scales, dtype)
    return DispatchedTokens(tokens.layout, hidden, tokens.tokens_per_expert)


# ---- normal mode: received rows -> contiguous slots, and the fold back ----------------------------------------------


def group_received(
    local_ids: torch.Tensor, num_slots: int, num_pairs: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group DeepEP's received rows by local slot: the contiguous layout, exactly as the torch backend's receiver.

    local_ids: `[R, K]` int64, DeepEP's `recv_topk_idx` (local slot ids, -1 where that k lives elsewhere).
    num_pairs: N, the local (row, k) pairs, known on the host from DeepEP's per-expert counts (no device sync).
    Returns (src_row `[N]` int64 received row of each expert row, ordered by slot then (row, k);
    tokens_per_slot `[L]` int64; row `[R, K]` int64, the expert row of each (received row, k), -1 elsewhere).
    """
    return _group_by_slot(local_ids, num_slots, num_pairs)


def fold_step_sizes(row: torch.Tensor) -> torch.Tensor:
    """row: `[R, K]` from `group_received` -> `[K]` int64 on row's device: received rows with more than j local
    entries. The host needs these to size the fold's steps (`plan_fold`)."""
    depth = (row >= 0).sum(1)  # [R]
    return (depth.unsqueeze(1) > torch.arange(row.shape[1], device=row.device)).sum(0)


def plan_fold(row: torch.Tensor, weights: torch.Tensor, step_sizes: list[int]) -> SegmentSum:
    """The receiver's fold: `partial[r] = sum_k weights[r, k] * y[row[r, k]]` over local k, in top-k order.

    row: `[R, K]` from `group_received`; weights: `[R, K]` float32, DeepEP's `recv_topk_weights`;
    step_sizes: `fold_step_sizes(row)` on the host. Apply to the expert outputs `[N, H]` -> `[R, H]` in their dtype
    (fp32 accumulation). DeepEP's normal combine then adds the partial sums over ranks without weights, in rank
    order, in fp32: the torch backend's sum, term for term.
    """
    flat = row.reshape(-1)
    num_pairs = sum(step_sizes)
    pairs = torch.nonzero_static(flat >= 0, size=num_pairs).squeeze(1)  # [N] flat (row, k), k order within a row
    return _plan_segment_sum(flat[pairs], (row >= 0).sum(1), step_sizes, weights.reshape(-1)[pairs])


@dataclass
class HostInts:
    """A small integer vector on its way to the host: the copy is posted at once, `get()` waits only for it.

    On CUDA the copy goes to pinned memory behind an event, so the caller can queue more GPU work (the experts)
    before it needs the numbers; elsewhere it is a plain copy.
    """

    host: torch.Tensor
    event: torch.cuda.Event | None = None

    @classmethod
    def start(cls, values: torch.Tensor) -> HostInts:
        if values.device.type != "cuda":
            return cls(values.cpu())
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(host, event)

    def get(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


# ---- masked <-> contiguous ------------------------------------------------------------------------------------------


def masked_to_contiguous(tokens: DispatchedTokens) -> DispatchedTokens:
    """Masked tokens (hidden `[L, M, H]`, first `tokens_per_expert[e]` rows valid) -> contiguous (`[N, H]`, slot
    order, rows kept in their order within a slot); scales follow. Reads the counts on the host (one sync)."""
    if tokens.layout != "masked":
        raise ValueError(f"expected masked tokens, got {tokens.layout}")
    counts = tokens.tokens_per_expert.to(torch.int64)
    _, m, _ = tokens.hidden.shape
    valid = torch.arange(m, device=counts.device) < counts.unsqueeze(1)  # [L, M]
    scales = tokens.scales[valid] if tokens.scales is not None else None
    return DispatchedTokens("contiguous", _from_bytes(_as_bytes(tokens.hidden)[valid], tokens.hidden.dtype), counts,
                            scales)


def contiguous_to_masked(tokens: DispatchedTokens, max_m: int) -> DispatchedTokens:
    """Contiguous tokens (`[N, H]` grouped by slot) -> masked (`[L, max_m, H]`, zeros past each slot's count)."""
    if tokens.layout != "contiguous":
        raise ValueError(f"expected contiguous tokens, got {tokens.layout}")
    counts = tokens.tokens_per_expert.to(torch.int64)
    most = int(counts.max()) if counts.numel() else 0
    if most > max_m:
        raise ValueError(f"a slot has {most} rows, more than max_m = {max_m}")
    slots = counts.numel()
    slot = torch.repeat_interleave(torch.arange(slots, device=counts.device), counts)  # [N]
    first = torch.cumsum(counts, 0) - counts  # [L] first row of each slot
    pos = torch.arange(slot.numel(), device=counts.device) - first[slot]  # [N] row within its slot

    def place(rows: torch.Tensor) -> torch.Tensor:
        out = _as_bytes(rows).new_zeros(slots, max_m, *rows.shape[1:])
        out[slot, pos] = _as_bytes(rows)
        return _from_bytes(out, rows.dtype)

    scales = place(tokens.scales) if tokens.scales is not None else None
    return DispatchedTokens("masked", place(tokens.hidden), counts, scales)


def take_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`rows[index]` for any dtype (e4m3 rows are gathered as their bytes)."""
    return _from_bytes(_as_bytes(rows)[index], rows.dtype)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """e4m3 tensors viewed as uint8, so that indexing needs no float8 kernels; other dtypes unchanged."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _from_bytes(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.view(dtype) if dtype == torch.float8_e4m3fn else t
