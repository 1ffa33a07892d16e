#!/usr/bin/env bash
# Issue 14's GPU checks as one run on a lent device machine, everything that belongs together in one
# command (a machine costs minutes to start; see /work/.library/device/README.md):
#
#     run(command="bash benchmarks/device_check.sh", timeout_s=600)
#
# Steps, each under its own time limit so the whole ends inside one 10-minute call:
#   1. the kernels and solvers against their NumPy references, on the GPU (TF32 matmuls by default);
#   2. bench_snmf.py: seconds per iteration of every solver against the device's measured float32 and
#      bfloat16 matmul rates at n = 65,536, d = 3072, k = 100 (targets: mu >= 85%, hals >= 60%);
#   3. bench_scale.py: a store of n = 262,144 tokens in memory, held on the device (on_device=True, what
#      a fit of a store now does by itself on a GPU) and streamed from disk (on_device=False);
#   4. bench_time_to_answer.py without the paper's CPU peer: cold and warm fresh-process fits.
# The benchmarks write their sections of benchmarks/RESULTS.md (labels h200-*); that file and one log per
# step are copied to $OUT, which the device tool brings back (at most 8 files). The real GGUF models do
# not travel (98 and 253 MB against the tool's 64 MiB), so real-model extraction is not a step here.
#
# QUICK=1 runs every step at toy sizes: a dry run of this script on any machine (the CPU too).
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
LABEL=${LABEL:-h200}
started=$SECONDS

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, its output teed to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: at most ${limit} s (${SECONDS}s into the run)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

if ! python3 -c "import jsnmf" 2>/dev/null; then  # the device image has jax, flax, optax, orbax, transformers
    python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$OUT/devices.log"

if [[ ${QUICK:-0} == 1 ]]; then
    LABEL=quick
    WRITE=(--no-write)  # a dry run leaves RESULTS.md alone
    SNMF_SIZE=(--n 2048 --d 256 --k 16 --mu-iters 40 --short 5 --long 15)
    SCALE_SIZE=(--sizes 8192 --d 256 --rank 16 --chunk-tokens 2048 --iters 4 --repeats 1)
    TTA_SIZE=(--n 1024 --d 256 --k 16 --mu-iters 40 --probe-iters 30 --seed-probe-iters 30 --repeats 1 --seeds 2)
    TESTS=(tests/test_kernels.py -k "hals or mu_codes or features_step")
else
    SNMF_SIZE=(--n 65536 --d 3072 --k 100)
    SCALE_SIZE=(--sizes 262144 --d 3072 --rank 100 --chunk-tokens 65536 --repeats 3)
    TTA_SIZE=(--n 65536 --d 3072 --k 100 --noise 1.0 --repeats 2)
    TESTS=(tests/test_kernels.py tests/test_solvers.py)
    WRITE=()
fi

step kernels 120 python3 -m pytest -q -x -p no:cacheprovider "${TESTS[@]}"
step snmf-float32 150 python3 benchmarks/bench_snmf.py "${SNMF_SIZE[@]}" --no-peer --label "$LABEL-65k" "${WRITE[@]}"
step snmf-bfloat16 100 python3 benchmarks/bench_snmf.py "${SNMF_SIZE[@]}" --no-peer --no-target --dtype bfloat16 \
    --label "$LABEL-65k-bfloat16" "${WRITE[@]}"
step scale 120 python3 benchmarks/bench_scale.py "${SCALE_SIZE[@]}" --label "$LABEL" "${WRITE[@]}"
step time-to-answer 90 python3 benchmarks/bench_time_to_answer.py "${TTA_SIZE[@]}" --no-paper --label "$LABEL" \
    --solvers mu,ehals,ehals/tokens "${WRITE[@]}"
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
echo "== done in $((SECONDS - started)) s; files in $OUT"
