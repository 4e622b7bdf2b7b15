#!/usr/bin/env bash
# One device call for the decode path (after `make build` and `scripts/gpu_check.sh stage` here;
# carry .devrun/gpu): CUDA tests (the decode tests also with the SIMT split kernel); decode
# attention vs torch SDPA, SIMT and tensor-core split kernels; end-to-end decode for issue 4's
# decode targets (DW3, DW6) with each. Results: $OUT/decode.tar + log.txt.
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
cuda_tests
fi

step "decode attention: torch SDPA, then duo SIMT (DUO_DECODE_MMA=0) and tensor-core kernels"
timeout 120 python3 "$G/attention_baseline.py" --decode-only > "$R/attn_torch.jsonl" 2>&1
grep decode "$R/attn_torch.jsonl"
for mma in 0 1; do
  DUO_DECODE_MMA=$mma timeout 120 "$G/duo_attention_bench" --decode-only > "$R/attn_mma$mma.jsonl" 2>&1
  echo "DUO_DECODE_MMA=$mma:"; grep decode "$R/attn_mma$mma.jsonl"
done
timeout 120 python3 "$G/attention_baseline.py" --decode-only > "$R/attn_torch2.jsonl" 2>&1
echo "torch again:"; grep decode "$R/attn_torch2.jsonl"

L3="--random-weights --config $G/configs/llama-3-8b-1048k.json"
L2="--random-weights --config $G/configs/llama-2-7b-32k.json"
P2="--pattern $G/patterns/Llama-2-7B-32K-Instruct --sparsity 0.75"
if [[ -f .devrun/me/duo_base.gz ]]; then  # the previous build, same call, for A/B
  gunzip -c .devrun/me/duo_base.gz > /tmp/duo_base && chmod +x /tmp/duo_base
  step "base build $(cat .devrun/me/base_commit.txt 2>/dev/null): same three runs"
  DUO_SAVE=$DUO; DUO=/tmp/duo_base
  bench base_l3_32k 120 $L3 --contexts 32000 --synthetic-prefix --decode-steps 200
  bench base_l2_120k_full 120 $L2 --contexts 120000 --synthetic-prefix --decode-steps 100
  bench base_l2_120k_duo75 120 $L2 $P2 --contexts 120000 --synthetic-prefix --decode-steps 100
  DUO=$DUO_SAVE
fi
for mma in ${DECODE_MMA:-0 1}; do
  step "DUO_DECODE_MMA=$mma: Llama-3-8B 32K full (DW6); Llama-2-7B 120K full vs 25% (DW3)"
  DUO_DECODE_MMA=$mma bench l3_32k_mma$mma 120 $L3 --contexts 32000 --synthetic-prefix --decode-steps 200
  DUO_DECODE_MMA=$mma bench l2_120k_full_mma$mma 120 $L2 --contexts 120000 --synthetic-prefix --decode-steps 100
  DUO_DECODE_MMA=$mma bench l2_120k_duo75_mma$mma 120 $L2 $P2 --contexts 120000 --synthetic-prefix --decode-steps 100
done
step "done"
