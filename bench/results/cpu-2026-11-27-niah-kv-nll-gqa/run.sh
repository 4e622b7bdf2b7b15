#!/bin/bash
cd /work/main
N="-m models/duo-demo-gqa --haystack data/haystack --task kv --kv-pairs 8 --lengths 1000,2000,4000 --answer-nll --sink 64 --recent 256 --backend cpu"
python3 - <<'PY'
import os, random
random.seed(7)
d = "/tmp/nllg/pattern-random-gqa"; os.makedirs(d, exist_ok=True)
with open(d + "/full_attention_heads.tsv", "w") as f:
    for _ in range(8): f.write("\t".join("%.18e" % random.random() for _ in range(2)) + "\n")
open(d + "/config.json", "w").write('{"sink_size": 64, "recent_size": 256, "method": "random, seed 7"}')
PY
for sp in 0.5 0.875; do
  for p in models/duo-demo-gqa/pattern-gate models/duo-demo-gqa/pattern-heuristic /tmp/nllg/pattern-random-gqa; do
    name=$(basename $p)_$sp
    ./build/duo niah $N --pattern $p --sparsity $sp --json /tmp/nllg/$name.json > /tmp/nllg/$name.txt 2>&1
    echo "$name: $(tail -2 /tmp/nllg/$name.txt | tr '\n' ' ')"
  done
done
./build/duo niah $N --json /tmp/nllg/full.json > /tmp/nllg/full.txt 2>&1
echo "full: $(tail -2 /tmp/nllg/full.txt | tr '\n' ' ')"
