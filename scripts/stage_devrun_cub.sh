#!/bin/bash
# Stages the built binaries and their runtime files into <lead checkout>/.devrun/cub for the
# device tool (which copies the lead's checkout, not this worktree). Usage:
#   scripts/stage_devrun_cub.sh BUILD_DIR DEST_CHECKOUT
set -e
B=${1:-/tmp/build-cub}; DEST=${2:-/work/main}/.devrun/cub
SRC=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$DEST"; mkdir -p "$DEST/libs" "$DEST/patterns"
cp "$B/duo" "$B/duo_cuda_tests" "$DEST/"
cp -r "$SRC/tests/fixtures" "$DEST/fixtures"
cp -r "$SRC/bench/configs" "$DEST/configs"
cp "$SRC/bench/baseline_transformers.py" "$SRC/scripts/devrun_cub.sh" "$DEST/"
cp -r /work/shared/patterns/Llama-3-8B-Instruct-Gradient-1048k "$DEST/patterns/"
for l in libopenblas.so.0 libgfortran.so.5 libquadmath.so.0; do
  gzip -c "$(readlink -f /lib/x86_64-linux-gnu/$l)" > "$DEST/libs/$l.gz"
done
du -sh "$DEST"
