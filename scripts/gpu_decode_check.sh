#!/usr/bin/env bash
# One device call for the decode path (after `make build` and `scripts/gpu_check.sh stage` here;
# carry .devrun/gpu, plus .devrun/me for the attention bench of the previous commit if staged
# there as attn_bench_base.gz): CUDA tests; one-row GEMM kernel vs cuBLAS; decode attention vs
# torch SDPA (DUO_DECODE_STAGES); end-to-end decode with the one-row kernel on and off
# (DUO_GEMV=0) and its DUO_GEMV_FLAGS variants, for issue 4's decode targets. Results: $OUT/decode.tar + log.txt.
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
grep -E "one-row|linear_swiglu" "$R/cuda_tests.log" | sort -k9 -g | tail -3
fi

step "one-row GEMM: duo gemv vs cuBLAS (Llama-3-8B decode shapes), DUO_GEMV_FLAGS variants"
for f in ${GEMV_FLAGS:-1 5}; do
  echo "flags $f:"; DUO_GEMV_FLAGS=$f timeout 120 "$G/duo_gemv_bench" | tee "$R/gemv_f$f.jsonl"
done

step "decode attention: torch SDPA, then duo (base = previous commit if staged), stages 4 / 3 / 2"
timeout 120 python3 "$G/attention_baseline.py" --decode-only > "$R/attn_torch.jsonl" 2>&1
grep decode "$R/attn_torch.jsonl"
if [[ -f .devrun/me/attn_bench_base.gz ]]; then
  gunzip -c .devrun/me/attn_bench_base.gz > /tmp/attn_base && chmod +x /tmp/attn_base
  echo "base:"; timeout 120 /tmp/attn_base --decode-only > "$R/attn_base.jsonl" 2>&1; grep decode "$R/attn_base.jsonl"
fi
for st in ${DECODE_STAGES:-4 3 2}; do
  DUO_DECODE_STAGES=$st timeout 120 "$G/duo_attention_bench" --decode-only > "$R/attn_s$st.jsonl" 2>&1
  echo "stages $st:"; grep decode "$R/attn_s$st.jsonl"
done

L3="--random-weights --config $G/configs/llama-3-8b-1048k.json"
L2="--random-weights --config $G/configs/llama-2-7b-32k.json"
P2="--pattern $G/patterns/Llama-2-7B-32K-Instruct --sparsity 0.75"
step "Llama-3-8B 32K full attention decode (DW6): cuBLASLt (DUO_GEMV=0), then gemv flag variants"
DUO_GEMV=0 bench l3_32k_cublas 120 $L3 --contexts 32000 --synthetic-prefix --decode-steps 200
for f in ${GEMV_FLAGS:-1 5}; do
  DUO_GEMV_FLAGS=$f bench l3_32k_gemv_f$f 120 $L3 --contexts 32000 --synthetic-prefix --decode-steps 200
done
step "Llama-2-7B 120K decode, full vs 25% (DW3): cuBLASLt, then gemv flag variants"
DUO_GEMV=0 bench l2_120k_full_cublas 120 $L2 --contexts 120000 --synthetic-prefix --decode-steps 100
DUO_GEMV=0 bench l2_120k_duo75_cublas 120 $L2 $P2 --contexts 120000 --synthetic-prefix --decode-steps 100
for f in ${GEMV_FLAGS:-1 5}; do
  DUO_GEMV_FLAGS=$f bench l2_120k_full_f$f 120 $L2 --contexts 120000 --synthetic-prefix --decode-steps 100
  DUO_GEMV_FLAGS=$f bench l2_120k_duo75_f$f 120 $L2 $P2 --contexts 120000 --synthetic-prefix --decode-steps 100
done
step "done"
