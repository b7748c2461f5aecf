"""Expert-load recording: tokens routed to each logical expert of each MoE layer, counted on the device.

Counting is a `scatter_add_` into a device buffer per MoE layer per step: no host synchronisation per step. The
counts of the last `window` steps are kept in a ring, so a rebalance sees recent load only.

Modes (`--expert-distribution-recorder-mode`):
- `stat`: the ring holds one row per step and `logical_count` dumps their sum, `[1, layers, experts]`;
- `per_pass`: the dump keeps every step of the window, `[steps, layers, experts]`, oldest first.
"""

from __future__ import annotations

import torch

from engine.errors import WideepError

MODES = ("stat", "per_pass")


class ExpertLoadRecorder:
    """counts: `[window + 1, L, E]` int64 on `device`, a ring: row `self._row` is the step being recorded, the
    `window` rows before it the closed steps kept."""

    def __init__(self, num_layers: int, num_experts: int, window: int, mode: str = "stat",
                 device: torch.device | str = "cpu") -> None:
        if mode not in MODES:
            raise WideepError(f"--expert-distribution-recorder-mode {mode!r}: choose one of {', '.join(MODES)}")
        if window < 1:
            raise WideepError(f"the expert-load window must hold at least one step, found {window}")
        self.mode = mode
        self.window = window
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.counts = torch.zeros(window + 1, num_layers, num_experts, dtype=torch.int64, device=device)
        self._row = 0
        self.steps = 0  # steps ended so far (the ring holds the last min(steps, window) of them)

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """topk_ids: `[T, K]` int64 logical expert ids of this step's tokens on this rank (-1 = none)."""
        ids = topk_ids.reshape(-1)
        valid = ids >= 0
        self.counts[self._row, layer].scatter_add_(0, ids.clamp(min=0), valid.to(torch.int64))

    def end_step(self) -> None:
        """Closes the current step's row and opens the next (clearing the oldest once the ring is full)."""
        self.steps += 1
        self._row = (self._row + 1) % (self.window + 1)
        self.counts[self._row].zero_()

    def _ordered_rows(self) -> torch.Tensor:
        """`[n, L, E]` the closed steps in the ring, oldest first (n = min(steps, window))."""
        n = min(self.steps, self.window)
        order = [(self._row - n + i) % (self.window + 1) for i in range(n)]
        return self.counts[order]

    def window_load(self) -> torch.Tensor:
        """`[L, E]` int64 tokens per expert over the closed steps of the window, on this rank."""
        return self._ordered_rows().sum(0)

    def logical_count(self) -> torch.Tensor:
        """What a dump holds for this rank: `[1, L, E]` (stat) or `[steps, L, E]` (per_pass), on the CPU."""
        rows = self._ordered_rows()
        return (rows.sum(0, keepdim=True) if self.mode == "stat" else rows).cpu()

    def reset(self) -> None:
        self.counts.zero_()
        self._row = 0
        self.steps = 0
