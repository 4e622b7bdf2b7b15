#!/usr/bin/env bash
# Final check of branch gate-tc: the whole CUDA test suite with the final binary.
set -uo pipefail
G=.devrun/gate-tc
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p $G/lib
for f in $G/libs/*.gz; do gunzip -c "$f" > "$G/lib/$(basename "$f" .gz)"; done
gunzip -c $G/duo_cuda_tests.gz > $G/duo_cuda_tests && chmod +x $G/duo_cuda_tests
export LD_LIBRARY_PATH=$PWD/$G/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export DUO_FIXTURES=$PWD/tests/fixtures DUO_CORPUS=$PWD/data/haystack DUO_MODELS=$PWD/models
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "branch $(cat $G/commit.txt)"
timeout 300 $G/duo_cuda_tests > $OUT/cuda_tests_all.log 2>&1; echo "rc=$?"
grep -E "\[  (PASSED|FAILED)|tests ran|Failure|Expected|Which is|\[ attn tc \] worst|\[ d=128|FAILED" $OUT/cuda_tests_all.log | head -40
gzip $OUT/cuda_tests_all.log
