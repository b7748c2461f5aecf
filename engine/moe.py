"""The MoE layer: router -> logical ids -> physical slots -> dispatch -> expert GEMMs -> combine, plus shared experts.

The layer only ever computes the expert slots this rank holds; the dispatcher decides where tokens go, so the same
code runs on one process (local dispatcher) and across ranks (torch all-to-all, DeepEP).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine import step_timer
from engine.config import ModelConfig
from engine.layers import FP8_BLOCK, FP8_COMPUTE_DTYPE, MLP, Linear, take
from engine.weights import SCALE_SUFFIX
from eplb.placement import ExpertPlacement, map_random, map_static
from kernels.checks import FP8, HALF
from kernels.grouped_gemm import grouped_mlp
from kernels.router import route
from parallel.dispatcher import Dispatcher


@dataclass
class ExpertWeights:
    """This rank's expert slots: w13 `[E_local, 2I, H]` (gate rows, then up rows), w2 `[E_local, H, I]`, in the
    compute dtype; or, for FP8 checkpoints on GPUs, e4m3 with block scales w13_scale `[E_local, 2I/128, H/128]` and
    w2_scale `[E_local, H/128, I/128]` float32 (the checkpoint's `weight_scale_inv` blocks)."""

    w13: torch.Tensor
    w2: torch.Tensor
    w13_scale: torch.Tensor | None = None
    w2_scale: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.w13, self.w2, self.w13_scale, self.w2_scale) if t is not None]


def stack_experts(weights: MutableMapping[str, torch.Tensor], layer: int, experts: list[int]) -> ExpertWeights:
    """Stacks the local slots' expert weights; `experts[s]` is the logical expert of slot s (an expert may fill
    several slots).

    Each per-expert tensor is copied into place and then dropped from `weights`, so with a lazy mapping (dummy
    weights) a full-size layer never exists twice. FP8 weights stay FP8 when their 128-blocks tile the expert
    exactly (I and H multiples of 128, as in DeepSeek-V3); otherwise they are dequantized.
    """
    p = f"model.layers.{layer}.mlp.experts"
    last_use = {e: s for s, e in enumerate(experts)}
    out: ExpertWeights | None = None
    for s, e in enumerate(experts):
        gate, up, down = (Linear.load(weights, f"{p}.{e}.{proj}") for proj in ("gate_proj", "up_proj", "down_proj"))
        inter, hidden = gate.weight.shape
        fp8 = gate.scale_inv is not None and inter % FP8_BLOCK[0] == 0 and hidden % FP8_BLOCK[0] == 0
        if out is None:
            dtype = gate.weight.dtype if gate.scale_inv is None or fp8 else FP8_COMPUTE_DTYPE
            out = ExpertWeights(gate.weight.new_empty(len(experts), 2 * inter, hidden, dtype=dtype),
                                gate.weight.new_empty(len(experts), hidden, inter, dtype=dtype))
            if fp8:
                out.w13_scale = gate.scale_inv.new_empty(len(experts), 2 * inter // 128, hidden // 128)
                out.w2_scale = gate.scale_inv.new_empty(len(experts), hidden // 128, inter // 128)
        if fp8:
            out.w13[s, :inter].copy_(gate.weight)
            out.w13[s, inter:].copy_(up.weight)
            out.w2[s].copy_(down.weight)
            out.w13_scale[s].copy_(torch.cat([gate.scale_inv, up.scale_inv]))
            out.w2_scale[s].copy_(down.scale_inv)
        else:
            out.w13[s, :inter].copy_(gate.dequantized())
            out.w13[s, inter:].copy_(up.dequantized())
            out.w2[s].copy_(down.dequantized())
        if last_use[e] == s:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                weights.pop(f"{p}.{e}.{proj}.weight", None)
                weights.pop(f"{p}.{e}.{proj}.weight{SCALE_SUFFIX}", None)
    return out


class MoE:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: MutableMapping[str, torch.Tensor],
        layer: int,
        *,
        placement: ExpertPlacement,
        ep_rank: int,
        ep_size: int,
        dispatcher: Dispatcher,
        dispatch_algorithm: str = "static",
    ) -> None:
        p = f"model.layers.{layer}.mlp"
        self.cfg = cfg
        self.moe_index = layer - cfg.first_k_dense_replace
        # The router runs in fp32, as the reference model does: selection is sensitive to rounding.
        self.gate = take(weights, p + ".gate.weight").float()
        self.bias = take(weights, p + ".gate.e_score_correction_bias").float()
        self.set_placement(placement)
        self.recorder = None  # an eplb ExpertLoadRecorder counts routed tokens when attached
        self.dispatch_algorithm = dispatch_algorithm
        # Seeded alike on every rank and device, so --ep-dispatch-algorithm random is reproducible.
        self.generator = torch.Generator(device=self.gate.device).manual_seed(1234 + layer)
        self.ep_size = ep_size
        self.weights = stack_experts(weights, layer, placement.local_experts(self.moe_index, ep_rank, ep_size))
        self.dispatcher = dispatcher
        self.shared = MLP(weights, p + ".shared_experts") if cfg.n_shared_experts else None

    def route(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: `[T, H]` -> (physical slot ids `[T, K]` int64, weights `[T, K]` float32)."""
        c = self.cfg
        logits = F.linear(x.float(), self.gate)
        # One fused Triton kernel on GPUs, the torch reference on the CPU.
        ids, weights = route(logits, self.bias, c.num_experts_per_tok, c.n_group, c.topk_group,
                             c.routed_scaling_factor, c.norm_topk_prob, backend="auto")
        if self.recorder is not None:
            self.recorder.record(self.moe_index, ids)
        if self.redundant:
            if self.dispatch_algorithm == "random":
                ids = map_random(self.placement, self.moe_index, ids, self.generator)
            else:
                ids = map_static(self.placement, self.moe_index, ids, positions)
        return ids, weights

    def set_placement(self, placement: ExpertPlacement) -> None:
        """The (device) placement routing uses from now on; the local slots' weights must already match it."""
        self.placement = placement
        self.redundant = placement.num_slots != placement.num_experts

    def expert_tensors(self) -> list[torch.Tensor]:
        """This rank's expert weights, each `[E_local, ...]`: what a placement change moves between ranks."""
        return self.weights.tensors()

    def triton_experts(self) -> bool:
        """Whether the local expert MLP runs on the Triton grouped GEMMs (no host sync), not the torch reference."""
        return self.weights.w13.is_cuda and self.weights.w13.dtype in (*HALF, FP8)

    def experts(self, tokens, expected_m: int | None = None) -> torch.Tensor:
        """Local expert MLPs over `DispatchedTokens`, answering in the same layout. expected_m: mean rows per
        local slot, to pick tiles and size the grid of the masked layout (whose max_m holds a worst case)."""
        w = self.weights
        # An FP8 dispatch (DeepEP) goes into the FP8 GEMM as it came, 1x128 scales and all; bf16/fp16 experts
        # dequantize it first. Triton grouped GEMMs on CUDA tensors; elsewhere the torch reference.
        return grouped_mlp(tokens.hidden, tokens.tokens_per_expert, tokens.layout, w.w13, w.w2,
                           w13_scale=w.w13_scale, w2_scale=w.w2_scale, hidden_scale=tokens.scales,
                           expected_m=expected_m if tokens.layout == "masked" else None)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, mode: str = "prefill") -> torch.Tensor:
        """x: `[T, H]`, positions: `[T]`; mode: the step's job-wide mode, for the dispatcher -> `[T, H]`."""
        ids, weights = self.route(x, positions)
        # Each span holds both halves (start, then wait): the compute stream's wait is where the communication's
        # time shows.
        with step_timer.scope("dispatch"):
            tokens, handle = self.dispatcher.dispatch(x, ids, weights, mode)
        # Mean rows per slot if every rank sent this many tokens: shapes only, so it holds in a CUDA graph.
        expected_m = max(1, -(-x.shape[0] * self.cfg.num_experts_per_tok * self.ep_size // self.placement.num_slots))
        with step_timer.scope("experts"):
            y = self.experts(tokens, expected_m)
        with step_timer.scope("combine"):
            out = self.dispatcher.combine(y, handle)
        if self.shared is not None:
            out = out + self.shared(x)
        return out
