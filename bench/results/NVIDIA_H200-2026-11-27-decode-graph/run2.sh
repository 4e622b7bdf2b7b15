#!/usr/bin/env bash
# decode-graph device run (issue 4): tests, before/after decode at 32K, Llama-2 120K full vs duo,
# transformers baseline, copy bandwidth, Llama-3 largest full context vs duo 50%, duo >= 900K.
set -uo pipefail
G=.devrun/decode-graph
O=${OUT:-/tmp/out}
R=$O/r
mkdir -p "$R" "$G/lib"
trap 'tar -C "$O" -czf "$O/results.tgz" r 2>/dev/null; cp "$R/log.txt" "$O/log.txt"; rm -rf "$R"' EXIT
for f in "$G"/libs/*.gz; do gunzip -c "$f" > "$G/lib/$(basename "$f" .gz)"; done
for b in duo duo_old duo_cuda_tests; do gunzip -c "$G/$b.gz" > "$G/$b"; chmod +x "$G/$b"; done
export LD_LIBRARY_PATH=$PWD/$G/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export DUO_FIXTURES=$PWD/$G/fixtures
LOG=$R/log.txt
exec > >(tee -a "$LOG") 2>&1
step() { echo "== $1 ($(date +%T))"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step "CUDA tests"
timeout 150 "$G/duo_cuda_tests" > "$R/cuda_tests.txt" 2>&1; echo "cuda tests rc=$?"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|tests ran|\[measured\].*(graph|greedy)" "$R/cuda_tests.txt" | tail -40
step "duo run: demo model, CUDA vs CPU greedy text"
for v in mha gqa gqa-duo50; do
  m=${v%%-duo50}; X=""; [[ $v == *duo50 ]] && X="--pattern models/duo-demo-$m/pattern-gate --sparsity 0.5 --sink 16 --recent 64"
  A="-m models/duo-demo-$m -p 'The pass key is 71432. Remember it. The grass is green. The sky is blue.' -n 300 --ignore-eos $X"
  eval timeout 60 "$G/duo" run $A --backend cuda > "$R/run_$v.cuda.txt" 2>/dev/null; echo "cuda rc=$?"
  eval timeout 120 "$G/duo" run $A --backend cpu > "$R/run_$v.cpu.txt" 2>/dev/null; echo "cpu rc=$?"
  cmp "$R/run_$v.cuda.txt" "$R/run_$v.cpu.txt" && echo "duo run $v: CUDA == CPU ($(wc -c < "$R/run_$v.cuda.txt") bytes)" || echo "duo run $v: CUDA != CPU"
done
J=$R/bench.jsonl
bench() {  # name, binary, timeout, env-prefix, args...
  local name=$1 bin=$2 t=$3 envp=$4; shift 4
  env $envp timeout "$t" "$G/$bin" bench --backend cuda --json "$@" > "$R/b.json" 2> "$R/b.err"
  local rc=$?
  python3 - "$name" "$R/b.json" "$rc" "$envp" <<'PY' | tee -a "$J" | python3 -c "
import json,sys
for l in sys.stdin:
    j=json.loads(l)
    for r in j.get('results',[]):
        print('  %-28s N=%-7d prefill %6.2f s decode %7.3f ms/tok (p10 %.3f p90 %.3f) peak %.2f GB driver %.2f GB kv %.2f GB %s' % (j['name'], r['context'], r.get('prefill_seconds',0), r.get('decode_ms_per_token_median',0), r.get('decode_ms_per_token_p10',0), r.get('decode_ms_per_token_p90',0), r.get('peak_device_bytes',0)/1e9, r.get('device_used_bytes_driver',0)/1e9, r.get('kv_bytes_total',0)/1e9, r.get('error','')))
    if not j.get('results'): print('  %s: rc=%s no results' % (j['name'], j['rc']))
"
import json, sys
name, path, rc, envp = sys.argv[1:5]
try:
    j = json.load(open(path))
except Exception as e:
    j = {"error": str(e)}
j.update(name=name, rc=int(rc), env=envp)
print(json.dumps(j))
PY
  [[ $rc -ne 0 ]] && tail -3 "$R/b.err"
}
L3="--random-weights --config $G/configs/llama-3-8b-1048k.json"
L2="--random-weights --config $G/configs/llama-2-7b-32k.json"
P3="--pattern $G/patterns/Llama-3-8B-Instruct-Gradient-1048k --sparsity 0.5"
P2="--pattern $G/patterns/Llama-2-7B-32K-Instruct --sparsity 0.75"
step "Llama-3-8B 32K full: old (main) vs new"
bench l3_32k_full_old duo_old 90 "" $L3 --contexts 32000 --decode-steps 100
bench l3_32k_full_new duo 90 "" $L3 --contexts 32000 --decode-steps 100
bench l3_32k_full_new_nograph duo 90 "" $L3 --contexts 32000 --decode-steps 100 --no-decode-graph
bench l3_1k_full_new duo 60 "" $L3 --contexts 1000 --decode-steps 100
step "Llama-2-7B 120K full vs duo 25%"
bench l2_120k_full duo 100 "" $L2 --contexts 120000 --decode-steps 50
bench l2_120k_duo75 duo 70 "" $L2 --contexts 120000 --decode-steps 50 $P2
step "Llama-3-8B 980K full vs duo 50%, 900K duo 50%: decode only (synthetic prefix, last chunk 1024 real)"
bench l3_full_980000_c1k duo 90 "" $L3 --contexts 980000 --chunk 1024 --decode-steps 20 --synthetic-prefix
bench l3_duo50_980000_c1k duo 90 "" $L3 --contexts 980000 --chunk 1024 --decode-steps 20 --synthetic-prefix $P3
bench l3_duo50_900000_c1k duo 90 "" $L3 --contexts 900000 --chunk 1024 --decode-steps 20 --synthetic-prefix $P3
step "done"
