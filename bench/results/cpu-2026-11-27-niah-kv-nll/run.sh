#!/bin/bash
cd /work/main
N="-m models/duo-demo-mha --haystack data/haystack --task kv --kv-pairs 8 --lengths 1000,2000,4000 --answer-nll --sink 64 --recent 256 --backend cpu"
python3 - <<'PY'
import os, random
random.seed(7)
d = "/tmp/nll/pattern-random-mha"; os.makedirs(d, exist_ok=True)
with open(d + "/full_attention_heads.tsv", "w") as f:
    for _ in range(8): f.write("\t".join("%.18e" % random.random() for _ in range(4)) + "\n")
open(d + "/config.json", "w").write('{"sink_size": 64, "recent_size": 256, "method": "random, seed 7"}')
PY
for sp in 0.75 0.9375; do
  for p in models/duo-demo-mha/pattern-gate models/duo-demo-mha/pattern-heuristic /tmp/nll/pattern-random-mha; do
    name=$(basename $p)_$sp
    ./build/duo niah $N --pattern $p --sparsity $sp --json /tmp/nll/$name.json > /tmp/nll/$name.txt 2>&1
    echo "$name: $(tail -2 /tmp/nll/$name.txt | tr '\n' ' ')"
  done
done
./build/duo niah $N --json /tmp/nll/full.json > /tmp/nll/full.txt 2>&1
echo "full: $(tail -2 /tmp/nll/full.txt | tr '\n' ' ')"
