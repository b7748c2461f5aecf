"""`--plot`: GPU load per layer before and after a plan, as heatmaps, and balancedness per layer.

matplotlib is optional (`pip install matplotlib`, or the `plot` extra); it is imported only when a plot is
asked for, with the non-interactive Agg backend so that it works on machines without a display.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.errors import WideepError
from eplb.stats import atomic_output


def require_matplotlib():
    """Imports matplotlib's pyplot on the Agg backend, or raises a `WideepError` saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise WideepError(
            "--plot needs matplotlib, which is not installed; run `pip install matplotlib` (or install wideep with "
            "the 'plot' extra), or leave out --plot"
        ) from None
    return plt


def plot_plan(
    path: str | Path, gpu_before: torch.Tensor, gpu_after: torch.Tensor, bal_before: torch.Tensor,
    bal_after: torch.Tensor, title: str,
) -> None:
    """Writes a PNG atomically.

    gpu_before, gpu_after: `[L, G]` load per GPU; bal_before, bal_after: `[L]` balancedness. Heatmaps show load
    over the layer's mean GPU load (1.0 = even), on one colour scale so that the two can be compared.
    """
    plt = require_matplotlib()
    mean = gpu_before.mean(1, keepdim=True).clamp_min(1e-12)  # [L, 1]; equal before and after
    rel_before, rel_after = (gpu_before / mean).numpy(), (gpu_after / mean).numpy()
    top = max(float(rel_before.max()), float(rel_after.max()), 1.0)
    layers = gpu_before.shape[0]
    fig, axes = plt.subplots(1, 3, figsize=(15, max(4.0, 0.12 * layers + 2.0)), layout="constrained",
                             gridspec_kw={"width_ratios": [1, 1, 0.8]})
    for ax, data, name, bal in ((axes[0], rel_before, "before (trivial)", bal_before),
                                (axes[1], rel_after, "after", bal_after)):
        image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
        ax.set_title(f"GPU load / mean, {name}\nbalancedness mean {float(bal.mean()):.3f}")
        ax.set_xlabel("GPU")
        ax.set_ylabel("MoE layer")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # GPUs and layers are whole numbers
        ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.colorbar(image, ax=axes[:2], fraction=0.03, label="GPU load / layer mean")
    axes[2].plot(range(layers), bal_before.numpy(), label="before (trivial)", marker=".")
    axes[2].plot(range(layers), bal_after.numpy(), label="after", marker=".")
    axes[2].set_ylim(0, 1.02)
    axes[2].set_xlabel("MoE layer")
    axes[2].set_ylabel("balancedness (mean / max GPU load)")
    axes[2].legend(loc="lower right")
    axes[2].xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    axes[2].grid(alpha=0.3)
    fig.suptitle(title)
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
