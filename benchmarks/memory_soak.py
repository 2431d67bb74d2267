#!/usr/bin/env python3
"""Memory soak: private memory (USS) of vscsid's supervisor and workers under
sustained load, sampled over time.

Starts a daemon (a file LUN on tmpfs, N queues), drives it with vscsid-bench
(random 4 KiB reads and writes at QD32 on every queue) for --minutes, samples
USS/PSS/RSS of every vscsid process every --interval seconds with psutil, and
prints a table plus the growth between the first sample after warm-up and the
last. RSS includes the guest memory each worker maps, so USS is the number to
watch. Targets: worker USS <= 40 MiB, supervisor <= 60 MiB, no growth.

    python benchmarks/memory_soak.py --minutes 10
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

MiB = 1 << 20


def family(pid: int) -> dict[str, psutil.Process]:
    root = psutil.Process(pid)
    out = {"supervisor": root}
    for child in root.children():
        title = " ".join(child.cmdline()).strip()
        if "worker" in title:
            out[title.replace("vscsid: ", "")] = child
    return out


def sample(pid: int) -> dict[str, dict]:
    rows = {}
    for name, p in family(pid).items():
        try:
            m = p.memory_full_info()
        except psutil.Error:
            continue
        rows[name] = {"uss": m.uss, "pss": m.pss, "rss": m.rss}
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=30.0)
    ap.add_argument("--queues", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds before the baseline sample")
    ap.add_argument("--json-out")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vscsid-soak-", dir="/dev/shm"))
    img = work / "disk.img"
    with open(img, "wb") as f:
        f.truncate(256 * MiB)
    sock = work / "vscsid.sock"
    daemon = subprocess.Popen(
        ["vscsid", "--socket-path", str(sock), "--lun", str(img), "--num-queues",
         str(args.queues), "--quiet", "--log-format", "json", "--stats-interval", "0"],
        stderr=open(work / "daemon.log", "wb"))
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.1)
        seconds = args.minutes * 60 + args.warmup
        bench = subprocess.Popen(
            ["vscsid-bench", "--socket-path", str(sock), "--rw", "randrw", "--iodepth", "32",
             "--queues", str(args.queues), "--seconds", str(seconds), "--ramp", "0", "--json"],
            stdout=subprocess.PIPE)
        start = time.monotonic()
        samples = []
        time.sleep(min(args.warmup, seconds))
        while bench.poll() is None:
            t = time.monotonic() - start
            samples.append({"t": round(t), "procs": sample(daemon.pid)})
            time.sleep(args.interval)
        result = json.loads(bench.stdout.read() or b"{}")
        samples.append({"t": round(time.monotonic() - start), "procs": sample(daemon.pid)})
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(work, ignore_errors=True)

    names = sorted({n for s in samples for n in s["procs"]}, key=lambda n: (n != "supervisor", n))
    print(f"# vscsid memory soak: {args.minutes:g} min, {args.queues} queues, randrw 4k QD32\n")
    print(f"bench: {result.get('iops', 0):,.0f} IOPS average, errors {result.get('errors')}\n")
    print("| t (s) | " + " | ".join(f"{n} USS MiB" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for s in samples:
        cells = [f"{s['procs'][n]['uss'] / MiB:.1f}" if n in s["procs"] else "-" for n in names]
        print(f"| {s['t']} | " + " | ".join(cells) + " |")
    print()
    ok = True
    for n in names:
        vals = [s["procs"][n]["uss"] for s in samples if n in s["procs"]]
        growth = (vals[-1] - vals[0]) / MiB
        limit = 60 if n == "supervisor" else 40
        peak = max(vals) / MiB
        verdict = "ok" if peak <= limit and growth < 1.0 else "OVER"
        ok = ok and verdict == "ok"
        print(f"- {n}: USS first {vals[0] / MiB:.1f} MiB, last {vals[-1] / MiB:.1f} MiB, "
              f"peak {peak:.1f} MiB (limit {limit}), growth {growth:+.2f} MiB: {verdict}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"samples": samples, "bench": result}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
