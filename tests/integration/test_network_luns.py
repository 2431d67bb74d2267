"""LUNs on network storage, end to end through a real daemon: NBD exports served by
real qemu-nbd and nbdkit, a Ceph RBD image on the real single-node cluster; the
server killed and restarted under I/O; fault injection on every LUN type; task
management aborting what never completes.

The front end is the Python one (vscsid.bench) with memfd guest memory, so every
byte a command moves is checked against the server's storage."""
from __future__ import annotations

import json
import os
import struct
import time

import pytest

from tests.daemon import Daemon
from tests.support.servers import make_image
from tests.wait import WAIT, wait_for
from vscsid.bench import virtio_scsi as vs

from .test_daemon_io import Guest

pytestmark = pytest.mark.timeout(180)

MiB = 1 << 20
BS = 512


@pytest.fixture
def daemon(tmp_path):
    started: list[Daemon] = []

    def start(*args: str, engine: str = "c") -> Daemon:
        d = Daemon(tmp_path, [*args, "--engine", engine], tmp_path / f"vscsid{len(started)}.sock")
        started.append(d)
        return d

    yield start
    for d in started:
        code = d.stop()
        assert code == 0, d.log_tail()
        crashes = [r for r in d.log_records() if r.get("level") == "critical"]
        assert not crashes, crashes


@pytest.fixture
def guests():
    made: list[Guest] = []

    def make(d, **kw) -> Guest:
        g = Guest(d, **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def submit(g: Guest, cdb: bytes, *, lun: int = 0, queue: int = 2, **kw):
    """Queue one command and kick, without waiting."""
    h = g.builders[queue].command(cdb, lun=lun, publish=True, **kw)
    g.queues[queue].kick()
    return h


def wait_all(g: Guest, handles, queue: int = 2, timeout: float = WAIT) -> list:
    """Reap until every handle is done; the order in which they completed."""
    b, q = g.builders[queue], g.queues[queue]
    order = []
    deadline = time.monotonic() + timeout
    pending = [h for h in handles if not h.done]
    while pending:
        order += b.reap()
        pending = [h for h in pending if not h.done]
        if not pending:
            break
        left = deadline - time.monotonic()
        assert left > 0, f"{len(pending)} of {len(handles)} commands not completed in {timeout}s"
        q.wait_used(min(left, 1.0))
    return order


def sense(h) -> tuple[int, int, int]:
    s = vs.parse_sense(h.response.sense)
    return (s.key, s.asc, s.ascq) if s else (None, None, None)


def information(h) -> int | None:
    """The INFORMATION field of fixed-format sense (VALID set), e.g. the failing LBA."""
    s = h.response.sense
    if len(s) >= 7 and s[0] & 0x80:
        return int.from_bytes(s[3:7], "big")
    return None


def mode_page(g: Guest, page: int, *, lun: int = 0, pc: int = 0) -> tuple[int, bytes]:
    """(device-specific parameter of the MODE SENSE(10) header, the page)."""
    h = g.command(vs.mode_sense10(page, pc=pc), lun=lun, data_in_len=255)
    assert h.response.ok, h.response
    return h.data_in[3], h.data_in[8:]


def vpd(g: Guest, page: int, *, lun: int = 0) -> bytes:
    h = g.command(vs.inquiry(evpd=True, page=page, alloc_len=255), lun=lun, data_in_len=255)
    assert h.response.ok, h.response
    return h.data_in


def capacity(g: Guest, *, lun: int = 0) -> tuple[int, int, int]:
    """(bytes, block length, RC16 byte 14: LBPME/LBPRZ)."""
    h = g.command(vs.read_capacity16(), lun=lun, data_in_len=32)
    last, bl = struct.unpack(">QI", h.data_in[:12])
    return (last + 1) * bl, bl, h.data_in[14]


def unmap_cdb(ranges) -> tuple[bytes, bytes]:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    plist = struct.pack(">HH4x", len(body) + 6, len(body)) + body
    return bytes([0x42, 0, 0, 0, 0, 0, 0]) + len(plist).to_bytes(2, "big") + b"\0", plist


# ------------------------------------------------------------------ NBD: data and capabilities

def _export(kind: str, nbd_server, tmp_path, size: int):
    """(server, path of its backing file) for one of the server set-ups."""
    img = make_image(tmp_path / f"{kind}.img", size)
    if kind == "qemu-nbd-unix":
        return nbd_server("qemu-nbd", img, unix=True), img
    if kind == "qemu-nbd-qcow2-tcp":
        q = make_image(tmp_path / "d.qcow2", size, fmt="qcow2")
        return nbd_server("qemu-nbd", q, fmt="qcow2", tcp=True), None
    return nbd_server("nbdkit", "file", f"file={img}", tcp=True), img


@pytest.mark.parametrize("engine", ["c", "python"])
@pytest.mark.parametrize("kind", ["qemu-nbd-unix", "qemu-nbd-qcow2-tcp", "nbdkit-file-tcp"])
def test_nbd_lun_many_commands_in_flight(kind, engine, nbd_server, daemon, guests, tmp_path):
    srv, img = _export(kind, nbd_server, tmp_path, 32 * MiB)
    d = daemon("--lun", srv.uri, engine=engine)
    g = guests(d)
    size, bl, _ = capacity(g)
    assert (size, bl) == (32 * MiB, BS)
    # 64 writes of 64 KiB out at once (one kick), then 64 reads, scattered over the LUN.
    datas = [os.urandom(64 * 1024) for _ in range(64)]
    lbas = [(i * 7919 % 500) * 128 for i in range(64)]
    b = g.builders[2]
    hs = [b.command(vs.write10(lba, 128), data_out=data, publish=False, data_seg=16384,
                     indirect=True)
          for lba, data in zip(lbas, datas)]
    g.queues[2].publish()
    g.queues[2].kick()
    wait_all(g, hs)
    assert all(h.response.ok for h in hs), [h.response for h in hs if not h.response.ok]
    hs = [b.command(vs.read10(lba, 128), data_in_len=64 * 1024, publish=False,
                     data_seg=4096 + 512, indirect=True)
          for lba in lbas]
    g.queues[2].publish()
    g.queues[2].kick()
    wait_all(g, hs)
    assert [h.data_in for h in hs] == datas
    if img is not None:
        with open(img, "rb") as f:
            for lba, data in zip(lbas, datas):
                f.seek(lba * BS)
                assert f.read(len(data)) == data
    # Several commands were out on the connection together.
    d.check_alive()
    stats = _worker_stats(d)
    assert stats["max_inflight"] > 8, stats


def _worker_stats(d: Daemon) -> dict:
    """The counters of the request queue's worker, from its ring_stopped line after
    GET_VRING_BASE (done by the caller's front end closing) or now via a stop."""
    recs = [r for r in d.events("ring_stopped") if r.get("component") == "worker"]
    if not recs:
        d.stop()
        recs = [r for r in d.events("ring_stopped") if r.get("component") == "worker"]
    return recs[-1]


def test_nbd_capabilities_follow_the_server(nbd_server, daemon, guests, tmp_path):
    """Read-only, flush (WCE), FUA (DPOFUA), trim/zero (UNMAP, LBPRZ) and the block
    sizes as each server advertises them."""
    ev = make_image(tmp_path / "ev.img", 16 * MiB)
    servers = [
        # everything: flush, FUA, trim, zero; preferred block 4096
        nbd_server("qemu-nbd", make_image(tmp_path / "full.img", 16 * MiB), unix=True),
        # read-only
        nbd_server("nbdkit", "memory", "size=16M", unix=True, read_only=True),
        # no write zeroes, no FUA: FUA emulated with a flush, UNMAP as trim (no LBPRZ)
        nbd_server("nbdkit", "memory", "size=16M", unix=True, filters=["nozero", "fua"]),
        # no flush, no FUA, no trim (zero only): WCE 0 and not changeable, no DPOFUA
        nbd_server("nbdkit", "eval", "get_size=echo 16777216",
                   f"pread=dd if={ev} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
                   f"pwrite=dd of={ev} seek=$4 oflag=seek_bytes conv=notrunc status=none",
                   "can_write=exit 0", "can_flush=exit 3", unix=True),
        # a 64 KiB maximum request
        nbd_server("nbdkit", "memory", "size=16M", "blocksize-minimum=512", "blocksize-preferred=4096",
                   "blocksize-maximum=64K", unix=True, filters=["blocksize-policy"]),
    ]
    args = []
    for s in servers:
        args += ["--lun", s.uri]
    d = daemon(*args)
    g = guests(d)
    expect = [  # (wp, dpofua, wce, wce changeable, lbpu, lbprz, max transfer blocks)
        (False, True, True, True, True, True, 65536),
        (True, True, True, True, False, False, 65536),   # (flush still advertised)
        (False, True, True, True, True, False, 65536),
        (False, False, False, False, True, True, 65536),
        (False, True, True, True, True, True, 128),
    ]
    for lun, (wp, dpofua, wce, wce_ch, lbpu, lbprz, maxt) in enumerate(expect):
        dsp, caching = mode_page(g, 0x08, lun=lun)
        _, changeable = mode_page(g, 0x08, lun=lun, pc=1)
        b0, b2 = vpd(g, 0xB0, lun=lun), vpd(g, 0xB2, lun=lun)
        size, _, rc16 = capacity(g, lun=lun)
        got = (bool(dsp & 0x80), bool(dsp & 0x10), bool(caching[2] & 0x04),
               bool(changeable[2] & 0x04), bool(b2[5] & 0x80), bool(b2[5] & 0x04),
               int.from_bytes(b0[8:12], "big"))
        assert got == (wp, dpofua, wce, wce_ch, lbpu, lbprz, maxt), (lun, servers[lun].argv)
        assert size == 16 * MiB
        assert bool(rc16 & 0x80) == lbpu and bool(rc16 & 0x40) == lbprz
    # The read-only export refuses writes with DATA PROTECT, before they reach the server.
    h = g.command(vs.write10(0, 1), lun=1, data_out=b"x" * BS)
    assert sense(h) == (7, 0x27, 0)
    # FUA emulated (write, then flush), UNMAP as trim, WRITE SAME(16) zeros written as data:
    payload = os.urandom(8192)
    h = g.command(vs.write10(64, 16, fua=True), lun=2, data_out=payload)
    assert h.response.ok, h.response
    assert g.command(vs.read10(64, 16), lun=2, data_in_len=8192).data_in == payload
    ws = bytes([0x93, 0x00]) + (64).to_bytes(8, "big") + (16).to_bytes(4, "big") + b"\0\0"
    h = g.command(ws, lun=2, data_out=bytes(BS))
    assert h.response.ok, h.response
    assert g.command(vs.read10(64, 16), lun=2, data_in_len=8192).data_in == bytes(8192)
    cdb, plist = unmap_cdb([(0, 8)])
    assert g.command(cdb, lun=2, data_out=plist).response.ok
    # No flush: SYNCHRONIZE CACHE still succeeds (there is no cache to write back);
    # UNMAP goes out as write-zeroes, so the blocks read back as zeros (LBPRZ).
    g.command(vs.write10(8, 8), lun=3, data_out=b"\xAA" * 4096)
    assert g.command(vs.sync_cache10(), lun=3).response.ok
    cdb, plist = unmap_cdb([(8, 8)])
    assert g.command(cdb, lun=3, data_out=plist).response.ok
    assert g.command(vs.read10(8, 8), lun=3, data_in_len=4096).data_in == bytes(4096)
    # MODE SELECT cannot turn on a write cache that does not exist.
    _, page = mode_page(g, 0x08, lun=3)
    plist = bytes(8) + bytes([0x08, 0x12, page[2] | 0x04]) + page[3:20]
    h = g.command(bytes([0x55, 0x10, 0, 0, 0, 0, 0, 0, len(plist), 0]), lun=3, data_out=plist)
    assert sense(h)[0] == 5
    # A transfer over the server's 64 KiB maximum is refused as the B0 page says.
    h = g.command(vs.read10(0, 256), lun=4, data_in_len=256 * BS)
    assert sense(h) == (5, 0x24, 0)
    assert g.command(vs.read10(0, 128), lun=4, data_in_len=128 * BS).response.ok


def test_nbd_unreachable_at_start_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vscsid.cli", "--socket-path", str(tmp_path / "s"),
                        "--lun", f"nbd+unix:///x?socket={tmp_path}/none.sock", "--quiet",
                        "--log-format", "json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "none.sock" in r.stdout + r.stderr and "worker_boot_failed" in r.stdout + r.stderr
    stopped = [json.loads(line) for line in (r.stdout + r.stderr).splitlines()
               if '"event": "stopped"' in line]
    assert [x["exit_code"] for x in stopped] == [1]      # the log says what the process exits with


# ------------------------------------------------------------------ NBD: outages

def test_nbd_server_killed_requests_held_then_completed(nbd_server, daemon, guests, tmp_path):
    img = make_image(tmp_path / "d.img", 16 * MiB)
    srv = nbd_server("qemu-nbd", img, unix=True)
    d = daemon("--lun", srv.uri)
    g = guests(d)
    first = os.urandom(4096)
    assert g.command(vs.write10(0, 8), data_out=first).response.ok
    srv.kill()
    t0 = time.monotonic()
    # Issued while the server is gone: nothing fails, everything waits.
    datas = [os.urandom(4096) for _ in range(16)]
    hs = [submit(g, vs.write10(8 + 8 * i, 8), data_out=data) for i, data in enumerate(datas)]
    hs.append(submit(g, vs.read10(0, 8), data_in_len=4096))
    time.sleep(1.0)
    g.builders[2].reap()
    assert not any(h.done for h in hs), "a request completed while the server was down"
    srv.start()
    wait_all(g, hs, timeout=10)
    stall = time.monotonic() - t0
    assert all(h.response.ok for h in hs), [h.response for h in hs if not h.response.ok]
    assert hs[-1].data_in == first
    for i, data in enumerate(datas):
        h = g.command(vs.read10(8 + 8 * i, 8), data_in_len=4096)
        assert h.data_in == data
    lost = d.wait_for_log("nbd_connection_lost")
    back = d.wait_for_log("nbd_reconnected")
    assert lost["uri"] == srv.uri and 1.0 <= back["outage_s"] <= stall
    print(f"\nNBD server down {back['outage_s']:.2f} s; held requests completed {stall:.2f} s "
          "after the kill")


def test_nbd_outage_past_hold_fails_with_not_ready_then_recovers(nbd_server, daemon, guests,
                                                                 tmp_path):
    """Past hold= seconds a request fails with NOT READY, LOGICAL UNIT IS IN PROCESS OF
    BECOMING READY (02/04/01), which initiators retry; once the server is back the
    same LUN serves again. The worker answers heartbeats all the while."""
    img = make_image(tmp_path / "d.img", 16 * MiB, data=b"\x5A" * 4096)
    srv = nbd_server("nbdkit", "file", f"file={img}", tcp=True)
    d = daemon("--lun", f"{srv.uri},hold=2", "--heartbeat-timeout", "3")
    g = guests(d)
    assert g.command(vs.read10(0, 8), data_in_len=4096).data_in == b"\x5A" * 4096
    srv.kill()
    t0 = time.monotonic()
    h = submit(g, vs.read10(0, 8), data_in_len=4096)
    w = submit(g, vs.write10(16, 8), data_out=b"w" * 4096)
    wait_all(g, [h, w], timeout=10)
    took = time.monotonic() - t0
    assert sense(h) == sense(w) == (2, 0x04, 0x01)
    assert 1.9 <= took <= 4.0, took
    # A command that arrives later waits its own hold time (it is not failed at once).
    t1 = time.monotonic()
    h = g.command(vs.read10(0, 1), data_in_len=BS, timeout=10)
    assert sense(h) == (2, 0x04, 0x01) and time.monotonic() - t1 >= 1.9
    srv.start()
    h = g.command(vs.read10(0, 8), data_in_len=4096, timeout=10)
    assert h.response.ok and h.data_in == b"\x5A" * 4096
    assert not d.events("worker_hung") and not d.events("worker_died")
    assert d.events("nbd_requests_expired")


def test_worker_replaced_while_the_server_is_down(nbd_server, daemon, guests, tmp_path):
    """A worker that dies while its NBD server is away is replaced, and the replacement
    comes up with the LUN's known identity instead of failing to connect; the request that
    was held when the worker died is resubmitted and completes once the server is back."""
    import signal

    img = make_image(tmp_path / "d.img", 16 * MiB, data=b"r" * 4096)
    srv = nbd_server("qemu-nbd", img, unix=True)
    d = daemon("--lun", srv.uri)
    g = guests(d)
    assert g.command(vs.read10(0, 8), data_in_len=4096).response.ok
    srv.kill()
    h = submit(g, vs.read10(0, 8), data_in_len=4096)
    time.sleep(0.5)
    os.kill(d.worker_pids()[0], signal.SIGKILL)
    d.wait_for_log("worker_configured", count=2, timeout=20)
    assert not h.done
    srv.start()
    wait_all(g, [h], timeout=20)
    assert h.response.ok and h.data_in == b"r" * 4096
    assert d.wait_for_log("inflight_recovered")["resubmit"] == 1
    starts = [r for r in d.events("nbd_connection_lost") if r.get("reason") == "connect failed at start-up"]
    assert starts, d.events("nbd_connection_lost")


def test_nbd_server_not_answering_is_reconnected(nbd_server, daemon, guests, tmp_path):
    """A server that stops answering on a live connection (SIGSTOP) is treated like one
    that went away: after hold= seconds the connection is dropped (libnbd lets go of the
    guest buffers) and made again; the command fails with 02/04/01 and the next one,
    once the server runs again, succeeds."""
    img = make_image(tmp_path / "d.img", 16 * MiB)
    srv = nbd_server("qemu-nbd", img, unix=True)
    d = daemon("--lun", f"{srv.uri},hold=2")
    g = guests(d)
    assert g.command(vs.write10(0, 8), data_out=b"a" * 4096).response.ok
    os.kill(srv.pid, 19)      # SIGSTOP
    try:
        h = submit(g, vs.read10(0, 8), data_in_len=4096)
        wait_all(g, [h], timeout=10)
        assert sense(h) == (2, 0x04, 0x01)
        assert d.events("nbd_server_not_answering")
    finally:
        os.kill(srv.pid, 18)  # SIGCONT
    h = g.command(vs.read10(0, 8), data_in_len=4096, timeout=15)
    assert h.response.ok and h.data_in == b"a" * 4096


# ------------------------------------------------------------------ RBD

def test_rbd_lun_data_snapshot_and_capabilities(ceph_cluster, rbd_image, daemon, guests):
    name = rbd_image("24M")
    pool = ceph_cluster.pool
    conf = str(ceph_cluster.conf)
    d = daemon("--lun", f"rbd:{pool}/{name},conf={conf},id=vscsid", "--num-queues", "1")
    g = guests(d)
    size, bl, rc16 = capacity(g)
    assert (size, bl) == (24 * MiB, BS)
    b2 = vpd(g, 0xB2)
    assert b2[5] & 0x80 and b2[5] & 0x04 and rc16 & 0xC0 == 0xC0   # LBPU, LBPRZ
    datas = [os.urandom(128 * 1024) for _ in range(32)]
    b = g.builders[2]
    hs = [b.command(vs.write16(i * 1024, 256), data_out=data, publish=False, data_seg=32768,
                     indirect=True)
          for i, data in enumerate(datas)]
    g.queues[2].publish()
    g.queues[2].kick()
    wait_all(g, hs, timeout=60)
    assert all(h.response.ok for h in hs), [h.response for h in hs if not h.response.ok]
    assert g.command(vs.sync_cache16()).response.ok
    hs = [b.command(vs.read16(i * 1024, 256), data_in_len=128 * 1024, publish=False, indirect=True)
          for i in range(32)]
    g.queues[2].publish()
    g.queues[2].kick()
    wait_all(g, hs, timeout=60)
    assert [h.data_in for h in hs] == datas
    # The data is in the image, as the rbd CLI reads it back.
    out = d.log_path.parent / "export.raw"
    ceph_cluster.rbd("export", "--no-progress", f"{pool}/{name}", str(out))
    raw = out.read_bytes()
    assert all(raw[i * 1024 * BS:(i * 1024 + 256) * BS] == data for i, data in enumerate(datas))
    # UNMAP (as write-zeroes) reads back as zeros.
    cdb, plist = unmap_cdb([(0, 256)])
    assert g.command(cdb, data_out=plist).response.ok
    assert g.command(vs.read16(0, 256), data_in_len=128 * 1024).data_in == bytes(128 * 1024)
    g.close()
    # A snapshot: read-only, its data as it was.
    ceph_cluster.rbd("snap", "create", f"{pool}/{name}@s1")
    d2 = daemon("--lun", f"rbd:{pool}/{name}@s1,conf={conf},id=vscsid")
    g2 = guests(d2)
    dsp, _ = mode_page(g2, 0x08)
    assert dsp & 0x80     # WP
    h = g2.command(vs.write10(0, 1), data_out=b"x" * BS)
    assert sense(h) == (7, 0x27, 0)
    assert g2.command(vs.read16(1024, 256), data_in_len=128 * 1024).data_in == datas[1]


def test_rbd_lun_on_two_queues(ceph_cluster, rbd_image, daemon, guests):
    """Two workers, two librados clients on one image: writes on either queue are seen by
    the other (the exclusive lock moves between them), and the supervisor warns that this
    is slow."""
    name = rbd_image("16M")
    d = daemon("--lun", f"rbd:{ceph_cluster.pool}/{name},conf={ceph_cluster.conf},id=vscsid",
               "--num-queues", "2")
    g = guests(d, queues=2)
    for i, (wq, rq) in enumerate(((2, 3), (3, 2), (2, 3))):
        data = os.urandom(8192)
        assert g.command(vs.write10(16 * i, 16), queue=wq, data_out=data, timeout=60).response.ok
        assert g.command(vs.read10(16 * i, 16), queue=rq, data_in_len=8192, timeout=60).data_in == data
    w = d.wait_for_log("rbd_exclusive_lock_with_several_queues")
    assert w["queues"] == 2


# ------------------------------------------------------------------ fault injection

def _lun_for(kind: str, tmp_path, nbd_server, request) -> str:
    if kind == "file":
        return str(make_image(tmp_path / "f.img", 16 * MiB, data=bytes(range(256)) * 64))
    if kind == "null":
        return "null:16M"
    if kind == "nbd":
        img = make_image(tmp_path / "n.img", 16 * MiB, data=bytes(range(256)) * 64)
        return nbd_server("qemu-nbd", img, unix=True).uri
    cluster = request.getfixturevalue("ceph_cluster")
    name = request.getfixturevalue("rbd_image")("16M")
    return f"rbd:{cluster.pool}/{name},conf={cluster.conf},id=vscsid"


@pytest.mark.parametrize("kind", ["file", "null", "nbd", "rbd"])
def test_injected_medium_and_hardware_errors(kind, tmp_path, nbd_server, request, daemon, guests):
    """MEDIUM ERROR on reads of LBAs 100-199 (the blocks before it still arrive, and
    INFORMATION names LBA 100), WRITE ERROR and HARDWARE ERROR on writes, a count that
    runs out; other ranges work."""
    lun = _lun_for(kind, tmp_path, nbd_server, request)
    rules = "medium@read:100-199+medium@write:300-309+hardware@write:400*1"
    d = daemon("--lun", f"{lun},inject={rules}")
    g = guests(d)
    if kind != "null":
        data = os.urandom(64 * BS)
        assert g.command(vs.write10(40, 64), data_out=data).response.ok
    h = g.command(vs.read10(40, 100), data_in_len=100 * BS)
    assert h.response.status == 2 and sense(h) == (3, 0x11, 0) and information(h) == 100
    assert h.response.residual == 40 * BS           # LBAs 40..99 moved, 100..139 did not
    if kind != "null":
        assert h.data_in == data[:60 * BS]
    h = g.command(vs.read10(150, 1), data_in_len=BS)
    assert sense(h) == (3, 0x11, 0) and information(h) == 150
    assert g.command(vs.read10(200, 8), data_in_len=8 * BS).response.ok
    assert g.command(vs.read10(0, 100), data_in_len=100 * BS).response.ok
    h = g.command(vs.write10(305, 2), data_out=b"w" * 2 * BS)
    assert sense(h) == (3, 0x0C, 0) and information(h) == 305
    assert g.command(vs.read10(305, 2), data_in_len=2 * BS).response.ok
    h = g.command(vs.write10(396, 8), data_out=b"h" * 8 * BS)
    assert sense(h) == (4, 0x44, 0) and information(h) == 400
    assert g.command(vs.write10(396, 8), data_out=b"h" * 8 * BS).response.ok   # *1: used up
    if kind != "null":
        got = g.command(vs.read10(396, 8), data_in_len=8 * BS).data_in
        assert got == b"h" * 8 * BS
    assert d.events("fault_injected")
    g.close()
    assert d.stop() == 0        # before the fixtures remove the image or stop the server


def test_injected_hang_is_aborted_by_the_control_queue(nbd_server, daemon, guests, tmp_path):
    """A command that never completes is completed by ABORT TASK (VIRTIO_SCSI_S_ABORTED)
    and LOGICAL UNIT RESET (VIRTIO_SCSI_S_RESET); the TMF answers only after that; the
    LUN goes on working, and other commands were never held up."""
    img = make_image(tmp_path / "d.img", 16 * MiB)
    srv = nbd_server("qemu-nbd", img, unix=True)
    d = daemon("--lun", f"{img},inject=hang@read:1000-1999", "--lun", f"{srv.uri},inject=hang@write:0")
    g = guests(d)
    stuck = submit(g, vs.read10(1500, 8), data_in_len=4096, tag=4242)
    other = submit(g, vs.read10(0, 8), data_in_len=4096)
    wait_all(g, [other])
    assert other.response.ok and not stuck.done
    b0, q0 = g.builders[0], g.queues[0]
    t = b0.tmf(vs.VIRTIO_SCSI_T_TMF_QUERY_TASK, lun=0, tag=4242, publish=True)
    q0.kick()
    g.wait(t, queue=0)
    assert t.response == vs.VIRTIO_SCSI_S_FUNCTION_SUCCEEDED and not stuck.done
    t = b0.tmf(vs.VIRTIO_SCSI_T_TMF_ABORT_TASK, lun=0, tag=4242, publish=True)
    q0.kick()
    g.wait(t, queue=0)
    assert t.response == vs.VIRTIO_SCSI_S_OK
    # The aborted command was completed before the TMF answer was.
    g.builders[2].reap()
    assert stuck.done and stuck.response.response == vs.VIRTIO_SCSI_S_ABORTED
    # On the NBD LUN: two writes to LBA 0 hang; a LOGICAL UNIT RESET completes both.
    ws = [submit(g, vs.write10(0, 1), lun=1, data_out=b"z" * BS) for _ in range(2)]
    assert g.command(vs.write10(8, 1), lun=1, data_out=b"y" * BS).response.ok
    t = b0.tmf(vs.VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, lun=1, publish=True)
    q0.kick()
    g.wait(t, queue=0)
    assert t.response == vs.VIRTIO_SCSI_S_OK
    g.builders[2].reap()
    assert all(w.done and w.response.response == vs.VIRTIO_SCSI_S_RESET for w in ws)
    # The reset LUN reports it once (POWER ON, RESET unit attention); then both LUNs
    # keep working outside the hang rules.
    si = g.command(vs.test_unit_ready(), lun=1).response.sense_key()
    assert (si.key, si.asc, si.ascq) == (6, 0x29, 0)
    assert g.command(vs.read10(0, 8), data_in_len=4096).response.ok
    assert g.command(vs.read10(8, 1), lun=1, data_in_len=BS).data_in == b"y" * BS


def test_abort_of_a_request_out_on_the_server_waits_for_it(nbd_server, daemon, guests, tmp_path):
    """ABORT TASK for a command whose I/O is out on the NBD server (nbdkit's delay filter
    holds reads 1.5 s): the TMF is answered only once the server gave the buffers back,
    and the worker goes on serving other requests meanwhile."""
    img = make_image(tmp_path / "d.img", 16 * MiB)
    slow = nbd_server("nbdkit", "file", f"file={img}", "rdelay=1500ms", unix=True, filters=["delay"])
    fast = make_image(tmp_path / "f.img", 1 * MiB)
    d = daemon("--lun", slow.uri, "--lun", str(fast))
    g = guests(d)
    h = submit(g, vs.read10(0, 8), data_in_len=4096, tag=77)
    time.sleep(0.2)
    b0, q0 = g.builders[0], g.queues[0]
    t0 = time.monotonic()
    t = b0.tmf(vs.VIRTIO_SCSI_T_TMF_ABORT_TASK, lun=0, tag=77, publish=True)
    q0.kick()
    # Meanwhile the other LUN answers at once.
    assert g.command(vs.read10(0, 8), lun=1, data_in_len=4096).response.ok
    assert not t.done and time.monotonic() - t0 < 1.0
    g.wait(t, queue=0, timeout=10)
    assert t.response == vs.VIRTIO_SCSI_S_OK and time.monotonic() - t0 >= 1.0
    g.builders[2].reap()
    assert h.done and h.response.response == vs.VIRTIO_SCSI_S_ABORTED


def test_injected_delay(daemon, guests):
    d = daemon("--lun", "null:8M,inject=delay=200000@read:0-99", "--lun", "null:8M")
    g = guests(d)
    t0 = time.monotonic()
    assert g.command(vs.read10(0, 1), data_in_len=BS).response.ok
    assert time.monotonic() - t0 >= 0.2
    t0 = time.monotonic()
    assert g.command(vs.read10(100, 1), data_in_len=BS).response.ok
    assert g.command(vs.read10(0, 1), lun=1, data_in_len=BS).response.ok
    assert time.monotonic() - t0 < 0.2
    # Two delayed reads overlap (they stay in flight together).
    t0 = time.monotonic()
    hs = [submit(g, vs.read10(i, 1), data_in_len=BS) for i in range(4)]
    wait_all(g, hs)
    assert 0.2 <= time.monotonic() - t0 < 0.6


def test_random_delay_range_and_heartbeats(daemon, guests):
    d = daemon("--lun", "null:8M,inject=delay=50000-150000", "--heartbeat-timeout", "2")
    g = guests(d)
    took = []
    for _ in range(8):
        t0 = time.monotonic()
        assert g.command(vs.read10(0, 1), data_in_len=BS).response.ok
        took.append(time.monotonic() - t0)
    assert min(took) >= 0.05 and max(took) < 0.6 and max(took) - min(took) > 0.005, took
    wait_for(lambda: not d.events("worker_hung"), 1)


# ------------------------------------------------------------------ several queues, drains

def test_nbd_lun_on_two_queues_one_connection_each(nbd_server, daemon, guests, tmp_path):
    """Each worker has its own connection; without NBD multi-conn every write goes out FUA
    (a flush on one connection says nothing of writes on another)."""
    img = make_image(tmp_path / "d.img", 16 * MiB)
    multi = nbd_server("nbdkit", "file", f"file={img}", unix=True)
    ev = make_image(tmp_path / "ev.img", 16 * MiB)
    single = nbd_server("nbdkit", "eval", "get_size=echo 16777216",
                        f"pread=dd if={ev} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
                        f"pwrite=dd of={ev} seek=$4 oflag=seek_bytes conv=notrunc status=none",
                        "can_write=exit 0", "can_flush=exit 0", "can_fua=echo native",
                        "flush=exit 0", "can_multi_conn=exit 3", unix=True)
    d = daemon("--lun", multi.uri, "--lun", single.uri, "--num-queues", "2")
    g = guests(d, queues=2)
    for lun in (0, 1):
        for qi in (2, 3):
            data = os.urandom(4096)
            lba = 8 * (qi + 4 * lun)
            assert g.command(vs.write10(lba, 8), lun=lun, queue=qi, data_out=data).response.ok
            other = 5 - qi
            assert g.command(vs.read10(lba, 8), lun=lun, queue=other, data_in_len=4096).data_in == data
    luns = [r for r in d.events("network_lun")]
    assert len(luns) == 4 and {r["queue"] for r in luns} == {0, 1}
    wt = {(r["queue"], r["lun"]): r["writethrough"] for r in luns}
    assert wt == {(0, 0): False, (1, 0): False, (0, 1): True, (1, 1): True}, wt


def test_ring_stop_while_the_server_is_down(nbd_server, daemon, guests, tmp_path):
    """The front end goes away while requests are held for a dead server: the drain
    fails them at once (02/04/01) instead of waiting out hold=, the daemon stays healthy
    and serves the next front end once the server is back."""
    img = make_image(tmp_path / "d.img", 16 * MiB, data=b"k" * 4096)
    srv = nbd_server("qemu-nbd", img, unix=True)
    d = daemon("--lun", f"{srv.uri},hold=60")
    g = guests(d)
    base = g.queues[2].avail_idx            # (after the unit attentions were cleared)
    assert g.command(vs.read10(0, 8), data_in_len=4096).response.ok
    srv.kill()
    hs = [submit(g, vs.read10(0, 8), data_in_len=4096) for _ in range(4)]
    time.sleep(0.5)
    t0 = time.monotonic()
    assert g.fe.get_vring_base(2) == base + 5       # GET_VRING_BASE: the worker drains
    assert time.monotonic() - t0 < 5
    g.builders[2].reap()
    assert all(h.done and sense(h) == (2, 0x04, 0x01) for h in hs)
    assert d.wait_for_log("network_drained")
    g.close()
    d.wait_for_log("session_closed")
    srv.start()
    g2 = guests(d)
    assert g2.command(vs.read10(0, 8), data_in_len=4096, timeout=15).data_in == b"k" * 4096
