"""Every candidate kernel variant timed side by side with the current defaults and the baselines, in one run.

    python scripts/sweep_kernels.py [--only gemm,mla] [--workers 8] [--no-probe] [--budget-s 290] [--json FILE]

- GEMM (`kernels.grouped_gemm.TileConfig`): per shape class of `pick_tile` (rows per expert <= 16, <= 32, <= 128,
  more), FP8 and bf16, at DeepSeek-V3 expert shapes (gate_up N=4096 K=7168, down N=7168 K=2048), contiguous and
  masked (decode) layouts. Baselines in the same run: the current `pick_tile` choice ("default"),
  `torch._scaled_grouped_mm` (FP8 row-wise scales) and `torch._grouped_mm` (bf16) on the contiguous shapes.
- MLA decode (`kernels.mla_triton.MLADecodeConfig`): 128 heads, latent 512 + rope 64, bf16, against flashinfer
  (when installed) and the default tiling.

First, unless --no-probe, worker processes compile every candidate once (in parallel, filling Triton's cache): a
variant that fails to compile, or crashes its process, is reported in one line and left out of the timing. Then
every remaining candidate is timed with `triton.testing.do_bench` (median) on random data. The output ends with one
table per shape class (candidates x shapes, and the geometric mean of each candidate's speed over the default) and
the best config per class in the form of `_FP8_TILES` / `_HALF_TILES` entries and an `MLADecodeConfig`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from sweep_space import GEMM_SHAPES, MLA_SHAPES, PEAKS, Shape, candidates  # noqa: E402

_DEADLINE = [float("inf")]


# --- jobs -------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    shape: Shape
    label: str  # "default", a baseline's name, or the candidate's short name
    config: object | None  # TileConfig / MLADecodeConfig, None for a baseline
    note: str = ""
    ms: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.shape.name}|{self.label}"


def all_jobs(only: set[str]) -> list[Job]:
    jobs = []
    for shape in GEMM_SHAPES + MLA_SHAPES:
        if shape.kind in only:
            jobs += [Job(shape, label, cfg) for label, cfg in candidates(shape)]
    return jobs


class Data:
    """Random inputs of one shape at a time (the previous shape's are dropped first)."""

    def __init__(self, device: str):
        self.device, self.name, self.value = device, None, None

    def get(self, shape: Shape):
        if self.name != shape.name:
            self.value = None
            torch.cuda.empty_cache()
            self.value, self.name = shape.make(self.device), shape.name
        return self.value


# --- compile probe in worker processes --------------------------------------------------------------------------


def probe_worker(keys: list[str]) -> None:
    """Run each job once (compiling it), printing `start KEY`, then `ok KEY` or `err KEY<tab>message`."""
    jobs = {j.key: j for j in all_jobs({"gemm", "mla"})}
    data = Data("cuda")
    for key in sorted(keys, key=lambda k: list(jobs).index(k)):
        job = jobs[key]
        print(f"start {key}", flush=True)
        try:
            job.shape.fn(data.get(job.shape), job.config)()
            torch.cuda.synchronize()
            print(f"ok {key}", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported to the parent in one line
            print(f"err {key}\t{one_line(exc)}", flush=True)
            if "CUDA" in str(exc) or "cuda" in type(exc).__name__.lower():
                sys.exit(3)  # the context may be broken (an illegal address): the parent starts a fresh worker


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:150] if text else ''}"


def probe(jobs: list[Job], workers: int, stall_s: float) -> dict[str, str]:
    """key -> "" (compiled) or a one-line error, for every candidate job; crashed workers are restarted."""
    keys = [j.key for j in jobs if j.config is not None]
    # One config compiles in one worker (its shapes share most specializations), so the cache is filled once.
    slots: list[list[str]] = [[] for _ in range(workers)]
    for key in keys:
        shape, label = key.split("|", 1)
        slots[hash((label, shape.split()[0])) % workers].append(key)
    results: dict[str, str] = {}
    lock = threading.Lock()

    def run_slot(todo: list[str]) -> None:
        while todo:
            cmd = [sys.executable, __file__, "--probe-worker", json.dumps(todo)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            timer = threading.Timer(stall_s, proc.kill)
            timer.start()
            started, progress = None, False
            for line in proc.stdout:
                timer.cancel()
                timer = threading.Timer(stall_s, proc.kill)
                timer.start()
                word, _, rest = line.rstrip("\n").partition(" ")
                key, _, msg = rest.partition("\t")
                if word == "start":
                    started, progress = key, True
                elif word in ("ok", "err") and key in todo:
                    with lock:
                        results[key] = msg if word == "err" else ""
                    todo.remove(key)
                    started = None
            rc = proc.wait()
            timer.cancel()
            if started in todo:  # the process died (or stalled) inside this job
                with lock:
                    results[started] = f"crashed the process (exit {rc})" if rc > 0 else f"killed (signal {-rc})"
                todo.remove(started)
            elif todo and (rc == 0 or not progress):  # nothing more will come of retrying
                with lock:
                    for key in todo:
                        results[key] = f"probe worker ended without running it (exit {rc})"
                return

    threads = [threading.Thread(target=run_slot, args=(slot,)) for slot in slots if slot]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# --- timing -----------------------------------------------------------------------------------------------------


def time_ms(fn) -> float:
    import triton.testing

    if time.perf_counter() > _DEADLINE[0]:
        raise TimeoutError("skipped: --budget-s spent")
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def time_jobs(jobs: list[Job], probed: dict[str, str]) -> None:
    data = Data("cuda")
    for job in jobs:
        if probed.get(job.key):
            job.note = probed[job.key]
        else:
            try:
                inputs = data.get(job.shape)
                fn = job.shape.fn(inputs, job.config) if job.config is not None else job.shape.baseline(inputs,
                                                                                                        job.label)
                job.ms = time_ms(fn)
                job.extra = job.shape.check(inputs, fn) if job.config is not None else {}
            except Exception as exc:  # noqa: BLE001 - one failing variant must not stop the sweep
                job.note = one_line(exc)
        rate = job.shape.rate(job.ms) if job.ms else ""
        err = f" rel err {job.extra['rel_err']:.1e}" if "rel_err" in job.extra else ""
        print(f"  {job.shape.name:<34} {job.label:<36} "
              + (f"{job.ms * 1e3:9.1f} us  {rate}{err}" if job.ms else f"n/a  {job.note}"), flush=True)
    torch.cuda.empty_cache()


# --- report -----------------------------------------------------------------------------------------------------


def report(jobs: list[Job]) -> list[str]:
    """One table per shape class, then the best config of each class (geometric mean speed-up over the default
    across the class's shapes; a candidate missing on any shape of its class does not win)."""
    lines, best = [], {}
    classes: dict[str, list[Job]] = {}
    for job in jobs:
        classes.setdefault(job.shape.cls, []).append(job)
    for cls, members in classes.items():
        shapes = list(dict.fromkeys(j.shape.name for j in members))
        default = {j.shape.name: j.ms for j in members if j.label == "default"}
        labels = list(dict.fromkeys(j.label for j in members))
        lines.append(f"\n== {cls}: us per shape (speed vs default), last column geometric mean over the class")
        for i, name in enumerate(shapes):
            lines.append(f"   [{i}] {name}")
        lines.append(f"   {'candidate':<38}" + "".join(f" {f'[{i}]':>16}" for i in range(len(shapes)))
                     + f" {'geo-mean':>9}")
        scores = {}
        for label in labels:
            cells, speedups = [], []
            for name in shapes:
                job = next((j for j in members if j.label == label and j.shape.name == name), None)
                if job is None or not job.ms:
                    cells.append(f"{'-':>16}")
                    continue
                ref = default.get(name)
                speed = ref / job.ms if ref else None
                if speed:
                    speedups.append(speed)
                cells.append(f"{job.ms * 1e3:8.1f} ({speed:4.2f})" if speed else f"{job.ms * 1e3:16.1f}")
            geo = math.exp(sum(map(math.log, speedups)) / len(speedups)) if speedups else None
            full = len(speedups) == len(shapes)
            if geo and full and members[0].shape.kind in ("gemm", "mla") and any(
                    j.config is not None for j in members if j.label == label):
                scores[label] = geo
            lines.append(f"   {label[:38]:<38}" + "".join(f" {c}" for c in cells)
                         + (f" {geo:8.2f}x" if geo else f" {'-':>9}"))
        if scores:
            win = max(scores, key=scores.get)
            cfg = next(j.config for j in members if j.label == win)
            best[cls] = (win, scores[win], cfg)
            lines.append(f"   best: {win} ({scores[win]:.2f}x the default)")
            for base in dict.fromkeys(j.label for j in members if j.config is None):
                ratios = []
                for name in shapes:
                    ours = next((j.ms for j in members if j.label == win and j.shape.name == name), None)
                    theirs = next((j.ms for j in members if j.label == base and j.shape.name == name), None)
                    if ours and theirs:
                        ratios.append(f"[{shapes.index(name)}] {theirs / ours:.2f}x")
                if ratios:
                    lines.append(f"   best vs {base} (speed): " + ", ".join(ratios))
    lines.append("\n== best per shape class (paste into kernels/grouped_gemm.py / kernels/mla_triton.py)")
    for cls, (_label, speed, cfg) in best.items():
        lines.append(f"{cls:<22} {speed:4.2f}x  {paste(cfg)}")
    return lines


def paste(cfg) -> str:
    """The config as source, only the fields that differ from the dataclass defaults."""
    fields = cfg.__dataclass_fields__
    pos = ["block_m", "block_n", "block_k"] if "block_k" in fields else []
    args = [str(getattr(cfg, k)) for k in pos]
    kw = [f"{k}={getattr(cfg, k)!r}" for k, f in fields.items()
          if k not in pos and getattr(cfg, k) != f.default]
    return f"{type(cfg).__name__}({', '.join(args + kw)})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="gemm,mla", help="comma-separated subset of gemm,mla")
    p.add_argument("--workers", type=int, default=8, help="compile-probe processes (default 8)")
    p.add_argument("--no-probe", action="store_true", help="compile in this process (a crash ends the sweep)")
    p.add_argument("--stall-s", type=float, default=150, help="kill a probe worker silent for this long")
    p.add_argument("--budget-s", type=float, default=290, help="start no timing after this many seconds")
    p.add_argument("--json", type=Path, help="write every timed row here, one JSON object a line")
    p.add_argument("--probe-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe_worker:
        probe_worker(json.loads(args.probe_worker))
        return 0
    if not torch.cuda.is_available():
        print("error: sweep_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    _DEADLINE[0] = start + args.budget_s
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    import triton

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    try:
        from bench_kernels import ceilings

        PEAKS.update(ceilings(torch.device("cuda")))
        print(f"# ceilings: HBM copy {PEAKS['hbm_gbps']:.0f} GB/s, bf16 mm {PEAKS['bf16_tflops']:.0f} TFLOP/s, "
              f"fp8 _scaled_mm {PEAKS['fp8_tflops']:.0f} TFLOP/s", flush=True)
    except Exception as exc:  # noqa: BLE001 - shares of peak are then left out
        print(f"# ceilings not measured: {one_line(exc)}", flush=True)
    jobs = all_jobs(set(args.only.split(",")))
    probed: dict[str, str] = {}
    if not args.no_probe:
        probed = probe(jobs, args.workers, args.stall_s)
        failed = {k: v for k, v in probed.items() if v}
        print(f"# compile probe: {len(probed) - len(failed)} of {len(probed)} candidates compiled in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        for key, msg in failed.items():
            print(f"  failed  {key}: {msg}", flush=True)
    time_jobs(jobs, probed)
    for line in report(jobs):
        print(line)
    print(f"# sweep took {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text("".join(json.dumps(dict(shape=j.shape.name, cls=j.shape.cls, label=j.label, ms=j.ms,
                                                     note=j.note, **j.extra)) + "\n" for j in jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
