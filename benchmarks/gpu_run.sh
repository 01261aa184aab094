#!/usr/bin/env bash
# One call on the device machine: carried wheels (fla), the chunk benchmark, the GPU tests.
#   device run: bash benchmarks/gpu_run.sh [bench|tests|all]   (carry .whl for fla)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# The package without installing it: hgrn2mini/ with kernels/ linked in as hgrn2mini.kernels.
rm -rf /tmp/shim && mkdir -p /tmp/shim/hgrn2mini
for f in "$PWD"/hgrn2mini/*.py; do ln -s "$f" /tmp/shim/hgrn2mini/; done
ln -s "$PWD/kernels" /tmp/shim/hgrn2mini/kernels
export PYTHONPATH="/tmp/shim:${PYTHONPATH:-}"
(cd /tmp && python3 -c "import torch, triton, hgrn2mini; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())")
what=${1:-all}
if [[ $what == bench || $what == all ]]; then
  python3 benchmarks/bench_chunk.py --out "$OUT" 2>&1 | tee "$OUT/bench.log"
fi
if [[ $what == tests || $what == all ]]; then
  export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
  python3 -P -m pytest -q -m gpu tests/ -p no:warnings --durations=10 -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
  python3 -P -m pytest -q tests/test_kernels.py -p no:warnings -p no:cacheprovider 2>&1 | tee -a "$OUT/gpu_tests.log"
fi
