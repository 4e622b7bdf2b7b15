#!/usr/bin/env bash
# One-call GPU check for the device machine. Two halves:
#   scripts/gpu_check.sh stage     (here, after `make build`): copies binaries and what they read
#                                  into .devrun/gpu (git-ignored; carry it)
#   scripts/gpu_check.sh run       (there, from the repo root): CUDA tests, duo bench full vs
#                                  DuoAttention, the transformers baseline, needle-in-a-haystack on
#                                  the demo model; everything lands in $OUT/results/
set -uo pipefail
cd "$(dirname "$0")/.."
G=.devrun/gpu
if [[ "${1:-}" == "stage" ]]; then  # run: everything; tests-niah: CUDA tests + NIAH on both demo models
  rm -rf "$G" && mkdir -p "$G/libs" "$G/patterns"
  for b in duo duo_cuda_tests duo_attention_bench; do
    strip -o "$G/$b" "build/$b" && gzip "$G/$b"
  done
  cp bench/attention_baseline.py "$G/"
  git rev-parse --short HEAD > "$G/commit.txt"  # the commit the binaries were built from
  cp -r bench/configs "$G/configs"
  cp bench/baseline_transformers.py "$G/"
  cp -r ../shared/patterns/Llama-2-7B-32K-Instruct ../shared/patterns/Llama-3-8B-Instruct-Gradient-1048k "$G/patterns/"
  for l in libopenblas.so.0 libgfortran.so.5 libquadmath.so.0; do
    gzip -c "$(readlink -f /lib/x86_64-linux-gnu/$l)" > "$G/libs/$l.gz"
  done
  du -sh "$G"
  exit 0
fi
OUT=${OUT:-/tmp/out}
R=$OUT/results && mkdir -p "$R"
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/card.txt"
git rev-parse HEAD 2>/dev/null | tee "$R/commit.txt"

step "CUDA tests"
timeout 90 "$G/duo_cuda_tests" > "$R/cuda_tests.log" 2>&1; echo "cuda tests rc=$?"
grep -E "^\[  (PASSED|FAILED) |tests ran" "$R/cuda_tests.log" | tail -8

if [[ "${1:-}" != "tests-niah" ]]; then
step "duo bench: Llama-2-7B-32K config, full vs published pattern at sparsity 0.75 (S=128, R=256)"
L2="--random-weights --config $G/configs/llama-2-7b-32k.json --contexts ${L2_CTX:-120000} --chunk 32768 --decode-steps 50"
bench llama2_full 90 $L2
bench llama2_duo75 70 $L2 --pattern "$G/patterns/Llama-2-7B-32K-Instruct" --sparsity 0.75
step "duo bench: Llama-3-8B-1048k config, full vs published pattern at 0.5"
L3="--random-weights --config $G/configs/llama-3-8b-1048k.json --contexts ${L3_CTX:-32000,131072} --chunk 32768 --decode-steps 50"
bench llama3_full 90 $L3
bench llama3_duo50 70 $L3 --pattern "$G/patterns/Llama-3-8B-Instruct-Gradient-1048k" --sparsity 0.5
step "transformers baseline (sdpa, bf16), Llama-3-8B config at 32K"
PYTHONUNBUFFERED=1 timeout 70 python3 "$G/baseline_transformers.py" --config "$G/configs/llama-3-8b-1048k.json" \
  --contexts 32000 --decode-steps 50 > "$R/hf_llama3_32k.json" 2> "$R/hf_llama3_32k.err"; echo "hf rc=$?"
tail -c 600 "$R/hf_llama3_32k.json"; echo
fi

if [[ "${1:-}" != "tests-niah" ]]; then
step "needle in a haystack on models/duo-demo-mha (CUDA backend)"
python3 - <<'PY'
import os, random
random.seed(7)
d = ".devrun/gpu/pattern-random"; os.makedirs(d, exist_ok=True)
with open(d + "/full_attention_heads.tsv", "w") as f:
    for _ in range(8): f.write("\t".join("%.18e" % random.random() for _ in range(4)) + "\n")
open(d + "/config.json", "w").write('{"sink_size": 64, "recent_size": 256, "method": "random, seed 7"}')
PY
N="-m models/duo-demo-mha --haystack data/haystack --lengths 1000,2000,4000,8000,16000 --backend cuda"
for task in passkey sentence; do
  timeout 40 "$DUO" niah $N --task $task --json "$R/niah_${task}_full.json" | tail -1
  timeout 40 "$DUO" niah $N --task $task --streaming-only --sink 64 --recent 256 --json "$R/niah_${task}_streaming.json" | tail -1
  timeout 40 "$DUO" niah $N --task $task --pattern models/duo-demo-mha/pattern-heuristic --sparsity 0.75 --sink 64 --recent 256 --json "$R/niah_${task}_heuristic75.json" | tail -1
  timeout 40 "$DUO" niah $N --task $task --pattern .devrun/gpu/pattern-random --sparsity 0.75 --json "$R/niah_${task}_random75.json" | tail -1
done
else
step "needle in a haystack, both demo models, passkey (CUDA backend)"
for m in mha gqa; do
  N="-m models/duo-demo-$m --haystack data/haystack --task passkey --lengths 1000,2000,4000,8000,16000 --backend cuda --sink 64 --recent 256"
  P="--pattern models/duo-demo-$m/pattern-heuristic"
  timeout 40 "$DUO" niah $N --json "$R/niah_${m}_full.json" | tail -1
  timeout 40 "$DUO" niah $N --streaming-only --json "$R/niah_${m}_streaming.json" | tail -1
  for sp in 0.5 0.75 0.875; do timeout 40 "$DUO" niah $N $P --sparsity $sp --json "$R/niah_${m}_heuristic${sp#0.}.json" | tail -1; done
done
fi
echo "== done ($(date +%T)); pack with: tar -C \$OUT -cf \$OUT/results.tar results"
