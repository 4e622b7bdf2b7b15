#!/usr/bin/env bash
# On the device (after `make build` and `scripts/gpu_check.sh stage` here; carry .devrun/gpu):
# key-value NIAH (`duo niah --task kv`: one asked pair among --kv-pairs needles) on both demo
# models, full attention and the committed gate patterns (QA data and section-4 data), the
# heuristic and a seeded random pattern at the issue's retrieval ratios (MHA 25%, GQA 50%) and two
# more aggressive ones; 8 and 16 pairs; two seeds of 50 prompts (1K-16K x 10 depths) each.
# $PATTERNS (committed pattern-* names, or random), $MHA_SPS and $GQA_SPS (sparsities) narrow the
# grid. Results: $OUT/niah_kv.tar (JSON per run, summary.txt).
set -uo pipefail
cd "$(dirname "$0")/.."
G=.devrun/gpu
OUT=${OUT:-/tmp/out}; R=$OUT/niah_kv; mkdir -p "$R"
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/card.txt"
cat "$G/commit.txt" | tee "$R/commit.txt"
random_patterns "$R"
jobs_file=$R/jobs.txt; : > "$jobs_file"
for m in mha gqa; do
  [[ $m == mha ]] && sps=${MHA_SPS:-"0.75 0.875 0.9375"} || sps=${GQA_SPS:-"0.5 0.75 0.875"}
  for pairs in 8 16; do
    for seed in 42 1042; do
      echo "$m $pairs $seed full 0 -" >> "$jobs_file"
      for p in ${PATTERNS:-gate gate-duo-data heuristic random}; do
        case $p in
          random) dir=$R/pattern-random-$m ;;
          *) dir=models/duo-demo-$m/pattern-$p ;;
        esac
        for sp in $sps; do echo "$m $pairs $seed $p $sp $dir" >> "$jobs_file"; done
      done
    done
  done
done
run_one() {  # model pairs seed pattern sparsity dir
  local out=$R/kv_$1_$2_$3_$4_${5#0.}.json duo_args=()
  [[ $4 != full ]] && duo_args=(--sink 64 --recent 256 --pattern "$6" --sparsity "$5")
  echo "$1 pairs=$2 seed=$3 $4 $5: $(timeout 150 "$DUO" niah -m models/duo-demo-$1 --haystack data/haystack \
    --task kv --kv-pairs "$2" --seed "$3" --lengths 1000,2000,4000,8000,16000 --backend cuda \
    "${duo_args[@]}" --json "$out" 2>&1 | tail -1)"
}
export -f run_one; export R DUO
echo "== kv NIAH ($(date +%T)), $(wc -l < "$jobs_file") runs"
xargs -P 8 -L 1 bash -c 'run_one "$@"' _ < "$jobs_file" | sort | tee "$R/summary.txt"
echo "== done ($(date +%T))"
tar -C "$OUT" -cf "$OUT/niah_kv.tar" niah_kv && rm -rf "$R"
