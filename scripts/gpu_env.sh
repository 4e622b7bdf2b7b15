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
