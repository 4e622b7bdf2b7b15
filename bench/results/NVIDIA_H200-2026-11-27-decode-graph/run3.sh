#!/usr/bin/env bash
# Rebased build: CUDA tests + duo run CUDA vs CPU on the (retrained) demo models.
set -uo pipefail
G=.devrun/decode-graph
O=${OUT:-/tmp/out}; mkdir -p "$O" "$G/lib"
for f in "$G"/libs/*.gz; do gunzip -c "$f" > "$G/lib/$(basename "$f" .gz)"; done
for b in duo duo_cuda_tests; do gunzip -c "$G/$b.gz" > "$G/$b"; chmod +x "$G/$b"; done
export LD_LIBRARY_PATH=$PWD/$G/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export DUO_FIXTURES=$PWD/$G/fixtures
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 150 "$G/duo_cuda_tests" > "$O/cuda_tests.txt" 2>&1; echo "cuda tests rc=$?"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|\[measured\].*(graph|greedy|chunk)" "$O/cuda_tests.txt" | tail -30
for m in mha gqa; do
  A="-m models/duo-demo-$m -p 'The pass key is 71432. Remember it. The grass is green. The sky is blue.' -n 300 --ignore-eos"
  eval timeout 60 "$G/duo" run $A --backend cuda > "$O/run_$m.cuda.txt" 2>/dev/null; echo "cuda rc=$?"
  eval timeout 120 "$G/duo" run $A --backend cpu > "$O/run_$m.cpu.txt" 2>/dev/null; echo "cpu rc=$?"
  cmp "$O/run_$m.cuda.txt" "$O/run_$m.cpu.txt" && echo "duo run $m: CUDA == CPU ($(wc -c < "$O/run_$m.cuda.txt") bytes)" || echo "duo run $m: CUDA != CPU"
done
