#!/usr/bin/env bash
# Head patterns of the two demo models compared by how far they move the next-token distribution
# from full attention on held-out text: `duo perplexity --kl-divergence` (KL(full || pattern),
# top-token agreement, perplexity) over data/haystack (austen-persuasion, chesterton-thursday,
# shakespeare-macbeth: never trained on), windows of $CTX tokens (the second half scored), for each
# pattern (gate qa / gate duo-data / heuristic needle-mass / heuristic deviation / random seed 7)
# at three ratios per model, and streaming only. Runs there (carry .devrun/gpu, staged by
# `scripts/gpu_check.sh stage`); $PAR runs share the GPU, since the per-token comparison of the
# two models' logits runs on the CPU. Results: $OUT/results/kl_<model>_<pattern>_<ratio>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
R=$OUT/results && mkdir -p "$R"
source scripts/gpu_env.sh
CTX=${CTX:-16384} WINDOWS=${WINDOWS:-0} PAR=${PAR:-8}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/card.txt"
cat "$G/commit.txt"
random_patterns "$G"
step "KL(full || pattern) on held-out text, ctx $CTX, windows: ${WINDOWS} (0 = all)"
jobs=$R/kl_jobs.txt && : > "$jobs"
for m in mha gqa; do
  ratios="0.75 0.875 0.9375" && [[ $m == gqa ]] && ratios="0.5 0.75 0.875"
  for sp in $ratios; do
    for p in models/duo-demo-$m/pattern-{gate,gate-duo-data,heuristic,heuristic-deviation} \
      "$G/pattern-random-$m"; do
      echo "kl_${m}_$(basename "$p")_$sp -m models/duo-demo-$m --pattern $p --sparsity $sp" >> "$jobs"
    done
  done
  echo "kl_${m}_streaming-only -m models/duo-demo-$m --streaming-only" >> "$jobs"
done
export DUO R CTX WINDOWS
xargs -P "$PAR" -L 1 bash -c 'n=$0; timeout 300 "$DUO" perplexity "$@" --text data/haystack \
  --ctx $CTX --windows $WINDOWS --chunk 4096 --sink 64 --recent 256 --kl-divergence \
  --backend cuda --json "$R/$n.json" > "$R/$n.txt" 2> "$R/$n.err"; echo "$n rc=$?"' < "$jobs"
python3 - "$R" <<'PY'
import glob, json, os, sys
print("%-44s %5s %10s %10s %8s %9s" % ("run", "heads", "KL", "+/-", "same%", "PPL"))
for f in sorted(glob.glob(os.path.join(sys.argv[1], "kl_*.json"))):
    j = json.load(open(f))
    print("%-44s %5d %10.5f %10.5f %8.2f %9.3f" % (os.path.basename(f)[3:-5], j["retrieval_kv_heads"],
          j["kl"], j["kl_stderr"], 100 * j["same_top"], j["perplexity"]))
PY
