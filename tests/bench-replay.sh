#!/usr/bin/env bash
# Replay throughput on the bank-retail benchmark input (BENCHMARKS.md).
# Usage: tests/bench-replay.sh [RUNS]   (from the repository root)
# With NUDGE_BASELINE=/path/to/another/nudge, a `baseline` variant runs the
# `full` command with that binary in the same rounds (an earlier commit's
# build, say), so the two are compared in one run. Prints medians of
# events/s and of peak RSS (GNU time).
set -euo pipefail
runs=${1:-3}
work=${BENCH_DIR:-target/bench}
mkdir -p "$work"
events=$work/events-20k-30d-s3.jsonl
[ -s "$events" ] || python3 tests/fixtures/gen.py --customers 20000 --days 30 --seed 3 > "$events"
# NUDGE_BIN: a binary built elsewhere instead of this checkout's release build.
nudge=${NUDGE_BIN:-target/release/nudge}
[ -n "${NUDGE_BIN:-}" ] || cargo build --release --quiet
baseline=${NUDGE_BASELINE:-}

run() { # label, binary, extra args...
  local label=$1 bin=$2; shift 2
  rm -rf "$work/data"
  # Peak RSS from GNU time (KiB), events/s from the summary line.
  /usr/bin/time -f "rss_kib %M" -o "$work/time.txt" \
    "$bin" replay --events "$events" --decisions "$work/decisions.jsonl" --report "$work/report.jsonl" \
    --data "$work/data" --quiet "$@" 2>"$work/stderr.txt" >/dev/null
  local eps rss
  eps=$(tail -1 "$work/stderr.txt" | sed -n 's/.*: \([0-9]*\) events\/s/\1/p')
  rss=$(sed -n 's/^rss_kib //p' "$work/time.txt")
  echo "$label $eps $rss"
}

# Interleaved, so drift in the machine hits every variant alike.
for i in $(seq "$runs"); do
  run full "$nudge"
  [ -n "$baseline" ] && run baseline "$baseline"
  run one-worker "$nudge" --workers 1
  run floor "$nudge" --plugins tests/fixtures/bench-floor/plugins --rules tests/fixtures/bench-floor/rules
done | python3 -c '
import sys, statistics
runs, rss = {}, {}
for line in sys.stdin:
    label, value, kib = line.split()
    runs.setdefault(label, []).append(int(value))
    rss.setdefault(label, []).append(int(kib))
full = statistics.median(runs["full"])
for label, v in runs.items():
    m = statistics.median(v)
    r = statistics.median(rss[label]) / 1024
    print(f"{label:<11} median {m:>8.0f} events/s  ({m / full:.2f}x full)  peak RSS {r:.0f} MiB  runs: {v}")
'
