#!/usr/bin/env bash
# What the dashboard costs (BENCHMARKS.md): server time of the Overview and
# Campaigns pages over the store of the 2.4M-event replay benchmark, and
# ingest throughput at 25k events/s with and without the Operations page
# polling its live part (interleaved, same run).
# Usage: tests/bench-dashboard.sh [RUNS]   (from the repository root)
set -euo pipefail
runs=${1:-3}
work=${BENCH_DIR:-target/bench}
mkdir -p "$work"
events=$work/events-20k-30d-s3.jsonl
[ -s "$events" ] || python3 tests/fixtures/gen.py --customers 20000 --days 30 --seed 3 > "$events"
cargo build --release --quiet
nudge=target/release/nudge
if [ ! -f "$work/reports-data/db" ]; then
  "$nudge" replay --events "$events" --decisions "$work/decisions.jsonl" --report "$work/report.jsonl" \
    --data "$work/reports-data" --quiet 2>/dev/null >/dev/null
fi
cat > "$work/bench-dashboard.toml" <<TOML
[ingest]
write_keys = ["bench"]
[api]
tokens = ["bench-api"]
TOML
bench() { # label, extra args...
  local label=$1; shift
  cp -r "$work/reports-data" "$work/dashboard-serve"
  echo "$label $("$nudge" bench --config "$work/bench-dashboard.toml" --data "$work/dashboard-serve" \
    --json "$@" 2>/dev/null | tail -1)"
  rm -rf "$work/dashboard-serve"
}
for i in $(seq "$runs"); do
  bench overview --events 0 --reports 200 --probe "/ui/overview?days=all"
  bench campaigns --events 0 --reports 200 --probe "/ui/campaigns?days=all"
  bench ingest --events 300000 --rate 25000 --batch 100 --connections 8
  bench ingest+poll --events 300000 --rate 25000 --batch 100 --connections 8 \
    --reports 100000 --report-every-ms 1000 --probe /ui/operations/live
done | python3 -c '
import sys, json, statistics
runs = {}
for line in sys.stdin:
    label, rest = line.split(" ", 1)
    runs.setdefault(label, []).append(json.loads(rest))
for label in ("overview", "campaigns"):
    rs = runs[label]
    p50 = statistics.median(r["report_p50_ms"] for r in rs)
    p99 = statistics.median(r["report_p99_ms"] for r in rs)
    pages = sum(r["reports"] for r in rs)
    print(f"GET /ui/{label:<10} p50 {p50:.2f} ms  p99 {p99:.2f} ms  ({pages} pages over {len(rs)} runs)")
base = statistics.median(r["decided_events_per_sec"] for r in runs["ingest"])
for label in ("ingest", "ingest+poll"):
    rs = runs[label]
    eps = [round(r["decided_events_per_sec"]) for r in rs]
    m = statistics.median(eps)
    extra = ""
    if rs[0]["reports"]:
        live = statistics.median(r["report_p50_ms"] for r in rs)
        extra = f"  live part p50 {live:.2f} ms"
    print(f"{label:<12} decided median {m:.0f} events/s ({m / base:.2f}x ingest)  runs: {eps}{extra}")
'
