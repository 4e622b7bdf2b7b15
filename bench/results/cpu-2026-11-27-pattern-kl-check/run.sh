#!/bin/bash
# CPU (fp32) cross-check of the H200 run in ../NVIDIA_H200-2026-11-27-pattern-kl: GQA demo model,
# gate vs heuristic at 8/16, first 16K window of the held-out state-of-the-union text
# (../shared/corpus/state_union/<year>-*.txt, year >= 1991, copied to .devrun/heldout_sotu).
cd /work/main
for p in gate heuristic; do
  ./build/duo perplexity -m models/duo-demo-gqa --text .devrun/heldout_sotu --ctx 16384 --windows 1 \
    --chunk 4096 --sink 64 --recent 256 --pattern models/duo-demo-gqa/pattern-$p --sparsity 0.5 \
    --kl-divergence --backend cpu --json /tmp/cpukl/gqa_$p.json > /tmp/cpukl/gqa_$p.txt 2>&1
done
