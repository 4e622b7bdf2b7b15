#!/bin/bash
# Key-value NIAH answer NLL on the CPU: the --labels all pattern next to the gate and heuristic
# patterns at the ratios (MHA 8/32, GQA 8/16), same binary, same prompts (seed 42).
cd /work/main
for m in mha gqa; do
  sp=0.75 && [[ $m == gqa ]] && sp=0.5
  N="-m models/duo-demo-$m --haystack data/haystack --task kv --kv-pairs 8 --lengths 1000,2000,4000 --answer-nll --sink 64 --recent 256 --backend cpu"
  for p in gate-all-labels gate heuristic; do
    name=${m}_pattern-${p}_$sp
    /tmp/nll2/duo niah $N --pattern models/duo-demo-$m/pattern-$p --sparsity $sp --json /tmp/nll2/$name.json > /tmp/nll2/$name.txt 2>&1
    echo "$name: $(tail -2 /tmp/nll2/$name.txt | tr '\n' ' ')"
  done
done
