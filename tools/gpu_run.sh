#!/usr/bin/env bash
# One call on a GPU machine: correctness first, then speed. Everything it writes goes to $OUT.
#   OUT=/tmp/out bash tools/gpu_run.sh [check|shapes|tests|bench|sweep|lm|generate|experiments|none|all]
# Wheels in .whl/ (fla and its dependencies, for the comparisons) are installed to /tmp/site first.
#
# check: shapes, then tests.
# shapes: tools/check_shapes.py at every supported (K, V, dtype), one process per shape (a faulting
#         kernel poisons its CUDA context); $OUT/shapes.txt.
# tests: the GPU tests, split over parallel pytest processes. Triton compiles each kernel variant
#        on the CPU, and one process compiles them one after another: in parallel the whole set
#        takes ~3 min instead of over 10. Each process logs to $OUT/t_<name>.log; $OUT/tests.txt.
# bench: benchmarks/bench_ops.py --out $OUT (ours, fla and SDPA side by side), alone on the GPU.
# sweep: tools/sweep_configs.py --out $OUT (ours at every shape; configs from env SWEEP_CONFIGS, a
#        JSON list of CONFIG updates, e.g. '[{}, {"dqg_bk": 32}]'; shapes from SWEEP_SHAPES, e.g. 0,2).
# lm:    benchmarks/bench_lm.py, the 374M training step (MODELS=ours|fla|llama, SHAPES=8x2048,2x8192,
#        LM_ARGS; one model per call: fla autotunes for minutes). Not part of "all".
# generate: benchmarks/bench_generate.py --out $OUT (GEN_ARGS), alone on the GPU.
# experiments: examples/mqar.py, compare_lm.py, lra.py and image.py at once, each to $OUT/<name>/
#        (their own time budgets, ~7 min). Not part of "all", and never beside the tests: under one
#        machine's CPUs both slow down (GPU tests ran past their 400 s limit beside them, and the
#        examples' runs did too few steps to say anything).
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
    i=$((i + 1)); timeout 150 $P tools/check_shapes.py $s --out "$OUT" > "$OUT/shape_$i.log" 2>&1 &
  done
  wait
  tail -q -n 1 "$OUT"/shape_*.log | tee "$OUT/shapes.txt"
fi
if [[ $what == check || $what == tests || $what == all ]]; then
  run() { local name=$1; shift
    timeout 530 $P -m pytest -v -p no:warnings --tb=short -rA -p no:cacheprovider "$@" > "$OUT/t_$name.log" 2>&1 & }
  run fp32 -m gpu tests/test_ops.py -k naive_loop_cuda_fp32
  run bf16 -m gpu tests/test_ops.py -k naive_loop_cuda_bf16
  run gated32 -m gpu tests/test_ops.py -k "gated and fp32"
  run gated16 -m gpu tests/test_ops.py -k "gated and bf16"
  run ops_misc -m gpu tests/test_ops.py -k "opcheck or compile or direct_launch"
  run long1 -m gpu tests/test_ops.py -k "long_sequence and 128-128"
  run long2 -m gpu tests/test_ops.py -k "long_sequence and 64-256"
  run long3 -m gpu tests/test_ops.py -k "long_sequence and 256-16"
  run long4 -m gpu tests/test_ops.py -k "long_sequence and 64-64"
  run model -m gpu tests/test_model.py
  run generate -m gpu tests/test_generate.py
  run decode -m gpu tests/test_decode.py tests/test_scan1.py
  run graphstep -m gpu tests/test_graphstep.py
  run examples -m gpu tests/test_norm.py tests/test_bidirectional.py tests/test_lra.py tests/test_mqar.py \
    tests/test_compare_lm.py tests/test_checkpoint.py
  # test_kernels.py in four processes: the gated kernels' test in each launch mode takes minutes
  # of Triton compiles, and two of them in one process ran past the limit beside the others.
  run kernels1 tests/test_kernels.py -k "gated and two_launches"
  run kernels4 tests/test_kernels.py -k "(gated or gates) and not two_launches"
  run kernels3 tests/test_kernels.py -k "variants or outputs_written"
  run kernels2 tests/test_kernels.py -k "not (gated or gates or variants or outputs_written)"
  wait
  for f in "$OUT"/t_*.log; do
    # failures first, then the summary line (a list of every PASSED line once hid it past the head)
    echo "== $f"; grep -E "^(FAILED|ERROR)|Error|assert" "$f" | head -12; grep -E " (passed|failed|error)" "$f" | tail -n 1
  done | tee "$OUT/tests.txt"
fi
if [[ $what == bench || $what == all ]]; then
  PYTHONPATH="/tmp/shim${SITE:+:$SITE}" $P benchmarks/bench_ops.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
fi
if [[ $what == sweep || $what == all ]]; then
  $P tools/sweep_configs.py --out "$OUT" 2>&1 | tee "$OUT/sweep.log"
fi
if [[ $what == lm ]]; then
  PYTHONPATH="/tmp/shim${SITE:+:$SITE}" OUT="$OUT" $P benchmarks/bench_lm.py ${LM_ARGS:-} 2>&1 | tee "$OUT/lm.log"
fi
if [[ $what == generate ]]; then
  PYTHONPATH="/tmp/shim${SITE:+:$SITE}" $P benchmarks/bench_generate.py --out "$OUT" ${GEN_ARGS:-} 2>&1 | tee "$OUT/generate.log"
fi
if [[ $what == experiments ]]; then
  for name in mqar compare_lm lra image; do
    python3 examples/$name.py --out "$OUT/$name" > "$OUT/$name.log" 2>&1 &
  done
  wait
  for name in mqar compare_lm lra image; do echo "== $name"; cat "$OUT/$name/results.md" 2>/dev/null || tail -5 "$OUT/$name.log"; done
fi
