#!/usr/bin/env bash
# A lent GPU machine's session in one command: build fastseg._C for the card, check and time every
# GPU path (benchmarks/gpu_check.py), then run the test suite's CUDA cases. Each stage has its own
# time limit, so one that hangs cannot eat the others' time; logs and results go to $OUT.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh [CRF_DATA_DIR]
#
# TRITON_SECTIONS / EXT_SECTIONS choose gpu_check.py's sections before / after the build (BUILD=0:
# no build, for sections that need no compiled extension); TRITON_LIMIT, EXT_LIMIT, TEST_LIMIT are
# the stages' limits in seconds; TESTS="" skips the tests, TEST_K picks them (pytest -k).
set -u
OUT=${OUT:-/tmp/fastseg-gpu}
DATA=${1:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
start=$SECONDS
stamp() { echo "### $1 at $((SECONDS - start)) s"; }

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
# setup.py installs kernels/ and benchmarks/ as fastseg.kernels and fastseg.benchmarks; in place, links do.
ln -sfn ../kernels fastseg/kernels
ln -sfn ../benchmarks fastseg/benchmarks

# The extension builds while the Triton paths (which do not need it) are checked.
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
[ "${BUILD:-1}" = 1 ] && ( b=$SECONDS; FASTSEG_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=16 timeout 240 \
    python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "build exit $? after $((SECONDS - b)) s" >> "$OUT/build.log" ) &
build=$!
[ "${BUILD:-1}" = 1 ] || export FASTSEG_NO_EXTENSION=1
stamp "triton checks"
FASTSEG_NO_EXTENSION=1 timeout ${TRITON_LIMIT:-200} python3 benchmarks/gpu_check.py --out "$OUT" \
    ${TRITON_SECTIONS-peaks atrous atrous_routes aspp gcn unpool_conv} > "$OUT/check_triton.log" 2>&1
echo "triton checks exit $?"
wait $build
[ -e "$OUT/build.log" ] && tail -2 "$OUT/build.log"

if [ -n "${EXT_SECTIONS-default}" ]; then  # EXT_SECTIONS="" skips this stage
  stamp "extension checks"
  timeout ${EXT_LIMIT:-120} python3 benchmarks/gpu_check.py --out "$OUT" --data "$DATA" \
      ${EXT_SECTIONS-unpool crf crf_train crf_images profile} > "$OUT/check_ext.log" 2>&1
  echo "extension checks exit $?"
fi

stamp "tests"
if [ -n "$DATA" ] && [ ! -e ../shared/data/crf ]; then  # where the tests look for the CRF images
  mkdir -p ../shared/data && cp -r "$DATA" ../shared/data/crf
fi
# -v: each result is logged as it comes, so a run cut off at its limit still names its failures.
timeout ${TEST_LIMIT:-150} python3 -m pytest ${TESTS-tests} -v -k "${TEST_K:-cuda}" -n 8 -p no:cacheprovider --timeout 100 \
    -rfE --junitxml="$OUT/junit.xml" > "$OUT/pytest.log" 2>&1
echo "tests exit $?"
stamp "done"
grep -h "^name=" "$OUT"/check_*.log | cut -c1-250
grep -h "Error\|error" "$OUT"/check_*.log | sort | uniq -c | head -20
grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest.log" | cut -c1-200 | tail -40
