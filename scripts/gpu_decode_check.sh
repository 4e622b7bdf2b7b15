#!/usr/bin/env bash
# One device call for the decode path (after `make build` and `scripts/gpu_check.sh stage` here;
# carry .devrun/gpu): CUDA tests; decode attention vs torch SDPA; end-to-end decode for issue 4's
# decode targets (DW3, DW6). Results: $OUT/decode.tar + log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
G=.devrun/gpu
O=${OUT:-/tmp/out}; R=$O/decode; mkdir -p "$R"
trap 'cp "$R/log.txt" "$O/log.txt" 2>/dev/null; tar -C "$O" -cf "$O/decode.tar" decode; rm -rf "$R"' EXIT
exec > >(tee -a "$R/log.txt") 2>&1
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
cat "$G/commit.txt" 2>/dev/null

if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
step "CUDA tests"
timeout 200 "$G/duo_cuda_tests" > "$R/cuda_tests.log" 2>&1; echo "cuda tests rc=$?"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED" "$R/cuda_tests.log" | tail -12
fi

step "decode attention: torch SDPA, then duo"
timeout 120 python3 "$G/attention_baseline.py" --decode-only > "$R/attn_torch.jsonl" 2>&1
grep decode "$R/attn_torch.jsonl"
timeout 120 "$G/duo_attention_bench" --decode-only > "$R/attn_duo.jsonl" 2>&1
grep decode "$R/attn_duo.jsonl"

L3="--random-weights --config $G/configs/llama-3-8b-1048k.json"
L2="--random-weights --config $G/configs/llama-2-7b-32k.json"
P2="--pattern $G/patterns/Llama-2-7B-32K-Instruct --sparsity 0.75"
step "Llama-3-8B 32K full (DW6); Llama-2-7B 120K full vs 25% (DW3)"
bench l3_32k 120 $L3 --contexts 32000 --synthetic-prefix --decode-steps 200
bench l2_120k_full 120 $L2 --contexts 120000 --synthetic-prefix --decode-steps 100
bench l2_120k_duo75 120 $L2 $P2 --contexts 120000 --synthetic-prefix --decode-steps 100
step "done"
