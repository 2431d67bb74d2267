"""Failures that happen anyway must stay contained: a worker killed outright, a front end
that floods the daemon without reading its replies, a front end that shrinks the
guest memory under the daemon's mappings."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from vscsid.bench import virtio_scsi as vs
from vscsid.bench.guestmem import FrontendMemory
from vscsid.vhost.protocol import Request

from tests.support.admin import rpc

from .harness import (
    Guest, HostileDaemon, assert_tur_ok, check_serves, flood_without_reading, wait_for,
)

pytestmark = pytest.mark.timeout(90)


def test_killed_worker_is_contained(make_daemon):
    d = make_daemon(num_queues=3, kills_workers=True)
    pids = d.worker_pids()
    assert len(set(pids)) == 3
    g = Guest(d)
    try:
        for qi in (2, 3, 4):
            assert g.command(vs.test_unit_ready(), queue=qi).response.ok
        mark = d.mark()
        os.kill(pids[1], signal.SIGKILL)
        rec = d.wait_since(mark, "worker_died", worker_pid=pids[1])
        assert rec["queue"] == 1 and "SIGKILL" in rec["status"]
        # The other queues keep running, and so does the control queue.
        for i in range(20):
            for qi in (2, 4):
                payload = os.urandom(1024)
                lba = 100 * qi + 2 * i
                assert g.command(vs.write10(lba, 2), queue=qi, data_out=payload).response.ok
                assert g.command(vs.read10(lba, 2), queue=qi, data_in_len=1024).data_in == payload
        assert g.tmf().response == vs.VIRTIO_SCSI_S_OK
        assert d.alive()
        assert not d.since(mark, "stopped")
    finally:
        g.close_and_wait()
    check_serves(d, queues=[2, 4])


@pytest.mark.parametrize("action,opcode", [("crash", 0xC0), ("hang", 0xC1)])
def test_request_that_kills_its_worker_twice_is_quarantined(make_daemon, monkeypatch,
                                                            action, opcode):
    """A request that was in flight when its worker died twice (a crash, or a
    hang the heartbeat ends) is failed with HARDWARE ERROR instead of replayed a
    third time; every queue keeps serving and the daemon never exits. The test-only
    hook VSCSID_TEST_POISON stands in for such a command."""
    monkeypatch.setenv("VSCSID_TEST_POISON", f"{action}:{opcode:#x}")
    d = make_daemon("--heartbeat-timeout", "2", num_queues=2, kills_workers=True)
    g = Guest(d)
    try:
        mark = d.mark()
        cdb = bytes([opcode]) + bytes(9)
        h = g.submit(cdb, queue=2)
        # Meanwhile the other queue serves as ever.
        payload = os.urandom(4096)
        assert g.command(vs.write10(64, 8), queue=3, data_out=payload).response.ok
        g.wait(h, queue=2, timeout=60)
        r = h.response
        assert r.response == vs.VIRTIO_SCSI_S_OK and r.status == 0x02, r
        s = vs.parse_sense(r.sense)
        assert (s.key, s.asc, s.ascq) == (0x04, 0x44, 0x00), s
        deaths = d.since(mark, "worker_died")
        assert [x["queue"] for x in deaths] == [0, 0], deaths
        rec = d.wait_since(mark, "request_quarantined")
        assert rec["cdb"].startswith(f"{opcode:02x}") and rec["lun"] == 0, rec
        # The queue that lost two workers serves again; the daemon never stopped.
        for qi in (2, 3):
            assert g.command(vs.read10(64, 8), queue=qi, data_in_len=4096).data_in == payload
        assert d.alive() and not d.since(mark, "stopped")
        assert not d.since(mark, "worker_failing_repeatedly")
    finally:
        g.close_and_wait()
    check_serves(d)


def test_worker_killed_under_load_then_front_end_leaves(make_daemon):
    d = make_daemon(num_queues=2, kills_workers=True)
    pids = d.worker_pids()
    g = Guest(d)
    stop = threading.Event()
    completed = [0]
    try:
        def load():
            b = g.builders[2]
            q = g.queues[2]
            while not stop.is_set():
                try:
                    for _ in range(8):
                        b.command(vs.read10(0, 8), data_in_len=4096, publish=False)
                    q.publish()
                    q.kick()
                    q.wait_call(0.05)
                    completed[0] += len(b.reap())
                except Exception:  # noqa: BLE001 - the queue may be full of lost requests
                    time.sleep(0.01)

        t = threading.Thread(target=load, daemon=True)
        t.start()
        wait_for(lambda: completed[0] >= 32, what="the load to run")   # I/O is in progress
        mark = d.mark()
        os.kill(pids[0], signal.SIGKILL)
        d.wait_since(mark, "worker_died", worker_pid=pids[0])
        stop.set()
        t.join(5)
        assert g.command(vs.test_unit_ready(), queue=3).response.ok
    finally:
        stop.set()
        g.close_and_wait()
    assert d.alive()
    check_serves(d, queues=[3])


# =========================================================================== unread replies

@contextlib.contextmanager
def own_daemon(*args: str):
    """A daemon these tests may wedge: killed at the end, its exit not checked."""
    sub = Path(tempfile.mkdtemp(prefix="vsh"))
    img = sub / "disk.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    d = HostileDaemon(sub, ["--lun", str(img), *args], sub / "vscsid.sock")
    try:
        yield d
    finally:
        d.stop(signal.SIGKILL)
        shutil.rmtree(sub, ignore_errors=True)


def test_front_end_that_never_reads_replies_is_throttled():
    with own_daemon("--log-level", "info") as d:
        flood = flood_without_reading(d, 600_000)
        flood.close()
        # "cap": the daemon buffered every request although it could answer none
        assert flood.outcome in ("throttled", "dropped"), flood


def test_disconnect_after_unread_flood_frees_the_daemon():
    with own_daemon("--log-level", "info") as d:
        flood = flood_without_reading(d, 600_000)
        flood.close()
        assert flood.outcome in ("throttled", "dropped"), flood
        d.wait_since(flood.mark, "session_closed", conn=flood.conn)
        check_serves(d)


# =========================================================================== shrinking memory

def test_guest_memory_cannot_be_shrunk_under_the_daemon(make_daemon):
    """A memfd that allows sealing gets F_SEAL_SHRINK when it is mapped: the front end
    can no longer truncate it and turn the daemon's accesses into SIGBUS."""
    d = make_daemon()
    mem = FrontendMemory(8 << 20, allow_sealing=True)
    g = Guest(d, mem=mem)
    try:
        assert g.command(vs.test_unit_ready()).response.ok
        for r in mem.regions:
            with pytest.raises(PermissionError):
                os.ftruncate(r.fd, 0)
        g.kick(0)
        g.kick(2)
        assert g.command(vs.read10(0, 8), data_in_len=4096).response.ok
        assert g.tmf().response == vs.VIRTIO_SCSI_S_OK
    finally:
        g.close_and_wait()
        mem.close()
    check_serves(d)


@contextlib.contextmanager
def _truncated_memory(workers_paused: bool = False):
    """A daemon of its own and a guest whose (unsealable) memory the front end then
    truncates to nothing. The block makes the daemon touch it; afterwards the front end
    must have been dropped, the daemon alive and serving: (daemon, guest, the
    frontend_dropped record filled in after the block). With ``workers_paused`` the
    workers are stopped (SIGSTOP) from before the truncation to the end of the block, so
    that only the block touches guest memory: an idle worker re-reads its ring once a
    second (lost kicks and interrupts) and would otherwise fault first."""
    mem = FrontendMemory(8 << 20)          # no MFD_ALLOW_SEALING
    with own_daemon() as d:
        try:
            g = Guest(d, mem=mem)
            assert g.command(vs.test_unit_ready()).response.ok
            paused = d.workers() if workers_paused else []
            try:
                for pid in paused:
                    os.kill(pid, signal.SIGSTOP)
                for r in mem.regions:
                    os.ftruncate(r.fd, 0)
                dropped: dict = {}
                yield d, g, dropped
            finally:
                for pid in paused:
                    with contextlib.suppress(ProcessLookupError):   # the supervisor may have
                        os.kill(pid, signal.SIGCONT)                # replaced a stopped worker
            # the front end, not the daemon
            dropped.update(d.wait_since(g.mark, "frontend_dropped", conn=g.conn))
            alive = d.alive()
            g.close_and_wait()
            assert alive, "the daemon died"
            check_serves(d)
        finally:
            mem.close()


def test_truncated_unsealable_memory_does_not_kill_the_daemon():
    with _truncated_memory() as (_d, g, _dropped):
        g.kick(2)
        g.kick(0)


def test_status_on_truncated_memory_drops_the_front_end_not_the_daemon():
    """vscsid-ctl status reads the rings from guest memory: when the front end has
    truncated it, the read faults (survived), status answers without the indices and
    the front end is dropped, as when a queue faults."""
    with _truncated_memory(workers_paused=True) as (d, _g, dropped):
        st = rpc(str(d.socket_path) + ".ctl", "status")
        assert all(q.get("ring") is None for q in st["queues"]), st["queues"]
    assert "status" in dropped["reason"], dropped


def test_truncated_inflight_region_does_not_kill_the_daemon():
    """The inflight region handed over with SET_INFLIGHT_FD is a front end's file too:
    shrinking it under the workers' mapping is survived like guest memory."""
    from vscsid.vhost import protocol as P
    from vscsid.bench.driverq import DriverQueue
    from vscsid.virtio.inflight import queue_region_size

    from .harness import Conn, memfd

    qsize, rings = 64, 3
    size = queue_region_size(qsize) * rings
    fd = memfd("unsealable-inflight", size)          # no MFD_ALLOW_SEALING: cannot be sealed
    mem = FrontendMemory(4 << 20)
    with own_daemon() as d:
        c = Conn(d)
        try:
            c.fe.set_mem_table(mem)
            assert c.ack(Request.SET_INFLIGHT_FD, P.Inflight(size, 0, rings, qsize), [fd]) == 0
            qs = {i: DriverQueue(mem, qsize, event_idx=c.fe.event_idx) for i in range(rings)}
            for i, q in qs.items():
                c.fe.setup_queue(i, q)
            assert_tur_ok(qs[2], mem, "TEST UNIT READY to complete")
            b = vs.ScsiRequestBuilder(qs[2], mem)
            os.ftruncate(fd, 0)
            b.command(vs.test_unit_ready(), publish=True)
            qs[2].kick()
            d.wait_since(c.mark, "frontend_dropped", conn=c.conn)
            assert d.alive(), "the daemon died"
        finally:
            os.close(fd)
            c.close_and_wait()
            mem.close()
        check_serves(d)
