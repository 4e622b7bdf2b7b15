#!/usr/bin/env bash
# The gate optimisation with the loss over every row past sink + recent (`--labels all`) next to
# the paper's question-and-answer labels, on both demo models: identify (2000 steps, the same
# command as the committed pattern-gate/ otherwise), plus one more seed of the paper's labels on
# MHA to show how much the pattern moves with the data seed; then KL(full || pattern) on every
# window of the held-out texts at 2 / 4 / 8 retrieval KV heads (the committed gate and heuristic
# patterns at 8 heads again, to pair with in the same call) and passkey / sentence NIAH at 8 heads.
# Runs there (carry .devrun/gpu staged by `scripts/gpu_check.sh stage`, .devrun/inaugural and the
# text dirs). Results: $OUT/labels.tar.gz and $OUT/labels_summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
R=$OUT/results && mkdir -p "$R"
source scripts/gpu_env.sh
CTX=${CTX:-16384} PAR=${PAR:-8} TEXTS=${TEXTS:-"data/haystack .devrun/heldout_sotu"}
CORPUS=${CORPUS:-.devrun/inaugural} STEPS=${STEPS:-2000}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/card.txt"
cat "$G/commit.txt"

step "identify: --labels all on both models, and --labels qa --seed 43 on MHA (sharing the GPU)"
identify() {  # model labels seed name
  timeout 420 "$DUO" identify --method gate --backend cuda -m models/duo-demo-$1 --corpus "$CORPUS" \
    -o "$R/pattern-$4-$1" --steps "$STEPS" --ctx-min 1000 --ctx-max 16000 --sink 64 --recent 256 \
    --data qa --labels "$2" --seed "$3" > "$R/identify-$4-$1.log" 2>&1
  echo "$4 $1 rc=$? $(tail -c 200 "$R/identify-$4-$1.log" | tail -1)"
}
identify mha all 42 gateall & identify gqa all 42 gateall & identify mha qa 43 gateseed43 &
wait
rm -f "$R"/pattern-*/gate_checkpoint.json
for p in "$R"/pattern-*; do
  echo "$(basename "$p"):" && awk '{for (i = 1; i <= NF; i++) printf " %.3f", $i; print ""}' "$p/full_attention_heads.tsv"
done

step "KL(full || pattern) on every window"
jobs=$R/jobs.txt && : > "$jobs"
for text in $TEXTS; do
  t=$(basename "$text")
  for m in mha gqa; do
    H=32 && [[ $m == gqa ]] && H=16
    for k in 2 4 8; do
      sp=$(python3 -c "print(1 - $k / $H)")
      for p in "$R"/pattern-*-$m; do
        n=$(basename "$p" -$m) && n=${n#pattern-}
        echo "kl_${t}_${m}_${n}_k$k $text -m models/duo-demo-$m --pattern $p --sparsity $sp" >> "$jobs"
      done
    done
    sp=$(python3 -c "print(1 - 8 / $H)")
    for n in gate heuristic; do
      echo "kl_${t}_${m}_${n}_k8 $text -m models/duo-demo-$m --pattern models/duo-demo-$m/pattern-$n --sparsity $sp" >> "$jobs"
    done
  done
done
kl_jobs "$jobs" --backend cuda | grep -v "rc=0$"

step "NIAH at 8 retrieval KV heads"
for p in "$R"/pattern-*; do
  m=${p##*-} && sp=0.75 && [[ $m == gqa ]] && sp=0.5
  for task in passkey sentence; do
    n=$(basename "$p") && n=${n#pattern-}
    timeout 200 "$DUO" niah -m models/duo-demo-$m --haystack data/haystack --task $task \
      --lengths 1000,2000,4000,8000,16000 --backend cuda --sink 64 --recent 256 --pattern "$p" \
      --sparsity $sp --json "$R/niah_${n}_$task.json" > "$R/niah_${n}_$task.txt" 2>&1 &
  done
done
wait
for f in "$R"/niah_*.txt; do echo "$(basename "$f" .txt): $(tail -1 "$f")"; done | tee "$R/niah_summary.txt"

python3 tools/kl_summary.py "$R" --pairs gateall:gate,gateall:heuristic,gate:heuristic,gateseed43:heuristic,gateseed43:gate \
  | tee "$OUT/labels_summary.txt"
tar -C "$R" -czf "$OUT/labels.tar.gz" $(cd "$R" && ls)
rm -rf "$R"/*
