#!/usr/bin/env bash
# Replay throughput on the bank-retail benchmark input (BENCHMARKS.md).
# Usage: tests/bench-replay.sh [RUNS]   (from the repository root)
set -euo pipefail
runs=${1:-3}
work=${BENCH_DIR:-target/bench}
mkdir -p "$work"
events=$work/events-20k-30d-s3.jsonl
[ -s "$events" ] || python3 tests/fixtures/gen.py --customers 20000 --days 30 --seed 3 > "$events"
cargo build --release --quiet
nudge=target/release/nudge

run() { # label, extra args...
  local label=$1; shift
  rm -rf "$work/data"
  "$nudge" replay --events "$events" --decisions "$work/decisions.jsonl" --report "$work/report.jsonl" \
    --data "$work/data" --quiet "$@" 2>&1 >/dev/null | tail -1 | sed -n 's/.*: \([0-9]*\) events\/s/\1/p' | sed "s/^/$label /"
}

# Interleaved, so drift in the machine hits every variant alike.
for i in $(seq "$runs"); do
  run full
  run one-worker --workers 1
  run floor --plugins tests/fixtures/bench-floor/plugins --rules tests/fixtures/bench-floor/rules
done | python3 -c '
import sys, statistics
runs = {}
for line in sys.stdin:
    label, value = line.split()
    runs.setdefault(label, []).append(int(value))
full = statistics.median(runs["full"])
for label, v in runs.items():
    m = statistics.median(v)
    print(f"{label:<11} median {m:>8.0f} events/s  ({m / full:.2f}x full)  runs: {v}")
'
