#!/usr/bin/env bash
# One device call for the decode path (after `make build` and `scripts/gpu_check.sh stage` here;
# carry .devrun/gpu): CUDA tests (the decode tests also with the SIMT split kernel); decode
# attention vs torch SDPA, SIMT and tensor-core split kernels; end-to-end decode for issue 4's
# decode targets (DW3, DW6) with each (DECODE_MMA), alternating with the build staged in
# .devrun/me/duo_base.gz if there is one (ROUNDS rounds). Results: $OUT/decode.tar + log.txt.
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

L2S="$L2 --contexts 120000 --synthetic-prefix --decode-steps 100"
# One round: Llama-3-8B 32K full (DW6) and 50%, Llama-2-7B 120K full and 25% (DW3); NAME prefix.
decode_round() {
  bench $1_l3_32k 120 $L3 --contexts 32000 --synthetic-prefix --decode-steps 200
  bench $1_l3_32k_duo50 120 $L3 $P3 --contexts 32000 --synthetic-prefix --decode-steps 200
  bench $1_l2_120k_full 120 $L2S
  bench $1_l2_120k_duo75 120 $L2S $P2
}
BASE=
if [[ -f .devrun/me/duo_base.gz ]]; then  # the previous build, same call, alternating for A/B
  gunzip -c .devrun/me/duo_base.gz > /tmp/duo_base && chmod +x /tmp/duo_base
  BASE=/tmp/duo_base
fi
# DECODE_MMA: which split kernel (0: SIMT, 1: tensor cores, auto: the default choice per group).
for mma in ${DECODE_MMA:-0 1}; do
  if [[ $mma == auto ]]; then unset DUO_DECODE_MMA; else export DUO_DECODE_MMA=$mma; fi
  for round in $(seq "${ROUNDS:-1}"); do
    if [[ -n $BASE ]]; then
      step "base build $(cat .devrun/me/base_commit.txt 2>/dev/null), DUO_DECODE_MMA=$mma, round $round"
      DUO_SAVE=$DUO; DUO=$BASE; decode_round base_mma${mma}_$round; DUO=$DUO_SAVE
    fi
    step "this build, DUO_DECODE_MMA=$mma, round $round"
    decode_round mma${mma}_$round
  done
done
unset DUO_DECODE_MMA
step "done"
