#!/usr/bin/env bash
# decode-fuse device run (issue 4): CUDA tests, duo run CUDA vs CPU, decode benchmarks of main
# (duo_main) and this branch (duo) in the same call on the same card.
set -uo pipefail
G=.devrun/decode-fuse
O=${OUT:-/tmp/out}
R=$O/r
mkdir -p "$R" "$G/lib"
trap 'tar -C "$O" -czf "$O/results.tgz" r 2>/dev/null; rm -rf "$R"' EXIT
for f in "$G"/libs/*.gz; do gunzip -c "$f" > "$G/lib/$(basename "$f" .gz)"; done
for b in duo duo_main duo_cuda_tests; do gunzip -c "$G/$b.gz" > "$G/$b"; chmod +x "$G/$b"; done
export LD_LIBRARY_PATH=$PWD/$G/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export DUO_FIXTURES=$PWD/$G/fixtures
exec > >(tee -a "$O/log.txt") 2>&1
step() { echo "== $1 ($(date +%T))"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step "CUDA tests"
timeout 120 "$G/duo_cuda_tests" > "$R/cuda_tests.txt" 2>&1; echo "cuda tests rc=$?"
grep -E "^\[  (PASSED|FAILED) |^\[  FAILED|tests ran|fused vs op|\[attn-seq\] fused|\[measured\].*(graph|greedy|chunk)" "$R/cuda_tests.txt" | tail -45
J=$R/bench.jsonl
bench() {  # name, binary, timeout, env-prefix, args...
  local name=$1 bin=$2 t=$3 envp=$4; shift 4
  env $envp timeout "$t" "$G/$bin" bench --backend cuda --json "$@" > "$R/$name.json" 2> "$R/$name.err"
  local rc=$?
  python3 - "$name" "$R/$name.json" "$rc" "$envp" <<'PY' | tee -a "$J" | python3 -c "
import json,sys
for l in sys.stdin:
    j=json.loads(l)
    for r in j.get('results',[]):
        print('  %-24s N=%-7d decode %7.3f ms/tok (p10 %.3f p90 %.3f) prefill %6.2f s peak %.2f GB kv %.2f GB' % (j['name'], r['context'], r.get('decode_ms_per_token_median',0), r.get('decode_ms_per_token_p10',0), r.get('decode_ms_per_token_p90',0), r.get('prefill_seconds',0), r.get('peak_device_bytes',0)/1e9, r.get('kv_bytes_total',0)/1e9))
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
  [[ $rc -ne 0 ]] && tail -3 "$R/$name.err"
  grep -E "^decode graph|^gemm tune" "$R/$name.err" | head -3
}
L3="--random-weights --config $G/configs/llama-3-8b-1048k.json --contexts 1000,32000 --decode-steps 100"
L2="--random-weights --config $G/configs/llama-2-7b-32k.json --contexts 120000 --decode-steps 50 --synthetic-prefix --chunk 1024"
P2="--pattern $G/patterns/Llama-2-7B-32K-Instruct --sparsity 0.75"
step "Llama-3-8B-1048k full, 1K and 32K: main vs new"
bench l3_main duo_main 60 "" $L3
bench l3_new duo 60 "DUO_GRAPH_NODES=1" $L3
step "Llama-2-7B-32K 120K (synthetic prefix, last chunk 192 real): full vs duo 25%"
bench l2_full_main duo_main 60 "" $L2
bench l2_full_new duo 60 "" $L2
bench l2_duo_main duo_main 60 "" $L2 $P2
bench l2_duo_new duo 60 "DUO_GRAPH_NODES=1" $L2 $P2
step "duo run: demo models, CUDA vs CPU greedy text"
for m in mha gqa; do
  A="-m models/duo-demo-$m -p 'The pass key is 71432. Remember it. The grass is green. The sky is blue.' -n 300 --ignore-eos"
  eval timeout 60 "$G/duo" run $A --backend cuda > "$R/run_$m.cuda.txt" 2>/dev/null; echo "cuda rc=$?"
  eval timeout 120 "$G/duo" run $A --backend cpu > "$R/run_$m.cpu.txt" 2>/dev/null; echo "cpu rc=$?"
  cmp -s "$R/run_$m.cuda.txt" "$R/run_$m.cpu.txt" && echo "duo run $m: CUDA == CPU ($(wc -c < "$R/run_$m.cuda.txt") bytes)" || echo "duo run $m: CUDA != CPU"
done
step "extras: DUO_PDL=0 and DUO_GEMM_TUNE=1"
bench l3_new_nopdl duo 60 "DUO_PDL=0" $L3
bench l3_new_tune duo 60 "DUO_GEMM_TUNE=1" $L3
bench l2_duo_new_tune duo 60 "DUO_GEMM_TUNE=1" $L2 $P2
DUO_PDL=0 timeout 40 "$G/duo_cuda_tests" --gtest_filter='*Decode*:*CudaDuo*:AttentionSequence*' > "$R/cuda_tests_nopdl.txt" 2>&1; echo "DUO_PDL=0 subset rc=$?"; grep -E "tests ran|PASSED|FAILED" "$R/cuda_tests_nopdl.txt" | tail -4
step "done"
