"""A worker killed mid-I/O is replaced and its requests are resubmitted from the
inflight region: the front end sees every request complete, with correct data."""
from __future__ import annotations

import os
import signal

import psutil
import pytest

from tests.wait import wait_for
from vscsid.bench import virtio_scsi as vs

from tests.support.scsi import clear_unit_attentions

from .test_daemon_io import Guest, guest_factory  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(120)


def _workers(daemon):
    return [p for p in psutil.Process(daemon.proc.pid).children()
            if "worker" in " ".join(p.cmdline())]


def test_killed_worker_requests_are_resubmitted(start_daemon, make_image, guest_factory):
    img = make_image(size=8 << 20)
    # 300 ms of injected latency keeps the requests in flight when the worker dies.
    d = start_daemon("--lun", f"{img},delay_us=300000")
    g = guest_factory(d)
    b, q = g.builders[2], g.queues[2]
    base = q.avail_idx                # (after the unit attentions were cleared)
    payloads = {i: os.urandom(4096) for i in range(8)}
    handles = [b.command(vs.write10(i * 8, 8), data_out=payloads[i], publish=False)
               for i in range(8)]
    q.publish()
    q.kick()
    # The worker has popped all 8 (and marked them in flight) once it asks to be
    # kicked at avail index 8 (EVENT_IDX: used->avail_event).
    wait_for(lambda: q.avail_event() == (base + 8) & 0xFFFF, what="the worker to pop the 8 writes")
    (victim,) = _workers(d)
    # Freeze it, see how many it answered (none, unless this process stalled for
    # the 300 ms the writes take), then kill it with the rest in flight.
    victim.send_signal(signal.SIGSTOP)
    wait_for(lambda: victim.status() == psutil.STATUS_STOPPED, what="the worker to stop")
    answered = q.used_idx() - base
    assert answered < 8, "every write completed before the worker was stopped"
    victim.send_signal(signal.SIGKILL)
    for h in handles:
        g.wait(h)
        assert h.response.response == vs.VIRTIO_SCSI_S_OK and h.response.status == 0
    d.wait_for_log("worker_died", queue=0)
    rec = d.wait_for_log("inflight_recovered")
    assert rec["resubmit"] == 8 - answered
    (new,) = _workers(d)
    assert new.pid != victim.pid
    for i, data in payloads.items():
        h = g.command(vs.read10(i * 8, 8), data_in_len=4096)
        assert h.data_in == data
    # Every head completed exactly once: the driver queue is strict about it.
    assert q.in_flight == 0


def test_killed_idle_worker_resumes_at_the_right_index(start_daemon, make_image, guest_factory):
    img = make_image(size=1 << 20)
    d = start_daemon("--lun", str(img))
    g = guest_factory(d)
    base = g.queues[2].avail_idx      # (after the unit attentions were cleared)
    for _ in range(10):
        assert g.command(vs.test_unit_ready()).response.status == 0
    (victim,) = _workers(d)
    victim.send_signal(signal.SIGKILL)
    d.wait_for_log("worker_resumed", queue=0)
    for _ in range(5):
        assert g.command(vs.test_unit_ready()).response.status == 0
    assert g.fe.get_vring_base(2) == base + 15


def test_hung_worker_is_aborted_killed_and_replaced(start_daemon, make_image, guest_factory):
    """A worker that stops answering (here: SIGSTOP, as if stuck in a syscall) gets
    SIGABRT, then SIGKILL, and is replaced; the request it held completes."""
    img = make_image(size=1 << 20)
    d = start_daemon("--lun", str(img), "--heartbeat-timeout", "1")
    g = guest_factory(d)
    assert g.command(vs.test_unit_ready()).response.status == 0
    (victim,) = _workers(d)
    victim.send_signal(signal.SIGSTOP)
    b, q = g.builders[2], g.queues[2]
    h = b.command(vs.write10(0, 1), data_out=b"H" * 512, publish=True)
    q.kick()
    hung = d.wait_for_log("worker_hung")
    assert hung["action"] == "SIGABRT"
    d.wait_for_log("worker_hung", action="SIGKILL")
    died = d.wait_for_log("worker_died")
    assert "SIGKILL" in died["status"]
    g.wait(h)
    assert h.response.status == 0
    (new,) = _workers(d)
    assert new.pid != victim.pid
    assert open(img, "rb").read(512) == b"H" * 512


def test_reconnect_with_a_stale_vring_base_resumes_at_the_used_index(start_daemon, make_image):
    """A daemon restart races with the front end: QEMU takes the next available index
    from the used index when the connection drops, and the dying daemon's worker can
    still publish a few completions after that. With the front end's inflight region
    saying nothing is in flight, the ring must resume at the used index (used_idx +
    in flight, as the inflight-tracking spec has it), not at the stale base: the
    requests already answered must not run (and complete) a second time."""
    from vscsid.bench.driverq import DriverQueue
    from vscsid.bench.frontend import VhostUserFrontend
    from vscsid.bench.guestmem import FrontendMemory
    from vscsid.vhost.protocol import Inflight, ProtocolFeature, Request, feature_mask

    proto = feature_mask(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG,
                         ProtocolFeature.INFLIGHT_SHMFD)
    img = make_image(size=1 << 20)
    d = start_daemon("--lun", str(img))
    mem = FrontendMemory(16 << 20)
    queues = {i: DriverQueue(mem, 64) for i in range(3)}
    fe = VhostUserFrontend(d.socket_path)
    infl = None
    try:
        fe.negotiate(protocol=proto)
        rep = fe.get(Request.GET_INFLIGHT_FD, Inflight(0, 0, 3, 64), "inflight")
        infl, size = rep.fds[0], rep.payload.mmap_size
        fe.request(Request.SET_INFLIGHT_FD, Inflight(size, 0, 3, 64), [infl])
        fe.set_mem_table(mem)
        for i, q in queues.items():
            fe.setup_queue(i, q)
        b, q = vs.ScsiRequestBuilder(queues[2], mem), queues[2]

        def run(cdb, **kw):
            h = b.command(cdb, publish=True, **kw)
            q.kick()
            wait_for(lambda: b.reap() or h.done, what=f"command {cdb[0]:#x}")
            return h

        clear_unit_attentions(run)         # POWER ON, RESET: a new front end
        n0 = q.used_idx()
        for lba in range(5):
            h = b.command(vs.write10(lba, 1), data_out=bytes([0xA0 + lba]) * 512, publish=True)
            q.kick()
            wait_for(lambda: b.reap() or h.done, what=f"write {lba}")
            assert h.response.ok
        assert q.used_idx() == n0 + 5
        fe.close()                         # gone without GET_VRING_BASE, like a dead daemon
        d.wait_for_log("session_closed")
        with open(img, "r+b") as f:        # a write that runs again would show here
            f.write(bytes(5 * 512))
        for q in queues.values():          # the old connection's eventfds are closed
            q.kick_fd = q.call_fd = None
        mark = len(d.events("ring_started"))
        fe = VhostUserFrontend(d.socket_path)
        fe.negotiate(protocol=proto)
        fe.request(Request.SET_INFLIGHT_FD, Inflight(size, 0, 3, 64), [infl])
        fe.set_mem_table(mem)
        for i, q in queues.items():        # ring 2's base is stale: 2 behind the used index
            fe.setup_queue(i, q, base=n0 + 3 if i == 2 else None)
        q = queues[2]
        started = [r for r in d.events("ring_started")[mark:] if r.get("queue") == 0]
        assert started and started[0]["last_avail"] == n0 + 5, started
        clear_unit_attentions(run)         # the new front end's POWER ON, RESET
        n1 = q.used_idx()
        h = run(vs.test_unit_ready())
        assert h.response.ok
        assert fe.get_vring_base(2) == n1 + 1
        assert open(img, "rb").read(5 * 512) == bytes(5 * 512), "an answered write ran again"
    finally:
        fe.close()
        if infl is not None:
            os.close(infl)
        mem.close()
