"""The event queue under a hostile guest: a driver that never posts event buffers,
or posts unusable ones (too short, device-readable, outside guest memory, broken
chains), while the daemon has LUN events to report. The events that find no usable
buffer are reported missed (EVENTS_MISSED on the next good buffer), bad buffers
come back unused (length 0), and the daemon, its LUN operations and the other
queues are unaffected."""
from __future__ import annotations

import time

import pytest

from tests.support.admin import rpc
from vscsid.bench import virtio_scsi as vs

from .harness import Guest
from .test_guest_rings import HOSTILE, submit_bad

pytestmark = pytest.mark.timeout(120)


def _reap_events(g, timeout: float = 10, n: int = 1):
    """The next ``n`` events in the buffers posted with post_events (hand-built chains
    complete into g.done)."""
    q = g.queues[1]
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        g.poll(1)
        got += [h.event for h in g.event_handles if h.done and h not in g.seen]
        g.seen.update(h for h in g.event_handles if h.done)
        if len(got) >= n:
            return got
        assert time.monotonic() < deadline, f"{len(got)} of {n} events"
        q.wait_call(0.2)
    return got


def _post(g, n: int = 1):
    hs = g.builders[1].post_events(n)
    if not hasattr(g, "event_handles"):
        g.event_handles, g.seen = [], set()
    g.event_handles += hs
    g.kick(1)
    return hs


def _post_short(g, n: int, size: int) -> list:
    """Device-writable buffers shorter than an event (hand-built: tokens in g.done)."""
    q = g.queues[1]
    tokens = []
    for i in range(n):
        tok = ("short", size, i)
        if size:
            q.add(in_=[size], token=tok, publish=True)
        else:
            d = q.reserve(1)
            q.raw_desc(d[0], q.raw_alloc(16), 0, 2, 0)          # a zero-length writable buffer
            q.submit_raw(d[0], d, token=tok, publish=True)
        tokens.append(tok)
    return tokens


def _add_remove(daemon):
    """A LUN change the driver should hear about (two events)."""
    lun = rpc(daemon.admin_socket, "lun_add", {"spec": "null:1M"})["lun"]
    rpc(daemon.admin_socket, "lun_remove", {"lun": lun})


def test_a_driver_that_never_posts_buffers(daemon, baseline):
    g = Guest(daemon, hotplug=True)
    try:
        mark = daemon.mark()
        for _ in range(20):
            _add_remove(daemon)
        missed = daemon.since(mark, "event_missed", conn=g.conn)
        assert len(missed) == 40
        g.poll(1)
        assert not g.done
        # I/O goes on, and the LUNs' changes were reported as unit attentions instead.
        si = g.command(vs.test_unit_ready()).response.sense_key()
        assert (si.key, si.asc, si.ascq) == (6, 0x3F, 0x0E)
        assert g.command(vs.test_unit_ready()).response.ok
        # A buffer, at last: the driver learns that it missed events (and rescans).
        _post(g)
        (ev,) = _reap_events(g)
        assert ev.missed and ev.kind == vs.VIRTIO_SCSI_T_NO_EVENT
    finally:
        g.close_and_wait()


@pytest.mark.parametrize("size", [0, 1, 8, 15])
def test_event_buffers_too_short_come_back_unused(daemon, baseline, size):
    g = Guest(daemon, hotplug=True)
    try:
        mark = daemon.mark()
        bad = _post_short(g, 3, size)
        good = _post(g)
        _add_remove(daemon)
        (ev,) = _reap_events(g)                      # the good buffer got the event
        assert (ev.kind, ev.reason) == (vs.VIRTIO_SCSI_T_TRANSPORT_RESET,
                                        vs.VIRTIO_SCSI_EVT_RESET_RESCAN)
        assert good[0].done
        assert {c.token: c.len for c in g.done} == {t: 0 for t in bad}
        assert len(daemon.since(mark, "bad_event_buffer", conn=g.conn)) == 3
        # the REMOVED had no buffer left: missed, then flagged
        daemon.wait_since(mark, "event_missed", conn=g.conn)
        _post(g)
        (ev,) = _reap_events(g)
        assert ev.missed
    finally:
        g.close_and_wait()


def test_a_device_readable_event_buffer_comes_back_unused(daemon, baseline):
    g = Guest(daemon, hotplug=True)
    try:
        mark = daemon.mark()
        q = g.queues[1]
        q.add(out=[bytes(16)], publish=True, token="readable")
        q.add(out=[bytes(8)], in_=[16], publish=True, token="mixed")
        _post(g)
        _add_remove(daemon)
        (ev,) = _reap_events(g)
        assert ev.kind == vs.VIRTIO_SCSI_T_TRANSPORT_RESET
        done = {c.token: c.len for c in g.done}
        assert done == {"readable": 0, "mixed": 0}, done
        assert len(daemon.since(mark, "bad_event_buffer", conn=g.conn)) == 2
    finally:
        g.close_and_wait()


@pytest.mark.parametrize("name", HOSTILE)
def test_malformed_event_chains_come_back_unused(daemon, baseline, name):
    g = Guest(daemon, hotplug=True)
    try:
        mark = daemon.mark()
        if name == "indirect_longer_than_queue":
            g.queues[1].hostile.indirect_longer_than_queue()
            token = ("hostile", name)
        else:
            token = submit_bad(g, 1, name)
        _post(g)
        _add_remove(daemon)
        (ev,) = _reap_events(g)
        assert ev.kind == vs.VIRTIO_SCSI_T_TRANSPORT_RESET
        assert {c.token: c.len for c in g.done} == {token: 0}
        assert daemon.since(mark, "bad_event_buffer", conn=g.conn)
        assert not daemon.since(mark, "ring_broken")
        assert g.command(vs.test_unit_ready()).response.sense_key().key == 6
    finally:
        g.close_and_wait()


def test_a_flood_of_lun_changes_with_a_full_event_ring(daemon, baseline):
    g = Guest(daemon, hotplug=True)
    try:
        mark = daemon.mark()
        _post(g, 100)
        for _ in range(60):                  # 120 events for 100 buffers
            _add_remove(daemon)
        events = _reap_events(g, n=100)
        assert len(events) == 100 and not any(e.missed for e in events)
        assert len(daemon.since(mark, "event_missed", conn=g.conn)) == 20
        _post(g)
        (ev,) = _reap_events(g)
        assert ev.missed
    finally:
        g.close_and_wait()
