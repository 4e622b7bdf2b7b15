# Sourced by the device scripts (scripts/gpu_*.sh) from the repo root on the GPU machine: unpacks
# what `scripts/gpu_check.sh stage` packed into .devrun/gpu (gzip'd binaries and OpenBLAS
# libraries, so one call's tree stays under the 64 MiB transfer limit), sets the environment and
# defines the helpers the scripts share (step, bench; bench writes under $R, set by the caller).
G=.devrun/gpu
mkdir -p "$G/lib"
for f in "$G"/libs/*.gz; do gunzip -c "$f" > "$G/lib/$(basename "$f" .gz)"; done
for b in duo duo_cuda_tests duo_attention_bench; do
  if [[ -f $G/$b.gz ]]; then gunzip -c "$G/$b.gz" > "$G/$b" && chmod +x "$G/$b"; fi
done
export LD_LIBRARY_PATH=$PWD/$G/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export DUO_FIXTURES=$PWD/tests/fixtures  # they travel with the tree
export DUO_CORPUS=$PWD/data/haystack DUO_MODELS=$PWD/models  # tests that read these from the tree
DUO=$PWD/$G/duo
# The issue-4 benchmark models (random weights) and published patterns, for `bench ... $L2 $P2`.
L3="--random-weights --config $G/configs/llama-3-8b-1048k.json"
L2="--random-weights --config $G/configs/llama-2-7b-32k.json"
P2="--pattern $G/patterns/Llama-2-7B-32K-Instruct --sparsity 0.75"
P3="--pattern $G/patterns/Llama-3-8B-Instruct-Gradient-1048k --sparsity 0.5"

step() { echo "== $1 ($(date +%T))"; }

# bench NAME TIMEOUT ARGS...: `duo bench --backend cuda --json ARGS` into $R/NAME.json (stderr in
# $R/NAME.err), then one summary line per context.
bench() {
  local name=$1 t=$2; shift 2
  timeout "$t" "$DUO" bench --backend cuda --json "$@" > "$R/$name.json" 2> "$R/$name.err"
  echo "$name rc=$?"; python3 - "$R/$name.json" <<'PY'
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except Exception as e:
    print("  no result:", e); sys.exit()
for r in j["results"]:
    print("  N=%d prefill %.3f s decode %.3f ms/tok peak %.2f GB kv %.2f GB" % (
        r["context"], r["prefill_seconds"], r["decode_ms_per_token_median"],
        r["peak_device_bytes"] / 1e9, r["kv_bytes_total"] / 1e9))
PY
}

# cuda_tests: the whole CUDA suite into $R/cuda_tests.log, then the decode tests with each decode
# split kernel forced (DUO_DECODE_MMA=0: SIMT, 1: tensor cores) into $R/cuda_tests_mma{0,1}.log.
cuda_tests() {
  step "CUDA tests, then the decode tests with each split kernel forced (DUO_DECODE_MMA=0 / 1)"
  timeout 300 "$G/duo_cuda_tests" > "$R/cuda_tests.log" 2>&1; echo "cuda tests rc=$?"
  grep -E "^\[  (PASSED|FAILED) |^\[  FAILED" "$R/cuda_tests.log" | tail -12
  local mma
  for mma in 0 1; do
    DUO_DECODE_MMA=$mma timeout 200 "$G/duo_cuda_tests" --gtest_filter='Attention*:Decode*:CudaDuo*' \
      > "$R/cuda_tests_mma$mma.log" 2>&1; echo "DUO_DECODE_MMA=$mma decode tests rc=$?"
    grep -E "^\[  (PASSED|FAILED) |^\[  FAILED" "$R/cuda_tests_mma$mma.log" | tail -6
  done
}

# kl_jobs JOBS [ARGS...]: runs the lines of JOBS ("NAME TEXT DUO_ARGS...", $PAR at once) as
# `duo perplexity --kl-divergence` over TEXT in windows of $CTX tokens (S=64 R=256, chunk 4096),
# with ARGS added to every run; writes $R/NAME.json (.txt: stdout, .err: stderr) and prints
# "NAME rc=N" per run.
kl_jobs() {
  local jobs=$1
  shift
  DUO=$DUO R=$R CTX=$CTX KL_ARGS="$*" xargs -P "${PAR:-8}" -L 1 bash -c 'n=$0 text=$1; shift
    timeout 300 "$DUO" perplexity "$@" $KL_ARGS --text "$text" --ctx "$CTX" --chunk 4096 --sink 64 \
      --recent 256 --kl-divergence --json "$R/$n.json" > "$R/$n.txt" 2> "$R/$n.err"
    echo "$n rc=$?"' < "$jobs"
}

# random_patterns DIR: seeded random head patterns for the two demo models (random.seed(7), uniform
# gates, 8 layers x 4 / 2 KV heads) in DIR/pattern-random-{mha,gqa}: the baseline the identified
# patterns must beat.
random_patterns() {
  python3 - "$1" <<'PY'
import os, random, sys
for m, L, H in (("mha", 8, 4), ("gqa", 8, 2)):
    random.seed(7)
    d = os.path.join(sys.argv[1], "pattern-random-" + m); os.makedirs(d, exist_ok=True)
    with open(d + "/full_attention_heads.tsv", "w") as f:
        for _ in range(L): f.write("\t".join("%.18e" % random.random() for _ in range(H)) + "\n")
    open(d + "/config.json", "w").write('{"sink_size": 64, "recent_size": 256, "method": "random, seed 7"}')
PY
}

# copy_bandwidth: device-to-device copy bandwidth (torch, 4 GiB, 2 x bytes / time, median of 15),
# the denominator of issue 4's decode floor.
copy_bandwidth() {
  step "copy bandwidth (torch, 4 GiB D2D, 2 x bytes / time, median of 15)"
  timeout 60 python3 - <<'PY'
import torch
n = 4 << 30
x = torch.empty(n, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); ts = []
for _ in range(15):
    a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
    a.record(); y.copy_(x); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) / 1e3)
ts.sort(); print("copy_bandwidth_TBps %.3f" % (2 * n / ts[len(ts) // 2] / 1e12))
PY
}

# dw4_80gb: issue 4 DW4 on an 80 GB card: the largest Llama-3-8B-1048k context whose full-attention
# cache fits (tried from the top down, $FULL_TRY; synthetic prefix, last 32K chunk real),
# DuoAttention 50% at that context, and DuoAttention 50% at 900K.
dw4_80gb() {
  local L3S="$L3 --synthetic-prefix --decode-steps 20"
  step "DW4: largest full-attention context (from the top down)"
  local fit=0 n
  for n in ${FULL_TRY:-530000 515000 500000 480000 460000 440000}; do
    bench l3_full_$n 90 $L3S --contexts $n
    if grep -q '"decode_ms_per_token_median"' "$R/l3_full_$n.json" 2>/dev/null; then fit=$n; break; fi
    tail -c 300 "$R/l3_full_$n.err"; echo
  done
  echo "largest full-attention context tried that fits: $fit"
  if [[ $fit -gt 0 ]]; then bench l3_duo50_$fit 90 $L3S $P3 --contexts $fit; fi
  step "DW4: DuoAttention 50% at 900K"
  bench l3_duo50_900000 120 $L3S $P3 --contexts 900000
  nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader
}

# memcheck_suite: the whole CUDA suite under compute-sanitizer memcheck, 4 gtest shards in parallel,
# each within MEMCHECK_S seconds (API errors not reported: one test provokes an out-of-memory on
# purpose); logs in $R/memcheck_{0..3}.log.
memcheck_suite() {
  local CS pids i
  step "compute-sanitizer memcheck over the whole CUDA suite (4 shards)"
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [[ -n $CS ]]; then
    pids=()
    for i in 0 1 2 3; do
      GTEST_TOTAL_SHARDS=4 GTEST_SHARD_INDEX=$i timeout "${MEMCHECK_S:-300}" "$CS" --tool memcheck --report-api-errors no \
        --leak-check no --error-exitcode 9 "$G/duo_cuda_tests" > "$R/memcheck_$i.log" 2>&1 &
      pids+=($!)
    done
    for i in 0 1 2 3; do wait "${pids[$i]}"; echo "shard $i rc=$?"; done
    for i in 0 1 2 3; do
      echo "shard $i: $(grep -cE '^\[       OK \]' "$R/memcheck_$i.log") ok, $(grep -cE '^\[  FAILED  \] [A-Za-z]' "$R/memcheck_$i.log") failed lines; $(grep -E 'ERROR SUMMARY' "$R/memcheck_$i.log" | tail -1)"
    done
  else
    echo "compute-sanitizer not found"
  fi
}

# dw6_vs_transformers: issue 4 DW6, Llama-3-8B 32K full attention, then transformers (sdpa, bf16)
# on the same config in the same call.
dw6_vs_transformers() {
  step "DW6: Llama-3-8B 32K full attention vs transformers (sdpa, bf16)"
  bench l3_32k_full 90 $L3 --contexts 32000 --chunk 32768 --decode-steps 100
  PYTHONUNBUFFERED=1 timeout 120 python3 "$G/baseline_transformers.py" --config $G/configs/llama-3-8b-1048k.json \
    --contexts 32000 --decode-steps 20 > "$R/hf_l3_32k.json" 2> "$R/hf_l3_32k.err"; echo "hf rc=$?"
  tail -c 500 "$R/hf_l3_32k.json"; echo
}

# dw5_prefill: issue 4 DW5, prefill with chunk 32K: Llama-2-7B 100K full vs 25%, Llama-3-8B 320K
# full vs 50%.
dw5_prefill() {
  step "DW5: prefill, chunk 32K: Llama-2-7B 100K full vs 25%"
  bench l2_100k_full 120 $L2 --contexts 100000 --chunk 32768 --decode-steps 20
  bench l2_100k_duo75 90 $L2 --contexts 100000 --chunk 32768 --decode-steps 20 $P2
  step "DW5: prefill, chunk 32K: Llama-3-8B 320K full vs 50%"
  bench l3_320k_full 200 $L3 --contexts 320000 --chunk 32768 --decode-steps 5
  bench l3_320k_duo50 150 $L3 --contexts 320000 --chunk 32768 --decode-steps 5 $P3
}
