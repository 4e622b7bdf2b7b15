#!/usr/bin/env bash
# On the device (after `make build` and `scripts/gpu_check.sh stage` here; carry .devrun/gpu and
# .devrun/corpus): the gate optimisation (`duo identify --backend cuda`, 2000 steps) on both demo
# models with the section-4 data (--data duo) and the demo models' QA format (--data qa), then
# passkey and sentence NIAH with the gate, heuristic and a seeded random pattern at several
# retrieval ratios, and the whole CUDA test suite. Everything lands in $OUT/results.tar.
set -uo pipefail
cd "$(dirname "$0")/.."
G=.devrun/gpu
OUT=${OUT:-/tmp/out}; R=$OUT/results; mkdir -p "$R"
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/card.txt"
git rev-parse HEAD 2>/dev/null | tee "$R/commit.txt"
STEPS=${STEPS:-2000}

echo "== identify ($(date +%T)), CUDA tests alongside"
timeout 300 "$G/duo_cuda_tests" > "$R/cuda_tests.log" 2>&1 &
for m in mha gqa; do
  for data in duo qa; do
    timeout 420 "$DUO" identify --method gate --backend cuda -m models/duo-demo-$m \
      --corpus .devrun/corpus/inaugural -o "$R/pattern-gate-$data-$m" --steps "$STEPS" \
      --ctx-min 1000 --ctx-max 16000 --sink 64 --recent 256 --data $data --seed 42 \
      > "$R/identify-$data-$m.log" 2>&1 &
  done
done
wait
echo "cuda tests: $(grep -E '^\[  (PASSED|FAILED) ' "$R/cuda_tests.log" | tr '\n' ' ')"
for f in "$R"/identify-*.log; do echo "$f: $(tail -c 300 "$f" | tr '\r' '\n' | tail -2 | tr '\n' ' ')"; done

random_patterns "$R"

echo "== NIAH ($(date +%T))"
jobs_file=$R/niah_jobs.txt; : > "$jobs_file"
for m in mha gqa; do
  [[ $m == mha ]] && sps="0.75 0.875 0.9375" || sps="0.5 0.75 0.875"
  for task in passkey sentence; do
    for p in gate-duo gate-qa heuristic random; do
      case $p in
        gate-*) dir=$R/pattern-gate-${p#gate-}-$m ;;
        heuristic) dir=models/duo-demo-$m/pattern-heuristic ;;
        random) dir=$R/pattern-random-$m ;;
      esac
      for sp in $sps; do
        echo "$m $task $p $sp $dir" >> "$jobs_file"
      done
    done
  done
done
run_one() {  # model task pattern sparsity dir
  local out=$R/niah_$1_$2_$3_${4#0.}.json
  [[ -f $5/full_attention_heads.tsv ]] || { echo "$1 $2 $3 $4: no pattern"; return; }
  echo "$1 $2 $3 $4: $(timeout 120 "$DUO" niah -m models/duo-demo-$1 --haystack data/haystack \
    --task "$2" --lengths 1000,2000,4000,8000,16000 --backend cuda --sink 64 --recent 256 \
    --pattern "$5" --sparsity "$4" --json "$out" 2>&1 | tail -1)"
}
export -f run_one; export R DUO
xargs -P 8 -L 1 bash -c 'run_one "$@"' _ < "$jobs_file" | sort | tee "$R/niah_summary.txt"
echo "== done ($(date +%T))"
tar -C "$OUT" -cf "$OUT/results.tar" results && rm -rf "$R"
