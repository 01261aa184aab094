#!/usr/bin/env bash
# One call on the device machine: correctness first, then speed.
#   device run: bash benchmarks/gpu_run.sh [check|shapes|tests|bench|sweep|lm|none|all]  (carry .whl for fla)
#
# check: shapes, then tests.
# shapes: the shape sweep (one process per shape: a faulting kernel poisons its CUDA context).
# tests: the GPU tests, split over parallel pytest processes. Triton compiles each kernel variant
#        on the CPU, and one process runs them one after another: in parallel the whole set takes
#        ~3 min instead of over 10. Each process logs to $OUT/t_<name>.log.
# bench: bench_chunk.py (ours, SDPA, fla side by side), alone on the GPU.
# sweep: sweep_configs.py (ours at every shape; configs from env SWEEP_CONFIGS, a JSON list of
#        CONFIG updates, e.g. '[{}, {"dqg_bk": 32, "dqg_warps": 4}]'; shapes from SWEEP_SHAPES, e.g. 0,2).
# lm:    bench_lm.py, the 374M training step (MODELS=ours|fla|llama, SHAPES=8x2048,2x8192, LM_ARGS; one
#        model per call: fla autotunes for minutes). Not part of "all".
# none:  only the set-up (fla's wheels, the package shim), for a command of one's own after it.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
SITE=""
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && SITE=/tmp/site
fi
# The package without installing it: hgrn2mini/ with kernels/ linked in as hgrn2mini.kernels.
rm -rf /tmp/shim && mkdir -p /tmp/shim/hgrn2mini
for f in "$PWD"/hgrn2mini/*.py; do ln -s "$f" /tmp/shim/hgrn2mini/; done
ln -s "$PWD/kernels" /tmp/shim/hgrn2mini/kernels
export PYTHONPATH=/tmp/shim
P="python3 -P"
$P -c "import torch, triton, hgrn2mini; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
what=${1:-all}  # "none": only the set-up above; then PYTHONPATH=/tmp/shim:/tmp/site python3 -P <script>

if [[ $what == check || $what == shapes || $what == all ]]; then
  i=0
  for s in "128 128 bfloat16" "16 16 bfloat16" "32 128 bfloat16" "64 64 bfloat16" "128 16 bfloat16" \
           "16 256 bfloat16" "256 256 bfloat16" "256 16 bfloat16" "64 256 bfloat16" "64 16 bfloat16" \
           "128 128 float32" "16 64 float32" "64 16 float32"; do
    i=$((i + 1)); timeout 150 $P benchmarks/check_shapes.py $s > "$OUT/shape_$i.log" 2>&1 &
  done
  wait
  tail -q -n 1 "$OUT"/shape_*.log | tee "$OUT/shapes.txt"
fi
if [[ $what == check || $what == tests || $what == all ]]; then
  run() { local name=$1; shift
    timeout 400 $P -m pytest -v -p no:warnings --tb=short -rA -p no:cacheprovider "$@" > "$OUT/t_$name.log" 2>&1 & }
  run fp32 -m gpu tests/test_ops.py -k naive_loop_cuda_fp32
  run bf16 -m gpu tests/test_ops.py -k naive_loop_cuda_bf16
  run gated32 -m gpu tests/test_ops.py -k "gated and fp32"
  run gated16 -m gpu tests/test_ops.py -k "gated and bf16"
  run ops_misc -m gpu tests/test_ops.py -k "opcheck or compile"
  run long1 -m gpu tests/test_ops.py -k "long_sequence and 128-128"
  run long2 -m gpu tests/test_ops.py -k "long_sequence and 64-256"
  run long3 -m gpu tests/test_ops.py -k "long_sequence and 256-16"
  run long4 -m gpu tests/test_ops.py -k "long_sequence and 64-64"
  run model -m gpu tests/test_model.py
  # test_kernels.py in three processes: in one it ran past the 400 s limit on the H100, and so did
  # the gated tests with the offline compile checks (61 variants) in one (2026-11-24).
  run kernels1 tests/test_kernels.py -k "gated or gates"
  run kernels3 tests/test_kernels.py -k "variants or outputs_written"
  run kernels2 tests/test_kernels.py -k "not (gated or gates or variants or outputs_written)"
  wait
  for f in "$OUT"/t_*.log; do
    # failures first, then the summary line (a list of every PASSED line once hid it past the head)
    echo "== $f"; grep -E "^(FAILED|ERROR)|Error|assert" "$f" | head -12; grep -E " (passed|failed|error)" "$f" | tail -n 1
  done | tee "$OUT/tests.txt"
fi
if [[ $what == bench || $what == all ]]; then
  PYTHONPATH="/tmp/shim${SITE:+:$SITE}" $P benchmarks/bench_chunk.py --out "$OUT" --results "$OUT/RESULTS_append.md" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
fi
if [[ $what == sweep || $what == all ]]; then
  $P benchmarks/sweep_configs.py 2>&1 | tee "$OUT/sweep.log"
fi
if [[ $what == lm ]]; then
  PYTHONPATH="/tmp/shim${SITE:+:$SITE}" OUT="$OUT" $P benchmarks/bench_lm.py ${LM_ARGS:-} 2>&1 | tee -a "$OUT/lm.log"
fi
