#!/usr/bin/env bash
# What the live reports cost (BENCHMARKS.md): GET /v1/reports over the store
# of the 2.4M-event replay benchmark, idle and while `nudge bench` ingests
# at 25k events/s; and what keeping the tallies costs replay (full against
# --no-ledger, interleaved, same input).
# Usage: tests/bench-reports.sh [RUNS]   (from the repository root)
set -euo pipefail
runs=${1:-3}
work=${BENCH_DIR:-target/bench}
mkdir -p "$work"
events=$work/events-20k-30d-s3.jsonl
[ -s "$events" ] || python3 tests/fixtures/gen.py --customers 20000 --days 30 --seed 3 > "$events"
cargo build --release --quiet
nudge=target/release/nudge

replay() { # label, data dir, extra args...
  local label=$1 data=$2; shift 2
  rm -rf "$data"
  "$nudge" replay --events "$events" --decisions "$work/decisions.jsonl" --report "$work/report.jsonl" \
    --data "$data" --quiet "$@" 2>"$work/stderr.txt" >/dev/null
  echo "$label $(tail -1 "$work/stderr.txt" | sed -n 's/.*: \([0-9]*\) events\/s/\1/p')"
}
for i in $(seq "$runs"); do
  replay ledger "$work/reports-data"
  replay no-ledger "$work/data" --no-ledger
done | python3 -c '
import sys, statistics
runs = {}
for line in sys.stdin:
    label, value = line.split()
    runs.setdefault(label, []).append(int(value))
base = statistics.median(runs["no-ledger"])
for label, v in runs.items():
    m = statistics.median(v)
    print(f"replay {label:<10} median {m:>8.0f} events/s ({m / base:.2f}x no-ledger)  runs: {v}")
'

cat > "$work/bench-reports.toml" <<TOML
[ingest]
write_keys = ["bench"]
[api]
tokens = ["bench-api"]
TOML
# The replayed store, served: reports back to back, then during ingest.
for i in $(seq "$runs"); do
  cp -r "$work/reports-data" "$work/reports-serve"
  echo "idle $("$nudge" bench --config "$work/bench-reports.toml" --data "$work/reports-serve" \
    --events 0 --reports 300 --json 2>/dev/null | tail -1)"
  echo "ingest-25k $("$nudge" bench --config "$work/bench-reports.toml" --data "$work/reports-serve" \
    --events 300000 --rate 25000 --batch 100 --connections 8 --reports 1000 --report-every-ms 50 --json 2>/dev/null | tail -1)"
  rm -rf "$work/reports-serve"
done | python3 -c '
import sys, json, statistics
runs = {}
for line in sys.stdin:
    label, rest = line.split(" ", 1)
    runs.setdefault(label, []).append(json.loads(rest))
for label, rs in runs.items():
    p50 = statistics.median(r["report_p50_ms"] for r in rs)
    p99 = statistics.median(r["report_p99_ms"] for r in rs)
    n = sum(r["reports"] for r in rs)
    extra = ""
    if rs[0]["events"]:
        eps = statistics.median(r["decided_events_per_sec"] for r in rs)
        extra = f"  decided {eps:.0f} events/s"
    print(f"GET /v1/reports {label:<10} p50 {p50:.2f} ms  p99 {p99:.2f} ms  ({n} reports over {len(rs)} runs){extra}")
'
