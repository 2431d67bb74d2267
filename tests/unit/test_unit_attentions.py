"""Unit attentions (SPC-5 5.14) in the SCSI target, and the shared-page protocol that
makes every one of them reported exactly once however many worker processes race
for it (the C atomic exchange in workers/_engine.c, vsd_ua_take)."""
from __future__ import annotations

import mmap
import multiprocessing
import os
import struct
import time

from vscsid import lunstate
from vscsid.workers._fast import ffi, lib
from vscsid.workers.backends import NullBackend
from vscsid.workers.scsi import Disk, DiskInfo, ScsiTarget, SGList
from vscsid.workers.scsi.disk import UnitAttentions
from vscsid.workers.scsi.sense import parse_sense

TUR = bytes(6)
INQUIRY = bytes((0x12, 0, 0, 0, 96, 0))
REPORT_LUNS = bytes((0xA0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0))
REQUEST_SENSE = bytes((0x03, 0, 0, 0, 252, 0))
READ10 = bytes((0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0))


def _target(ua: UnitAttentions | None = None):
    d = Disk(DiskInfo(num_blocks=2048, serial="UA1"), NullBackend(1 << 20), ua=ua)
    return ScsiTarget({0: d}), d


def _run(t, cdb, alloc=512):
    buf = bytearray(alloc)
    r = t.execute(0, cdb, data_in=SGList([memoryview(buf)]))
    return r, bytes(buf[:r.data_in_len])


def _ua(r):
    return parse_sense(r.sense) if r.status == 2 else None


def test_a_unit_attention_is_reported_once_by_the_next_command():
    t, d = _target()
    d.ua.establish(lunstate.UA_POWER_ON)
    r, _ = _run(t, READ10)
    assert _ua(r) == (6, 0x29, 0x00)
    r, data = _run(t, READ10)
    assert r.status == 0 and r.data_in_len == 512


def test_inquiry_neither_reports_nor_clears_it():
    t, d = _target()
    d.ua.establish(lunstate.UA_CAPACITY)
    r, data = _run(t, INQUIRY)
    assert r.status == 0 and data[8:16] == b"VSCSID  "
    assert _ua(_run(t, TUR)[0]) == (6, 0x2A, 0x09)
    assert _run(t, TUR)[0].status == 0


def test_report_luns_clears_only_reported_luns_data_has_changed():
    t, d = _target()
    d.ua.establish(lunstate.UA_LUNS_CHANGED)
    d.ua.establish(lunstate.UA_MODE)
    r, data = _run(t, REPORT_LUNS)
    assert r.status == 0 and struct.unpack(">I", data[:4])[0] == 8
    assert d.ua.pending() == [lunstate.UA_MODE]
    assert _ua(_run(t, TUR)[0]) == (6, 0x2A, 0x01)
    assert _run(t, TUR)[0].status == 0


def test_request_sense_returns_the_unit_attention_and_clears_it():
    t, d = _target()
    d.ua.establish(lunstate.UA_POWER_ON)
    r, data = _run(t, REQUEST_SENSE)
    assert r.status == 0
    assert parse_sense(data) == (6, 0x29, 0x00)
    assert _run(t, TUR)[0].status == 0
    # descriptor format when asked for it
    d.ua.establish(lunstate.UA_CAPACITY)
    r, data = _run(t, bytes((0x03, 0x01, 0, 0, 252, 0)))
    assert r.status == 0 and data[0] == 0x72 and (data[1], data[2], data[3]) == (6, 0x2A, 0x09)


def test_several_are_reported_in_order_one_per_command():
    t, d = _target()
    for kind in (lunstate.UA_LUNS_CHANGED, lunstate.UA_CAPACITY, lunstate.UA_POWER_ON):
        d.ua.establish(kind)
    got = [_ua(_run(t, TUR)[0]) for _ in range(4)]
    assert got == [(6, 0x29, 0), (6, 0x2A, 0x09), (6, 0x3F, 0x0E), None]


def test_the_c_exchange_takes_each_once():
    page = bytearray(8)
    buf = ffi.from_buffer("uint8_t[]", page)
    page[4:8] = b"\x00\x01\x00\x01"
    assert lib.vsd_ua_take(buf + 4, 4) == 1
    assert lib.vsd_ua_take(buf + 4, 4) == 3
    assert lib.vsd_ua_take(buf + 4, 4) == -1
    assert page[4:8] == bytes(4)


#: a worker preempted while it takes a unit attention: the gap makes the race certain
GAP = 0.0002


def _racer(fd: int, atomic: bool, out) -> None:
    """A 'worker': takes the LUN's unit attentions as fast as it can until told to
    stop (what every TEST UNIT READY does, without the rest of the command), and
    counts those it would have reported. Every take is delayed by GAP after the
    condition was seen pending, so two racers nearly always see it together."""
    mm = mmap.mmap(fd, lunstate.PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    base = ffi.from_buffer("uint8_t[]", mm)
    off = lunstate.ua_offset(0)
    ptr = base + off
    view = memoryview(mm)[off:off + 4]

    def atomic_take(k):
        time.sleep(GAP)
        return lib.vsd_ua_take(ptr + k, 1) == 0

    def plain_take(k):            # read, then store: not atomic
        old = view[k]
        time.sleep(GAP)
        view[k] = 0
        return old

    ua = UnitAttentions(view, exchange=atomic_take if atomic else plain_take)
    seen = 0
    stop = lunstate.PAGE_SIZE - 1
    while not mm[stop]:
        if ua.take() is not None:
            seen += 1
    out.put(seen)


def _race(atomic: bool, n: int) -> list[int]:
    fd = os.memfd_create("ua-race")
    os.ftruncate(fd, lunstate.PAGE_SIZE)
    mm = mmap.mmap(fd, lunstate.PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(fd, atomic, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for _ in range(n):
        lunstate.establish(mm, 0, lunstate.UA_POWER_ON)
        deadline = time.monotonic() + 10
        while mm[lunstate.ua_offset(0, lunstate.UA_POWER_ON)]:
            assert time.monotonic() < deadline, "nobody took the unit attention"
            time.sleep(0.0001)        # leave the CPUs to the racers
        time.sleep(GAP)               # (the loser of a round is done with it)
    mm[lunstate.PAGE_SIZE - 1] = 1
    counts = [out.get(timeout=10) for _ in procs]
    for p in procs:
        p.join(10)
    mm.close()
    os.close(fd)
    return counts


def test_racing_processes_report_each_unit_attention_exactly_once():
    n = 500
    counts = _race(True, n)
    assert sum(counts) == n, counts
    assert min(counts) > 0, counts      # both really took some


def test_the_race_is_real_a_plain_swap_reports_some_twice():
    # The same race without the atomic exchange (a read, then a store): several
    # processes see the same condition pending and report it. This shows the
    # test above can fail.
    counts = _race(False, 500)
    assert sum(counts) > 500 + 100, counts
