#!/usr/bin/env bash
# Everything a GPU machine checks, in one go (t2i installed, CUDA visible):
#
#     bash benchmarks/gpu.sh [OUT_DIR]        # default: benchmarks/results
#
# 1. the CUDA tests: every Triton kernel compiled for this GPU against fp64 / exact
#    references, and the whole Muse model on the GPU (tests/kernels/test_cuda.py and the
#    CUDA test of tests/models/test_muse.py);
# 2. the kernels' and generation's CUDA benchmarks, to OUT_DIR/kernels-<gpu>.json and
#    generation-<gpu>.json, with their tables (benchmarks.report) and plots.
# Each step writes its log beside its figures and the script goes on after a failure; it
# exits non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
gpu=$(timeout 120 python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())") || exit 1
timeout 120 python - <<'PY' | tee "$out/gpu-env.txt"
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
      f"sm_{p.major}{p.minor}; torch {torch.__version__}, triton {triton.__version__}")
PY
status=0
limit=${STEP_TIMEOUT:-1200}  # seconds per step; a stuck step dumps its stacks, then dies
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, remember a failure
    local name=$1; shift
    echo "+ $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log" || { status=1; echo "FAILED: $name"; }
}
# compiling every kernel specialisation dominates: spread the tests over the CPU cores
workers=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
step gpu-tests python -m pytest -q -p no:cacheprovider -rf -o faulthandler_timeout=120 \
    $workers tests/kernels/test_cuda.py tests/models/test_muse.py -k "cuda"
for suite in kernels generation; do
    files=(benchmarks/bench_vq.py benchmarks/bench_attention.py benchmarks/bench_sampling.py
           benchmarks/bench_cross_entropy.py)
    [ "$suite" = generation ] && files=(benchmarks/bench_generation.py)
    step "bench-$suite" python -m pytest -q -p no:cacheprovider -o faulthandler_timeout=120 \
        "${files[@]}" -k cuda \
        --benchmark-json="$out/$suite-$gpu.json"
    [ -f "$out/$suite-$gpu.json" ] && step "report-$suite" python -m benchmarks.report \
        "$out/$suite-$gpu.json" --plot "$out/$suite-$gpu.png"
done
exit $status
