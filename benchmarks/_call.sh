set -u
bash benchmarks/gpu_run.sh none > $OUT/setup.log 2>&1
export PYTHONPATH=/tmp/shim:/tmp/site
timeout 200 python3 -P benchmarks/ab_chunk.py benchmarks/_chunk_a.py --rounds 7 --configs '[{"dqg_stages": 2}, {"out_stages": 2}]' 2>&1 | tee $OUT/ab.log
timeout 390 bash benchmarks/gpu_run.sh tests > $OUT/check.log 2>&1; echo tests rc $?
cat $OUT/tests.txt
