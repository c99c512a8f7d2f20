#!/usr/bin/env bash
# Issue 5's GPU verification, in one or two device calls, for a session that is lent a GPU machine.
#
# Once, here (diffusers is the pipeline benchmark's oracle; the device image has everything else):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
# Then, through the device tool (a time budget in seconds keeps each call inside its limit):
#   run(command="bash benchmarks/gpu_check.sh main 420", carry=[".whl"])     # smoke, tests, eager pipeline, kernels
#   run(command="bash benchmarks/gpu_check.sh compile 300", carry=[".whl"])  # pipeline with torch.compile'd UNets
# Seen on an H200 (2026-11-28): a machine start ~30 s, install 12 s, smoke 25 s, tests ~110 s (12 workers),
# eager pipeline 87 s (weights built in the background meanwhile), kernel benchmarks about 1 minute each.
# Parts: smoke | tests | kernels | pipeline | compile | main (= smoke tests pipeline kernels) | all (= main compile).
# Every step gets at most what is left of the budget; after each step $OUT/results.tar.gz is rewritten with
# benchmarks/results (JSONs) so a call cut short still returns what finished, and $OUT/gpu.log holds the log.
# Unpack the tarball into the repo root, commit benchmarks/results/*.json and put the numbers in the README.
set -uo pipefail
part=${1:?usage: gpu_check.sh smoke|tests|kernels|pipeline|compile|main|all [budget_seconds]}
budget=${2:-560}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT" benchmarks/results
log=$OUT/gpu.log
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
failed=0
end=$((SECONDS + budget))

say() { echo "$*" | tee -a "$log"; }
save() { tar czf "$OUT/results.tar.gz" benchmarks/results; }
# step LIMIT CMD...: run CMD for at most min(LIMIT, what is left of the budget) seconds.
step() {
    local limit=$1; shift
    local left=$((end - SECONDS - 5))
    (( left < limit )) && limit=$left
    if (( limit < 20 )); then say "SKIPPED (budget spent): $*"; failed=1; return; fi
    say "+ [${limit}s, t=${SECONDS}s] $*"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    (( rc != 0 )) && { say "FAILED (exit $rc): $*"; failed=1; }
    save
}

if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>&1 | tee -a "$log" || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 | tee -a "$log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$log"

# pytest-xdist / pytest-timeout where installed (the device image has both).
par() { python3 -c "import xdist" 2>/dev/null && echo "-n $1"; }
tmo() { python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout $1"; }

case $part in
    main) parts="smoke tests pipeline kernels" ;;
    all) parts="smoke tests pipeline kernels compile" ;;
    *) parts=$part ;;  # one part, or several in quotes: "smoke tests"
esac
# The pipeline benchmark's random SD1.5-size weights are built and saved in the background meanwhile.
if [[ " $parts " == *" pipeline "* || " $parts " == *" compile "* ]]; then
    python3 examples/bench_pipeline.py --size sd15 --build-only > "$OUT/build.log" 2>&1 &
    build_pid=$!
fi
# Wait for that build once (the pipeline and compile parts both need it; a second wait would fail).
weights_ready() { [ -n "${build_pid:-}" ] && wait "$build_pid"; build_pid=; }
for p in $parts; do
    case $p in
    smoke)  # small kernel cases in isolated processes: a fault shows as one line, not a poisoned session
        step 45 python3 benchmarks/kernel_smoke.py
        ;;
    tests)  # the kernel test files whole (tiny shapes, compiled for the GPU) and every gpu-marked test; -v names
            # each result as it lands, so a run cut by its time limit still says which tests failed
        step 150 python3 -m pytest -v -p no:cacheprovider $(par 12) $(tmo 80) -rfE \
            tests/test_kernel_attention.py tests/test_kernel_norm.py tests/test_kernel_temporal.py tests/test_motion.py \
            tests/test_pipeline.py::test_cuda_half_follows_fp32_and_seeds_are_device_independent \
            tests/test_vae.py::test_cuda_half_precision_error_within_2x_pytorch \
            tests/test_vae.py::test_cuda_encode_with_cpu_generator_matches_cpu \
            tests/test_lora.py::test_cuda_fp16_merge_matches_cpu_and_unmerges_exactly
        ;;
    kernels)
        step 40 python3 examples/bench_temporal.py --dtype fp16
        step 80 env TRITON_PRINT_AUTOTUNING=1 python3 examples/bench_attention.py --dtype fp16
        step 50 python3 examples/bench_norm.py --dtype fp16
        ;;
    pipeline)
        weights_ready
        step 150 python3 examples/bench_pipeline.py --size sd15 --runs 2 --profile
        ;;
    compile)
        weights_ready
        step 400 python3 examples/bench_pipeline.py --size sd15 --runs 2 --variants diffusers+compile ours+compile \
            --label compile
        ;;
    *)
        say "unknown part $p (smoke|tests|kernels|pipeline|compile|main|all)"; failed=2 ;;
    esac
done
save
say "gpu_check $part: exit $failed after ${SECONDS}s; results in $OUT/results.tar.gz, log in $log"
exit "$failed"
