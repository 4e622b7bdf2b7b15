#!/usr/bin/env bash
# One device call for the state of main (after `make build` and `scripts/gpu_check.sh stage` here;
# carry .devrun/gpu): the whole CUDA test suite (decode tests with each split kernel), decode
# attention vs torch SDPA, the copy bandwidth, issue 4's end-to-end targets
# with the current kernels (Llama-3-8B 32K full vs transformers in the same call; prefill with
# chunk 32K: Llama-2-7B 100K full vs 25%, Llama-3-8B 320K full vs 50%) and NIAH on the demo models
# at the most aggressive retrieval ratios (gate vs heuristic). Results: $OUT/final.tar + log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
G=.devrun/gpu
O=${OUT:-/tmp/out}; R=$O/final; mkdir -p "$R"
trap 'cp "$R/log.txt" "$O/log.txt" 2>/dev/null; tar -C "$O" -cf "$O/final.tar" final; rm -rf "$R"' EXIT
exec > >(tee -a "$R/log.txt") 2>&1
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cat "$G/commit.txt" 2>/dev/null

cuda_tests

step "decode attention vs torch SDPA (DW2)"
timeout 120 python3 "$G/attention_baseline.py" --decode-only > "$R/attn_torch.jsonl" 2>&1
grep decode "$R/attn_torch.jsonl"
timeout 120 "$G/duo_attention_bench" --decode-only > "$R/attn_duo.jsonl" 2>&1
grep decode "$R/attn_duo.jsonl"

if [[ ${PREFILL_BENCH:-0} == 1 ]]; then
  step "prefill attention kernels (duo_attention_bench --prefill-only)"
  timeout 120 "$G/duo_attention_bench" --prefill-only > "$R/attn_prefill.jsonl" 2>&1
  grep -E "prefill|streaming|half" "$R/attn_prefill.jsonl" | head -12
fi

copy_bandwidth

dw6_vs_transformers
step "decode: Llama-2-7B 120K full vs 25% (DW3), synthetic prefix"
bench l2_120k_full 120 $L2 --contexts 120000 --synthetic-prefix --decode-steps 100
bench l2_120k_duo75 120 $L2 $P2 --contexts 120000 --synthetic-prefix --decode-steps 100
step "identify profile: Llama-3-8B config, random weights (issue 6 speed)"
timeout 240 "$DUO" identify --backend cuda --random-weights --config $G/configs/llama-3-8b-1048k.json \
  --profile-contexts 1024,8192,32000 --profile-steps 3 --json "$R/identify_profile.json" \
  > "$R/identify_profile.log" 2>&1; echo "identify profile rc=$?"; tail -n 25 "$R/identify_profile.log"
[[ ${SKIP_PREFILL:-0} == 1 ]] || dw5_prefill

step "NIAH, most aggressive ratios (gate vs heuristic)"
pids=()
for m in mha gqa; do
  [[ $m == mha ]] && sp=0.96875 || sp=0.9375
  for p in gate heuristic; do
    for task in passkey sentence; do
      echo "$m $task $p $sp: $(timeout 60 "$DUO" niah -m models/duo-demo-$m --haystack data/haystack \
        --task $task --lengths 1000,2000,4000,8000,16000 --backend cuda --sink 64 --recent 256 \
        --pattern models/duo-demo-$m/pattern-$p --sparsity $sp --json "$R/niah_${m}_${task}_${p}_${sp#0.}.json" | tail -1)" &
      pids+=($!)
    done
  done
done
# Wait for these jobs only: a bare `wait` also waits for the `exec > >(tee ...)` process
# substitution above, which never ends (that hung the first run of this script until its timeout).
wait "${pids[@]}"
step "done"
