#!/usr/bin/env bash
# Device run for branch gate-tc (from the repo root): tests, then main vs branch identify profile.
set -uo pipefail
T0=$SECONDS; BUDGET=${BUDGET:-340}
left() { echo $(( BUDGET - (SECONDS - T0) )); }
# cap WANT [RESERVE]: a timeout of WANT seconds, less if RESERVE must stay for what follows (>= 5).
cap() { local t=$1 l; l=$(( $(left) - ${2:-5} )); (( l < t )) && t=$l; (( t < 5 )) && t=5; echo $t; }
G=.devrun/gate-tc
OUT=${OUT:-/tmp/out}; R=$OUT/r; mkdir -p "$R"
mkdir -p $G/lib
for f in $G/libs/*.gz; do gunzip -c "$f" > "$G/lib/$(basename "$f" .gz)"; done
for b in duo duo_main duo_cuda_tests; do gunzip -c $G/$b.gz > $G/$b && chmod +x $G/$b; done
export LD_LIBRARY_PATH=$PWD/$G/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export DUO_FIXTURES=$PWD/tests/fixtures DUO_CORPUS=$PWD/data/haystack DUO_MODELS=$PWD/models
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee $R/card.txt
echo "branch $(cat $G/commit.txt), main $(cat $G/main_commit.txt)"
P="identify --random-weights --config bench/configs/llama-3-8b-1048k.json --profile-contexts 1024,8192,32000 --profile-steps 3"
summ() { grep -E "^ +[0-9]+ +[0-9.]+ |^fit:|^projection:|^identify profile|rror" "$1"; }

echo "== attention kernel tests ($(left) s left)"
timeout $(cap 60) $G/duo_cuda_tests --gtest_filter='GateCudaAttention.*' > $R/tests_attn.log 2>&1; echo "rc=$?"
grep -E "attn tc|\[  (PASSED|FAILED)|Failure|Expected|Which is|error" $R/tests_attn.log | head -60

echo "== main profile ($(left) s left)"
timeout $(cap 100 170) $G/duo_main $P --json $R/prof_main.json > $R/prof_main.txt 2>&1; echo "rc=$?"; summ $R/prof_main.txt

echo "== branch profile, defaults ($(left) s left)"
timeout $(cap 70 130) $G/duo $P --json $R/prof_branch.json > $R/prof_branch.txt 2>&1; echo "rc=$?"; summ $R/prof_branch.txt
grep -A14 "^ *32000 " $R/prof_branch.txt | tail -14

echo "== branch profile, longest first: the pool sized beside the 32K buffers, as in training ($(left) s left)"
P2="${P/1024,8192,32000/32000,8192,1024}"
timeout $(cap 70 95) $G/duo $P2 --json $R/prof_branch_desc.json > $R/prof_branch_desc.txt 2>&1; echo "rc=$?"; summ $R/prof_branch_desc.txt

echo "== Gate tests ($(left) s left)"
timeout $(cap 90 50) $G/duo_cuda_tests --gtest_filter='*Gate*:-GateCudaAttention.*' > $R/tests_gate.log 2>&1; echo "rc=$?"
grep -E "^\[ (demo|d=128|keep|FD)|\[  (PASSED|FAILED)|\[       OK|Failure|Expected|Which is|error" $R/tests_gate.log | head -70

echo "== branch profile, DUO_GATE_KEEP=0 ($(left) s left)"
if (( $(left) > 45 )); then
  DUO_GATE_KEEP=0 timeout $(cap 70 5) $G/duo $P --json $R/prof_branch_nokeep.json > $R/prof_branch_nokeep.txt 2>&1; echo "rc=$?"; summ $R/prof_branch_nokeep.txt
fi
echo "== compute-sanitizer on the tensor-core kernel test ($(left) s left)"
CS=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [[ -n "$CS" ]] && (( $(left) > 25 )); then
  timeout $(cap 60 3) "$CS" --tool memcheck --print-limit 5 $G/duo_cuda_tests --gtest_filter='GateCudaAttention.TensorCore*' > $R/memcheck.log 2>&1; echo "rc=$?"
  grep -E "ERROR SUMMARY|Invalid|PASSED|FAILED" $R/memcheck.log | head -8
else echo "skipped (${CS:-no compute-sanitizer})"; fi
echo "== done at $((SECONDS - T0)) s"
tar -C "$OUT" -czf "$OUT/results.tgz" r && rm -rf "$R"
