#!/usr/bin/env bash
# Compile every CUDA source with nvcc for sm_80 and sm_90, without torch headers.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "no .cu files"; exit 0; fi
out=$(mktemp -d)
for f in "${files[@]}"; do
  for arch in 80 90; do
    nvcc -c -std=c++17 -O3 -Icsrc/cuda -gencode "arch=compute_${arch},code=sm_${arch}" "$f" -o "$out/$(basename "$f").sm${arch}.o"
    echo "nvcc ok: $f sm_${arch}"
  done
done
rm -rf "$out"
