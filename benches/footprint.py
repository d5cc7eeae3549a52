#!/usr/bin/env python3
"""Footprint of `aos-cm run`: stripped binary size, time from exec to serving (the SM server
listening, the line the daemon prints on stdout), RSS after two idle seconds, and open
descriptors. Measured with an empty store and with the store a 100-node, 5,000-instance demo
leaves behind. Everything stays on loopback: the cloud URL points at a closed local port (the
link retries in the background), the SM server listens on 127.0.0.1:0.

    python3 benches/footprint.py            # builds the release binary first
    RUNS=9 python3 benches/footprint.py     # more runs per row (median reported)
    AOS_CM_BIN=/path/to/aos-cm python3 benches/footprint.py   # measure that binary, no build
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("AOS_CM_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"),
    os.environ.get("PROFILE_DIR", "release"),
    "aos-cm",
)
RUNS = int(os.environ.get("RUNS", "5"))


def config(workdir, system_id):
    path = os.path.join(workdir, "aos_cm.cfg")
    with open(path, "w") as f:
        json.dump(
            {
                "workingDir": workdir,
                "serviceDiscoveryUrl": "http://127.0.0.1:9/sd/v7/",
                "cmServerUrl": "127.0.0.1:0",
                "storageDir": os.path.join(workdir, "storages"),
                "stateDir": os.path.join(workdir, "states"),
                "identity": {"systemId": system_id, "nodeId": "main"},
            },
            f,
        )
    return path


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def one_run(cfg):
    start = time.perf_counter()
    p = subprocess.Popen(
        [BIN, "run", "-c", cfg],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, RUST_LOG="error"),
        text=True,
    )
    line = p.stdout.readline()
    serving = (time.perf_counter() - start) * 1000
    if "running" not in line:
        p.kill()
        sys.exit(f"the daemon did not start: {line!r}")
    time.sleep(2)
    rss = status_kib(p.pid, "VmRSS")
    hwm = status_kib(p.pid, "VmHWM")
    fds = len(os.listdir(f"/proc/{p.pid}/fd"))
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=10)
    return serving, rss, hwm, fds


def row(name, cfg):
    runs = [one_run(cfg) for _ in range(RUNS)]
    med = lambda i: statistics.median(r[i] for r in runs)
    print(
        f"| {name} | start to serving {med(0):.1f} ms "
        f"(runs {min(r[0] for r in runs):.1f}-{max(r[0] for r in runs):.1f}) | "
        f"RSS after 2 s {med(1) / 1024:.1f} MiB, peak {med(2) / 1024:.1f} MiB | "
        f"{med(3):.0f} descriptors |"
    )


def main():
    if not os.environ.get("AOS_CM_BIN"):
        subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    size = os.path.getsize(BIN)
    print(f"| stripped binary | {size / 1048576:.1f} MiB ({size} bytes) | | |")
    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty")
        os.makedirs(empty)
        row("empty store", config(empty, "footprint-unit"))
        big = os.path.join(tmp, "big")
        subprocess.run(
            [BIN, "demo", "--nodes", "100", "--instances", "5000", "--workdir", big],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        row("store of 100 nodes x 5,000 instances", config(big, "aos-cm-demo-synthetic-unit"))


if __name__ == "__main__":
    main()
