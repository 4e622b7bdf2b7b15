#!/usr/bin/env bash
# One device call for the sm_90a wgmma prefill kernel (attention_prefill_sm90.cu): attention tests
# with the default dispatch and with the kernel forced for every n, memcheck on a few cases, then
# prefill timings of the mma.sync kernel, the wgmma kernel (default, and without warpgroup ping-pong)
# and torch SDPA in the same call, and optionally `duo bench` end to end (Llama-3-8B config, 32K).
#   here:  scripts/prefill_sm90_check.sh stage DIR   (after building duo, duo_cuda_tests,
#          duo_attention_bench; DIR is carried to the device)
#   there: DIR/prefill_sm90_check.sh run [e2e]       (from the repo root; results in $OUT)
set -uo pipefail
if [[ "${1:-}" == "stage" ]]; then
  D=$2
  cd "$(dirname "$0")/.."
  rm -rf "$D" && mkdir -p "$D/libs"
  cp build/duo build/duo_cuda_tests build/duo_attention_bench bench/attention_baseline.py \
    scripts/prefill_sm90_check.sh "$D/"
  strip "$D/duo" "$D/duo_cuda_tests" "$D/duo_attention_bench"  # the carry limit is 64 MiB
  cp -r bench/configs "$D/configs"
  for l in libopenblas.so.0 libgfortran.so.5 libquadmath.so.0; do
    gzip -c "$(readlink -f /lib/x86_64-linux-gnu/$l)" > "$D/libs/$l.gz"
  done
  du -sh "$D"
  exit 0
fi
D=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}
L=$(mktemp -d)  # logs, packed into $OUT/logs.tgz at the end (few files come back)
trap 'tar -czf "$OUT/logs.tgz" -C "$L" .' EXIT
mkdir -p "$OUT" "$D/lib"
for f in "$D"/libs/*.gz; do gunzip -c "$f" > "$D/lib/$(basename "$f" .gz)"; done
export LD_LIBRARY_PATH=$D/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/card.txt"
cd "$D"
step() { echo "== $1 ($(date +%T))"; }
summary() { grep -E "^\[  (PASSED|FAILED) |tests ran|FAILED  \]" "$1" | tail -12; }

step "attention tests, default dispatch"
timeout 90 ./duo_cuda_tests --gtest_filter='Attention*' > "$L/tests_default.log" 2>&1
rc=$?; echo "rc=$rc"; summary "$L/tests_default.log"
if [[ $rc == 124 ]]; then echo "timed out (hang?): stopping"; tail -5 "$L/tests_default.log"; exit 1; fi
step "attention tests, DUO_ATTN_SM90=1 (wgmma kernel for every prefill)"
DUO_ATTN_SM90=1 timeout 90 ./duo_cuda_tests --gtest_filter='Attention*' > "$L/tests_sm90.log" 2>&1
rc=$?; echo "rc=$rc"; summary "$L/tests_sm90.log"
if [[ $rc == 124 ]]; then echo "timed out (hang?): stopping"; tail -5 "$L/tests_sm90.log"; exit 1; fi
grep -E "\[attn\] (long|n19_p13|S128|chunk_later|gqa8_prefill|nr0_prefill|edge_prefill_span)" "$L/tests_sm90.log" | cut -c1-150
step "attention tests, DUO_ATTN_SM90=1 DUO_ATTN_SM90_PINGPONG=0"
DUO_ATTN_SM90=1 DUO_ATTN_SM90_PINGPONG=0 timeout 60 ./duo_cuda_tests --gtest_filter='Attention/*' > "$L/tests_sm90_nopp.log" 2>&1
echo "rc=$?"; summary "$L/tests_sm90_nopp.log"

step "prefill timings (same card, same call)"
DUO_ATTN_SM90=0 timeout 60 ./duo_attention_bench --prefill-only > "$L/bench_mma_sync.jsonl" 2>&1; echo "rc=$?"
timeout 60 ./duo_attention_bench --prefill-only > "$L/bench_wgmma.jsonl" 2>&1; echo "rc=$?"
DUO_ATTN_SM90_PINGPONG=0 timeout 60 ./duo_attention_bench --prefill-only > "$L/bench_wgmma_nopp.jsonl" 2>&1; echo "rc=$?"
timeout 90 python3 attention_baseline.py > "$L/bench_torch.jsonl" 2>&1; echo "rc=$?"
python3 - "$L" <<'PY'
import json, sys, os
out = sys.argv[1]
def load(name):
    rows = {}
    for line in open(os.path.join(out, name)):
        try:
            j = json.loads(line)
        except Exception:
            continue
        if j.get("bench") == "prefill_causal":
            rows[j["n"]] = j
        elif "bench" in j and j["bench"].startswith("prefill_"):
            rows[j["bench"]] = j
    return rows
old, new, pp, tor = (load(f) for f in ("bench_mma_sync.jsonl", "bench_wgmma.jsonl",
                                           "bench_wgmma_nopp.jsonl", "bench_torch.jsonl"))
print("%-8s %22s %22s %22s %22s %8s" % ("n", "mma.sync", "wgmma", "wgmma no ping-pong", "torch sdpa", "w/torch"))
for n in (1024, 4096, 16384, 32768, 65536):
    f = lambda r: ("%.3f ms %6.1f TF" % (r[n]["ms"], r[n]["tflops"])) if n in r else "-"
    ratio = ("%.2fx" % (new[n]["tflops"] / tor[n]["tflops"])) if n in new and n in tor else "-"
    print("%-8d %22s %22s %22s %22s %8s" % (n, f(old), f(new), f(pp), f(tor), ratio))
for k in ("prefill_streaming_only", "prefill_half_retrieval"):
    print(k, "mma.sync", old.get(k), "\n   wgmma", new.get(k))
PY

step "compute-sanitizer memcheck, wgmma kernel forced"
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [[ -n "$CS" ]]; then
  DUO_ATTN_SM90=1 timeout 150 "$CS" --tool memcheck ./duo_cuda_tests \
    --gtest_filter='*n19_p13:*n199_p77:*gqa8_prefill:*S128_R256_prefill:*chunk_later:*S0R0_prefill:*long_n1025_p7_mixed:*long_n1031_p1900_all_streaming:*long_chunk_n1200_p500:*long_n1500_gqa4:*long_n2100_p333_gqa8' \
    > "$L/memcheck.log" 2>&1
  echo "rc=$?"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$L/memcheck.log" | tail -4
else
  echo "compute-sanitizer not found"
fi
if [[ "${2:-}" == "e2e" ]]; then
  step "duo bench, Llama-3-8B-1048k config, 32K, full attention: mma.sync vs wgmma prefill"
  A="--backend cuda --random-weights --config configs/llama-3-8b-1048k.json --contexts 32000 --chunk 32768 --decode-steps 5 --json"
  DUO_ATTN_SM90=0 timeout 120 ./duo bench $A > "$L/e2e_mma_sync.json" 2> "$L/e2e_mma_sync.err"; echo "rc=$?"
  timeout 120 ./duo bench $A > "$L/e2e_wgmma.json" 2> "$L/e2e_wgmma.err"; echo "rc=$?"
  for f in e2e_mma_sync e2e_wgmma; do
    python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['results'][0]; print(sys.argv[2], 'prefill %.3f s decode %.2f ms/tok' % (r['prefill_seconds'], r['decode_ms_per_token_median']))" "$L/$f.json" $f || tail -3 "$L/$f.err"
  done
fi
echo "== done ($(date +%T))"
