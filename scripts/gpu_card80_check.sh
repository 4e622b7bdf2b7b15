#!/usr/bin/env bash
# One device call for an 80 GB card (H100), after `make build` and `scripts/gpu_check.sh stage`
# here; carry .devrun/gpu. (1) the CUDA test suite; (2) issue 4 DW4: the largest Llama-3-8B-1048k
# context whose full-attention cache fits (tried from the top down, synthetic prefix, last 32K
# chunk real), DuoAttention 50% decode at that context, and DuoAttention 50% at 900K; (3) the
# identify profile (PROFILE=0 skips it); (4) the whole
# CUDA suite under compute-sanitizer memcheck, 4 shards in parallel, within MEMCHECK_S seconds
# (API errors not reported: one test provokes an out-of-memory on purpose).
# Results: $OUT/card80.tar + log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
G=.devrun/gpu
O=${OUT:-/tmp/out}; R=$O/card80; mkdir -p "$R"
trap 'cp "$R/log.txt" "$O/log.txt" 2>/dev/null; tar -C "$O" -cf "$O/card80.tar" card80; rm -rf "$R"' EXIT
exec > >(tee -a "$R/log.txt") 2>&1
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
cat "$G/commit.txt"

step "CUDA tests"
timeout 200 "$G/duo_cuda_tests" > "$R/cuda_tests.log" 2>&1; echo "cuda tests rc=$?"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED" "$R/cuda_tests.log" | tail -12

dw4_80gb

if [[ ${PROFILE:-1} == 1 ]]; then
step "identify profile: Llama-3-8B config, random weights (issue 6: under 1 h on one H100)"
timeout 240 "$DUO" identify --backend cuda --random-weights --config $G/configs/llama-3-8b-1048k.json \
  --profile-contexts 1024,8192,32000 --profile-steps 3 --json "$R/identify_profile.json" \
  > "$R/identify_profile.log" 2>&1; echo "identify profile rc=$?"
grep -E "^ +(1024|8192|32000) |^fit|^projection" "$R/identify_profile.log"
fi

memcheck_suite
step "done"
