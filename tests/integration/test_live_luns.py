"""Operating a running daemon: LUNs added, removed and resized through the admin
socket while a front end (the Python driver: memfd guest memory, eventfds, split
rings) uses them; what the driver sees: events on the event queue, unit
attentions (each reported once, whichever queue asks), REPORT LUNS per target,
requests in flight that complete before their LUN goes, and the answer a missing
LUN gets afterwards. Both engines."""
from __future__ import annotations

import os
import threading
import time

import pytest

from tests.support.admin import DaemonError, rpc
from tests.wait import WAIT, wait_for
from vscsid.bench import virtio_scsi as vs

from .test_daemon_io import guest_factory  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(180)

UA = 6


def _sense(h):
    si = h.response.sense_key()
    return (si.key, si.asc, si.ascq) if si is not None and h.response.status == 2 else None


def _events(g, n: int = 1, timeout: float = WAIT) -> list:
    """The next ``n`` events the device put in the buffers posted with _post."""
    got = []
    b, q = g.builders[1], g.queues[1]
    deadline = time.monotonic() + timeout
    while len(got) < n:
        got += [h.event for h in b.reap()]
        if len(got) >= n:
            break
        assert time.monotonic() < deadline, f"{len(got)} of {n} events: {got}"
        q.wait_used(0.2)
    return got


def _post(g, n: int = 4) -> None:
    g.builders[1].post_events(n)
    g.queues[1].kick()


def _capacity(g, lun: int, target: int = 0, queue: int = 2) -> int:
    for _ in range(4):
        h = g.command(vs.read_capacity16(), lun=lun, target=target, data_in_len=32, queue=queue)
        if h.response.ok:
            last, bs = vs.parse_read_capacity16(h.data_in)
            return (last + 1) * bs
    raise AssertionError(f"READ CAPACITY(16): {h.response}")


def test_hot_add_rescan_event_unit_attentions_and_io(start_daemon, make_image, guest_factory):
    a = make_image("a.img", 8 << 20)
    b = make_image("b.img", 4 << 20)
    d = start_daemon("--lun", str(a))
    g = guest_factory(d)
    _post(g)
    new = rpc(d.admin_socket, "lun_add", {"spec": f"{b},serial=HOTADD1"})
    assert new["lun"] == "0:1" and new["size"] == 4 << 20 and new["origin"] == "admin"
    (ev,) = _events(g)
    assert (ev.kind, ev.reason, ev.missed) == (vs.VIRTIO_SCSI_T_TRANSPORT_RESET,
                                               vs.VIRTIO_SCSI_EVT_RESET_RESCAN, False)
    assert ev.lun == bytes((1, 0, 0, 1, 0, 0, 0, 0))
    h = g.command(vs.report_luns(), lun=0, data_in_len=4096)
    assert h.response.ok and vs.parse_report_luns(h.data_in) == [0, 1]
    # The old LUN: REPORTED LUNS DATA HAS CHANGED (REPORT LUNS cleared it just now);
    # the new one: POWER ON, then it serves.
    assert g.command(vs.test_unit_ready(), lun=0).response.ok
    assert _sense(g.command(vs.test_unit_ready(), lun=1)) == (UA, 0x29, 0)
    h = g.command(vs.inquiry(evpd=True, page=0x80, alloc_len=64), lun=1, data_in_len=64)
    assert h.response.ok and b"HOTADD1" in h.data_in
    payload = os.urandom(8192)
    assert g.command(vs.write10(16, 16), lun=1, data_out=payload).response.ok
    h = g.command(vs.read10(16, 16), lun=1, data_in_len=8192)
    assert h.response.ok and h.data_in == payload
    with open(b, "rb") as f:
        f.seek(16 * 512)
        assert f.read(8192) == payload
    assert [x["lun"] for x in rpc(d.admin_socket, "lun_list")] == ["0:0", "0:1"]


def test_remove_completes_requests_in_flight_then_answers_as_missing(
        start_daemon, make_image, guest_factory):
    a = make_image("a.img", 8 << 20)
    d = start_daemon("--lun", str(a), "--lun", "null:16M,delay_us=400000")
    g = guest_factory(d)
    _post(g)
    bld, q = g.builders[2], g.queues[2]
    reads = [bld.command(vs.read10(8 * i, 8), lun=1, data_in_len=4096, publish=False)
             for i in range(6)]
    q.publish()
    q.kick()
    wait_for(lambda: q.avail_event() == q.avail_idx, what="the worker to pop the reads")
    t0 = time.monotonic()
    removed = rpc(d.admin_socket, "lun_remove", {"lun": "0:1"})
    took = time.monotonic() - t0
    assert removed["lun"] == "0:1"
    # Every read was still in flight (400 ms each) and completed, with data, before
    # the removal was answered.
    for h in reads:
        g.wait(h)
        assert h.response.ok and h.data_in == bytes(4096)
    assert took > 0.2, took
    (ev,) = _events(g)
    assert (ev.kind, ev.reason) == (vs.VIRTIO_SCSI_T_TRANSPORT_RESET,
                                    vs.VIRTIO_SCSI_EVT_RESET_REMOVED)
    assert ev.lun == bytes((1, 0, 0, 1, 0, 0, 0, 0))
    # Later requests to it: the answer for a LUN that does not exist.
    assert _sense(g.command(vs.read10(0, 8), lun=1, data_in_len=4096)) == (5, 0x25, 0)
    h = g.command(vs.inquiry(alloc_len=96), lun=1, data_in_len=96)
    assert h.response.ok and h.data_in[0] == 0x7F        # no LU here (peripheral 3, type 1Fh)
    assert _sense(g.command(vs.test_unit_ready(), lun=0)) == (UA, 0x3F, 0x0E)
    assert g.command(vs.test_unit_ready(), lun=0).response.ok
    with pytest.raises(DaemonError) as e:
        rpc(d.admin_socket, "lun_remove", {"lun": "0:1"})
    assert e.value.error["code"] == -32011


def test_a_target_whose_last_lun_goes_is_gone(start_daemon, make_image, guest_factory):
    a = make_image("a.img", 8 << 20)
    d = start_daemon("--lun", str(a))
    g = guest_factory(d)
    assert g.command(vs.test_unit_ready(), target=1).response.response == vs.VIRTIO_SCSI_S_BAD_TARGET
    rpc(d.admin_socket, "lun_add", {"spec": "null:8M,target=1,lun=0"})
    assert _sense(g.command(vs.test_unit_ready(), target=1)) == (UA, 0x29, 0)
    assert g.command(vs.read10(0, 8), target=1, data_in_len=4096).response.ok
    rpc(d.admin_socket, "lun_remove", {"lun": "1:0"})
    h = g.command(vs.test_unit_ready(), target=1)
    assert h.response.response == vs.VIRTIO_SCSI_S_BAD_TARGET


def test_resize_grow_and_shrink(start_daemon, make_image, guest_factory):
    a = make_image("a.img", 8 << 20)
    d = start_daemon("--lun", f"{a},delay_us=300000")
    g = guest_factory(d)
    _post(g)
    assert _capacity(g, 0) == 8 << 20
    os.truncate(a, 12 << 20)
    r = rpc(d.admin_socket, "lun_resize", {"lun": "0"})
    assert r == {"lun": "0:0", "old_size": 8 << 20, "size": 12 << 20, "changed": True}
    (ev,) = _events(g)
    assert ev.kind == vs.VIRTIO_SCSI_T_PARAM_CHANGE and ev.reason == 0x2A | (0x09 << 8)
    assert _sense(g.command(vs.test_unit_ready())) == (UA, 0x2A, 0x09)
    assert _capacity(g, 0) == 12 << 20
    assert g.command(vs.read10((12 << 20) // 512 - 8, 8), data_in_len=4096).response.ok
    # Shrink with a read in flight: applied once it completed.
    bld, q = g.builders[2], g.queues[2]
    h = bld.command(vs.read10((10 << 20) // 512, 8), data_in_len=4096, publish=True)
    q.kick()
    wait_for(lambda: q.avail_event() == q.avail_idx, what="the worker to pop the read")
    os.truncate(a, 6 << 20)
    r = rpc(d.admin_socket, "lun_resize", {"lun": "0:0"})
    g.wait(h)
    assert h.response.ok, h.response         # it ran on the old size
    assert r["size"] == 6 << 20
    assert _events(g)[0].kind == vs.VIRTIO_SCSI_T_PARAM_CHANGE
    assert _sense(g.command(vs.test_unit_ready())) == (UA, 0x2A, 0x09)
    assert _capacity(g, 0) == 6 << 20
    assert _sense(g.command(vs.read10((6 << 20) // 512, 8), data_in_len=4096)) == (5, 0x21, 0)
    assert rpc(d.admin_socket, "lun_resize", {"lun": "0:0"})["changed"] is False
    with pytest.raises(DaemonError) as e:
        rpc(d.admin_socket, "lun_resize", {"lun": "0:7"})
    assert e.value.error["code"] == -32011


def test_a_unit_attention_is_reported_once_whichever_queue_asks(start_daemon, make_image,
                                                                guest_factory):
    a = make_image("a.img", 8 << 20)
    d = start_daemon("--lun", str(a), "--num-queues", "2")
    g = guest_factory(d, queues=2)
    for round_ in range(6):
        os.truncate(a, (9 + round_) << 20)
        rpc(d.admin_socket, "lun_resize", {"lun": "0:0"})
        hs = {qi: g.builders[qi].command(vs.test_unit_ready(), publish=True) for qi in (2, 3)}
        for qi in ((2, 3) if round_ % 2 else (3, 2)):
            g.queues[qi].kick()
        results = [_sense(g.wait(hs[qi], qi)) for qi in (2, 3)]
        assert sorted(results, key=str) == sorted([None, (UA, 0x2A, 0x09)], key=str), results
        assert all(g.command(vs.test_unit_ready(), queue=qi).response.ok for qi in (2, 3))


def test_targets_report_their_own_luns_and_use_the_fast_path(start_daemon, make_image,
                                                            guest_factory, engine):
    a, b, c = (make_image(f"{n}.img", 4 << 20) for n in "abc")
    d = start_daemon("--lun", str(a), "--lun", f"{b},target=1,lun=0",
                     "--lun", f"{c},target=1,lun=5")
    g = guest_factory(d)
    for target, luns in ((0, [0]), (1, [0, 5])):
        h = g.command(vs.report_luns(), lun=0, target=target, data_in_len=4096)
        assert h.response.ok and vs.parse_report_luns(h.data_in) == luns
        for lun in luns:        # (the guest's set-up cleared target 0's already)
            want = None if target == 0 else (UA, 0x29, 0)
            assert _sense(g.command(vs.test_unit_ready(), lun=lun, target=target)) == want
    assert g.command(vs.test_unit_ready(), target=2).response.response == vs.VIRTIO_SCSI_S_BAD_TARGET
    assert _sense(g.command(vs.test_unit_ready(), lun=1, target=1)) == (5, 0x25, 0)
    cfg = vs.parse_config(g.fe.get_config(0, vs.CONFIG_SIZE))
    assert cfg.max_target == 1 and cfg.max_lun == 255
    before = rpc(d.admin_socket, "stats")["queues"][0]
    payload = os.urandom(4096)
    for _ in range(10):
        assert g.command(vs.write10(8, 8), lun=5, target=1, data_out=payload).response.ok
        h = g.command(vs.read10(8, 8), lun=5, target=1, data_in_len=4096)
        assert h.response.ok and h.data_in == payload
    with open(c, "rb") as f:
        f.seek(4096)
        assert f.read(4096) == payload
    after = rpc(d.admin_socket, "stats")
    q = after["queues"][0]
    if engine == "c":                         # target 1's LUN 5 on the C fast path
        assert q["fast"] - before["fast"] == 20, (before, q)
    lun = {x["lun"]: x for x in after["luns"]}["1:5"]
    assert (lun["reads"], lun["writes"], lun["bytes_written"]) == (10, 10, 40960)


def test_without_hotplug_negotiated_no_event_is_sent(start_daemon, make_image, guest_factory):
    a = make_image("a.img", 8 << 20)
    d = start_daemon("--lun", str(a))
    g = guest_factory(d, event_idx=False)       # features: VERSION_1 INDIRECT PROTOCOL only
    _post(g)
    rpc(d.admin_socket, "lun_add", {"spec": "null:4M"})
    d.wait_for_log("event_not_sent", why="feature not negotiated")
    assert not g.builders[1].reap()
    assert _sense(g.command(vs.test_unit_ready(), lun=0)) == (UA, 0x3F, 0x0E)
    status = rpc(d.admin_socket, "status")
    assert "HOTPLUG" not in status["frontend"]["features"]


def test_events_missed_without_buffers_are_flagged_on_the_next_one(start_daemon, make_image,
                                                                   guest_factory):
    a = make_image("a.img", 8 << 20)
    d = start_daemon("--lun", str(a))
    g = guest_factory(d)
    rpc(d.admin_socket, "lun_add", {"spec": "null:4M"})       # no buffer posted: lost
    d.wait_for_log("event_missed")
    _post(g, 1)
    (ev,) = _events(g)
    assert ev.missed and ev.kind == vs.VIRTIO_SCSI_T_NO_EVENT
    _post(g, 1)
    rpc(d.admin_socket, "lun_remove", {"lun": "0:1"})
    (ev,) = _events(g)
    assert not ev.missed and ev.reason == vs.VIRTIO_SCSI_EVT_RESET_REMOVED


def test_concurrent_admin_changes_are_serialised(start_daemon, make_image, guest_factory):
    imgs = [make_image(f"c{i}.img", 1 << 20) for i in range(8)]
    d = start_daemon("--lun", str(make_image("a.img", 8 << 20)), "--num-queues", "2")
    g = guest_factory(d, queues=2)
    out, errors = [], []

    def add(path):
        try:
            out.append(rpc(d.admin_socket, "lun_add", {"spec": str(path)})["lun"])
        except DaemonError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(p,)) for p in imgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and sorted(out) == sorted(f"0:{i}" for i in range(1, 9))
    h = g.command(vs.report_luns(), lun=0, data_in_len=4096)
    assert vs.parse_report_luns(h.data_in) == list(range(9))
    for lun in range(1, 9):
        for qi in (2, 3):
            h = g.command(vs.read10(0, 1), lun=lun, data_in_len=512, queue=qi)
            assert h.response.ok or _sense(h)[0] == UA


def test_the_driver_can_flush_a_removed_lun_before_it_goes(start_daemon, make_image,
                                                           guest_factory):
    """REMOVED comes first, while the LUN still serves: Linux's SYNCHRONIZE CACHE on
    its way out succeeds; once the LUN is quiet it goes."""
    a, b = make_image("a.img", 8 << 20), make_image("b.img", 8 << 20)
    d = start_daemon("--lun", str(a), "--lun", str(b))
    g = guest_factory(d)
    _post(g)
    done = []
    t = threading.Thread(target=lambda: done.append(rpc(d.admin_socket, "lun_remove",
                                                        {"lun": "0:1"})))
    t.start()
    try:
        (ev,) = _events(g)
        assert ev.reason == vs.VIRTIO_SCSI_EVT_RESET_REMOVED and not done
        h = g.command(vs.sync_cache10(), lun=1)
        assert h.response.ok, h.response
    finally:
        t.join(30)
    assert done and done[0]["lun"] == "0:1"
    assert _sense(g.command(vs.sync_cache10(), lun=1)) == (5, 0x25, 0)
