#!/usr/bin/env bash
# gate-speed device call: GateCuda* tests of the branch binary, then the Llama-3-8B identify
# profile for main's binary and the branch's, same card, same call.
set -uo pipefail
G=.devrun/gate-speed
O=${OUT:-/tmp/out}
mkdir -p "$G/lib" && for f in "$G"/libs/*.gz; do gunzip -c "$f" > "$G/lib/$(basename "$f" .gz)"; done
for b in duo_main duo_branch duo_cuda_tests; do gunzip -c "$G/$b.gz" > "$G/$b" && chmod +x "$G/$b"; done
cat "$G/commits.txt"
export LD_LIBRARY_PATH=$PWD/$G/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export DUO_FIXTURES=$PWD/tests/fixtures DUO_MODELS=$PWD/models DUO_CORPUS=$PWD/data/haystack
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$O/card.txt"
echo "== tests $(date +%T)"
timeout 150 "$G/duo_cuda_tests" --gtest_filter='GateCuda*' > "$O/tests.log" 2>&1; echo "tests rc=$?"
grep -E "^\[  (PASSED|FAILED) |^\[       OK|FAILED" "$O/tests.log" | tail -12
P="identify --backend cuda --random-weights --config bench/configs/llama-3-8b-1048k.json --profile-contexts 1000,8000,16000,32000 --profile-steps 2 --ctx-min 1000 --ctx-max 32000 --steps 2000 --sink 128 --recent 256"
for b in main branch; do
  echo "== $b $(date +%T)"
  timeout 150 "$G/duo_$b" $P --json "$O/profile_$b.json" > "$O/profile_$b.txt" 2>&1; echo "$b rc=$?"
  cat "$O/profile_$b.txt"
done
