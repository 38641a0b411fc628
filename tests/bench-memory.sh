#!/usr/bin/env bash
# Memory and disk over a long run (BENCHMARKS.md): resident memory of
# `nudge replay` and of `nudge serve` sampled every few seconds while they
# work through a large input, against the store's budget.
# Usage: tests/bench-memory.sh [CUSTOMERS] [DAYS] [SERVE_EVENTS]
#   (from the repository root; defaults 1000000 3 4000000)
# Env: NUDGE_BIN (a binary built elsewhere), MEMORY_MIB (the budget, 512),
#   ONLY=replay or ONLY=serve (one half).
set -euo pipefail
customers=${1:-1000000}
days=${2:-3}
serve_events=${3:-4000000}
budget=${MEMORY_MIB:-512}
work=${BENCH_DIR:-target/bench}
mkdir -p "$work"
events=$work/events-$customers-${days}d-s5.jsonl
[ -s "$events" ] || python3 tests/fixtures/gen.py --customers "$customers" --days "$days" --seed 5 > "$events"
nudge=${NUDGE_BIN:-target/release/nudge}
[ -n "${NUDGE_BIN:-}" ] || cargo build --release --quiet

sample() { # pid, label: one line per 5 s: seconds, RSS MiB, store MiB
  local pid=$1 label=$2 t=0
  while kill -0 "$pid" 2>/dev/null; do
    local rss
    rss=$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$pid/status" 2>/dev/null || echo 0)
    echo "$label t=${t}s rss_mib=$rss store_mib=$(du -sm "$work/mem-data" 2>/dev/null | cut -f1)"
    sleep 5
    t=$((t + 5))
  done
}

if [ "${ONLY:-}" != serve ]; then
echo "# replay of $(wc -l < "$events") events over $customers customers, memory_mib=$budget"
rm -rf "$work/mem-data"
"$nudge" replay --events "$events" --decisions "$work/mem-decisions.jsonl" \
  --report "$work/mem-report.jsonl" --data "$work/mem-data" --quiet \
  --memory-mib "$budget" 2>"$work/mem-replay.txt" >/dev/null &
sample $! replay
wait
tail -1 "$work/mem-replay.txt"
fi
[ "${ONLY:-}" = replay ] && exit 0

echo "# serve: $serve_events events over $customers customers through nudge bench, memory_mib=$budget"
rm -rf "$work/mem-data"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
smtp=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python=python3
[ -x target/test-venv/bin/python ] && python=target/test-venv/bin/python
$python -m aiosmtpd -n -l "127.0.0.1:$smtp" -c aiosmtpd.handlers.Sink &
sink=$!
cat > "$work/mem-serve.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
data = "$work/mem-data"
[store]
memory_mib = $budget
[ingest]
write_keys = ["bench"]
[smtp]
port = $smtp
TOML
"$nudge" serve --config "$work/mem-serve.toml" 2>"$work/mem-serve.txt" >/dev/null &
server=$!
trap 'kill $sink $server 2>/dev/null' EXIT
until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null; do sleep 0.2; done
sample $server serve &
sampler=$!
"$nudge" bench --url "http://127.0.0.1:$port" --write-key bench --events "$serve_events" \
  --customers "$customers" --batch 500 --connections 4 2>/dev/null | tail -3
kill -TERM $server
wait $server || true
wait $sampler 2>/dev/null || true
