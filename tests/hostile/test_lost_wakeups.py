"""A driver that publishes its wish for an interrupt too late must still get it.

A driver re-arms interrupts by storing ``used_event`` (EVENT_IDX) or clearing
VRING_AVAIL_F_NO_INTERRUPT, fencing, and reading ``used->idx`` once more; the
device publishes ``used->idx``, fences and reads the driver's wish. When the
driver's fence is missing, both can read the other's old value: the device sends
no interrupt and the driver waits for one, with every completion published. QEMU
7.2's TCG does exactly this for a one-vCPU guest (it elides the guest's barriers),
and `vscsid demo` then hung in fio. The device cannot see the driver's fence, but
it can look again before its queue sleeps: a call the driver asked for at an
entry already published, and never sent, is sent then (and counted as late).

Each test plays the late store by hand: the driver's wish is stale while the
device completes a command, and is published only after the completion, with no
re-check and no kick. The call must come, without any other event.
"""
from __future__ import annotations

import contextlib

import pytest

from vscsid.bench import virtio_scsi as vs
from vscsid.virtio.defs import VIRTQ_AVAIL_F_NO_INTERRUPT

from tests.support.admin import rpc
from tests.wait import WAIT, wait_for

from .harness import Guest

pytestmark = pytest.mark.timeout(120)

TUR = bytes(6)
ENGINES = ["c", "python"]


def _late_calls(d, queue: int = 0) -> int:
    stats = rpc(str(d.socket_path) + ".ctl", "stats")
    return next(q["late_interrupts"] for q in stats["queues"] if q["queue"] == queue)


@contextlib.contextmanager
def _request_queue(make_daemon, engine: str, event_idx: bool):
    """A daemon of its own and a guest on it: (daemon, guest, request queue 0, the
    queue's late interrupts so far)."""
    d = make_daemon("--engine", engine)
    g = Guest(d, event_idx=event_idx)
    try:
        yield d, g, g.queues[2], _late_calls(d)
    finally:
        g.close_and_wait()


def _complete_unsignalled(g: Guest, q, submit=None, queue: int = 2) -> object:
    """Submit a command (TEST UNIT READY) with interrupts suppressed; wait until the
    device has published it (without reaping) and check that it did not signal."""
    submit = submit or (lambda: g.submit(TUR))
    # First one signalled command, its call waited for: the device signals in order,
    # so no call for an earlier completion can still be on its way after it.
    sync = submit()
    assert q.wait_call(WAIT)
    g.wait(sync, queue)
    q.disable_interrupts()
    before = q.used_idx()
    h = submit()
    wait_for(lambda: q.used_idx() != before, WAIT, what="the device to publish the completion")
    assert not q.wait_call(0.5), "the device signalled although the driver suppressed it"
    return h


def _publish_late(q, event_idx: bool) -> None:
    """The driver's wish, published late and with no re-check of used->idx after it:
    EVENT_IDX, "signal me when entry last_used is used" (it already is); otherwise,
    interrupts on again."""
    if event_idx:
        q.raw_used_event(q.last_used)
    else:
        q.raw_avail_flags(q.avail_flags() & ~VIRTQ_AVAIL_F_NO_INTERRUPT)


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "flags"])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_late_wish_gets_its_interrupt(make_daemon, engine, event_idx):
    with _request_queue(make_daemon, engine, event_idx) as (d, g, q, late):
        # used_event just behind the last entry seen, or VRING_AVAIL_F_NO_INTERRUPT
        h = _complete_unsignalled(g, q)
        _publish_late(q, event_idx)
        assert q.wait_call(WAIT), "the driver waits for an interrupt that never comes"
        g.wait(h)
        assert h.response.ok
        assert _late_calls(d) == late + 1
        if event_idx:
            # vscsid-ctl status shows the ring as guest memory holds it (the reap
            # re-wrote used_event just behind the entry the driver has seen).
            vq = next(x for x in rpc(str(d.socket_path) + ".ctl", "status")["queues"]
                      if x["vq"] == 2)
            assert vq["ring"] == {
                "avail_flags": 0, "avail_idx": q.used_idx(), "used_flags": 0,
                "used_idx": q.used_idx(), "used_event": (q.last_used - 1) & 0xFFFF,
                "avail_event": q.used_idx()}
        # Nothing is sent twice: the next command is signalled as usual.
        q.enable_interrupts()
        g.command(TUR)
        assert _late_calls(d) == late + 1


@pytest.mark.parametrize("engine", ENGINES)
def test_a_driver_that_still_suppresses_gets_no_late_interrupt(make_daemon, engine):
    """used_event ahead of what was published: the driver waits for a later entry,
    and the device does not signal early."""
    with _request_queue(make_daemon, engine, True) as (d, g, q, late):
        h = _complete_unsignalled(g, q)
        q.raw_used_event(q.last_used + 1)       # the entry after the one published
        assert not q.wait_call(2.5)               # (the idle re-check runs at least once a second)
        assert _late_calls(d) == late
        q.enable_interrupts()
        g.wait(h)


def test_late_used_event_on_the_control_queue_gets_its_interrupt(daemon, baseline):
    """The supervisor's control queue: a TMF whose completion the driver re-armed for
    too late (Linux waits for a TMF without a timeout)."""
    g = Guest(daemon, event_idx=True)
    try:
        q = g.queues[0]

        def tmf():
            h = g.builders[0].tmf(vs.VIRTIO_SCSI_T_TMF_QUERY_TASK_SET, lun=0, publish=True)
            q.kick()
            return h

        h = _complete_unsignalled(g, q, tmf, queue=0)
        _publish_late(q, True)
        assert q.wait_call(WAIT), "the driver waits for an interrupt that never comes"
        g.wait(h, 0)
        assert h.response == vs.VIRTIO_SCSI_S_OK
    finally:
        g.close_and_wait()
