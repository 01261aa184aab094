set -u
MODELS=ours SHAPES=8x2048,2x8192 timeout 580 bash benchmarks/gpu_run.sh lm > $OUT/lm_full.log 2>&1
grep -v Warn $OUT/lm_full.log | grep -v "^\s*$" | tail -12
