#!/usr/bin/env bash
# Every Done-when of issue 4 on one card in one device call, baselines in the same call (after
# `make build` and `scripts/gpu_check.sh stage` here; carry .devrun/gpu). Meant for an 80 GB card
# (DW4's 900K needs one); on a larger card DW4's full-attention search starts higher (FULL_TRY).
#   DW1/DW2: attention kernels vs torch SDPA (prefill 16K-64K TFLOP/s; decode 128K/512K GB/s)
#   DW3: Llama-2-7B 120K decode, full vs 25% (three alternating pairs), peak memory
#   DW4: Llama-3-8B largest full context vs 50% there; 50% at 900K
#   DW5: prefill with chunk 32K: Llama-2 100K full vs 25%; Llama-3 320K full vs 50%
#   DW6: Llama-3-8B 32K full vs transformers (sdpa, bf16); copy bandwidth for the decode floor
# SKIP=dw4,dw5 skips steps; MEMCHECK=1 ends with the whole CUDA suite under compute-sanitizer.
# Results: $OUT/issue4.tar + log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
G=.devrun/gpu
O=${OUT:-/tmp/out}; R=$O/issue4; mkdir -p "$R"
trap 'cp "$R/log.txt" "$O/log.txt" 2>/dev/null; tar -C "$O" -cf "$O/issue4.tar" issue4; rm -rf "$R"' EXIT
exec > >(tee -a "$R/log.txt") 2>&1
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
cat "$G/commit.txt"
skip() { [[ ",${SKIP:-}," == *",$1,"* ]]; }

copy_bandwidth
step "DW1/DW2: attention kernels, torch SDPA then duo"
timeout 180 python3 "$G/attention_baseline.py" > "$R/attn_torch.jsonl" 2>&1
grep -E "prefill|decode" "$R/attn_torch.jsonl"
timeout 180 "$G/duo_attention_bench" > "$R/attn_duo.jsonl" 2>&1
grep -E "prefill|decode" "$R/attn_duo.jsonl"

dw6_vs_transformers

step "DW3: Llama-2-7B 120K decode, full vs 25% (synthetic prefix), three alternating pairs"
for i in 1 2 3; do
  bench l2_120k_full_$i 120 $L2 --contexts 120000 --synthetic-prefix --decode-steps 100
  bench l2_120k_duo75_$i 120 $L2 $P2 --contexts 120000 --synthetic-prefix --decode-steps 100
done
step "DW3 memory: real prefill (chunk 32K), full vs 25%"
bench l2_120k_full_real 150 $L2 --contexts 120000 --chunk 32768 --decode-steps 20
bench l2_120k_duo75_real 90 $L2 $P2 --contexts 120000 --chunk 32768 --decode-steps 20

skip dw4 || dw4_80gb

skip dw5 || dw5_prefill
[[ ${MEMCHECK:-0} == 1 ]] && memcheck_suite
step "done"
