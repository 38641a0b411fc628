#!/usr/bin/env bash
# Live-server throughput and latency (BENCHMARKS.md): `nudge bench` against a
# server it starts in the same process, with a fresh store each run and a
# real SMTP sink (aiosmtpd) for the email deliveries.
# Usage: tests/bench-serve.sh [RUNS]   (from the repository root)
set -euo pipefail
runs=${1:-3}
work=${BENCH_DIR:-target/bench}
mkdir -p "$work"
cargo build --release --quiet
nudge=target/release/nudge
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m aiosmtpd -n -l "127.0.0.1:$port" -c aiosmtpd.handlers.Sink &
sink=$!
trap 'kill $sink 2>/dev/null' EXIT
cat > "$work/bench-serve.toml" <<TOML
[smtp]
port = $port
TOML
# The same with the reorder window off: what holding events costs.
cat > "$work/bench-serve-window0.toml" <<TOML
[server]
reorder_window = "0s"
[smtp]
port = $port
TOML

run() { # label, config, extra args...
  local label=$1 config=$2; shift 2
  echo "$label $("$nudge" bench --config "$config" --json "$@" 2>/dev/null | tail -1)"
}

# Interleaved, so drift in the machine hits every variant alike.
for i in $(seq "$runs"); do
  run full-b500-c4 "$work/bench-serve.toml" --events 300000 --batch 500 --connections 4
  run full-b100-c8 "$work/bench-serve.toml" --events 300000 --batch 100 --connections 8
  run floor-b500-c4 tests/fixtures/bench-floor/nudge.toml --events 300000 --batch 500 --connections 4
  run half-rate-b500-c4 "$work/bench-serve.toml" --events 200000 --batch 500 --connections 4 --rate 25000
  run half-rate-b100-c8 "$work/bench-serve.toml" --events 200000 --batch 100 --connections 8 --rate 25000
  run half-rate-b100-c8-window0 "$work/bench-serve-window0.toml" --events 200000 --batch 100 --connections 8 --rate 25000
done | python3 -c '
import sys, json, statistics
runs = {}
for line in sys.stdin:
    label, doc = line.split(" ", 1)
    runs.setdefault(label, []).append(json.loads(doc))
keys = ["acked_events_per_sec", "decided_events_per_sec", "ack_p50_ms", "ack_p99_ms", "decision_p50_ms", "decision_p99_ms"]
print("| variant | runs | " + " | ".join(keys) + " |")
print("|---|---|" + "---|" * len(keys))
for label, rs in runs.items():
    med = lambda k: statistics.median(r[k] for r in rs if r[k] is not None)
    print(f"| {label} | {len(rs)} | " + " | ".join(f"{med(k):.1f}" for k in keys) + " |")
'
