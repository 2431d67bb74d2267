"""A quick side-by-side on tmpfs: this tree's vscsid, another build of it, and
qemu-storage-daemon, a few cells, rotated rounds (round r starts with daemon r mod n).

The same bench, placement (bench on CPU 0, daemon on CPU 1) and daemon CPU
accounting (cpuacct cgroup) as run_matrix.py, which it drives; for an A/B of one
change in minutes, where the whole matrix takes most of an hour. Prints one line
per run; no JSON. Example:

    python benchmarks/ab_tmpfs.py --base-python /path/to/other/venv/bin/python \\
        --only vscsid,base,qsd-native,qsd-native-iothread \\
        --cells randwrite:32:1,randread:32:1 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchmarks.run_matrix as rm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="vscsid,qsd-native",
                    help="vscsid, base (needs --base-python), qsd-native, qsd-native-iothread")
    ap.add_argument("--cells", default="randread:32:1,randwrite:32:1",
                    help="RW:QD:QUEUES, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base-python", help="the Python of another installed build (the 'base' row)")
    ap.add_argument("--workdir", default="/dev/shm/vscsid-ab")
    args = ap.parse_args()
    rm.set_placement("split")
    rm.REPEAT, rm.WAIT_QUIET = 1, 10
    base = Path(args.workdir)
    base.mkdir(exist_ok=True)
    img = base / "disk.img"
    if not img.exists():
        with open(img, "wb") as f:
            f.write(os.urandom(256 << 20))
    qsd = f"driver=file,node-name=disk,filename={img},aio=native,locking=off,cache.direct=on"
    rows = {"vscsid": lambda: rm.vscsid_backend("vscsid", str(img), base, queues=2),
            "base": lambda: rm.vscsid_backend("base", str(img), base, queues=2,
                                              python=args.base_python),
            "qsd-native": lambda: rm.qsd_backend("qsd-native", qsd, base, queues=2),
            "qsd-native-iothread": lambda: rm.qsd_backend("qsd-native-iothread", qsd, base,
                                                          queues=2, iothread=True)}
    names = args.only.split(",")
    if "base" in names and not args.base_python:
        ap.error("the base row needs --base-python")
    backends = [rows[n]() for n in names]
    for b in backends:
        if b.name == "base":
            b.cwd = "/tmp"                  # import the other build, not this tree
    try:
        for b in backends:
            if not rm.start(b, base):
                raise SystemExit(f"{b.name}: {b.status}")
        for cell in args.cells.split(","):
            rw, qd, nq = cell.split(":")
            for rnd in range(args.rounds):
                k = rnd % len(backends)
                for b in backends[k:] + backends[:k]:
                    r = rm._bench_once(b, rw=rw, iodepth=int(qd), queues=int(nq), seconds=4, ramp=1)
                    print(f"{cell:16s} round {rnd}  {b.name:20s} {r.get('iops', 0):10,.0f} IOPS  "
                          f"p50 {r['lat_ns']['p50'] / 1e3:6.1f} us  "
                          f"daemon {r.get('daemon_cpu_us_per_io', 0):5.2f} us/io", flush=True)
    finally:
        for b in backends:
            rm.stop(b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
