"""CPU cost per 4 KiB asynchronous NBD read round trip through different libnbd bindings.

Runs against nbdkit's memory plugin on TCP loopback (127.0.0.1) and reports the
client process's CPU time (user + system, ``time.process_time``) per completed
read at several queue depths. The server's CPU is not counted: it is the same
for every binding.

Variants:
  abi           cffi ABI mode (ffi.dlopen of libnbd.so.0), null completion closure,
                retired with nbd_aio_peek_command_completed + nbd_aio_command_completed
  abi-callback  the same, but a cffi completion callback that auto-retires
  api           cffi API mode compiled against libnbd-dev (built into a temporary dir)
  client        vscsid's NbdClient (ABI mode plus its bookkeeping), what vscsid pays
  python-libnbd Debian's python3-libnbd, run under /usr/bin/python3 (the only Python
                it is built for)

    python3 benchmarks/nbd_bindings.py [--reads 20000] [--depths 1,16] [--repeat 3]

Needs nbdkit, libnbd0; "api" also needs libnbd-dev and a C compiler; "python-libnbd"
needs python3-libnbd. A variant that cannot run is reported as skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZE = 64 << 20
BS = 4096
READ, WRITE = 1, 2


def cputime() -> tuple[float, float]:
    """(user, system) CPU seconds of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime, r.ru_stime)


def _since(t0):
    t1 = cputime()
    return (t1[0] - t0[0], t1[1] - t0[1])


def offsets(n: int, seed: int = 1) -> list[int]:
    rnd = random.Random(seed)
    blocks = SIZE // BS
    return [rnd.randrange(blocks) * BS for _ in range(n)]


def drive_raw(lib, ffi, h, n: int, depth: int, callback: bool) -> float:
    """Keep ``depth`` reads in flight until ``n`` completed; returns CPU seconds."""
    bufs = [bytearray(BS) for _ in range(depth)]
    cbufs = [ffi.from_buffer(b) for b in bufs]
    offs = offsets(n + depth)
    fd = lib.nbd_aio_get_fd(h)
    ep = select.epoll()
    ep.register(fd, select.EPOLLIN)
    done_slots: list[int] = []
    if callback:
        @ffi.callback("int(void *, int *)")
        def on_done(user_data, error):
            done_slots.append(int(ffi.cast("intptr_t", user_data)))
            return 1
        cbs = []
        for i in range(depth):
            cb = ffi.new("nbd_completion_callback *")
            cb.callback = on_done
            cb.user_data = ffi.cast("void *", i)
            cbs.append(cb[0])
    else:
        nocb = ffi.new("nbd_completion_callback *")[0]
    slot_of: dict[int, int] = {}
    issued = completed = 0
    t0 = cputime()
    for i in range(depth):
        if callback:
            c = lib.nbd_aio_pread(h, cbufs[i], BS, offs[issued], cbs[i], 0)
        else:
            c = lib.nbd_aio_pread(h, cbufs[i], BS, offs[issued], nocb, 0)
            slot_of[c] = i
        assert c > 0
        issued += 1
    while completed < n:
        d = lib.nbd_aio_get_direction(h)
        if d & WRITE:
            ep.modify(fd, select.EPOLLIN | select.EPOLLOUT)
        for _, ev in ep.poll():
            d = lib.nbd_aio_get_direction(h)
            if d & READ and ev & select.EPOLLIN:
                assert lib.nbd_aio_notify_read(h) == 0
            elif d & WRITE and ev & select.EPOLLOUT:
                assert lib.nbd_aio_notify_write(h) == 0
                ep.modify(fd, select.EPOLLIN)
        if callback:
            free = done_slots[:]
            done_slots.clear()
        else:
            free = []
            while True:
                c = lib.nbd_aio_peek_command_completed(h)
                if c <= 0:
                    break
                assert lib.nbd_aio_command_completed(h, c) == 1
                free.append(slot_of.pop(c))
        for i in free:
            completed += 1
            if issued < n:
                if callback:
                    c = lib.nbd_aio_pread(h, cbufs[i], BS, offs[issued], cbs[i], 0)
                else:
                    c = lib.nbd_aio_pread(h, cbufs[i], BS, offs[issued], nocb, 0)
                    slot_of[c] = i
                issued += 1
    return _since(t0)


def drive_client(uri: str, n: int, depth: int) -> float:
    sys.path.insert(0, str(ROOT))
    from vscsid.workers.backends.nbd_ffi import NbdClient

    c = NbdClient(uri, max_in_flight=max(depth, 1))
    bufs = [memoryview(bytearray(BS)) for _ in range(depth)]
    offs = offsets(n + depth)
    ep = select.epoll()
    ep.register(c.fileno(), select.EPOLLIN)
    registered = select.EPOLLIN
    slot_of = {}
    issued = completed = 0
    t0 = cputime()
    for i in range(depth):
        slot_of[c.submit_read((bufs[i],), offs[issued])] = i
        issued += 1
    while completed < n:
        ev = c.events()
        if ev != registered:
            ep.modify(c.fileno(), ev)
            registered = ev
        for _, rev in ep.poll():
            c.handle_events(rev)
        for token, err in c.poll():
            assert err == 0
            i = slot_of.pop(token)
            completed += 1
            if issued < n:
                slot_of[c.submit_read((bufs[i],), offs[issued])] = i
                issued += 1
    cpu = _since(t0)
    c.close()
    return cpu


def drive_python_libnbd(uri: str, n: int, depth: int) -> float:
    import nbd

    h = nbd.NBD()
    h.set_pread_initialize(False)
    h.connect_uri(uri)
    raw = [bytearray(BS) for _ in range(depth)]
    bufs = [nbd.Buffer.from_buffer(b) for b in raw]
    offs = offsets(n + depth)
    fd = h.aio_get_fd()
    ep = select.epoll()
    ep.register(fd, select.EPOLLIN)
    slot_of = {}
    issued = completed = 0
    t0 = cputime()
    for i in range(depth):
        slot_of[h.aio_pread(bufs[i], offs[issued])] = i
        issued += 1
    while completed < n:
        if h.aio_get_direction() & WRITE:
            ep.modify(fd, select.EPOLLIN | select.EPOLLOUT)
        for _, ev in ep.poll():
            d = h.aio_get_direction()
            if d & READ and ev & select.EPOLLIN:
                h.aio_notify_read()
            elif d & WRITE and ev & select.EPOLLOUT:
                h.aio_notify_write()
                ep.modify(fd, select.EPOLLIN)
        free = []
        while slot_of:
            c = h.aio_peek_command_completed()
            if c <= 0:
                break
            assert h.aio_command_completed(c)
            free.append(slot_of.pop(c))
        for i in free:
            completed += 1
            if issued < n:
                slot_of[h.aio_pread(bufs[i], offs[issued])] = i
                issued += 1
    cpu = _since(t0)
    del h
    return cpu


def raw_handle(lib, ffi, uri: str):
    h = lib.nbd_create()
    lib.nbd_set_pread_initialize(h, False)
    if lib.nbd_aio_connect_uri(h, uri.encode()) != 0:
        raise OSError(ffi.string(lib.nbd_get_error()).decode())
    p = select.poll()
    while not lib.nbd_aio_is_ready(h):
        fd = lib.nbd_aio_get_fd(h)
        d = lib.nbd_aio_get_direction(h)
        p.register(fd, (select.POLLIN if d & READ else 0) | (select.POLLOUT if d & WRITE else 0))
        for _, ev in p.poll(5000):
            if d & READ and ev & (select.POLLIN | select.POLLHUP):
                lib.nbd_aio_notify_read(h)
            elif d & WRITE and ev & select.POLLOUT:
                lib.nbd_aio_notify_write(h)
        p.unregister(fd)
        if lib.nbd_aio_is_dead(h):
            raise OSError("connection died during the handshake")
    return h


def load_abi():
    sys.path.insert(0, str(ROOT))
    from vscsid.workers.backends.nbd_ffi import load_libnbd
    return load_libnbd()


def load_api(tmp: Path):
    import cffi
    sys.path.insert(0, str(ROOT))
    from vscsid.workers.backends.nbd_ffi import CDEF

    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source("_nbd_api_bench", "#include <libnbd.h>", libraries=["nbd"])
    builder.compile(tmpdir=str(tmp), verbose=False)
    sys.path.insert(0, str(tmp))
    import _nbd_api_bench
    return _nbd_api_bench.ffi, _nbd_api_bench.lib


CALLS = 200_000


def call_cost(variant: str, uri: str, tmp: Path) -> float:
    """ns per call of a trivial libnbd function (nbd_aio_in_flight): the binding's own cost."""
    if variant == "client":
        return float("nan")
    if variant == "python-libnbd":
        import nbd
        h = nbd.NBD()
        h.connect_uri(uri)
        f = h.aio_in_flight
        t0 = time.perf_counter()
        for _ in range(CALLS):
            f()
        return (time.perf_counter() - t0) / CALLS * 1e9
    ffi, lib = load_api(tmp) if variant == "api" else load_abi()
    h = raw_handle(lib, ffi, uri)
    f = lib.nbd_aio_in_flight
    t0 = time.perf_counter()
    for _ in range(CALLS):
        f(h)
    dt = time.perf_counter() - t0
    lib.nbd_close(h)
    return dt / CALLS * 1e9


def run_variant(variant: str, uri: str, reads: int, depths: list[int], repeat: int, tmp: Path) -> dict:
    out = {"call_ns": min(call_cost(variant, uri, tmp) for _ in range(3))}
    if variant == "python-libnbd":
        run = lambda n, d: drive_python_libnbd(uri, n, d)  # noqa: E731
    elif variant == "client":
        run = lambda n, d: drive_client(uri, n, d)  # noqa: E731
    else:
        ffi, lib = load_api(tmp) if variant == "api" else load_abi()
        cb = variant == "abi-callback"

        def run(n, d):
            h = raw_handle(lib, ffi, uri)
            try:
                return drive_raw(lib, ffi, h, n, d, cb)
            finally:
                lib.nbd_close(h)
    run(min(reads, 2000), max(depths))  # warm up
    for d in depths:
        runs = [run(reads, d) for _ in range(repeat)]
        best = min(runs, key=lambda r: r[0] + r[1])
        out[d] = [best[0] / reads * 1e6, best[1] / reads * 1e6]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reads", type=int, default=20000)
    ap.add_argument("--depths", default="1,16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--variants", default="abi,abi-callback,api,client,python-libnbd")
    ap.add_argument("--unix", action="store_true", help="Unix socket instead of TCP loopback")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--uri", help=argparse.SUPPRESS)
    args = ap.parse_args()
    depths = [int(x) for x in args.depths.split(",")]
    if args.child:
        with tempfile.TemporaryDirectory() as t:
            print(json.dumps(run_variant(args.child, args.uri, args.reads, depths, args.repeat, Path(t))))
        return 0

    sys.path.insert(0, str(ROOT))
    from tests.support.servers import nbdkit

    results = {}
    with tempfile.TemporaryDirectory() as t:
        kw = dict(unix=Path(t) / "nbd.sock") if args.unix else dict(tcp=True)
        with nbdkit("memory", f"size={SIZE}", log_dir=t, **kw) as srv:
            for v in args.variants.split(","):
                py = "/usr/bin/python3" if v == "python-libnbd" else sys.executable
                if v == "python-libnbd" and not Path(py).exists():
                    results[v] = "skipped: /usr/bin/python3 missing"
                    continue
                if v == "api" and not (Path("/usr/include/libnbd.h").exists() and shutil.which("cc")):
                    results[v] = "skipped: needs libnbd-dev and a C compiler"
                    continue
                r = subprocess.run([py, __file__, "--child", v, "--uri", srv.uri, "--reads", str(args.reads),
                                    "--depths", args.depths, "--repeat", str(args.repeat)],
                                   capture_output=True, text=True, cwd=t)
                if r.returncode != 0:
                    results[v] = "failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
                    continue
                results[v] = {(int(k) if k.isdigit() else k): val for k, val in json.loads(r.stdout).items()}
    transport = "Unix socket" if args.unix else "TCP 127.0.0.1"
    print(f"client CPU µs per 4 KiB read (total = user + system), nbdkit memory plugin over "
          f"{transport} ({args.reads} reads, best of {args.repeat})")
    print(f"{'variant':<15}" + "".join(f"{'QD ' + str(d) + ' total/user':>20}" for d in depths)
          + f"{'ns/call':>10}")
    for v, r in results.items():
        if isinstance(r, str):
            print(f"{v:<15}{r}")
        else:
            print(f"{v:<15}" + "".join(f"{r[d][0] + r[d][1]:>14.1f} /{r[d][0]:>4.1f}" for d in depths)
                  + f"{r['call_ns']:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
