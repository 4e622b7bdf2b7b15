#!/bin/bash
# Runs on the GPU machine from <checkout>/.devrun/cub (prepared by scripts/stage_devrun_cub.sh):
# CUDA tests, duo bench (full vs DuoAttention 50%), the transformers baseline, compute-sanitizer.
# Logs go to $OUT; a summary is printed last.
cd "$(dirname "$0")"
D=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p lib && for f in libs/*.gz; do gunzip -c "$f" > "lib/$(basename "$f" .gz)"; done
CUBLAS_DIR=$(dirname "$(find /usr/local/cuda* /usr/lib /opt -name 'libcublasLt.so.13*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH=$D/lib:/usr/local/cuda/lib64:$CUBLAS_DIR:$LD_LIBRARY_PATH
export DUO_FIXTURES=$D/fixtures
CTX=${CTX:-8192}; STEPS=${STEPS:-20}; CHUNK=${CHUNK:-32768}
nvidia-smi -L
ldd ./duo_cuda_tests | grep "not found"
echo "== tests"; timeout ${T_TESTS:-60} ./duo_cuda_tests --gtest_filter="${TEST_FILTER:-*}" > "$OUT/tests.log" 2>&1; echo "tests rc=$?"
echo "== bench"; timeout ${T_BENCH:-40} ./duo bench --random-weights --config configs/llama-3-8b-1048k.json --contexts $CTX --chunk $CHUNK --decode-steps $STEPS --json > "$OUT/bench_full.json" 2> "$OUT/bench_full.err"; echo "full rc=$?"
timeout ${T_BENCH:-40} ./duo bench --random-weights --config configs/llama-3-8b-1048k.json --pattern patterns/Llama-3-8B-Instruct-Gradient-1048k --sparsity 0.5 --contexts $CTX --chunk $CHUNK --decode-steps $STEPS --json > "$OUT/bench_duo.json" 2> "$OUT/bench_duo.err"; echo "duo rc=$?"
echo "== transformers"; PYTHONUNBUFFERED=1 timeout ${T_HF:-50} python3 baseline_transformers.py --config configs/llama-3-8b-1048k.json --contexts $CTX --chunk $CHUNK --decode-steps $STEPS > "$OUT/bench_hf.json" 2> "$OUT/bench_hf.err"; echo "hf rc=$?"
echo "== sanitizer"; timeout ${T_SAN:-40} compute-sanitizer --tool memcheck --error-exitcode 9 ./duo_cuda_tests --gtest_filter="${SAN_FILTER:-CudaOps.*:-CudaOps.CacheBytes*}" > "$OUT/sanitizer.log" 2>&1; echo "sanitizer rc=$?"
echo "================ SUMMARY"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[==========\]|Failure|Expected|Which is|actual|measured" "$OUT/tests.log" | head -120
tail -4 "$OUT/sanitizer.log"; grep -c "Invalid\|ERROR SUMMARY" "$OUT/sanitizer.log"
for f in bench_full bench_duo bench_hf; do echo "-- $f"; tail -3 "$OUT/$f.err"; python3 -c "
import json,sys
j=json.load(open('$OUT/$f.json'))
print(j.get('device'), j.get('pattern', j.get('engine')))
for r in j['results']: print({k:v for k,v in r.items()})
" 2>&1 | tail -4; done
