"""A quick side-by-side on tmpfs: a few cells of run_matrix.py's tmpfs rows, rotated rounds
(round r starts with daemon r mod n).

The same daemons (run_matrix.tmpfs_backends: vscsid-file, other builds with --build,
qsd-native, qsd-native-iothread, ...), bench, placement (bench on CPU 0, daemon on CPU 1)
and daemon CPU accounting (cpuacct cgroup) as run_matrix.py; for an A/B of one change in
minutes, where the whole matrix takes most of an hour. Prints one line per run; no JSON.
Example:

    python benchmarks/ab_tmpfs.py --build "base=/path/to/other/venv/bin/python" \\
        --only vscsid-file,vscsid-file@base,qsd-native,qsd-native-iothread \\
        --cells randwrite:32:1,randread:32:1 --rounds 3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchmarks.run_matrix as rm  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="vscsid-file,qsd-native", help="run_matrix's row names")
    ap.add_argument("--build", action="append", default=[], metavar="'LABEL=PYTHON [ARGS]'",
                    help="another build of vscsid, row vscsid-file@LABEL (as run_matrix.py)")
    ap.add_argument("--cells", default="randread:32:1,randwrite:32:1",
                    help="RW:QD:QUEUES, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/dev/shm/vscsid-ab")
    args = ap.parse_args()
    rm.set_placement("split")
    rm.REPEAT, rm.WAIT_QUIET = 1, 10
    base = Path(args.workdir)
    base.mkdir(exist_ok=True)
    img = base / "disk.img"
    rm.fill_image(img, rm.IMAGE_SIZE)
    names = args.only.split(",")
    rows = {b.name: b for b in rm.tmpfs_backends(img, base, args.build)}
    missing = [n for n in names if n not in rows]
    if missing:
        ap.error(f"no such row: {', '.join(missing)} (rows: {', '.join(rows)})")
    backends = [rows[n] for n in names]
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
                    print(f"{cell:16s} round {rnd}  {b.name:22s} {r.get('iops', 0):10,.0f} IOPS  "
                          f"p50 {r['lat_ns']['p50'] / 1e3:6.1f} us  "
                          f"daemon {r.get('daemon_cpu_us_per_io', 0):5.2f} us/io", flush=True)
    finally:
        for b in backends:
            rm.stop(b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
