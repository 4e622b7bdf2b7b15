#!/usr/bin/env bash
# Head patterns of the two demo models compared by how far they move the next-token distribution
# from full attention on held-out text: `duo perplexity --kl-divergence` (KL(full || pattern),
# top-token agreement, perplexity), windows of $CTX tokens (the second half scored), for each
# pattern (gate qa / gate qa with --labels all / gate duo-data / heuristic needle-mass /
# heuristic deviation / random seed 7)
# at three ratios per model, and streaming only. $TEXTS: text directories never trained on
# (default data/haystack: austen-persuasion, chesterton-thursday, shakespeare-macbeth; the
# demo models also held out state_union 1991-, which a run may add, e.g. .devrun/heldout_sotu
# copied from ../shared/corpus). Runs there (carry .devrun/gpu, staged by `scripts/gpu_check.sh
# stage`, and any text dir); $PAR runs share the GPU, since the per-token comparison of the two
# models' logits runs on the CPU. Results: $OUT/kl.tar.gz (kl_<text>_<model>_<pattern>_<ratio>
# .json/.txt/.err) and the tables (summary, then gate vs heuristic per window) in $OUT/kl_summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
R=$OUT/results && mkdir -p "$R"
source scripts/gpu_env.sh
CTX=${CTX:-16384} WINDOWS=${WINDOWS:-0} PAR=${PAR:-8} BACKEND=${BACKEND:-cuda} TEXTS=${TEXTS:-data/haystack}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/card.txt"
cat "$G/commit.txt"
random_patterns "$G"
step "KL(full || pattern) on held-out text, ctx $CTX, windows: ${WINDOWS} (0 = all)"
jobs=$R/kl_jobs.txt && : > "$jobs"
for text in $TEXTS; do
t=$(basename "$text")
for m in mha gqa; do
  ratios="0.75 0.875 0.9375" && [[ $m == gqa ]] && ratios="0.5 0.75 0.875"
  for sp in $ratios; do
    for p in models/duo-demo-$m/pattern-{gate,gate-all-labels,gate-duo-data,heuristic,heuristic-deviation} \
      "$G/pattern-random-$m"; do
      echo "kl_${t}_${m}_$(basename "$p")_$sp $text -m models/duo-demo-$m --pattern $p --sparsity $sp" >> "$jobs"
    done
  done
  echo "kl_${t}_${m}_streaming-only $text -m models/duo-demo-$m --streaming-only" >> "$jobs"
done
done
kl_jobs "$jobs" --windows "$WINDOWS" --backend "$BACKEND"
python3 - "$R" <<'PY' | tee "$OUT/kl_summary.txt"
import glob, json, os, re, sys
runs = {}
print("%-52s %5s %10s %10s %8s %9s" % ("run", "heads", "KL", "+/-", "same%", "PPL"))
for f in sorted(glob.glob(os.path.join(sys.argv[1], "kl_*.json"))):
    j = json.load(open(f)); name = os.path.basename(f)[3:-5]; runs[name] = j
    print("%-52s %5d %10.5f %10.5f %8.2f %9.3f" % (name, j["retrieval_kv_heads"], j["kl"],
          j["kl_stderr"], 100 * j["same_top"], j["perplexity"]))
print("\ngate patterns vs the others, paired by window: mean KL difference (other - gate) and its"
      " standard error over windows; windows where the gate's KL is lower")
for name, g in sorted(runs.items()):
    m = re.match(r"(.*)_pattern-(gate|gate-all-labels)_(.*)$", name)
    if not m: continue
    for other in ("heuristic", "heuristic-deviation", "gate-duo-data", "gate"):
        if other == m.group(2): continue
        h = runs.get("%s_pattern-%s_%s" % (m.group(1), other, m.group(3)))
        if h is None: continue
        d = [b["kl"] - a["kl"] for a, b in zip(g["per_window"], h["per_window"])]
        n = len(d); mean = sum(d) / n
        se = (sum((x - mean) ** 2 for x in d) / (n - 1) / n) ** 0.5 if n > 1 else 0
        print("  %-28s %-5s %-15s vs %-20s %+.5f +/- %.5f  gate lower in %d of %d windows" % (
              m.group(1), m.group(3), m.group(2), other, mean, se, sum(x > 0 for x in d), n))
PY
tar -C "$R" -czf "$OUT/kl.tar.gz" $(cd "$R" && ls kl_*)
rm -f "$R"/kl_*
