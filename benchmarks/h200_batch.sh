#!/usr/bin/env bash
# Helpers for a batch of benchmark runs on the GPU machine; source after benchmarks/h200_env.sh:
#   source benchmarks/h200_env.sh; source benchmarks/h200_batch.sh
#   q   NAME GPU METHOD                  # bench_quality.py, 90-50%, --batch-size 4
#   sp  NAME GPU SHOTS PATTERN METHOD    # bench_sparse.py --no-speed
#   wait_cache N [TIMEOUT_S]             # until N synthetic-window files are in the cache
#   poll                                 # finished rows and each run's last shot so far
#   finish DEADLINE_S                    # wait for every run (or the deadline), then tar to $OUT/res.tgz
# Every run writes /root/res/NAME.{json,md,log,stdout.log} and shares its synthetic windows through
# --synthetic-cache /root/syncache: start one run per teacher, `wait_cache`, then the others, so that
# only the first pays for the sampling. DRY=1 prints the commands instead of starting them.
# Lessons of earlier sessions: the machine is handed back after 30 s without a call, runs and all, so
# make the next call right after the one that starts the runs; three runs on one H200 slow each other.

RES=${RES:-/root/res}
CACHE=${CACHE:-/root/syncache}
B="--model $MODEL --calib-pt .stage/calib.pt --eval-pt .stage/eval.pt --device cuda --precision mixed --synthetic-cache $CACHE"
mkdir -p "$RES" "$CACHE"

_start() {  # GPU NAME command...
  local gpu=$1 name=$2
  shift 2
  if [ -n "$DRY" ]; then
    echo "CUDA_VISIBLE_DEVICES=$gpu $* > $RES/$name.stdout.log"
    return
  fi
  CUDA_VISIBLE_DEVICES=$gpu setsid nohup "$@" > "$RES/$name.stdout.log" 2>&1 < /dev/null &
}

q() {
  _start "$2" "$1" python3 benchmarks/bench_quality.py --batch-size 4 --methods "$3" $B --out "$RES/$1"
}

sp() {
  _start "$2" "$1" python3 benchmarks/bench_sparse.py --no-speed --shots "$3" --patterns "$4" --methods "$5" $B --out "$RES/$1"
}

wait_cache() {
  local want=$1 limit=${2:-600} waited=0
  while [ "$(ls "$CACHE"/synthetic_*.pt 2>/dev/null | wc -l)" -lt "$want" ] && [ "$waited" -lt "$limit" ]; do
    sleep 5
    waited=$((waited + 5))
  done
  ls "$CACHE"
}

running() { pgrep -f "benchmarks/bench_(quality|sparse).py" | wc -l; }

poll() {
  (
    cd "$RES" || exit
    grep -o "^[^ ]* [01]\.[0-9]* {.ppl.: [0-9.]*" ./*.stdout.log
    grep -hE "(unstructured|[0-9]+:[0-9]+) surgeon.*: ppl [0-9]" ./*.stdout.log | cut -c1-160
    grep -h "synthetic windows" ./*.stdout.log | cut -c1-120
    for f in ./*.stdout.log; do echo "$f: $(grep -h '^shot [0-9]*/' "$f" | tail -1 | cut -c1-60)"; done
  )
  echo "running: $(running)"
}

finish() {
  local deadline=$1 waited=0
  while [ "$(running)" -gt 0 ] && [ "$waited" -lt "$deadline" ]; do
    sleep 10
    waited=$((waited + 10))
  done
  poll
  tar czf "$OUT/res.tgz" -C "$(dirname "$RES")" "$(basename "$RES")"
}
