#!/usr/bin/env bash
# Issue 5's GPU verification in two device calls, for a session that is lent a GPU machine.
#
# Once, here (diffusers is the pipeline benchmark's oracle; the device image has everything else):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
# Then, through the device tool, each part well inside one call's 10 minutes:
#   run(command="bash benchmarks/gpu_check.sh kernels", carry=[".whl"])    # gpu tests + kernel benchmarks
#   run(command="bash benchmarks/gpu_check.sh pipeline", carry=[".whl"])   # SD1.5-size pipeline vs diffusers
# Each call leaves $OUT/gpu_<part>.tar.gz (result JSONs + logs): unpack it into the repo root, commit
# benchmarks/results/*.json and put the numbers in the README.
set -uo pipefail
part=${1:?usage: gpu_check.sh kernels|pipeline}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT" benchmarks/results/logs
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
log=benchmarks/results/logs/gpu_$part.log
failed=0
step() { echo "+ $*"; "$@" || { echo "FAILED (exit $?): $*"; failed=1; }; }
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    case $part in
    kernels)
        step python3 -m pytest -m gpu -q -p no:cacheprovider tests
        for dtype in fp16 bf16; do
            step python3 examples/bench_attention.py --dtype "$dtype"
            step python3 examples/bench_temporal.py --dtype "$dtype"
            step python3 examples/bench_norm.py --dtype "$dtype"
        done
        ;;
    pipeline)
        step python3 examples/bench_pipeline.py --size sd15 --compile
        ;;
    *)
        echo "unknown part $part (kernels|pipeline)"; failed=2
        ;;
    esac
    exit $failed
} 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
tar czf "$OUT/gpu_$part.tar.gz" benchmarks/results
echo "gpu_check $part: exit $status, results in $OUT/gpu_$part.tar.gz"
exit "$status"
