#!/usr/bin/env bash
# One-shot GPU checks of the CUDA backend. Run from anywhere on a machine with a CUDA GPU:
#
#     bash bench/gpu_checks.sh
#
# (a) nvidia-smi, (b) build the CUDA extension and show backend availability, (c) the GPU test
# suite, (d) a small workload under compute-sanitizer memcheck (skipped with a note when the
# sanitizer is not installed). Logs go to $OUT (if set) or bench/results/gpu_checks/.
# Exit status: non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export GRADES_STRICT=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
LOG=${OUT:-$ROOT/bench/results/gpu_checks}
mkdir -p "$LOG"
# a build cache inside the log folder would be shipped back; keep it next to the sources instead
export GRADES_CACHE=${GRADES_CACHE:-$ROOT/build/grades-cache}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0
step() { echo; echo "=== $1"; }
fail() { echo "FAILED: $1"; status=1; }

step "nvidia-smi"
nvidia-smi 2>&1 | tee "$LOG/nvidia-smi.txt" || fail "nvidia-smi"

step "build + backend availability"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1 | tee "$LOG/env.txt"
GRADES_BUILD_VERBOSE=${GRADES_BUILD_VERBOSE:-0} "$PY" -m grades env 2>&1 | tee -a "$LOG/env.txt"
"$PY" -c "
import sys, grades.backends as b
ok, why = b.get('cuda').available()
print('cuda backend:', ok, why)
sys.exit(0 if ok else 1)" 2>&1 | tee -a "$LOG/env.txt"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  fail "CUDA extension build"
  echo "rebuilding verbosely for the log:"
  GRADES_BUILD_VERBOSE=1 "$PY" -c "from grades import _build; print(_build._jit('cuda'))" > "$LOG/build.txt" 2>&1
  tail -60 "$LOG/build.txt"
  exit 1
fi

step "pytest -m gpu"
"$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider --junitxml="$LOG/pytest-gpu.xml" 2>&1 | tee "$LOG/pytest-gpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "pytest -m gpu"

step "compute-sanitizer memcheck"
SAN=$(command -v compute-sanitizer || true)
for cand in "${CUDA_HOME:-}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [ -z "$SAN" ] && [ -x "$cand" ] && SAN=$cand
done
if [ -z "$SAN" ]; then
  echo "compute-sanitizer not found; memcheck skipped" | tee "$LOG/memcheck.txt"
  fail "compute-sanitizer missing"
else
  # PyTorch's caching allocator hides out-of-bounds accesses inside its large blocks; disable it
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 99 --target-processes all \
      "$PY" bench/sanitize_cuda.py 2>&1 | tee "$LOG/memcheck.txt"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ] || grep -q "ERROR SUMMARY: [1-9]" "$LOG/memcheck.txt"; then fail "memcheck (rc=$rc)"; fi
  for tool in racecheck synccheck; do
    "$SAN" --tool $tool --error-exitcode 99 "$PY" -c "
import torch, grades
from grades.ops import grad_stats, masked_adamw_
g=[torch.randn(n, device='cuda') for n in (1, 7, 4097, 70001)]
p=[torch.randn_like(t) for t in g]; m=[torch.zeros_like(t) for t in g]; v=[torch.zeros_like(t) for t in g]
grad_stats(g, backend='cuda'); masked_adamw_(p, g, m, v, step=1, backend='cuda'); torch.cuda.synchronize(); print('ok')
" > "$LOG/$tool.txt" 2>&1 || fail "$tool"
    tail -3 "$LOG/$tool.txt"
  done
fi

echo
if [ $status -eq 0 ]; then echo "ALL GPU CHECKS PASSED (logs in $LOG)"; else echo "SOME GPU CHECKS FAILED (logs in $LOG)"; fi
exit $status
