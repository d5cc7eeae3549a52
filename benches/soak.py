#!/usr/bin/env python3
"""Soak: `aos-cm demo --churn 10` for an hour (the whole daemon with a simulated IAM, cloud and
SMs in one process; a new desired state every 10 s, the cloud connection dropped every minute,
an SM reconnected every minute), sampling the process's RSS, descriptors and threads every
10 s. After a warm-up it reports the RSS growth (median of the last five minutes against the
median of the five minutes after the warm-up) and the descriptor range. The RSS is that of the
whole process: the daemon plus the simulators, whose records are cleared every period.

    python3 benches/soak.py                          # one hour, 10 minutes of warm-up
    SOAK_SECONDS=600 WARMUP_SECONDS=120 python3 benches/soak.py   # a short run
    SOAK_CSV=/tmp/soak.csv python3 benches/soak.py  # also keep every sample
    AOS_CM_BIN=/tmp/aos-cm python3 benches/soak.py  # run this binary, do not build

Exit status 1 if a churn period did not converge, the RSS grew by 1 % or more, or the
descriptor count of the last five minutes goes above that of the five after the warm-up.
"""

import os
import re
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# AOS_CM_BIN runs a copy (so that a rebuild during the hour cannot touch the running binary).
BIN = os.environ.get("AOS_CM_BIN") or os.path.join(ROOT, "target", "release", "aos-cm")
SECONDS = int(os.environ.get("SOAK_SECONDS", "3600"))
WARMUP = int(os.environ.get("WARMUP_SECONDS", "600"))
EVERY = int(os.environ.get("CHURN_SECONDS", "10"))
SAMPLE = 10
WINDOW = 300


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def main():
    if not os.environ.get("AOS_CM_BIN"):
        subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    p = subprocess.Popen(
        [BIN, "demo", "--churn", str(EVERY), "--run-for", str(SECONDS), "--timeout", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, RUST_LOG="error"),
        text=True,
    )
    lines = []
    churn_started = threading.Event()

    def reader():
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("churn:"):
                churn_started.set()
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    if not churn_started.wait(180):
        p.kill()
        print("\n".join(lines[-30:]))
        sys.exit("the demo did not converge and start its churn")
    start = time.monotonic()
    samples = []
    while p.poll() is None:
        try:
            s = proc_status(p.pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        s["t"] = time.monotonic() - start
        samples.append(s)
        time.sleep(SAMPLE)
    p.wait()
    t.join(5)
    csv = os.environ.get("SOAK_CSV")
    if csv:
        with open(csv, "w") as f:
            f.write("seconds,rss_kib,hwm_kib,fds,threads\n")
            for s in samples:
                f.write(f"{s['t']:.0f},{s['VmRSS']},{s['VmHWM']},{s['fds']},{s['Threads']}\n")
    periods = [l for l in lines if re.search(r"\] period \d+:", l)]
    failed = [l for l in periods if "converged in" not in l]
    summary = [l for l in lines if l.startswith("churn done")]
    after = [s for s in samples if s["t"] >= WARMUP]
    if len(after) < 2:
        sys.exit(f"too few samples after the warm-up ({len(samples)} in all)")
    first = [s["VmRSS"] for s in after if s["t"] < WARMUP + WINDOW]
    last = [s["VmRSS"] for s in after if s["t"] >= after[-1]["t"] - WINDOW]
    base, end = statistics.median(first), statistics.median(last)
    growth = (end - base) / base * 100
    fds = [s["fds"] for s in after]
    threads = [s["Threads"] for s in after]
    slow = sorted(
        int(l.rsplit("converged in ", 1)[1].split()[0]) for l in periods if "converged in" in l
    )
    print(f"soak: {SECONDS} s of churn every {EVERY} s, warm-up {WARMUP} s, {len(samples)} samples")
    print(summary[0] if summary else "(no churn summary: the demo ended early)")
    if slow:
        print(
            f"convergence per period: median {statistics.median(slow)} ms, "
            f"p99 {slow[min(len(slow) - 1, int(len(slow) * 0.99))]} ms, max {slow[-1]} ms"
        )
    print(
        f"RSS after warm-up: median {base / 1024:.1f} MiB (first {WINDOW} s) -> "
        f"{end / 1024:.1f} MiB (last {WINDOW} s): {growth:+.2f} %; "
        f"min {min(s['VmRSS'] for s in after) / 1024:.1f}, max {max(s['VmRSS'] for s in after) / 1024:.1f} MiB, "
        f"peak (VmHWM) {after[-1]['VmHWM'] / 1024:.1f} MiB"
    )
    print(
        f"descriptors after warm-up: {min(fds)}-{max(fds)} (end {fds[-1]}); "
        f"threads {min(threads)}-{max(threads)}"
    )
    ok = (
        p.returncode == 0
        and not failed
        and growth < 1.0
        and max(s["fds"] for s in after if s["t"] >= after[-1]["t"] - WINDOW)
        <= max(s["fds"] for s in after if s["t"] < WARMUP + WINDOW)
    )
    if failed:
        print("periods that did not converge:")
        print("\n".join(failed[:20]))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
