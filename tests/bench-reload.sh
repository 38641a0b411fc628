#!/usr/bin/env bash
# Hot reload benchmarks: `nudge bench-reload` three times at the server's
# default debounce (250 ms) and three times at 20 ms (to show the build
# itself), printing each run's JSON. Medians go into BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
for debounce in 250 20; do
  for run in 1 2 3; do
    ./target/release/nudge --log error bench-reload --debounce-ms "$debounce" \
      --iterations 30 --events 100000 --rounds 3 --json
  done
done
