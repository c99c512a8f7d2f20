#!/usr/bin/env bash
# Issue 12's GPU verification and measurement in ONE device call of at most 10 minutes.
#
# Once, here (diffusers is the pipeline benchmark's oracle; the device image has everything else):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
# Then, through the device tool (the budget in seconds keeps the call inside its 600 s limit):
#   run(command="bash benchmarks/gpu_check.sh all 540", carry=[".whl"], timeout_s=600)
# Steps, in order of value (each gets at most what is left of the budget; later ones are skipped when it is spent):
#   smoke      kernel cases each in its own process (a fault is one line, not a poisoned session)       ~40 s
#   tests      the kernel test files whole (on CUDA) and every -m gpu test, -v (names survive a cut),
#              junit XML to benchmarks/results/logs/junit-*-<device>.xml                                  ~200 s
#   norm       examples/bench_norm.py fp16 (GroupNorm/GEGLU; the per-shape thresholds come from it)       ~50 s
#   verified   benchmarks/write_verified.py: kernels/verified.toml rows for this device from the junit XML
#              (written only when every test passed) + thresholds from the norm results                  ~5 s
#   pipeline   SD1.5-size pipeline vs diffusers with the levers on and off (ours = "auto", i.e. the kernels
#              verified a step earlier; +triton forced; +nofuse; +cl), --profile tables per variant       ~180 s
#   kernels    examples/bench_temporal.py and bench_attention.py fp16, then verified again: the shapes where
#              the kernel lost to PyTorch's best become [[slower]] rows ("auto" takes PyTorch there)    ~120 s
#   compile    ours+compile, ours+cudagraphs, diffusers+compile (inductor compiles ~1-2 min each)        rest
# Parts: any of the steps above, several in quotes ("tests verified"), or all (= every step in that order).
# After every step $OUT/results.tar.gz is rewritten (benchmarks/results, kernels/verified.toml, the log), so a call
# cut short still returns what finished. Unpack it into the repository root and commit. Without CUDA (a dry run on a
# CPU machine) every step prints "needs CUDA" and the script exits 0.
set -uo pipefail
part=${1:-all}
budget=${2:-540}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT" benchmarks/results/logs
log=$OUT/gpu.log
: > "$log"
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
failed=0
end=$((SECONDS + budget))

say() { echo "$*" | tee -a "$log"; }
save() {
    (( cuda )) && cp "$log" "benchmarks/results/logs/gpu_check-$slug.log"
    tar czf "$OUT/results.tar.gz" benchmarks/results kernels/verified.toml 2>/dev/null
}
# step LIMIT CMD...: run CMD for at most min(LIMIT, what is left of the budget) seconds; results saved after it.
step() {
    local limit=$1; shift
    if (( ! cuda )); then say "needs CUDA, skipped: $*"; return; fi  # a dry run: list the step
    local left=$((end - SECONDS - 5))
    (( left < limit )) && limit=$left
    if (( limit < 20 )); then say "SKIPPED (budget spent): $*"; failed=1; return; fi
    say "+ [${limit}s, t=${SECONDS}s] $*"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    (( rc != 0 )) && { say "FAILED (exit $rc): $*"; failed=1; }
    save
}

cuda=0
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && cuda=1
if (( cuda )); then
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl 2>&1 | tee -a "$log" || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2 | tee -a "$log"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$log"
    slug=$(python3 -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name(0).lower()).strip('-'))")
else
    say "gpu_check: needs CUDA (no GPU here): a dry run, every step is listed and skipped"
    slug=cpu-dry-run
fi
junit_k=benchmarks/results/logs/junit-kernels-$slug.xml
junit_g=benchmarks/results/logs/junit-gpu-$slug.xml

# pytest-xdist / pytest-timeout where installed (the device image has both).
par() { python3 -c "import xdist" 2>/dev/null && echo "-n $1"; }
tmo() { python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout $1"; }

case $part in
    all) parts="smoke tests norm verified pipeline kernels verified compile" ;;
    main) parts="smoke tests norm verified pipeline kernels verified" ;;
    *) parts=$part ;;
esac
# The pipeline benchmark's random SD1.5-size weights are built and saved in the background meanwhile.
if (( cuda )) && [[ " $parts " == *" pipeline "* || " $parts " == *" compile "* ]]; then
    python3 examples/bench_pipeline.py --size sd15 --build-only > "$OUT/build.log" 2>&1 &
    build_pid=$!
fi
# Wait for that build once (the pipeline and compile parts both need it; a second wait would fail).
weights_ready() { [ -n "${build_pid:-}" ] && wait "$build_pid"; build_pid=; }
for p in $parts; do
    case $p in
    smoke)
        step 45 python3 benchmarks/kernel_smoke.py
        ;;
    tests)  # -v names each result as it lands (a run cut by its limit still says which failed); junit for the table
        rm -f "$junit_k" "$junit_g"
        kfiles="tests/test_kernel_attention.py tests/test_kernel_norm.py tests/test_kernel_temporal.py
                tests/test_kernel_dispatch.py tests/test_kernel_levers.py tests/test_motion.py"
        step 130 python3 -m pytest -v -p no:cacheprovider $(par 12) $(tmo 100) -rfE --junitxml "$junit_k" $kfiles
        step 110 python3 -m pytest -v -p no:cacheprovider $(par 12) $(tmo 100) -rfE --junitxml "$junit_g" -m gpu tests \
            $(for f in $kfiles; do echo --ignore "$f"; done)
        ;;
    norm)
        step 60 python3 examples/bench_norm.py --dtype fp16
        ;;
    verified)  # refuses (exit 1, table untouched) unless both junit files exist and every test in them passed;
               # measured files not there yet (kernels comes later) are skipped, so `all` runs it twice
        step 30 python3 benchmarks/write_verified.py "$junit_k" "$junit_g" \
            --norm-json "benchmarks/results/norm-fp16-$slug.json" \
            --attention-json "benchmarks/results/attention-fp16-$slug.json" \
            --temporal-json "benchmarks/results/temporal-fp16-$slug.json"
        ;;
    pipeline)
        (( cuda )) && weights_ready
        step 200 python3 examples/bench_pipeline.py --size sd15 --runs 2 --profile --label levers \
            --variants diffusers ours ours+triton ours+nofuse ours+cl ours+torch
        ;;
    kernels)
        step 45 python3 examples/bench_temporal.py --dtype fp16
        step 80 env TRITON_PRINT_AUTOTUNING=1 python3 examples/bench_attention.py --dtype fp16
        ;;
    compile)
        (( cuda )) && weights_ready
        step 400 python3 examples/bench_pipeline.py --size sd15 --runs 2 --profile --label compile \
            --variants ours ours+compile ours+cudagraphs diffusers+compile
        ;;
    *)
        say "unknown part $p (smoke|tests|norm|verified|pipeline|kernels|compile|main|all)"; failed=2 ;;
    esac
done
save
if (( ! cuda )); then
    say "gpu_check $part: dry run done (needs CUDA for every step); exit 0"
    exit 0
fi
say "gpu_check $part: exit $failed after ${SECONDS}s; results in $OUT/results.tar.gz, log in $log"
exit "$failed"
