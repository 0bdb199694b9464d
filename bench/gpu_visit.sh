#!/usr/bin/env bash
# A visit to a GPU machine in parts that each end within a 10-minute command, for machines that
# hand back only a few files: every part packs what it wrote into ONE archive.
#
#     bash bench/gpu_visit.sh checks     # build, pytest -m gpu, compute-sanitizer (gpu_checks.sh)
#     bash bench/gpu_visit.sh kernels    # bench/kernel_bandwidth.py, optim.py (fp32 and bf16) on cuda
#     bash bench/gpu_visit.sh rest       # bench/overhead.py (tiny Llama, Qwen3-0.6B-shaped), e2e.py on cuda
#
# The archive is $OUT/<part>.tar.gz when OUT is set (else bench/results/visit/<part>.tar.gz): the
# logs, and the benchmark results laid out as bench/results/<device>/ so that unpacking it at the
# repository root puts them where they belong. Each step has its own time limit (seconds, from
# the environment: CHECKS_LIMIT, KERNELS_LIMIT, OPTIM_LIMIT, REST_LIMIT), so a slow step costs that
# step only and the archive is still written. The CUDA build is cached in build/grades-cache, so
# a later part on the same (still held) machine does not compile again.
set -uo pipefail
part=${1:-}
case "$part" in
  checks|kernels|rest) ;;
  *) echo "usage: bash bench/gpu_visit.sh checks|kernels|rest" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
ROOT=$PWD
DEST=${OUT:-$ROOT/bench/results/visit}
mkdir -p "$DEST"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 GRADES_STRICT=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export GRADES_CACHE=${GRADES_CACHE:-$ROOT/build/grades-cache}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
PY=${PYTHON:-$(command -v python3 || command -v python)}
status=0
touch "$WORK/.start"

run() {  # run LIMIT NAME CMD...: one step, its output in $WORK/NAME.log
  local limit=$1 name=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --kill-after=20 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  tail -25 "$WORK/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  [ $rc -eq 0 ] || status=1
}

case "$part" in
  checks)
    run "${CHECKS_LIMIT:-540}" gpu_checks env OUT="$WORK/gpu_checks" bash bench/gpu_checks.sh
    ;;
  kernels)
    run "${KERNELS_LIMIT:-200}" kernels "$PY" bench/kernel_bandwidth.py --device cuda
    run "${OPTIM_LIMIT:-160}" optim "$PY" bench/optim.py --device cuda --rounds 3
    run "${OPTIM_LIMIT:-160}" optim_bf16 "$PY" bench/optim.py --device cuda --rounds 3 --dtype bf16
    ;;
  rest)
    run "${REST_LIMIT:-170}" overhead "$PY" bench/overhead.py --device cuda
    run "${REST_LIMIT:-170}" overhead_qwen "$PY" bench/overhead.py --device cuda --model qwen3-0.6b-shaped --layers 4
    run "${REST_LIMIT:-170}" e2e "$PY" bench/e2e.py --device cuda
    ;;
esac

# the benchmark scripts write bench/results/<device>/: take what this part wrote
if [ "$part" != checks ]; then
  (cd "$ROOT" && find bench/results -type f -newer "$WORK/.start" ! -path "*/visit/*") > "$WORK/written.txt"
  if [ -s "$WORK/written.txt" ]; then
    tar -C "$ROOT" -cf "$WORK/results.tar" -T "$WORK/written.txt"
  fi
fi
tar -C "$WORK" -czf "$DEST/$part.tar.gz" .
echo "packed $(tar -tzf "$DEST/$part.tar.gz" | wc -l) entries into $DEST/$part.tar.gz; status $status"
exit $status
