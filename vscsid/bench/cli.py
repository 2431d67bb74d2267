"""The ``vscsid-bench`` command line: options, the human summary and ``--json``."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from .config import EXIT_FATAL, EXIT_IO_ERRORS, EXIT_OK, EXIT_USAGE, RW_MODES, BenchConfig, BenchError, parse_size
from .runner import run

__all__ = ["main", "build_parser", "config_from_args", "summary"]


def _fmt_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f}ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f}us"
    return f"{ns:.0f}ns"


def summary(res: dict) -> str:
    c = res["config"]
    lat = res["lat_ns"]
    lines = [
        f"vscsid-bench: {c['format']} {c['rw']}"
        + (f" (rwmixread={c['rwmixread']})" if c["rw"] in ("randrw", "rw") else "")
        + f" bs={c['bs_human']} iodepth={c['iodepth']} queues={c['queues']} engine={res['engine']}"
        + (" verify" if c["verify"] else ""),
        f"  device: {res['device'].get('inquiry', '')} capacity={res['device'].get('capacity_bytes')} "
        f"region={c['size']} event_idx={res['device'].get('event_idx')} indirect={res['device'].get('indirect')}",
        f"  iops={res['iops']:,.0f}  bw={res['bw_bytes'] / 2**20:,.1f} MiB/s  ios={res['ios']} "
        f"in {res['seconds']:.2f}s (ramp {c['ramp']}s excluded)",
        f"  lat: min={_fmt_ns(lat['min'])} mean={_fmt_ns(lat['mean'])} p50={_fmt_ns(lat['p50'])} "
        f"p90={_fmt_ns(lat['p90'])} p99={_fmt_ns(lat['p99'])} p99.9={_fmt_ns(lat['p99.9'])} "
        f"max={_fmt_ns(lat['max'])}",
        f"  bench cpu: {res['cpu_seconds']:.3f}s ({100 * res['cpu_util']:.0f}% of a core), "
        + (f"{res['cpu_us_per_io']:.2f} us/io" if res["cpu_us_per_io"] else "-")
        + f"; kicks/io={res['kicks_per_io']:.3f} waits/io={res['waits_per_io']:.3f}",
    ]
    if "daemon_cpu_seconds" in res:
        per = res["daemon_cpu_us_per_io"]
        lines.append(f"  daemon cpu: {res['daemon_cpu_seconds']:.2f}s"
                     + (f", {per:.2f} us/io" if per else "")
                     + f" ({res.get('daemon_cpu_source', 'pids')})")
    if res.get("flushes"):
        lines.append(f"  flushes: {res['flushes']} (mean {_fmt_ns(res['flush_lat_mean_ns'])})")
    if "other_cpu_seconds" in res:
        lines.append(f"  machine: {res['system_busy_cpu_seconds']:.2f} CPU-s busy in the window, "
                     f"{res['other_cpu_seconds']:.2f} CPU-s of it neither bench nor daemon"
                     + ("" if "daemon_cpu_seconds" in res else " (no --daemon-pid given)"))
    if "verify" in res:
        lines.append("  verify: " + ", ".join(f"{k}={v}" for k, v in res["verify"].items()))
    lines.append(f"  errors: {res['errors']}")
    if res["first_error"]:
        lines.append(f"  first error: {res['first_error']}")
    if res["fatal"]:
        lines.append(f"  FATAL: {res['fatal']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vscsid-bench",
        description="Load generator for vhost-user storage back ends (virtio-scsi: vscsid; "
                    "virtio-blk: e.g. qemu-storage-daemon). Plays QEMU and the guest driver; "
                    "no VM needed.")
    p.add_argument("--socket-path", help="the back end's vhost-user unix socket")
    p.add_argument("--format", choices=("scsi", "blk"), default="scsi",
                   help="virtio-scsi (request queues from 2) or virtio-blk (from 0); default scsi")
    p.add_argument("--rw", choices=RW_MODES, default="randread", help="I/O pattern (default randread)")
    p.add_argument("--rwmixread", type=int, default=50, metavar="PCT",
                   help="percentage of reads for randrw/rw (default 50)")
    p.add_argument("--bs", default="4k", help="block size, e.g. 4k, 64k (default 4k)")
    p.add_argument("--iodepth", type=int, default=1, help="requests in flight per queue (default 1)")
    p.add_argument("--queues", type=int, default=1, help="request queues, one thread each (default 1)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured duration (default 5)")
    p.add_argument("--ramp", type=float, default=1.0, help="warm-up seconds excluded from stats (default 1)")
    p.add_argument("--lun", type=int, default=0, help="SCSI LUN (default 0)")
    p.add_argument("--size", help="bytes of the disk to use from offset 0 (default: all of it)")
    p.add_argument("--queue-size", type=int, default=128, help="virtqueue size (default 128)")
    p.add_argument("--indirect", choices=("auto", "on", "off"), default="auto",
                   help="indirect descriptors: auto = only when 3*iodepth > queue size (default)")
    p.add_argument("--no-event-idx", action="store_true", help="do not negotiate VIRTIO_RING_F_EVENT_IDX")
    p.add_argument("--verify", action="store_true",
                   help="write a checkable pattern (header per 512-byte sector: magic, sector, seed, "
                        "generation), check every read and finally read back every block written")
    p.add_argument("--seed", type=int, default=1, help="pattern and LBA sequence seed (default 1)")
    p.add_argument("--once", action="store_true",
                   help="sequential patterns stop after one pass over the region (e.g. to fill it)")
    p.add_argument("--engine", choices=("c", "python"), default="c",
                   help="c (default) or python (slow reference implementation)")
    p.add_argument("--spin-us", type=int, default=0,
                   help="poll the used ring this long before sleeping on the call eventfd (default 0)")
    p.add_argument("--stall-timeout", type=float, default=30.0,
                   help="fail if nothing completes for this long (default 30 s)")
    p.add_argument("--loopback", action="store_true",
                   help="no back end: an in-process C device completes every request at once "
                        "(measures the generator's own ceiling)")
    p.add_argument("--daemon-pid", type=int, action="append", default=[], metavar="PID",
                   help="also report the CPU time of PID and its descendants during the window "
                        "(repeatable)")
    p.add_argument("--daemon-cgroup", metavar="DIR",
                   help="a cgroup v1 cpuacct directory the daemon runs in: its CPU during the "
                        "window from cpuacct.usage (counts every process of the daemon, also "
                        "workers that exited)")
    p.add_argument("--flush-every", type=int, default=0, metavar="N",
                   help="issue a cache flush (SYNCHRONIZE CACHE / VIRTIO_BLK_T_FLUSH) after every "
                        "N writes, per queue (default 0: never)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    p.add_argument("--report", metavar="DIR",
                   help="also write a report of the run into DIR: index.html (self-contained), "
                        "latency.png, iops.png, cpu.png, result.json (needs matplotlib)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="run nothing: show two results (--json output or a report's result.json) "
                        "side by side; with --report DIR also as a page with the plots overlaid")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    try:
        bs = parse_size(args.bs)
        size = parse_size(args.size) if args.size is not None else None
    except ValueError as e:
        raise BenchError(str(e), EXIT_USAGE) from None
    return BenchConfig(socket_path=args.socket_path, format=args.format, rw=args.rw,
                       rwmixread=args.rwmixread, bs=bs, iodepth=args.iodepth, queues=args.queues,
                       seconds=args.seconds, ramp=args.ramp, lun=args.lun, size=size,
                       queue_size=args.queue_size, indirect=args.indirect,
                       event_idx=not args.no_event_idx, verify=args.verify, seed=args.seed,
                       once=args.once, engine=args.engine, spin_us=args.spin_us,
                       stall_timeout=args.stall_timeout, loopback=args.loopback,
                       daemon_pids=list(args.daemon_pid), daemon_cgroup=args.daemon_cgroup,
                       flush_every=args.flush_every)


def _run_name(path: str) -> str:
    """A result's name in a comparison: the file's name, or its report directory's."""
    base = os.path.basename(path)
    if base == "result.json":
        return os.path.basename(os.path.dirname(os.path.abspath(path))) or base
    return base.removesuffix(".json")


def compare_main(args: argparse.Namespace) -> int:
    from .report import compare, compare_rows, load_result, write_compare_report
    pa, pb = args.compare
    try:
        a, b = load_result(pa), load_result(pb)
        names = (_run_name(pa), _run_name(pb))
        if names[0] == names[1]:
            names = (pa, pb)
        files = write_compare_report(a, b, args.report, names) if args.report else []
    except BenchError as e:
        print(f"vscsid-bench: {e}", file=sys.stderr)
        return e.code
    if args.json:
        print(json.dumps({"tool": "vscsid-bench", "compare": list(names), "rows": compare_rows(a, b),
                          "files": files}))
    else:
        print(compare(a, b, names))
        if files:
            print(f"report: {files[0]}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        return compare_main(args)
    try:
        if args.report:
            from .report import require_pyplot
            require_pyplot()        # no matplotlib: say so before the run, not after it
        cfg = config_from_args(args)
        res = run(cfg)
    except BenchError as e:
        if args.json:
            print(json.dumps({"tool": "vscsid-bench", "fatal": str(e), "errors": 0}))
        print(f"vscsid-bench: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except (OSError, ConnectionError, TimeoutError) as e:
        if args.json:
            print(json.dumps({"tool": "vscsid-bench", "fatal": f"{type(e).__name__}: {e}", "errors": 0}))
        print(f"vscsid-bench: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FATAL
    res["machine"] = {"kernel": platform.release(), "python": platform.python_version(),
                      "cpus": os.cpu_count()}
    if args.report:
        from .report import write_report
        files = write_report(res, args.report)
        res["report"] = files[0]
    if args.json:
        print(json.dumps(res))
    else:
        print(summary(res))
        if args.report:
            print(f"  report: {res['report']}")
    if res["fatal"]:
        return EXIT_FATAL
    if res["errors"] or ("verify" in res and not res["verify"]["ok"]):
        return EXIT_IO_ERRORS
    return EXIT_OK
