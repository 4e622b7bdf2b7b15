#!/usr/bin/env bash
# How much room is there above the identified head patterns? For each demo model, a greedy
# "oracle" (tools/head_oracle.py) picks retrieval KV heads one at a time by the measure the
# patterns are judged on, KL(full || pattern) of `duo perplexity --kl-divergence`, on calibration
# windows (the first $CALIB_W windows of each text, 16K tokens, S=64 R=256); then the oracle's
# patterns at 2 / 4 / 8 heads, the gate pattern and the needle-mass heuristic at the same head
# counts are scored on every window of the held-out texts in the same call, paired by window.
# Runs there (carry .devrun/gpu, staged by `scripts/gpu_check.sh stage`, and the text dirs, e.g.
# .devrun/heldout_sotu copied from ../shared/corpus/state_union 1991-). Results: $OUT/oracle.tar.gz
# (greedy.json and patterns per model, final kl_*.json) and $OUT/oracle_summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
R=$OUT/results && mkdir -p "$R"
source scripts/gpu_env.sh
CTX=${CTX:-16384} PAR=${PAR:-8} TEXTS=${TEXTS:-"data/haystack .devrun/heldout_sotu"} CALIB_W=${CALIB_W:-2}
GREEDY_S=${GREEDY_S:-420}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/card.txt"
cat "$G/commit.txt"
calib=() && for t in $TEXTS; do calib+=(--calib "$t:$CALIB_W"); done

step "greedy oracle, both models at once ($PAR processes each, at most $GREEDY_S s)"
for m in mha gqa; do
  timeout "$GREEDY_S" python3 tools/head_oracle.py --duo "$DUO" -m models/duo-demo-$m "${calib[@]}" \
    --max-heads 8 --keep 2,4,8 -o "$R/oracle-$m" --par "$PAR" --ctx "$CTX" 2> "$R/oracle-$m.log" &
done
wait
tail -n 8 "$R"/oracle-*.log
rm -rf "$R"/oracle-*/work

step "oracle vs gate vs heuristic on every window"
jobs=$R/jobs.txt && : > "$jobs"
for text in $TEXTS; do
  t=$(basename "$text")
  for m in mha gqa; do
    H=32 && [[ $m == gqa ]] && H=16
    for k in 2 4 8; do
      sp=$(python3 -c "print(1 - $k / $H)")
      [[ -d $R/oracle-$m/pattern-oracle-k$k ]] &&
        echo "kl_${t}_${m}_oracle_k$k $text -m models/duo-demo-$m --pattern $R/oracle-$m/pattern-oracle-k$k --threshold 0.5" >> "$jobs"
      for p in gate heuristic; do
        echo "kl_${t}_${m}_${p}_k$k $text -m models/duo-demo-$m --pattern models/duo-demo-$m/pattern-$p --sparsity $sp" >> "$jobs"
      done
    done
  done
done
kl_jobs "$jobs" --backend cuda | grep -v "rc=0$"
{
  for m in mha gqa; do
    [[ -f $R/oracle-$m/greedy.json ]] && python3 -c 'import json, sys
j = json.load(open(sys.argv[1]))
print(sys.argv[2], "greedy order (layer, head) and calibration KL:", ", ".join(
    "(%d,%d) %.5f" % (s["added"][0], s["added"][1], s["calib_kl"]) for s in j["steps"]))' "$R/oracle-$m/greedy.json" $m
  done
  python3 tools/kl_summary.py "$R" --pairs oracle:gate,oracle:heuristic,gate:heuristic
} | tee "$OUT/oracle_summary.txt"
tar -C "$R" -czf "$OUT/oracle.tar.gz" $(cd "$R" && ls -d kl_* oracle-* card.txt)
rm -rf "$R"/kl_* "$R"/oracle-*
