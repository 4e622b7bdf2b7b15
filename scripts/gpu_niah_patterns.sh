#!/usr/bin/env bash
# On the device (after scripts/gpu_check.sh stage): NIAH passkey on both demo models with the
# committed gate and heuristic patterns and a seeded random pattern (.devrun/gpu/pattern-random-*)
# at sparsities 0.5 / 0.75 / 0.875. Results: $OUT/results/niah_<model>_<pattern>_<sparsity>.json
set -uo pipefail
cd "$(dirname "$0")/.."
G=.devrun/gpu
OUT=${OUT:-/tmp/out}; R=$OUT/results; mkdir -p "$R"
source scripts/gpu_env.sh
for m in mha gqa; do
  N="-m models/duo-demo-$m --haystack data/haystack --task passkey --lengths 1000,2000,4000,8000,16000 --backend cuda --sink 64 --recent 256"
  for p in gate heuristic random; do
    dir=models/duo-demo-$m/pattern-$p; [[ $p == random ]] && dir=$G/pattern-random-$m
    for sp in 0.5 0.75 0.875; do
      echo "$m $p $sp: $(timeout 40 $G/duo niah $N --pattern $dir --sparsity $sp --json "$R/niah_${m}_${p}_${sp#0.}.json" | tail -1)"
    done
  done
done
