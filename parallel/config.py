"""The parallel command-line flags (SGLang's names) and the validated settings they become.

`add_parallel_args(parser)` is for entry points only; domain code receives a `ParallelConfig` (or the
`ParallelState` built from it), never the argparse namespace.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from engine.errors import WideepError
from parallel.launch import parse_dist_init_addr

A2A_BACKENDS = ("local", "torch", "deepep")
DEEPEP_MODES = ("auto", "normal", "low_latency")
DEFAULT_DIST_TIMEOUT_S = 300.0
DEFAULT_DEEPEP_MAX_DISPATCH_TOKENS_PER_RANK = 128  # SGLang's default


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    """Add `--tp-size --dp-size --ep-size --enable-dp-attention --nnodes --node-rank --dist-init-addr
    --dist-timeout --moe-a2a-backend --deepep-mode --deepep-max-dispatch-tokens-per-rank --deepep-fp8-dispatch`
    in an argument group of their own."""
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tp-size", type=int, default=None,
                   help="GPUs serving the model, as in SGLang; wideep runs DP attention, so it equals --ep-size")
    g.add_argument("--dp-size", type=int, default=None,
                   help="data-parallel attention ranks (default: --ep-size with --enable-dp-attention, else 1)")
    g.add_argument("--ep-size", type=int, default=1, help="expert-parallel ranks; must equal the launched world size")
    g.add_argument("--enable-dp-attention", action="store_true",
                   help="every rank runs attention on its own requests (needed for --ep-size > 1)")
    g.add_argument("--nnodes", type=int, default=None, help="nodes in the job (launches without torchrun/srun/mpirun)")
    g.add_argument("--node-rank", type=int, default=None, help="this node's index, 0 to nnodes-1")
    g.add_argument("--dist-init-addr", default=None, metavar="HOST:PORT",
                   help="rendezvous address on node 0 (default: from torchrun, Slurm or MPI)")
    g.add_argument("--dist-timeout", type=float, default=DEFAULT_DIST_TIMEOUT_S, metavar="SECONDS",
                   help="a collective or step waiting longer than this ends every rank with a message naming the "
                        f"missing rank (default {DEFAULT_DIST_TIMEOUT_S:g})")
    g.add_argument("--moe-a2a-backend", choices=A2A_BACKENDS, default=None,
                   help="token dispatcher (default: local for one rank, torch otherwise)")
    g.add_argument("--deepep-mode", choices=DEEPEP_MODES, default="auto",
                   help="DeepEP kernels: normal (prefill), low_latency (decode), auto (per step)")
    g.add_argument("--deepep-max-dispatch-tokens-per-rank", type=int, metavar="N",
                   default=DEFAULT_DEEPEP_MAX_DISPATCH_TOKENS_PER_RANK,
                   help="tokens a rank may send in one DeepEP low-latency step; sizes its buffers, the same on every "
                        f"rank (default {DEFAULT_DEEPEP_MAX_DISPATCH_TOKENS_PER_RANK})")
    g.add_argument("--deepep-fp8-dispatch", action=argparse.BooleanOptionalAction, default=True,
                   help="DeepEP dispatch sends tokens as FP8 with one scale per 128 channels (default on)")


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel settings, validated once; messages name the flag to change.

    ep_size: ranks sharing the routed experts (the whole world for now). dp_size/tp_size: derived when not given.
    dist_timeout: seconds, for the process group and the watchdog.
    """

    ep_size: int = 1
    tp_size: int | None = None
    dp_size: int | None = None
    enable_dp_attention: bool = False
    nnodes: int | None = None
    node_rank: int | None = None
    dist_init_addr: str | None = None
    dist_timeout: float = DEFAULT_DIST_TIMEOUT_S
    moe_a2a_backend: str | None = None
    deepep_mode: str = "auto"
    deepep_max_dispatch_tokens_per_rank: int = DEFAULT_DEEPEP_MAX_DISPATCH_TOKENS_PER_RANK
    deepep_fp8_dispatch: bool = True

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise WideepError(f"--ep-size {self.ep_size} must be at least 1")
        if self.ep_size > 1 and not self.enable_dp_attention:
            raise WideepError(
                f"--ep-size {self.ep_size} needs --enable-dp-attention: wideep runs attention data-parallel on "
                "every rank (tensor-parallel attention is not supported)"
            )
        if self.tp_size is not None and self.tp_size != self.ep_size:
            raise WideepError(
                f"--tp-size {self.tp_size} must equal --ep-size {self.ep_size} (it counts GPUs, as in SGLang; "
                "attention is data-parallel) or be left out"
            )
        if self.dp_size is not None and self.dp_size != self.attention_dp_size:
            raise WideepError(f"--dp-size {self.dp_size} must equal {self.attention_dp_size} here, or be left out")
        if self.dist_timeout <= 0:
            raise WideepError(f"--dist-timeout {self.dist_timeout} must be a positive number of seconds")
        if self.moe_a2a_backend is not None and self.moe_a2a_backend not in A2A_BACKENDS:
            raise WideepError(f"--moe-a2a-backend {self.moe_a2a_backend!r}: choose one of {', '.join(A2A_BACKENDS)}")
        if self.moe_a2a_backend == "local" and self.ep_size > 1:
            raise WideepError(f"--moe-a2a-backend local holds every expert in one process; with --ep-size "
                              f"{self.ep_size} use torch or deepep")
        if self.deepep_mode not in DEEPEP_MODES:
            raise WideepError(f"--deepep-mode {self.deepep_mode!r}: choose one of {', '.join(DEEPEP_MODES)}")
        if self.deepep_max_dispatch_tokens_per_rank < 1:
            raise WideepError(f"--deepep-max-dispatch-tokens-per-rank {self.deepep_max_dispatch_tokens_per_rank} "
                              "must be at least 1")
        if self.dist_init_addr is not None:
            parse_dist_init_addr(self.dist_init_addr)

    @property
    def attention_dp_size(self) -> int:
        """Ranks that each run attention on their own requests: every EP rank with DP attention, else 1."""
        return self.ep_size if self.enable_dp_attention else 1

    @property
    def a2a_backend(self) -> str:
        """The dispatcher to build: `--moe-a2a-backend`, else local for one rank and torch for several."""
        return self.moe_a2a_backend or ("local" if self.ep_size == 1 else "torch")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ParallelConfig:
        """Build from a namespace that went through `add_parallel_args`."""
        return cls(
            ep_size=args.ep_size, tp_size=args.tp_size, dp_size=args.dp_size,
            enable_dp_attention=args.enable_dp_attention, nnodes=args.nnodes, node_rank=args.node_rank,
            dist_init_addr=args.dist_init_addr, dist_timeout=args.dist_timeout,
            moe_a2a_backend=args.moe_a2a_backend, deepep_mode=args.deepep_mode,
            deepep_max_dispatch_tokens_per_rank=args.deepep_max_dispatch_tokens_per_rank,
            deepep_fp8_dispatch=args.deepep_fp8_dispatch,
        )
