"""A worker killed mid-I/O is replaced and its requests are resubmitted from the
inflight region: the front end sees every request complete, with correct data."""
from __future__ import annotations

import os
import signal

import psutil
import pytest

from tests.wait import wait_for
from vscsid.client import virtio_scsi as vs

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
    payloads = {i: os.urandom(4096) for i in range(8)}
    handles = [b.command(vs.write10(i * 8, 8), data_out=payloads[i], publish=False)
               for i in range(8)]
    q.publish()
    q.kick()
    # The worker has popped all 8 (and marked them in flight) once it asks to be
    # kicked at avail index 8 (EVENT_IDX: used->avail_event).
    wait_for(lambda: q.avail_event() == 8, what="the worker to pop the 8 writes")
    (victim,) = _workers(d)
    # Freeze it, see how many it answered (none, unless this process stalled for
    # the 300 ms the writes take), then kill it with the rest in flight.
    victim.send_signal(signal.SIGSTOP)
    wait_for(lambda: victim.status() == psutil.STATUS_STOPPED, what="the worker to stop")
    answered = q.used_idx()
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
    for _ in range(10):
        assert g.command(vs.test_unit_ready()).response.status == 0
    (victim,) = _workers(d)
    victim.send_signal(signal.SIGKILL)
    d.wait_for_log("worker_resumed", queue=0)
    for _ in range(5):
        assert g.command(vs.test_unit_ready()).response.status == 0
    assert g.fe.get_vring_base(2) == 15


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
