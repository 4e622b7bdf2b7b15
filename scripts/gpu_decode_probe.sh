#!/usr/bin/env bash
# Where the batch-1 decode step's time goes (after `make build` and `scripts/gpu_check.sh stage`
# here; carry .devrun/gpu). Llama-2-7B 120K: streaming-only (weights + small kernels), 25% and
# full attention, so (25% - streaming-only) and (full - streaming-only) are the attention's cost;
# the cuBLASLt configuration of every decode GEMM (DUO_GEMM_INFO=1); and the decode step with the
# GEMMs' split-K reduction schemes restricted (DUO_GEMM_REDUCTION mask). Results: $OUT/probe.tar.
set -uo pipefail
cd "$(dirname "$0")/.."
G=.devrun/gpu
O=${OUT:-/tmp/out}; R=$O/probe; mkdir -p "$R"
trap 'cp "$R/log.txt" "$O/log.txt" 2>/dev/null; tar -C "$O" -cf "$O/probe.tar" probe; rm -rf "$R"' EXIT
exec > >(tee -a "$R/log.txt") 2>&1
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
cat "$G/commit.txt" 2>/dev/null

step "cuBLASLt configurations of the decode GEMMs (Llama-3-8B, Llama-2-7B)"
DUO_GEMM_INFO=1 bench l3_1k_info 60 $L3 --contexts 1000 --decode-steps 20
grep "^gemm 1 x" "$R/l3_1k_info.err" | sort -u
DUO_GEMM_INFO=1 bench l2_1k_info 60 $L2 --contexts 1000 --decode-steps 20
grep "^gemm 1 x" "$R/l2_1k_info.err" | sort -u

step "Llama-2-7B 120K decode: streaming-only, 25%, full (synthetic prefix)"
for i in 1 2; do
  bench l2_120k_stream_$i 120 $L2 --streaming-only --contexts 120000 --synthetic-prefix --decode-steps 100
  bench l2_120k_duo75_$i 120 $L2 $P2 --contexts 120000 --synthetic-prefix --decode-steps 100
  bench l2_120k_full_$i 120 $L2 --contexts 120000 --synthetic-prefix --decode-steps 100
done

step "split-K reduction schemes: default vs mask 0 (none) vs 1 (in place), Llama-3 32K and Llama-2 25%"
for mask in default 0 1; do
  if [[ $mask == default ]]; then unset DUO_GEMM_REDUCTION; else export DUO_GEMM_REDUCTION=$mask; fi
  DUO_GEMM_INFO=1 bench l3_32k_red$mask 120 $L3 --contexts 32000 --synthetic-prefix --decode-steps 200
  grep "^gemm 1 x" "$R/l3_32k_red$mask.err" | sort -u
  bench l2_120k_duo75_red$mask 120 $L2 $P2 --contexts 120000 --synthetic-prefix --decode-steps 100
done
unset DUO_GEMM_REDUCTION
step "done"
