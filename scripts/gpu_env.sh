# Sourced by the device scripts (scripts/gpu_*.sh) from the repo root on the GPU machine: unpacks
# what `scripts/gpu_check.sh stage` packed into .devrun/gpu (gzip'd binaries and OpenBLAS
# libraries, so one call's tree stays under the 64 MiB transfer limit) and sets the environment.
G=.devrun/gpu
mkdir -p "$G/lib"
for f in "$G"/libs/*.gz; do gunzip -c "$f" > "$G/lib/$(basename "$f" .gz)"; done
for b in duo duo_cuda_tests; do
  if [[ -f $G/$b.gz ]]; then gunzip -c "$G/$b.gz" > "$G/$b" && chmod +x "$G/$b"; fi
done
export LD_LIBRARY_PATH=$PWD/$G/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export DUO_FIXTURES=$PWD/tests/fixtures  # they travel with the tree
export DUO_CORPUS=$PWD/data/haystack DUO_MODELS=$PWD/models  # tests that read these from the tree
