#!/usr/bin/env bash
# Checks and times everything on a GPU machine in one go: the GPU test suite, then offline benchmarks.
# Usage: scripts/gpu_suite.sh LOGDIR [quick|sweep]   (sweep: also scripts/sweep_kernels.py)
# Full logs go to LOGDIR; the last thing printed is a short table of results. Where the tree was copied
# without .git, set WIDEEP_COMMIT to the commit it holds.
set -uo pipefail
logs=${1:?usage: scripts/gpu_suite.sh LOGDIR [quick|sweep]}
mode=${2:-full}
mkdir -p "$logs"
# Mandatory on the lent machines: no NVLink multicast objects (they can take shared GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
summary="$logs/summary.txt"
: >"$summary"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$logs/gpu.txt" 2>&1
echo "device: $(head -2 "$logs/gpu.txt" | tail -1)  commit: ${WIDEEP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  date: $(date -u +%F)" >>"$summary"

python -m pytest -m gpu -q -p no:cacheprovider tests >"$logs/pytest_gpu.log" 2>&1
echo "pytest -m gpu: $(tail -1 "$logs/pytest_gpu.log")" >>"$summary"

bench() {  # name, then engine.bench flags
    local name=$1; shift
    if python -m engine.bench --device cuda --result-filename "$logs/bench.jsonl" "$@" >"$logs/bench_$name.log" 2>&1; then
        python - "$name" "$logs/bench_$name.log" >>"$summary" <<'PY'
import json, sys
r = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
print(f"bench {sys.argv[1]:<28} in/out {r['random_input_len']}/{r['random_output_len']} x{r['num_prompts']}: "
      f"output {r['output_throughput']:.0f} tok/s, total {r['total_throughput']:.0f} tok/s, {r['total_latency']:.1f} s")
PY
    else
        echo "bench $name: FAILED (see $logs/bench_$name.log)" >>"$summary"
    fi
}
bench tiny --model tiny --num-prompts 64
if [ "$mode" != quick ]; then
    bench v3-5layers-128-128 --model v3 --num-layers 5 --load-format dummy --num-prompts 64 \
        --random-input-len 128 --random-output-len 128 --random-range-ratio 1.0
    bench v3-5layers-1000-100 --model v3 --num-layers 5 --load-format dummy --num-prompts 32 \
        --random-input-len 1000 --random-output-len 100 --random-range-ratio 1.0
fi
if [ "$mode" = sweep ]; then  # the kernel variants side by side (about 5 minutes on one H100)
    if python scripts/sweep_kernels.py --json "$logs/sweep.jsonl" >"$logs/sweep.log" 2>&1; then
        echo "sweep: $(grep -c . "$logs/sweep.jsonl") rows; best per class:" >>"$summary"
        sed -n '/== best per shape class/,$p' "$logs/sweep.log" >>"$summary"
    else
        echo "sweep: FAILED (see $logs/sweep.log)" >>"$summary"
    fi
fi
echo
cat "$summary"
