#!/usr/bin/env python3
"""Run the standard vhost-user storage benchmark matrix on this machine.

vscsid (virtio-scsi; null LUN and a file LUN on tmpfs) against
qemu-storage-daemon (virtio-blk; the same 256 MiB tmpfs file with aio=threads,
aio=io_uring and aio=native,cache.direct=on where that works, plus its null-co
driver), 4 KiB randread/randwrite at iodepth 1 and 32 on 1 and 2 queues; then the
real-disk rows: a file on the host's disk larger than the run can cache (the page
cache dropped before every run), vscsid at its defaults and with cache=none against
qemu-storage-daemon at its defaults and with aio=native,cache.direct=on, 4 KiB
randread, randwrite and a mix with a flush every 8 writes, at iodepth 1 and 32;
then network storage: an NBD export of the tmpfs file by qemu-nbd (Unix socket)
and an RBD image on a single-node Ceph cluster started for the run
(tests/support/ceph_cluster.sh, in the work directory), each served by vscsid
(``--lun nbd+unix://...``, ``--lun rbd:...``) and by qemu-storage-daemon's own
``nbd`` and ``rbd`` block drivers on the same server; then QD1 vs QD32 on a vscsid
LUN with ``delay_us=200``; then the bench's own ceiling against its in-process
loopback device. Everything is driven by ``vscsid-bench``.

Reports IOPS, p50/p99 latency, the daemon's CPU per request and the bench's own.
The daemon's CPU is counted for its whole process tree over the measurement
window only: each daemon runs in a cgroup v1 cpuacct group of its own (the
bench reads cpuacct.usage at the edges of its window: workers that exit are
counted too); without cgroup v1 (or not root) from /proc/<pid>/stat of the
daemon and its descendants.

Usage::

    python benchmarks/run_matrix.py [--seconds 4] [--ramp 1] [--repeat 3] [--json-out results.json]
                                    [--only vscsid-null,qsd-io_uring] [--no-disk] [--quick]

The network rows are vscsid-nbd, qsd-nbd, vscsid-rbd and qsd-rbd (``--only`` selects
them like the others; ``--no-network`` skips them). They need qemu-nbd, the Ceph
packages and qemu-block-extra (qemu-storage-daemon's rbd driver); a missing one is
reported and its rows skipped.

The daemons are started and stopped by the script (temporary directory under
/dev/shm for sockets and tmpfs images; the disk image in --disk-dir, kept for the
next run). With --json-out, a PNG plot of the matrix is written next to it. See
benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SIZE = 256 << 20
REPO = Path(__file__).resolve().parent.parent
NETWORK_ROWS = ("vscsid-nbd", "qsd-nbd", "vscsid-rbd", "qsd-rbd")
CGROUP_ROOT = Path("/sys/fs/cgroup/cpuacct")


# ----------------------------------------------------------------------------- machine
def _cmd_out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qsd = _cmd_out(["qemu-storage-daemon", "--version"]).splitlines()
    repo = Path(__file__).resolve().parent.parent
    return {
        "cpu_model": model,
        "cpus_online": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "vscsid": _cmd_out([sys.executable, "-m", "vscsid.cli", "--version"]),
        "qemu_storage_daemon": qsd[0] if qsd else "not installed",
        "git_commit": _cmd_out(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]),
        "tmpfs": "/dev/shm",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


# ----------------------------------------------------------------------------- daemons
@dataclass
class Backend:
    name: str
    kind: str                  # "vscsid" | "qsd"
    fmt: str                   # "scsi" | "blk"
    args: list[str]
    note: str = ""
    proc: subprocess.Popen | None = None
    socket_path: str = ""
    log_path: str = ""
    status: str = "not started"
    extra: dict = field(default_factory=dict)
    cgroup: str | None = None       # the daemon's cpuacct group
    disk: bool = False              # on the host's disk: drop the page cache before each run
    cwd: str | None = None          # where the daemon starts (another build: not this tree)


#: more vscsid options for every vscsid row (--vscsid-args, e.g. "--latency-sample 0")
VSCSID_EXTRA: list[str] = []


def vscsid_backend(name: str, lun: str, workdir: Path, queues: int = 2, note: str = "",
                   python: str = sys.executable, extra: list[str] | None = None) -> Backend:
    """``extra``: more vscsid options (default: --vscsid-args)."""
    sock = str(workdir / f"{name}.sock")
    return Backend(name, "vscsid", "scsi",
                   [python, "-m", "vscsid.cli", "--socket-path", sock, "--lun", lun,
                    "--num-queues", str(queues), "--quiet", "--log-format", "json",
                    "--log-level", "info", *(VSCSID_EXTRA if extra is None else extra)],
                   note=note, socket_path=sock)


def build_backend(spec: str, lun: str, workdir: Path) -> Backend:
    """A vscsid-file row served by another build of vscsid (``--build "LABEL=PYTHON [ARGS]"``:
    the interpreter of a virtualenv where that commit is installed, and options for it). It
    starts outside this tree so that ``-m vscsid.cli`` imports that build."""
    words = shlex.split(spec)
    label, sep, python = words[0].partition("=") if words else ("", "", "")
    if not (sep and label and python):
        raise SystemExit(f"--build {spec!r}: LABEL=PYTHON [ARGS]")
    own = words[1:] or None          # its own options, else --vscsid-args
    b = vscsid_backend(f"vscsid-file@{label}", lun, workdir, python=python, extra=own,
                       note=" ".join([f"256 MiB file on tmpfs, {python}", *words[1:]]))
    b.cwd = str(workdir)
    return b


def qsd_backend(name: str, blockdev: str, workdir: Path, queues: int = 2, note: str = "",
                iothread: bool = False) -> Backend:
    """qemu-storage-daemon exporting ``blockdev`` over vhost-user-blk. With ``iothread`` the
    export runs in an iothread, which polls adaptively (poll-max-ns, 32 us by default) before
    sleeping -- the same idea as vscsid's --poll-us -- instead of the main loop."""
    sock = str(workdir / f"{name}.sock")
    pre = ["--object", "iothread,id=io0"] if iothread else []
    export = (f"type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,"
              f"addr.path={sock},writable=on,num-queues={queues}")
    if iothread:
        export += ",iothread=io0"
    return Backend(name, "qsd", "blk",
                   ["qemu-storage-daemon", *pre, "--blockdev", blockdev, "--export", export],
                   note=note, socket_path=sock)


# CPU placement: "split" pins the bench to the first CPU and the daemon (with every process and
# thread it creates: affinity is inherited) to the others; "none" leaves both to the scheduler.
PLACEMENT = {"bench": None, "daemon": None}


def set_placement(mode: str) -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "split" and len(cpus) >= 2:
        PLACEMENT.update(bench={cpus[0]}, daemon=set(cpus[1:]))
    else:
        PLACEMENT.update(bench=None, daemon=None)
    return {"mode": mode if PLACEMENT["bench"] else "none",
            "bench_cpus": sorted(PLACEMENT["bench"] or cpus),
            "daemon_cpus": sorted(PLACEMENT["daemon"] or cpus)}


def _pin(cpus):
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def _cgroup_for(name: str) -> str | None:
    """A fresh cgroup v1 cpuacct group for one daemon, or None (no cgroup v1, not root)."""
    if not (CGROUP_ROOT / "cgroup.procs").exists() or os.geteuid() != 0:
        return None
    path = CGROUP_ROOT / "vscsid-matrix" / name
    try:
        if path.exists():
            path.rmdir()
        path.mkdir(parents=True)
    except OSError:
        return None
    return str(path)


def _drop_cgroup(path: str | None) -> None:
    if path:
        try:
            os.rmdir(path)
        except OSError:
            pass


def _daemon_preexec(cgroup: str | None):
    pin = _pin(PLACEMENT["daemon"])

    def run():
        if cgroup:           # before exec: every process the daemon starts stays in it
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        if pin:
            pin()
    return run


def drop_caches() -> None:
    """Write back and drop the page cache (root): a disk run starts cold."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def start(b: Backend, workdir: Path, timeout: float = 30.0) -> bool:
    b.log_path = str(workdir / f"{b.name}.log")
    log = open(b.log_path, "wb")
    b.cgroup = _cgroup_for(b.name)
    b.proc = subprocess.Popen(b.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              preexec_fn=_daemon_preexec(b.cgroup), cwd=b.cwd)
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if b.proc.poll() is not None:
            b.status = "failed: " + _tail(b.log_path)
            return False
        if b.kind == "vscsid":
            ready = any('"ready"' in line for line in _lines(b.log_path))
        else:
            ready = os.path.exists(b.socket_path)
        if ready:
            b.status = "running"
            return True
        time.sleep(0.05)
    b.status = "failed: not ready within %.0f s: %s" % (timeout, _tail(b.log_path))
    stop(b)
    return False


def stop(b: Backend) -> None:
    p = b.proc
    if p is not None and p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if b.cgroup:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and Path(b.cgroup, "cgroup.procs").read_text().strip():
            time.sleep(0.05)
        _drop_cgroup(b.cgroup)
        b.cgroup = None


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return []


def _tail(path: str, n: int = 3) -> str:
    return " | ".join(line.strip() for line in _lines(path)[-n:])


# ----------------------------------------------------------------------------- noise
def _busy() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def background_load(interval: float = 1.0) -> float:
    """CPUs' worth of work the machine does while we do nothing (other users, tests...)."""
    a = _busy()
    time.sleep(interval)
    return (_busy() - a) / interval


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (up to ``max_wait`` s) until the background load is below ``threshold`` CPUs."""
    deadline = time.monotonic() + max_wait
    load = background_load()
    while load > threshold and time.monotonic() < deadline:
        load = background_load()
    return load


# ----------------------------------------------------------------------------- runs
WAIT_QUIET = 0.0
MAX_OTHER = None       # re-run when other processes used more than this share of a CPU
RETRIES = 2


REPEAT = 1


def bench(b: Backend | None, **kw) -> dict:
    """One measurement: the median of REPEAT runs (by IOPS), each a noisy-neighbour-checked one."""
    return _median([_bench_quiet(b, **kw) for _ in range(REPEAT)])


def _median(runs: list[dict]) -> dict:
    good = [r for r in runs if not r.get("fatal")] or runs
    good.sort(key=lambda r: r.get("iops") or 0)
    res = dict(good[len(good) // 2])
    if REPEAT > 1:
        res["repeats"] = [{"iops": r.get("iops"), "daemon_cpu_us_per_io": r.get("daemon_cpu_us_per_io")}
                          for r in runs]
    return res


def _bench_quiet(b: Backend | None, **kw) -> dict:
    """One measurement; with --max-other, repeated (up to RETRIES times) while the machine was
    noisy, keeping the quietest attempt."""
    best = None
    for attempt in range(1 + (RETRIES if MAX_OTHER is not None else 0)):
        res = _bench_once(b, **kw)
        res["attempt"] = attempt + 1
        other = (res.get("other_cpu_seconds") or 0.0) / (res.get("seconds") or 1.0)
        if best is None or other < best[0]:
            best = (other, res)
        if MAX_OTHER is None or other <= MAX_OTHER or res.get("fatal"):
            break
    return best[1]


def _bench_once(b: Backend | None, *, rw: str, iodepth: int, queues: int, seconds: float, ramp: float,
                bs: str = "4k", fmt: str | None = None, extra: list[str] = (),
                flush_every: int = 0) -> dict:
    load_before = wait_quiet(WAIT_QUIET) if WAIT_QUIET else None
    if b is not None and b.disk:
        drop_caches()
    cmd = [sys.executable, "-m", "vscsid.bench", "--json", "--rw", rw, "--bs", bs,
           "--iodepth", str(iodepth), "--queues", str(queues), "--seconds", str(seconds),
           "--ramp", str(ramp), *extra]
    if flush_every:
        cmd += ["--flush-every", str(flush_every)]
    if b is None:
        # the loopback device runs in the bench process: leave it all CPUs
        cmd += ["--loopback", "--format", fmt or "scsi"]
        pin = None
    else:
        cmd += ["--socket-path", b.socket_path, "--format", b.fmt]
        cmd += (["--daemon-cgroup", b.cgroup] if b.cgroup else ["--daemon-pid", str(b.proc.pid)])
        pin = _pin(PLACEMENT["bench"])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + ramp + 120,
                       preexec_fn=pin)
    try:
        res = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        res = {"fatal": f"no JSON from vscsid-bench (exit {p.returncode}): {p.stderr.strip()[-400:]}"}
    res["exit_code"] = p.returncode
    if load_before is not None:
        res["background_load_before"] = load_before
    return res


def row(backend: str, res: dict, **wl) -> dict:
    lat = res.get("lat_ns") or {}
    return {
        "backend": backend, **wl,
        "iops": res.get("iops"),
        "mean_us": lat.get("mean", 0) / 1e3 if lat else None,
        "p50_us": lat.get("p50", 0) / 1e3 if lat else None,
        "p99_us": lat.get("p99", 0) / 1e3 if lat else None,
        "daemon_us_per_io": res.get("daemon_cpu_us_per_io"),
        "daemon_cpu_util": (res["daemon_cpu_seconds"] / res["seconds"]
                            if res.get("daemon_cpu_seconds") is not None and res.get("seconds") else None),
        "bench_us_per_io": res.get("cpu_us_per_io"),
        "bench_cpu_util": res.get("cpu_util"),
        "other_cpu_util": (res["other_cpu_seconds"] / res["seconds"]
                           if res.get("other_cpu_seconds") is not None and res.get("seconds") else None),
        "errors": res.get("errors"),
        "fatal": res.get("fatal"),
        "exit_code": res.get("exit_code"),
        "raw": res,
    }


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n## {title}\n")
    hdr = ("backend", "rw", "qd", "q", "IOPS", "mean us", "p50 us", "p99 us", "daemon us/io", "daemon CPU",
           "bench us/io", "bench CPU", "other CPU", "err")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "|".join("---" for _ in hdr) + "|")
    for r in rows:
        if r.get("fatal"):
            print(f"| {r['backend']} | {r.get('rw', '')} | {r.get('qd', '')} | {r.get('queues', '')} | "
                  f"FAILED: {str(r['fatal'])[:80]} |||||||||")
            continue
        print("| " + " | ".join([
            r["backend"], r.get("rw", ""), str(r.get("qd", "")), str(r.get("queues", "")),
            _f(r["iops"], ",.0f"), _f(r["mean_us"], ".1f"), _f(r["p50_us"], ".1f"), _f(r["p99_us"], ".1f"),
            _f(r["daemon_us_per_io"], ".2f"),
            _f(None if r["daemon_cpu_util"] is None else 100 * r["daemon_cpu_util"], ".0f") + "%"
            if r["daemon_cpu_util"] is not None else "-",
            _f(r["bench_us_per_io"], ".2f"),
            _f(None if r["bench_cpu_util"] is None else 100 * r["bench_cpu_util"], ".0f") + "%"
            if r["bench_cpu_util"] is not None else "-",
            _f(None if r["other_cpu_util"] is None else 100 * r["other_cpu_util"], ".0f") + "%"
            if r["other_cpu_util"] is not None else "-",
            str(r["errors"]),
        ]) + " |")
    sys.stdout.flush()


def run_backend(b: Backend, base: Path, workloads, args, out: dict, table: str) -> None:
    """Start ``b``, run every workload on it into ``out[table]``, stop it."""
    ok = start(b, base)
    out["backends"][b.name] = {"cmd": b.args, "note": b.note, "status": b.status}
    print(f"\n### {b.name}: {b.note}: {b.status}", flush=True)
    if not ok:
        return
    try:
        for rw, qd, nq in workloads:
            res = bench(b, rw=rw, iodepth=qd, queues=nq, seconds=args.seconds, ramp=args.ramp)
            r = row(b.name, res, rw=rw, qd=qd, queues=nq)
            out[table].append(r)
            if r["fatal"]:
                print(f"  {rw} qd{qd} q{nq}: FAILED: {r['fatal']}", flush=True)
            else:
                print(f"  {rw:9s} qd{qd:<2d} q{nq}: {r['iops']:>10,.0f} IOPS  p50 {r['p50_us']:8.1f} us"
                      f"  daemon {_f(r['daemon_us_per_io'], '6.2f')} us/io"
                      f"  bench {_f(r['bench_us_per_io'], '5.2f')} us/io  errors {r['errors']}",
                      flush=True)
    finally:
        stop(b)


def run_network(base: Path, img: Path, workloads, args, out: dict, only) -> None:
    """The NBD rows (qemu-nbd serving the tmpfs image on a Unix socket) and the RBD rows
    (an image on a single-node Ceph cluster started in the work directory), each with
    vscsid and qemu-storage-daemon's own driver on the same server. The server's own
    CPU (qemu-nbd, the OSD) is not in the daemon columns."""
    sys.path.insert(0, str(REPO))
    from tests.support.servers import CephCluster, ceph_skip_reason, nbd_skip_reason, qemu_nbd

    def wanted(name: str) -> bool:
        return not only or name in only

    qsd_ok = shutil.which("qemu-storage-daemon") is not None
    if wanted("vscsid-nbd") or wanted("qsd-nbd"):
        reason = nbd_skip_reason("qemu-nbd")
        if reason:
            print(f"\n### NBD rows skipped: {reason}", flush=True)
        else:
            sock = base / "nbd.sock"
            srv = qemu_nbd(img, unix=sock, log_dir=base)
            srv.start()
            try:
                rows = [vscsid_backend("vscsid-nbd", srv.uri, base,
                                       note="NBD export of the tmpfs file by qemu-nbd (Unix socket)")]
                if qsd_ok:
                    rows.append(qsd_backend(
                        "qsd-nbd", f"driver=nbd,node-name=disk,server.type=unix,server.path={sock},"
                        "export=disk", base, note="qemu-storage-daemon's nbd driver, same export"))
                for b in rows:
                    if wanted(b.name):
                        run_backend(b, base, workloads, args, out, "network")
            finally:
                srv.stop()
    if wanted("vscsid-rbd") or wanted("qsd-rbd"):
        reason = ceph_skip_reason()
        if reason:
            print(f"\n### RBD rows skipped: {reason}", flush=True)
            return
        cluster = CephCluster(base / "ceph")
        print("\nstarting a single-node Ceph cluster ...", flush=True)
        conf = cluster.start()
        try:
            # Filled with the same random data as the file (reads of never-written objects
            # would not reach an OSD's disk); no exclusive-lock, so vscsid's workers (one
            # librados client each) do not pass the lock back and forth on writes.
            cluster.rbd("import", "--no-progress", "--image-feature", "layering", str(img),
                        f"{cluster.pool}/bench")
            rows = [vscsid_backend("vscsid-rbd", f"rbd:{cluster.pool}/bench,conf={conf},id=vscsid",
                                   base, note="RBD image, single-node cluster (one OSD on tmpfs)")]
            if qsd_ok:
                rows.append(qsd_backend(
                    "qsd-rbd", f"driver=rbd,node-name=disk,pool={cluster.pool},image=bench,"
                    f"conf={conf},user=vscsid", base, note="qemu-storage-daemon's rbd driver, same image"))
            for b in rows:
                if wanted(b.name):
                    run_backend(b, base, workloads, args, out, "network")
        finally:
            cluster.stop()


def fill_image(path: Path, size: int) -> None:
    """A fully allocated image with non-zero data (reads must hit real tmpfs pages)."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)


def tmpfs_backends(img: Path, base: Path, builds=()) -> list[Backend]:
    """The tmpfs rows' daemons: vscsid (null and the file, and ``builds``: other builds of
    it, --build) and qemu-storage-daemon's configurations, when it is installed."""
    backends = [
        vscsid_backend("vscsid-null", f"null:{IMAGE_SIZE}", base, note="null LUN (reads zero-filled)"),
        vscsid_backend("vscsid-file", str(img), base, note="256 MiB file on tmpfs"),
        *(build_backend(spec, str(img), base) for spec in builds),
    ]
    if shutil.which("qemu-storage-daemon") is not None:
        # locking=off: with --side-by-side they share the image (QEMU would refuse a second
        # writer); it changes nothing on the data path.
        backends += [
            qsd_backend("qsd-null", f"driver=null-co,node-name=disk,size={IMAGE_SIZE},read-zeroes=on",
                        base, note="null-co, read-zeroes=on"),
            qsd_backend("qsd-threads", f"driver=file,node-name=disk,filename={img},aio=threads,locking=off,"
                                       "cache.direct=off", base, note="file, aio=threads"),
            qsd_backend("qsd-io_uring", f"driver=file,node-name=disk,filename={img},aio=io_uring,locking=off,"
                                        "cache.direct=off", base, note="file, aio=io_uring"),
            qsd_backend("qsd-native", f"driver=file,node-name=disk,filename={img},aio=native,locking=off,"
                                      "cache.direct=on", base, note="file, aio=native, O_DIRECT"),
            qsd_backend("qsd-native-iothread", f"driver=file,node-name=disk,filename={img},"
                                               "aio=native,cache.direct=on,locking=off", base, iothread=True,
                        note="file, aio=native, O_DIRECT, iothread (adaptive polling)"),
            qsd_backend("qsd-io_uring-iothread", f"driver=file,node-name=disk,filename={img},"
                                                 "aio=io_uring,cache.direct=off,locking=off", base, iothread=True,
                        note="file, aio=io_uring, iothread (adaptive polling)"),
        ]
    return backends


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run (default 4)")
    ap.add_argument("--ramp", type=float, default=1.0, help="warm-up seconds per run (default 1)")
    ap.add_argument("--json-out", help="write every result (incl. the raw bench JSON) here")
    ap.add_argument("--only", help="comma-separated backends to run (default: all)")
    ap.add_argument("--vscsid-args", default="", metavar="ARGS",
                    help="more options for every vscsid row, e.g. \"--latency-sample 0\" (what the "
                         "latency histograms cost, docs/performance.md)")
    ap.add_argument("--build", action="append", default=[], metavar="'LABEL=PYTHON [ARGS]'",
                    help="also a vscsid-file row served by another build: the python of a "
                         "virtualenv with that commit installed, and options for it (repeatable; "
                         "--only vscsid-file@LABEL selects it); for before/after tables")
    ap.add_argument("--side-by-side", action="store_true",
                    help="tmpfs rows too: start every daemon at once and take each measurement in "
                         "turn from each (as the real-disk rows always do), so that the machine's "
                         "drift over minutes does not fall between two daemons")
    ap.add_argument("--quick", action="store_true", help="1 s runs, 0.3 s ramp (smoke-testing the script)")
    ap.add_argument("--workdir", help="where sockets and the image go (default: a new dir in /dev/shm)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each run wait up to this long for the machine to be idle "
                         "(background load < 0.15 CPU); use on shared machines")
    ap.add_argument("--max-other", type=float, default=None, metavar="CPUS",
                    help="re-run (up to twice) a measurement during which other processes used more "
                         "than this many CPUs, keeping the quietest attempt (e.g. 0.1)")
    ap.add_argument("--no-network", action="store_true",
                    help="skip the NBD and RBD rows (no qemu-nbd, no Ceph cluster)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run every measurement N times and report the median (by IOPS)")
    ap.add_argument("--disk-dir", default=os.environ.get("VSCSID_DISK_DIR", "/var/tmp"),
                    help="a directory on the host's disk for the real-disk rows (default /var/tmp)")
    ap.add_argument("--disk-size", default="8G",
                    help="size of the real-disk image (default 8G: more than a run can cache)")
    ap.add_argument("--no-disk", action="store_true", help="skip the real-disk rows")
    ap.add_argument("--plot", help="PNG plot of the matrix (default: next to --json-out)")
    ap.add_argument("--placement", choices=("split", "none"), default="split",
                    help="split (default): bench on the first CPU, daemon on the others; "
                         "none: unpinned (QD1 results then depend on where the scheduler puts "
                         "the two sides)")
    args = ap.parse_args(argv)
    # SIGTERM (e.g. from timeout(1)) must still stop the daemons and remove the work directory
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.seconds, args.ramp = 1.0, 0.3
    only = set(args.only.split(",")) if args.only else None
    VSCSID_EXTRA[:] = args.vscsid_args.split()

    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vscsid-matrix-",
                                                                          dir="/dev/shm"))
    base.mkdir(parents=True, exist_ok=True)
    img = base / "disk.img"
    info = machine_info()
    info["placement"] = set_placement(args.placement)
    global WAIT_QUIET, MAX_OTHER, REPEAT
    WAIT_QUIET = args.wait_quiet
    MAX_OTHER = args.max_other
    REPEAT = max(1, args.repeat)
    info["cpu_accounting"] = ("cgroup v1 cpuacct" if (CGROUP_ROOT / "cgroup.procs").exists()
                              and os.geteuid() == 0 else "/proc/<pid>/stat of the daemon tree")
    info["background_load_at_start_cpus"] = round(background_load(2.0), 2)
    print("# vhost-user storage benchmark matrix\n")
    for k, v in info.items():
        print(f"- {k}: {v}")
    out: dict = {"machine": info, "settings": {"seconds": args.seconds, "ramp": args.ramp, "bs": "4k",
                                               "image": str(img), "image_size": IMAGE_SIZE},
                 "backends": {}, "matrix": [], "disk": [], "delay": [], "network": [],
                 "loopback": []}

    backends = tmpfs_backends(img, base, args.build)
    if only:
        backends = [b for b in backends if b.name in only]

    try:
        print(f"\nfilling {img} ({IMAGE_SIZE >> 20} MiB) ...", flush=True)
        fill_image(img, IMAGE_SIZE)
        workloads = [(rw, qd, nq) for rw in ("randread", "randwrite") for qd in (1, 32) for nq in (1, 2)]
        if args.side_by_side:
            run_side_by_side(backends, base, [(rw, {"rw": rw, "iodepth": qd, "queues": nq})
                                              for rw, qd, nq in workloads], args, out, "matrix")
        else:
            for b in backends:
                run_backend(b, base, workloads, args, out, "matrix")

        # Network storage: vscsid and qemu-storage-daemon on the same NBD and RBD servers
        if not args.no_network and (not only or only & set(NETWORK_ROWS)):
            run_network(base, img, workloads, args, out, only)

        # The real-disk rows: a cold file on the host's disk, at the defaults of each side
        if not args.no_disk and (not only or any(n.endswith("-disk") or "-disk-" in n for n in only)):
            run_disk_rows(args, base, only, out)

        # QD1 vs QD32 with an injected 200 us per I/O
        if not only or "vscsid-delay" in only:
            b = vscsid_backend("vscsid-delay", f"null:{IMAGE_SIZE},delay_us=200", base,
                               note="null LUN, delay_us=200")
            ok = start(b, base)
            out["backends"][b.name] = {"cmd": b.args, "note": b.note, "status": b.status}
            print(f"\n### {b.name}: {b.note}: {b.status}", flush=True)
            if ok:
                try:
                    for qd in (1, 32):
                        res = bench(b, rw="randread", iodepth=qd, queues=1, seconds=args.seconds,
                                    ramp=args.ramp)
                        r = row(b.name, res, rw="randread", qd=qd, queues=1)
                        out["delay"].append(r)
                        print(f"  randread qd{qd}: {_f(r['iops'], ',.0f')} IOPS p50 {_f(r['p50_us'], '.1f')} us",
                              flush=True)
                finally:
                    stop(b)

        # The bench's own ceiling: in-process loopback device (no back end)
        if not only or "loopback" in only:
            print("\n### loopback (in-process C device on its own CPU, bench spinning: "
                  "measures vscsid-bench itself)", flush=True)
            for qd, nq in ((1, 1), (32, 1), (32, 2)):
                # --spin-us: the bench never sleeps, so this measures its CPU cost per request
                # rather than the machine's cross-CPU wake-up latency
                res = bench(None, rw="randread", iodepth=qd, queues=nq, seconds=args.seconds,
                            ramp=args.ramp, fmt="scsi", extra=["--spin-us", "100"])
                r = row("loopback", res, rw="randread", qd=qd, queues=nq)
                out["loopback"].append(r)
                print(f"  qd{qd} q{nq}: {_f(r['iops'], ',.0f')} IOPS, bench {_f(r['bench_us_per_io'], '.3f')} us/io",
                      flush=True)
    finally:
        for b in backends:
            stop(b)
        if not args.keep and not args.workdir:
            shutil.rmtree(base, ignore_errors=True)

    pl = info["placement"]
    print("\n# Results (4 KiB; daemon CPU = daemon + descendants during the window; "
          + (f"bench on CPU {pl['bench_cpus']}, daemon on CPU {pl['daemon_cpus']})" if pl["mode"] == "split"
             else "bench and daemon unpinned)"))
    print_table(out["matrix"], "matrix")
    if out["disk"]:
        print_table(out["disk"], f"real disk: {out['settings'].get('disk_image')} "
                                 "(page cache dropped before every run; 1 queue)")
    if out["delay"]:
        print_table(out["delay"], "vscsid null LUN with delay_us=200: QD1 vs QD32 (1 queue)")
    if out["network"]:
        print_table(out["network"], "network storage: NBD (qemu-nbd, tmpfs file, Unix socket) and "
                    "RBD (single-node cluster), vscsid vs qemu-storage-daemon's drivers")
    if out["loopback"]:
        print_table(out["loopback"], "vscsid-bench ceiling (loopback device, no back end)")
    failed = {k: v["status"] for k, v in out["backends"].items() if not v["status"].startswith("running")}
    if failed:
        print("\nBack ends that did not start:")
        for k, v in failed.items():
            print(f"- {k}: {v}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
        print(f"\nJSON written to {args.json_out}")
    plot = args.plot or (str(Path(args.json_out).with_suffix(".png")) if args.json_out else None)
    if plot:
        try:
            plot_matrix(out, plot)
            print(f"plot written to {plot}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install matplotlib)")
    return 0


DISK_WORKLOADS = [("randread", 0), ("randwrite", 0), ("randrw", 8)]   # (rw, flush every N writes)


def disk_image(args) -> Path:
    """An image on the host's disk filled with data, made once and kept (its size: more
    than one run can bring into the page cache)."""
    from vscsid.config import parse_size

    size = parse_size(args.disk_size)
    path = Path(args.disk_dir) / f"vscsid-matrix-{size >> 30}g.img"
    if not path.exists() or path.stat().st_size != size:
        print(f"\nfilling {path} ({size >> 30} GiB of random data, once) ...", flush=True)
        tmp = path.with_suffix(".tmp")
        chunk = os.urandom(1 << 20)
        with open(tmp, "wb") as f:
            for i in range(size >> 20):
                f.write(chunk[i % 4096:] + chunk[:i % 4096])
        os.replace(tmp, path)
    return path


def run_side_by_side(backends: list[Backend], base: Path, measurements, args, out: dict,
                     table: str) -> None:
    """Start every backend at once and take each measurement in turn from every one of them,
    REPEAT rounds (each in a rotated order), each row the median of its rounds. A machine's
    (or a disk's) speed drifts over minutes -- other tenants of the host, write-back -- and a
    whole series of one daemon after another's would put that drift between them.
    ``measurements``: (label, kwargs of bench) pairs."""
    started = []
    try:
        for b in backends:
            ok = start(b, base)
            out["backends"][b.name] = {"cmd": b.args, "note": b.note, "status": b.status}
            print(f"\n### {b.name}: {b.note}: {b.status}", flush=True)
            if ok:
                started.append(b)
        print(f"\n### side by side: {', '.join(b.name for b in started)}", flush=True)
        for label, kw in measurements:
            runs: dict[str, list[dict]] = {b.name: [] for b in started}
            for rnd in range(REPEAT):
                # Each round starts one daemon later: a disk that speeds up or slows down
                # within a round would otherwise favour whoever always runs last.
                k = rnd % max(1, len(started))
                for b in started[k:] + started[:k]:
                    runs[b.name].append(_bench_quiet(b, seconds=args.seconds, ramp=args.ramp, **kw))
            for b in started:
                r = row(b.name, _median(runs[b.name]), rw=label, qd=kw["iodepth"],
                        queues=kw["queues"])
                out[table].append(r)
                print(f"  {b.name:24s} {label:16s} qd{kw['iodepth']:<2d} q{kw['queues']}: "
                      f"{_f(r['iops'], ',.0f'):>10s} IOPS  p50 {_f(r['p50_us'], '8.1f')} us  "
                      f"daemon {_f(r['daemon_us_per_io'], '6.2f')} us/io", flush=True)
    finally:
        for b in backends:
            stop(b)


def run_disk_rows(args, base: Path, only, out: dict) -> None:
    img = disk_image(args)
    out["settings"]["disk_image"] = str(img)
    out["settings"]["disk_image_size"] = img.stat().st_size
    backends = [
        vscsid_backend("vscsid-disk", str(img), base, queues=1, note="host disk, defaults"),
        vscsid_backend("vscsid-disk-none", f"{img},cache=none", base, queues=1,
                       note="host disk, cache=none (O_DIRECT)"),
    ]
    if shutil.which("qemu-storage-daemon"):
        backends += [
            # locking=off: the two run side by side on one image (QEMU would refuse a second
            # writer); it changes nothing on the data path.
            qsd_backend("qsd-disk", f"driver=file,node-name=disk,filename={img},locking=off", base,
                        queues=1, note="host disk, defaults (aio=threads, buffered)"),
            qsd_backend("qsd-disk-native", f"driver=file,node-name=disk,filename={img},aio=native,"
                                           "cache.direct=on,locking=off", base, queues=1,
                        note="host disk, aio=native, O_DIRECT"),
        ]
    if only:
        backends = [b for b in backends if b.name in only] or backends
    for b in backends:
        b.disk = True
    measurements = [(rw + (f"+flush/{flush}" if flush else ""),
                     {"rw": rw, "iodepth": qd, "queues": 1, "flush_every": flush})
                    for rw, flush in DISK_WORKLOADS for qd in (1, 32)]
    run_side_by_side(backends, base, measurements, args, out, "disk")


def plot_matrix(out: dict, path: str) -> None:
    """IOPS and daemon CPU per request of every run, grouped by workload, one bar per daemon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [(k, t) for k, t in (("matrix", "tmpfs (256 MiB)"), ("disk", "host disk (cold)"))
                if out.get(k)]
    fig, axes = plt.subplots(2, len(sections), figsize=(8 * len(sections), 9), squeeze=False)
    for col, (key, title) in enumerate(sections):
        rows = [r for r in out[key] if not r.get("fatal")]
        workloads = sorted({(r["rw"], r["qd"], r["queues"]) for r in rows},
                           key=lambda w: (w[0], w[2], w[1]))
        backends = sorted({r["backend"] for r in rows})
        width = 0.8 / max(1, len(backends))
        for k, be in enumerate(backends):
            by = {(r["rw"], r["qd"], r["queues"]): r for r in rows if r["backend"] == be}
            xs = [i + k * width for i in range(len(workloads))]
            color = plt.cm.tab20(k % 20)      # more daemons than tab10 has colours (--build rows)
            axes[0][col].bar(xs, [(by[w]["iops"] or 0) / 1e3 if w in by else 0 for w in workloads],
                             width, label=be, color=color)
            axes[1][col].bar(xs, [(by[w]["daemon_us_per_io"] or 0) if w in by else 0
                                  for w in workloads], width, label=be, color=color)
        labels = [f"{rw}\nqd{qd} q{q}" for rw, qd, q in workloads]
        for ax, ylabel in ((axes[0][col], "kIOPS"), (axes[1][col], "daemon CPU µs / request")):
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))])
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_ylabel(ylabel)
            ax.grid(axis="y", alpha=0.3)
        axes[0][col].set_title(f"{title}: IOPS (4 KiB)")
        axes[1][col].set_title(f"{title}: daemon CPU per request (whole process tree)")
        axes[0][col].legend(fontsize=7)
    m = out.get("machine", {})
    fig.suptitle(f"vscsid vs qemu-storage-daemon — {m.get('cpu_model', '')}, {m.get('cpus_online')} CPUs, "
                 f"kernel {m.get('kernel')}, {m.get('date', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
