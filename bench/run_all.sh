#!/usr/bin/env bash
# Run the whole benchmark suite for one device.
#
#   bash bench/run_all.sh cpu|cuda [--smoke] [--out DIR]
#
# Runs bench/kernel_bandwidth.py, optim.py (fp32, then bf16 parameters), overhead.py, ttc_eval.py, ttc_stop.py and
# e2e.py in turn, each with --device DEV (when the script takes it) and --smoke / --out passed through. Results land in
# bench/results/<device>/ unless --out is given. A script that does not exist is skipped with a
# message; the exit status is non-zero when any script that ran failed.
set -u

usage() { echo "usage: bash bench/run_all.sh cpu|cuda [--smoke] [--out DIR]" >&2; exit 2; }

DEV=${1:-}
case "$DEV" in
  cpu|cuda) shift ;;
  *) usage ;;
esac
SMOKE=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1; shift ;;
    --out) [ $# -ge 2 ] || usage; OUT=$2; shift 2 ;;
    *) echo "run_all.sh: unknown argument $1" >&2; usage ;;
  esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if command -v python >/dev/null 2>&1; then PY=python; else PY=python3; fi
fi

if [ "$DEV" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "run_all.sh: cuda requested but torch sees no CUDA device" >&2
  exit 2
fi

failed=()
ran=0
for entry in kernel_bandwidth optim "optim --dtype bf16" overhead ttc_eval ttc_stop e2e; do
  name=${entry%% *}
  extra=()
  [ "$entry" != "$name" ] && read -r -a extra <<<"${entry#* }"
  script="$HERE/$name.py"
  if [ ! -f "$script" ]; then
    echo "== $name: skipped (bench/$name.py does not exist)"
    continue
  fi
  help=$("$PY" "$script" --help 2>/dev/null)
  args=("${extra[@]}")
  if grep -q -- "--device" <<<"$help"; then
    args+=(--device "$DEV")
  else
    echo "== $name: takes no --device; running it on its default device"
  fi
  [ "$SMOKE" = 1 ] && args+=(--smoke)
  if [ -n "$OUT" ]; then
    if grep -q -- "--out" <<<"$help"; then
      args+=(--out "$OUT")
    else
      echo "== $name: takes no --out; its results go to its own default folder"
    fi
  fi
  echo "== $name: $PY bench/$name.py ${args[*]}"
  start=$(date +%s)
  if "$PY" "$script" "${args[@]}"; then
    echo "== $name: ok ($(( $(date +%s) - start )) s)"
  else
    echo "== $name: FAILED (exit $?)" >&2
    failed+=("$name")
  fi
  ran=$((ran + 1))
done

echo "== ran $ran benchmark(s); failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
