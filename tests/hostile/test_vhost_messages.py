"""An untrusted front end: malformed, oversized, out-of-order and unexpected vhost-user
messages.

Every case checks that the daemon logs a structured line naming the problem (with
``conn``), closes every fd that came with the message (pipe tracers reach EOF, fd
counts of the supervisor and the workers return to their idle values, no guest
memory stays mapped), drops the connection or NACKs as the case calls for, and then
serves a NEW connection on which a well-behaved front end does correct I/O (the
``baseline`` fixture)."""
from __future__ import annotations

import os
import random
import socket
import struct
import time

import pytest

from vscsid.vhost import protocol as P
from vscsid.bench import virtio_scsi as vs
from vscsid.bench.driverq import DriverQueue
from vscsid.bench.guestmem import FrontendMemory
from vscsid.vhost.protocol import (
    ConfigPayload, MemoryRegion, MemoryTable, Request, U64Payload, VringAddr, VringFile,
    VringState,
)

from tests.wait import WAIT

from .conftest import NUM_QUEUES
from .harness import Conn, Guest, Tracer, assert_tur_ok, memfd, wait_for

pytestmark = pytest.mark.timeout(60)

R = Request
NUM_RINGS = 2 + NUM_QUEUES
V1 = P.VERSION


def hdr(request: int, flags: int, size: int) -> bytes:
    return struct.pack("<III", request, flags, size)


def dropped_with(daemon, data: bytes, reason: str | None, *, nfds: int = 1,
                 negotiate: bool = True) -> None:
    """Send ``data`` with ``nfds`` traced fds; the daemon must drop the connection, log
    the reason and close every fd."""
    c = Conn(daemon, negotiate=negotiate)
    tracers = [Tracer() for _ in range(nfds)]
    try:
        c.raw(data, [t.fd for t in tracers])
        c.expect_dropped(reason)
        assert all(t.closed_by_peer() for t in tracers), "an fd of the message was not closed"
    finally:
        c.close()
        for t in tracers:
            t.close()


# =========================================================================== header

@pytest.mark.parametrize("flags,reason", [
    (0x0, "version"), (0x2, "version"), (0x3, "version"),
    (V1 | P.FLAG_REPLY, "reply"), (V1 | P.FLAG_REPLY | P.FLAG_NEED_REPLY, "reply"),
    (V1 | 0x10, "flag bits"), (V1 | 0x8000_0000, "flag bits"),
])
@pytest.mark.parametrize("negotiate", [False, True])
def test_bad_header_flags_drop_the_connection(daemon, baseline, flags, reason, negotiate):
    dropped_with(daemon, hdr(R.GET_FEATURES, flags, 0), reason, negotiate=negotiate)


_FIXED = sorted(code for code, spec in P.REQUESTS.items() if spec.sizes)


@pytest.mark.parametrize("request_code", _FIXED, ids=lambda c: P.request_name(c))
def test_wrong_payload_size_for_each_request(daemon, baseline, request_code):
    sizes = P.REQUESTS[request_code].sizes
    bad = max(sizes) + 4
    dropped_with(daemon, hdr(request_code, V1, bad) + b"\x01" * bad, "payload is")


@pytest.mark.parametrize("request_code,size", [
    (R.SET_FEATURES, 4), (R.SET_VRING_ADDR, 32), (R.SET_VRING_NUM, 4), (R.SET_VRING_KICK, 0),
    (R.GET_FEATURES, 1), (R.SET_INFLIGHT_FD, 16),
])
def test_short_payloads(daemon, baseline, request_code, size):
    dropped_with(daemon, hdr(request_code, V1, size) + b"\0" * size, "payload is")


@pytest.mark.parametrize("body,reason", [
    (b"\x01\0\0\0", "shorter than its header"),
    (struct.pack("<II", 1, 0) + b"\0" * 16, "expected 40"),
    (struct.pack("<II", 2, 0) + b"\0" * 32, "expected 72"),
])
def test_malformed_mem_table_payload(daemon, baseline, body, reason):
    dropped_with(daemon, hdr(R.SET_MEM_TABLE, V1, len(body)) + body, reason)


@pytest.mark.parametrize("request_code", [R.GET_CONFIG, R.SET_CONFIG])
@pytest.mark.parametrize("body,reason", [
    (b"\0" * 8, "shorter than its header"),
    (struct.pack("<III", 0, 8, 0) + b"\0" * 4, "header says"),
    (struct.pack("<III", 0, 4, 0) + b"\0" * 8, "header says"),
    (struct.pack("<III", 0, 300, 0) + b"\0" * 300, "exceeds"),
])
def test_malformed_config_payload(daemon, baseline, request_code, body, reason):
    dropped_with(daemon, hdr(request_code, V1, len(body)) + body, reason)


@pytest.mark.parametrize("size", [P.MAX_PAYLOAD + 1, 1 << 20, 0xFFFF_FFFF])
def test_payload_over_the_cap(daemon, baseline, size):
    # The daemon must refuse on the header alone, not wait for (or buffer) the payload.
    dropped_with(daemon, hdr(R.SET_FEATURES, V1, size), "exceeds")


def test_vring_file_reserved_bits(daemon, baseline):
    dropped_with(daemon, hdr(R.SET_VRING_CALL, V1, 8) + struct.pack("<Q", 0x200 | 2),
                 "reserved bits")


# =========================================================================== fds

@pytest.mark.parametrize("nfds", [9, 16, 64, 253])
@pytest.mark.parametrize("request_code", [R.SET_MEM_TABLE, R.GET_FEATURES])
def test_too_many_fds(daemon, baseline, nfds, request_code):
    if request_code == R.SET_MEM_TABLE:
        body = P.encode_payload(MemoryTable((MemoryRegion(0, 4096, 0x10000, 0),)))
    else:
        body = b""
    c = Conn(daemon)
    tracers = [Tracer() for _ in range(nfds)]
    try:
        c.raw(hdr(request_code, V1, len(body)) + body, [t.fd for t in tracers])
        assert c.fe.connection_closed(5)
        rec = c.log("protocol_error")
        assert "fds" in rec["reason"], rec
        c.log("session_closed")
        assert all(t.closed_by_peer() for t in tracers)
    finally:
        c.close()
        for t in tracers:
            t.close()


@pytest.mark.parametrize("request_code,payload", [
    (R.GET_FEATURES, b""), (R.SET_FEATURES, U64Payload(1 << 32)), (R.SET_OWNER, b""),
    (R.SET_VRING_NUM, VringState(2, 128)), (R.GET_VRING_BASE, VringState(2, 0)),
    (R.SET_VRING_ADDR, VringAddr(2, 0, 0, 0, 0, 0)), (R.SET_PROTOCOL_FEATURES, U64Payload(0)),
    (R.GET_CONFIG, ConfigPayload(0, 4, 0, bytes(4))), (R.SET_STATUS, U64Payload(0)),
    (R.SET_VRING_CALL, VringFile(2, True)), (R.RESET_DEVICE, b""),
], ids=lambda v: v.name if isinstance(v, Request) else "")
def test_fds_on_a_message_that_takes_none(daemon, baseline, request_code, payload):
    dropped_with(daemon, P.encode_request(request_code, payload), "expected 0", nfds=2)


@pytest.mark.parametrize("request_code", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
def test_missing_fd(daemon, baseline, request_code):
    dropped_with(daemon, P.encode_request(request_code, VringFile(2, False)), "0 fds attached",
                 nfds=0)


@pytest.mark.parametrize("request_code", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
def test_two_fds_on_a_vring_message(daemon, baseline, request_code):
    dropped_with(daemon, P.encode_request(request_code, VringFile(2, False)), "2 fds attached",
                 nfds=2)


def test_mem_table_fewer_fds_than_regions(daemon, baseline):
    table = MemoryTable((MemoryRegion(0, 4096, 0x10000, 0), MemoryRegion(1 << 20, 4096, 0x20000, 0)))
    dropped_with(daemon, P.encode_request(R.SET_MEM_TABLE, table), "expected 2", nfds=1)


def test_mem_table_with_no_regions(daemon, baseline):
    body = struct.pack("<II", 0, 0)
    dropped_with(daemon, hdr(R.SET_MEM_TABLE, V1, len(body)) + body, "no regions", nfds=1)


def test_mem_table_with_nine_regions(daemon, baseline):
    regions = tuple(MemoryRegion(i << 20, 4096, 0x100000 + (i << 20), 0) for i in range(9))
    dropped_with(daemon, P.encode_request(R.SET_MEM_TABLE, MemoryTable(regions)), "9 regions",
                 nfds=8)


# =========================================================================== truncation, garbage

def test_truncated_message_then_eof(daemon, baseline):
    c = Conn(daemon)
    t = Tracer()
    try:
        table = P.encode_request(R.SET_MEM_TABLE, MemoryTable((MemoryRegion(0, 4096, 0x10000, 0),)))
        c.raw(table[:20], [t.fd])
        c.fe.sock.shutdown(socket.SHUT_WR)      # the stream delivers the 20 bytes, then EOF
        assert c.fe.connection_closed(5)
        c.log("frontend_disconnected")
        c.log("session_closed")
        assert t.closed_by_peer()
    finally:
        c.close()
        t.close()


def test_truncated_message_is_logged_as_such(daemon, baseline):
    c = Conn(daemon)
    try:
        c.raw(P.encode_request(R.SET_FEATURES, U64Payload(1))[:15])
        c.fe.sock.shutdown(socket.SHUT_WR)
        c.log("session_closed")
        recs = daemon.since(c.mark, conn=c.conn)
        assert any("truncat" in (r.get("event", "") + r.get("reason", "")) for r in recs), recs
    finally:
        c.close()


@pytest.mark.parametrize("seed", range(12))
def test_garbage_bytes(daemon, baseline, seed):
    rng = random.Random(seed)
    data = bytes(rng.randrange(256) for _ in range(rng.choice([1, 11, 12, 40, 500, 4000])))
    if seed % 3 == 0:   # well-formed header flags, random code and size: framing survives longer
        data = struct.pack("<II", rng.randrange(1 << 32), V1) + data
    c = Conn(daemon, negotiate=seed % 2 == 0)
    t = Tracer()
    try:
        c.raw(data, [t.fd])
        if not c.fe.connection_closed(0.3):
            c.fe.sock.shutdown(socket.SHUT_WR)     # the daemon waits for more bytes: give up
        c.log("session_closed")
        assert t.closed_by_peer()
    finally:
        c.close()
        t.close()


# =========================================================================== unknown / unsupported

@pytest.mark.parametrize("code", [0, 26, 27, 44, 99, 0xFFFF, 0xFFFF_FFFF])
@pytest.mark.parametrize("need_reply", [True, False])
def test_unknown_request_is_nacked_and_the_connection_stays_usable(daemon, baseline, code,
                                                                   need_reply):
    c = Conn(daemon)
    t = Tracer()
    try:
        flags = V1 | (P.FLAG_NEED_REPLY if need_reply else 0)
        c.raw(hdr(code, flags, 5) + b"hello", [t.fd])
        if need_reply:
            assert c.fe.recv_reply(code, "u64").payload.value != 0
        rec = c.log("protocol_error")
        assert rec["fatal"] is False and "unknown" in rec["reason"]
        assert t.closed_by_peer(), "the fd of an unknown message was kept"
        assert c.alive()
        c.set_mem()                          # and the connection still does real work
    finally:
        c.close_and_wait()
        t.close()


@pytest.mark.parametrize("request_code,payload,nfds", [
    (R.SET_LOG_BASE, P.LogPayload(4096, 0), 1), (R.SET_LOG_FD, b"", 1),
    (R.SET_BACKEND_REQ_FD, b"", 1), (R.SET_VRING_ENDIAN, VringState(2, 1), 0),
], ids=lambda v: v.name if isinstance(v, Request) else None)
def test_known_but_unsupported_requests(daemon, baseline, request_code, payload, nfds):
    c = Conn(daemon)
    tracers = [Tracer() for _ in range(nfds)]
    try:
        c.expect_nack(request_code, payload, [t.fd for t in tracers])
        c.log("unsupported_request")
        assert all(t.closed_by_peer() for t in tracers)
        assert c.alive()
    finally:
        c.close_and_wait()
        for t in tracers:
            t.close()


def _inflight_fd(kind: str, size: int) -> int:
    if kind == "memfd":
        return memfd("hostile-inflight", size)
    if kind == "pipe":
        r, w = os.pipe()
        os.close(r)
        return w
    if kind == "dev_null":
        return os.open("/dev/null", os.O_RDWR)
    raise AssertionError(kind)


@pytest.mark.parametrize("mmap_size,mmap_offset,num_queues,queue_size,kind,file_size", [
    (4096, 0, 2, 128, "memfd", 1 << 20),              # too small for 2 queues of 128
    (1 << 20, 0, 0, 128, "memfd", 1 << 20),           # no queues
    (1 << 20, 0, 0xFFFF, 128, "memfd", 1 << 20),      # more queues than the device has
    (1 << 20, 0, 2, 100, "memfd", 1 << 20),           # queue size not a power of two
    (1 << 20, 0, 2, 0, "memfd", 1 << 20),
    (1 << 20, 0, 2, 1 << 15, "memfd", 1 << 20),
    (1 << 20, 0, 2, 128, "memfd", 4096),              # region past the end of the file
    (1 << 20, 1 << 40, 2, 128, "memfd", 1 << 20),     # offset past the end
    ((1 << 64) - 1, (1 << 64) - 1, 2, 128, "memfd", 1 << 20),
    (1 << 20, 0, 2, 128, "pipe", 0),
    (1 << 20, 0, 2, 128, "dev_null", 0),
])
def test_bad_set_inflight_fd(daemon, baseline, mmap_size, mmap_offset, num_queues, queue_size,
                             kind, file_size):
    c = Conn(daemon)
    fd = _inflight_fd(kind, file_size)
    try:
        n_before = daemon.fd_count()
        c.expect_nack(R.SET_INFLIGHT_FD, P.Inflight(mmap_size, mmap_offset, num_queues, queue_size),
                      [fd])
        c.log("request_rejected", request="SET_INFLIGHT_FD")
        assert daemon.fd_count() == n_before and not daemon.holders("hostile-inflight")
        assert c.alive()
        c.set_mem()
    finally:
        os.close(fd)
        c.close_and_wait()


@pytest.mark.parametrize("num_queues,queue_size", [(0, 128), (0xFFFF, 128), (2, 100), (2, 0),
                                                   (2, 0xFFFF), (2, 0x8001)])
def test_bad_get_inflight_fd(daemon, baseline, num_queues, queue_size):
    c = Conn(daemon)
    try:
        rep = c.fe.get(R.GET_INFLIGHT_FD, P.Inflight(0, 0, num_queues, queue_size), "inflight")
        assert rep.payload.mmap_size == 0 and rep.fds == []
        c.log("request_rejected", request="GET_INFLIGHT_FD")
        assert c.alive()
    finally:
        c.close_and_wait()


# =========================================================================== SET_MEM_TABLE contents

def _mem_case(name: str):
    """(regions, fds) for a memory table that must be refused."""
    mib = 1 << 20
    if name == "overlap_gpa":
        fds = [memfd("hostile-a", mib), memfd("hostile-b", mib)]
        return [MemoryRegion(0, mib, 0x7000_0000_0000, 0),
                MemoryRegion(mib // 2, mib, 0x7100_0000_0000, 0)], fds
    if name == "overlap_uva":
        fds = [memfd("hostile-a", mib), memfd("hostile-b", mib)]
        return [MemoryRegion(0, mib, 0x7000_0000_0000, 0),
                MemoryRegion(4 * mib, mib, 0x7000_0008_0000, 0)], fds
    if name == "larger_than_memfd":
        return [MemoryRegion(0, 2 * mib, 0x7000_0000_0000, 0)], [memfd("hostile-a", mib)]
    if name == "offset_past_end":
        return [MemoryRegion(0, 4096, 0x7000_0000_0000, mib + 4096)], [memfd("hostile-a", mib)]
    if name == "offset_plus_size_past_end":
        return [MemoryRegion(0, mib, 0x7000_0000_0000, 4096)], [memfd("hostile-a", mib)]
    if name == "offset_overflows":
        return [MemoryRegion(0, 8192, 0x7000_0000_0000, (1 << 64) - 4096)], [memfd("hostile-a", mib)]
    if name == "gpa_overflows":
        return [MemoryRegion((1 << 64) - 4096, 8192, 0x7000_0000_0000, 0)], [memfd("hostile-a", mib)]
    if name == "uva_overflows":
        return [MemoryRegion(0, 8192, (1 << 64) - 4096, 0)], [memfd("hostile-a", mib)]
    if name == "size_zero":
        return [MemoryRegion(0, 0, 0x7000_0000_0000, 0)], [memfd("hostile-a", mib)]
    if name == "huge":
        return [MemoryRegion(0, 1 << 62, 0x7000_0000_0000, 0)], [memfd("hostile-a", mib)]
    if name == "one_good_one_bad":
        return [MemoryRegion(0, mib, 0x7000_0000_0000, 0),
                MemoryRegion(2 * mib, 2 * mib, 0x7100_0000_0000, 0)], \
            [memfd("hostile-a", mib), memfd("hostile-b", mib)]
    region = [MemoryRegion(0, 4096, 0x7000_0000_0000, 0)]
    if name == "pipe":
        r, w = os.pipe()
        os.close(r)
        return region, [w]
    if name == "socket":
        a, b = socket.socketpair()
        b.close()
        return region, [a.detach()]
    if name == "directory":
        return region, [os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)]
    if name == "dev_null":
        return region, [os.open("/dev/null", os.O_RDWR)]
    if name == "read_only_fd":
        fd = memfd("hostile-a", mib)
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        os.close(fd)
        return region, [ro]
    if name == "eventfd":
        return region, [os.eventfd(0)]
    raise AssertionError(name)


MEM_CASES = ["overlap_gpa", "overlap_uva", "larger_than_memfd", "offset_past_end",
             "offset_plus_size_past_end", "offset_overflows", "gpa_overflows", "uva_overflows",
             "size_zero", "huge", "one_good_one_bad", "pipe", "socket", "directory", "dev_null",
             "read_only_fd", "eventfd"]


@pytest.mark.parametrize("case", MEM_CASES)
@pytest.mark.parametrize("replacing", [False, True], ids=["first", "replacing"])
def test_bad_memory_table_is_nacked(daemon, baseline, case, replacing):
    """The table is refused without mapping past any file's end (SIGBUS), every fd is
    closed at once, an earlier good table stays in force, and the connection goes on."""
    c = Conn(daemon)
    guest = None
    regions, fds = _mem_case(case)
    try:
        if replacing:
            guest = FrontendMemory(4 << 20)
            c.fe.set_mem_table(guest)
        n_before = daemon.fd_count()
        c.expect_nack(R.SET_MEM_TABLE, MemoryTable(tuple(regions)), fds)
        rec = c.log("request_failed", request="SET_MEM_TABLE")
        assert rec.get("reason"), rec
        assert daemon.holders("hostile-") == []
        assert daemon.fd_count() == n_before
        assert c.alive()
        if replacing:          # the old table still serves a ring
            q = DriverQueue(guest, 64, event_idx=c.fe.event_idx)
            c.fe.setup_queue(2, q)
            assert_tur_ok(q, guest, "I/O on the old memory table")
        else:
            c.set_mem()
    finally:
        for fd in fds:
            os.close(fd)
        c.close_and_wait()
        if guest is not None:
            guest.close()


@pytest.mark.parametrize("content", ["random", "all_in_flight", "some_in_flight", "wrong_size",
                                     "used_idx_far", "zero"])
def test_hostile_inflight_region_contents(daemon, baseline, content):
    """The front end owns the inflight region handed over with SET_INFLIGHT_FD and can
    fill it with anything: recovering from it must not crash a worker or touch memory
    outside the guest regions; at worst the ring is reported broken."""
    import random

    from vscsid.virtio.inflight import queue_region_size

    rng = random.Random(content)
    qsize, rings = 64, 2 + NUM_QUEUES
    per = queue_region_size(qsize)
    region = bytearray(per * rings)
    for r in range(rings):
        base = r * per
        if content == "random":
            region[base:base + per] = rng.randbytes(per)
            continue
        if content == "zero":
            continue
        n = 32 if content == "wrong_size" else qsize
        used = rng.randrange(0x10000) if content == "used_idx_far" else 0
        struct.pack_into("<QHHHH", region, base, 0, 1, n, rng.randrange(0x10000), used)
        for h in range(qsize):
            on = content in ("all_in_flight", "used_idx_far", "wrong_size") or rng.random() < 0.3
            struct.pack_into("<B5xHQ", region, base + 16 + 16 * h, 1 if on else 0,
                             rng.randrange(0x10000), rng.randrange(1 << 64))
    fd = memfd("hostile-inflight", len(region))
    os.pwrite(fd, bytes(region), 0)
    c = Conn(daemon)
    g = FrontendMemory(4 << 20)
    try:
        c.fe.set_mem_table(g)
        assert c.ack(R.SET_INFLIGHT_FD, P.Inflight(len(region), 0, rings, qsize), [fd]) == 0
        qs = {i: DriverQueue(g, qsize, event_idx=c.fe.event_idx, strict=False) for i in (0, 2, 3)}
        for i, q in qs.items():
            c.fe.setup_queue(i, q)
        b = vs.ScsiRequestBuilder(qs[2], g)
        h = b.command(vs.test_unit_ready(), publish=True)
        qs[2].kick()
        deadline = time.monotonic() + 3
        while not h.done and time.monotonic() < deadline:
            b.reap()
            if not daemon.since(c.mark, "ring_needs_reset", conn=c.conn, ring=2):
                qs[2].wait_call(0.1)
            else:
                break
        assert h.done or daemon.since(c.mark, "ring_needs_reset", conn=c.conn, ring=2)
        if h.done:
            # GOOD, or the POWER ON, RESET a new front end's first command gets
            si = h.response.sense_key()
            assert h.response.ok or (si is not None and (si.key, si.asc) == (6, 0x29)), h.response
        assert c.alive() and daemon.alive()
    finally:
        os.close(fd)
        c.close_and_wait()
        g.close()


# =========================================================================== ADD/REM_MEM_REG

ADD_CASES = ["overlap_gpa", "overlap_uva", "larger_than_memfd", "offset_past_end", "size_zero",
             "gpa_overflows", "huge", "pipe", "socket", "directory", "dev_null", "read_only_fd"]


@pytest.mark.parametrize("case", ADD_CASES)
def test_bad_add_mem_reg(daemon, baseline, case):
    """Refused, its fd closed at once, the table in force unchanged and still usable."""
    c = Conn(daemon)
    guest = FrontendMemory(4 << 20)
    mib = 1 << 20
    if case in ("overlap_gpa", "overlap_uva"):
        r0 = guest.regions[0]
        fd = memfd("hostile-a", mib)
        region = (MemoryRegion(mib, mib, 0x7000_0000_0000, 0) if case == "overlap_gpa" else
                  MemoryRegion(64 * mib, mib, r0.user_addr + 4096, 0))
    else:
        regions, fds = _mem_case(case)
        region, fd = regions[0], fds[0]
        region = MemoryRegion(region.guest_phys_addr + 64 * mib
                              if region.guest_phys_addr < (1 << 40) else region.guest_phys_addr,
                              region.memory_size, region.userspace_addr, region.mmap_offset)
    try:
        c.fe.set_mem_table(guest)
        n_before = daemon.fd_count()
        c.expect_nack(R.ADD_MEM_REG, P.MemRegionMsg(region), [fd])
        assert daemon.since(c.mark, "request_failed", conn=c.conn) or \
            daemon.since(c.mark, "request_rejected", conn=c.conn)
        assert daemon.fd_count() == n_before and not daemon.holders("hostile-")
        q = DriverQueue(guest, 64, event_idx=c.fe.event_idx)
        c.fe.setup_queue(2, q)
        assert_tur_ok(q, guest, "I/O after a refused ADD_MEM_REG")
    finally:
        os.close(fd)
        c.close_and_wait()
        guest.close()


def test_add_mem_reg_beyond_the_slot_limit(daemon, baseline):
    c = Conn(daemon)
    fds = []
    try:
        slots = c.fe.get(R.GET_MAX_MEM_SLOTS).payload.value
        assert 8 <= slots <= 512
        for i in range(slots):
            fds.append(memfd("hostile-slot", 64 << 10))
            assert c.ack(R.ADD_MEM_REG, P.MemRegionMsg(
                MemoryRegion(i << 20, 64 << 10, 0x7000_0000_0000 + (i << 20), 0)), [fds[-1]]) == 0
        fds.append(memfd("hostile-extra", 64 << 10))
        c.expect_nack(R.ADD_MEM_REG, P.MemRegionMsg(
            MemoryRegion(slots << 20, 64 << 10, 0x7000_0000_0000 + (slots << 20), 0)), [fds[-1]])
        assert not daemon.holders("hostile-extra")
        assert c.alive()
    finally:
        for fd in fds:
            os.close(fd)
        c.close_and_wait()


@pytest.mark.parametrize("with_table", [False, True])
@pytest.mark.parametrize("nfds", [0, 1])
def test_rem_mem_reg_of_an_unknown_region(daemon, baseline, with_table, nfds):
    c = Conn(daemon)
    t = Tracer()
    try:
        if with_table:
            c.set_mem()
        c.expect_nack(R.REM_MEM_REG, P.MemRegionMsg(MemoryRegion(64 << 20, 4096, 0x1000, 0)),
                      [t.fd] if nfds else [])
        c.log("request_rejected", request="REM_MEM_REG")
        assert t.closed_by_peer()
        assert c.alive()
    finally:
        c.close_and_wait()
        t.close()


def test_rem_mem_reg_under_running_rings(daemon, baseline):
    """The front end removes the region its rings live in: the rings stop being served
    (logged), nothing touches the unmapped memory, the daemon survives."""
    c = Conn(daemon)
    g = FrontendMemory(4 << 20)
    try:
        c.fe.set_mem_table(g)
        qs = {i: DriverQueue(g, 64, event_idx=c.fe.event_idx) for i in (0, 2)}
        for i, q in qs.items():
            c.fe.setup_queue(i, q)
        r = g.regions[0]
        assert c.ack(R.REM_MEM_REG, P.MemRegionMsg(
            MemoryRegion(r.gpa, r.size, r.user_addr, r.mmap_offset))) == 0
        for q in qs.values():
            q.kick()
        time.sleep(0.2)
        assert c.alive()
        # the removed region is unmapped and closed everywhere
        wait_for(lambda: not daemon.holders("vscsid-guest"), what="the region to be released")
    finally:
        c.close_and_wait()
        g.close()


# =========================================================================== vring index

def _vring_msg(request_code, index):
    if request_code in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        return VringFile(index, False), 1
    if request_code == R.SET_VRING_ADDR:
        return VringAddr(index, 0, 0x7000_0000_0000, 0x7000_0000_2000, 0x7000_0000_1000, 0), 0
    if request_code == R.SET_VRING_NUM:
        return VringState(index, 64), 0
    if request_code == R.SET_VRING_ENABLE:
        return VringState(index, 1), 0
    return VringState(index, 0), 0


VRING_REQUESTS = [R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ADDR, R.SET_VRING_KICK,
                  R.SET_VRING_CALL, R.SET_VRING_ERR, R.SET_VRING_ENABLE, R.GET_VRING_BASE]


_FILE_REQUESTS = (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR)


@pytest.mark.parametrize("request_code,index", [
    (code, index) for code in VRING_REQUESTS
    for index in (NUM_RINGS, 0xFF, 0x100, 0xFFFF_FFFF)
    if code not in _FILE_REQUESTS or index <= 0xFF      # an fd message's index has 8 bits
], ids=lambda v: v.name if isinstance(v, Request) else hex(v))
def test_vring_index_out_of_range(daemon, baseline, request_code, index):
    c = Conn(daemon)
    c.set_mem()
    payload, nfds = _vring_msg(request_code, index)
    tracers = [Tracer() for _ in range(nfds)]
    try:
        if request_code == R.GET_VRING_BASE:
            rep = c.fe.get(R.GET_VRING_BASE, payload)      # has a reply of its own
            assert rep.payload.num == 0
        else:
            c.expect_nack(request_code, payload, [t.fd for t in tracers])
        rec = c.log("request_rejected", request=request_code.name)
        assert "out of range" in rec["reason"]
        assert all(t.closed_by_peer() for t in tracers)
        assert c.alive()
    finally:
        c.close_and_wait()
        for t in tracers:
            t.close()


# =========================================================================== vring size, addresses

@pytest.mark.parametrize("num", [0, 3, 100, 129, 256, 1 << 15, 1 << 16, 0xFFFF_FFFF])
def test_bad_vring_size(daemon, baseline, num):
    c = Conn(daemon)
    try:
        c.expect_nack(R.SET_VRING_NUM, VringState(2, num))
        assert "power of two" in c.log("request_rejected", request="SET_VRING_NUM")["reason"]
    finally:
        c.close_and_wait()


@pytest.mark.parametrize("base", [0x10000, 0xFFFF_FFFF])
def test_bad_vring_base(daemon, baseline, base):
    c = Conn(daemon)
    try:
        c.expect_nack(R.SET_VRING_BASE, VringState(2, base))
        c.log("request_rejected", request="SET_VRING_BASE")
    finally:
        c.close_and_wait()


def _addr_case(mem: FrontendMemory, q: DriverQueue, case: str) -> VringAddr:
    a = q.vring_addr()
    r = mem.regions[-1]
    end = r.user_addr + r.size
    desc, used, avail = a.desc_user_addr, a.used_user_addr, a.avail_user_addr
    if case == "desc_outside":
        desc = 0x1000
    elif case == "used_outside":
        used = end + (1 << 30)
    elif case == "avail_outside":
        avail = 16
    elif case == "desc_no_room":
        desc = end - 16 * q.size + 16
    elif case == "used_no_room":
        used = end - (6 + 8 * q.size) + 4
    elif case == "avail_no_room":
        avail = end - 4
    elif case == "desc_misaligned":
        desc += 8
    elif case == "avail_misaligned":
        avail += 1
    elif case == "used_misaligned":
        used += 2
    elif case == "addr_overflow":
        desc = (1 << 64) - 16
    elif case == "spans_two_regions":
        first = mem.regions[0]
        desc = first.user_addr + first.size - 16 * q.size // 2
    elif case == "log_flag":
        return VringAddr(2, VringAddr.F_LOG, desc, used, avail, 0)
    elif case == "unknown_flags":
        return VringAddr(2, 0x80, desc, used, avail, 0)
    else:
        raise AssertionError(case)
    return VringAddr(2, 0, desc, used, avail, 0)


ADDR_CASES = ["desc_outside", "used_outside", "avail_outside", "desc_no_room", "used_no_room",
              "avail_no_room", "desc_misaligned", "avail_misaligned", "used_misaligned",
              "addr_overflow", "spans_two_regions", "log_flag", "unknown_flags"]


@pytest.mark.parametrize("case", ADDR_CASES)
@pytest.mark.parametrize("memory_first", [True, False], ids=["mem_first", "addr_first"])
def test_bad_ring_addresses(daemon, baseline, case, memory_first):
    """Refused at SET_VRING_ADDR when the memory table is known, else at SET_VRING_KICK;
    the ring never starts and the kick fd is closed."""
    c = Conn(daemon)
    mem = FrontendMemory(4 << 20, regions=2)
    q = DriverQueue(mem, 128)
    t = Tracer()
    try:
        if memory_first:
            c.fe.set_mem_table(mem)
        assert c.ack(R.SET_VRING_NUM, VringState(2, 128)) == 0
        addr = _addr_case(mem, q, case)
        value = c.ack(R.SET_VRING_ADDR, addr)
        if memory_first or case in ("log_flag", "unknown_flags"):
            assert value != 0
        else:
            assert value == 0           # checked later, when the memory is known
            c.fe.set_mem_table(mem)
        c.expect_nack(R.SET_VRING_KICK, VringFile(2, False), [t.fd])
        assert t.closed_by_peer()
        assert not daemon.since(c.mark, "ring_started")
        assert c.alive()
    finally:
        c.close_and_wait()
        t.close()
        q.close()
        mem.close()


# =========================================================================== order

@pytest.mark.parametrize("missing", ["mem_table", "addr", "num", "all"])
def test_kick_before_the_ring_is_configured(daemon, baseline, missing):
    c = Conn(daemon)
    mem = FrontendMemory(4 << 20)
    q = DriverQueue(mem, 64)
    t = Tracer()
    try:
        if missing not in ("mem_table", "all"):
            c.fe.set_mem_table(mem)
        if missing not in ("num", "all"):
            assert c.ack(R.SET_VRING_NUM, VringState(2, 64)) == 0
        if missing not in ("addr", "all"):
            a = q.vring_addr()
            assert c.ack(R.SET_VRING_ADDR, VringAddr(2, 0, a.desc_user_addr, a.used_user_addr,
                                                     a.avail_user_addr, 0)) == 0
        c.expect_nack(R.SET_VRING_KICK, VringFile(2, False), [t.fd])
        c.log("request_rejected", request="SET_VRING_KICK")
        assert t.closed_by_peer()
        # Once configured properly the same ring works on the same connection.
        if missing in ("mem_table", "all"):
            c.fe.set_mem_table(mem)
        c.fe.setup_queue(2, q)
        assert_tur_ok(q, mem, "I/O after a rejected kick")
    finally:
        c.close_and_wait()
        q.close()
        mem.close()
        t.close()


@pytest.mark.parametrize("ring", [0, 2])
def test_rejected_kick_leaves_no_stale_fd(daemon, baseline, ring):
    c = Conn(daemon)
    mem = FrontendMemory(4 << 20)
    try:
        kick = c.fe.eventfd()
        c.expect_nack(R.SET_VRING_KICK, VringFile(ring, False), [kick])  # before SET_MEM_TABLE
        c.fe.set_mem_table(mem)         # its memfd gets the number the kick fd had
        assert daemon.holders("memfd:vscsid-guest")
        held = [t for t in daemon.fd_targets() if "vscsid-guest" in t]
        c.fe.get_vring_base(ring)       # a ring that never started: must close nothing
        assert [t for t in daemon.fd_targets() if "vscsid-guest" in t] == held
    finally:
        c.close_and_wait()
        mem.close()


def test_vring_addr_before_memory_then_good(daemon, baseline):
    c = Conn(daemon)
    g = FrontendMemory(4 << 20)
    q = DriverQueue(g, 64)
    try:
        a = q.vring_addr()
        assert c.ack(R.SET_VRING_NUM, VringState(2, 64)) == 0
        assert c.ack(R.SET_VRING_ADDR, VringAddr(2, 0, a.desc_user_addr, a.used_user_addr,
                                                 a.avail_user_addr, 0)) == 0
        c.fe.set_mem_table(g)
        c.fe.setup_queue(2, q)
        assert_tur_ok(q, g, "I/O")
    finally:
        c.close_and_wait()
        q.close()
        g.close()


def test_ring_reconfiguration_while_started_is_refused(daemon, baseline):
    c = Conn(daemon)
    g = FrontendMemory(4 << 20)
    q = DriverQueue(g, 64)
    try:
        c.fe.set_mem_table(g)
        c.fe.setup_queue(2, q)
        c.expect_nack(R.SET_VRING_NUM, VringState(2, 32))
        c.expect_nack(R.SET_VRING_BASE, VringState(2, 5))
        a = q.vring_addr()
        c.expect_nack(R.SET_VRING_ADDR, VringAddr(2, 0, a.desc_user_addr, a.used_user_addr,
                                                  a.avail_user_addr, 0))
        c.expect_nack(R.SET_VRING_ENABLE, VringState(2, 2))
        c.expect_nack(R.SET_STATUS, U64Payload(0x100))
        assert len(daemon.since(c.mark, "request_rejected", conn=c.conn)) == 5
    finally:
        c.close_and_wait()
        q.close()
        g.close()


def test_memory_table_that_drops_the_running_rings(daemon, baseline):
    """A new table that no longer covers running rings: nothing may touch the old memory;
    the rings just stop being served (logged), and the daemon survives."""
    c = Conn(daemon)
    g = FrontendMemory(4 << 20)
    other = FrontendMemory(regions=[(64 << 20, 1 << 20)], name="vscsid-guest-other")
    try:
        c.fe.set_mem_table(g)
        qs = {i: DriverQueue(g, 64) for i in (0, 2)}
        for i, q in qs.items():
            c.fe.setup_queue(i, q)
        c.fe.set_mem_table(other)
        c.log("ring_unmappable_after_memory_change")
        for q in qs.values():
            q.kick()
        time.sleep(0.2)
        assert c.alive()
    finally:
        c.close_and_wait()
        other.close()
        g.close()


# =========================================================================== config space

@pytest.mark.parametrize("offset,size", [(36, 4), (0, 37), (32, 8), (0xFFFF_FFF0, 16), (0, 0),
                                         (200, 56)])
def test_get_config_out_of_range(daemon, baseline, offset, size):
    c = Conn(daemon)
    try:
        rep = c.fe.get(R.GET_CONFIG, ConfigPayload(offset, size, 0, bytes(size)))
        assert rep.payload.size == 0 and rep.payload.data == b""
        c.log("request_rejected", request="GET_CONFIG")
        assert c.alive()
    finally:
        c.close_and_wait()


@pytest.mark.parametrize("offset,data,why", [
    (0, struct.pack("<I", 9), "read-only"),              # num_queues
    (4, struct.pack("<I", 1), "read-only"),              # seg_max
    (28, struct.pack("<HH", 1, 1), "read-only"),          # max_channel / max_target
    (32, struct.pack("<I", 0), "read-only"),              # max_lun
    (16, struct.pack("<III", 32, 96, 32), "read-only"),  # event_info_size + writable fields
    (20, struct.pack("<I", 0), "out of range"),          # sense_size 0
    (20, struct.pack("<I", 253), "out of range"),
    (24, struct.pack("<I", 0), "out of range"),          # cdb_size 0
    (24, struct.pack("<I", 4), "smaller than any CDB"),
    (24, struct.pack("<I", 0xFFFF_FFFF), "out of range"),
    (34, struct.pack("<I", 1), "outside"),               # runs past the end
    (36, b"\1", "outside"),
    (0xFFFF_FFFF, b"\1", "outside"),
])
def test_set_config_refused(daemon, baseline, offset, data, why):
    c = Conn(daemon)
    try:
        before = c.fe.get_config(0, 36)
        c.expect_nack(R.SET_CONFIG, ConfigPayload(offset, len(data), 0, data))
        assert why in c.log("request_rejected", request="SET_CONFIG")["reason"]
        assert c.fe.get_config(0, 36) == before
    finally:
        c.close_and_wait()


@pytest.mark.parametrize("offset,value", [(20, 8), (24, 16)], ids=["sense_size", "cdb_size"])
def test_config_written_by_one_front_end_does_not_leak_to_the_next(make_daemon, offset, value):
    d = make_daemon()
    c = Conn(d)
    try:
        c.fe.set_config(offset, struct.pack("<I", value))   # a legal driver write
    finally:
        c.close_and_wait()
    g = Guest(d)
    try:
        payload = os.urandom(512)
        assert g.command(vs.write10(5, 1), data_out=payload).response.ok
        h = g.command(vs.read10(5, 1), data_in_len=512)
        assert h.response.ok and h.data_in == payload
    finally:
        g.close_and_wait()


# =========================================================================== protocol features

def test_protocol_features_not_offered(daemon, baseline):
    c = Conn(daemon, negotiate=False)
    try:
        offered = c.fe.get(R.GET_PROTOCOL_FEATURES).payload.value
        extra = (1 << P.ProtocolFeature.LOG_SHMFD) | (1 << 63)
        assert not offered & extra
        c.send(R.SET_PROTOCOL_FEATURES, U64Payload(offered | extra), need_reply=True)
        assert "not offered" in c.log("request_rejected", request="SET_PROTOCOL_FEATURES")["reason"]
        # Nothing was negotiated: REPLY_ACK is off, so a valid SET_OWNER gets no reply.
        c.send(R.SET_OWNER, need_reply=False)
        # A proper negotiation then works, and REPLY_ACK NACKs a second bad attempt.
        c.fe.negotiate(protocol=(1 << P.ProtocolFeature.REPLY_ACK) | (1 << P.ProtocolFeature.MQ))
        c.expect_nack(R.SET_PROTOCOL_FEATURES, U64Payload(offered | extra))
        c.set_mem()
    finally:
        c.close_and_wait()


# =========================================================================== connection flood

def test_connection_flood_while_one_is_active(daemon, baseline):
    g = Guest(daemon)
    extras: list[socket.socket] = []
    tracers: list[Tracer] = []
    try:
        assert g.command(vs.test_unit_ready()).response.ok
        mark = daemon.mark()
        for i in range(48):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(daemon.socket_path)      # blocking: waits while the backlog is full
            if i % 4 == 0:   # some send a message with an fd before they are refused
                t = Tracer()
                tracers.append(t)
                try:
                    socket.send_fds(s, [P.encode_request(R.SET_VRING_KICK, VringFile(2, False))],
                                    [t.fd])
                except OSError:
                    pass      # already refused
            extras.append(s)
            if i % 8 == 7:   # interleave I/O on the active connection
                assert g.command(vs.test_unit_ready()).response.ok
        for s in extras:
            s.settimeout(WAIT)
            try:
                assert s.recv(16) == b"", "an extra connection was served"
            except ConnectionResetError:
                pass          # closed with our message unread
        wait_for(lambda: len(daemon.since(mark, "connection_refused")) >= 48, what="48 refusals")
        assert all(t.closed_by_peer() for t in tracers)
        payload = os.urandom(4096)
        assert g.command(vs.write10(0, 8), data_out=payload).response.ok
        assert g.command(vs.read10(0, 8), data_in_len=4096).data_in == payload
        assert not daemon.since(mark, "frontend_connected")
    finally:
        for s in extras:
            s.close()
        for t in tracers:
            t.close()
        g.close_and_wait()
