"""An untrusted guest: malformed descriptor chains and broken rings, on a request queue
(served by a worker) and on the control queue (served by the supervisor).

A malformed chain fails only its request: a used entry with length 0 (a chain that is
not well formed has no writable part the device may trust), a log line, and the queue
goes on with the next request. A broken ring (a head index out of range, an available
index that jumps by more than the queue size) stops that queue, is logged, signals the
ring's error eventfd and sets DEVICE_NEEDS_RESET, while other queues and new
connections are served. Nothing outside the guest regions is ever touched."""
from __future__ import annotations

import os
import struct

import pytest

from vscsid.bench import virtio_scsi as vs
from vscsid.bench.guestmem import POISON, FrontendMemory
from vscsid.vhost.protocol import Request
from vscsid.virtio.defs import DESC_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

from .harness import Guest

pytestmark = pytest.mark.timeout(60)

W = VIRTQ_DESC_F_WRITE
N = VIRTQ_DESC_F_NEXT
I = VIRTQ_DESC_F_INDIRECT    # noqa: E741

#: HostileChains methods that build a chain the device must refuse.
HOSTILE = ["loop", "next_out_of_range", "indirect_bad_len", "indirect_empty", "nested_indirect",
           "indirect_with_next", "indirect_loop", "addr_outside", "addr_straddles_end",
           "addr_overflow", "read_after_write"]


def custom_chain(g: Guest, queue: int, name: str) -> tuple:
    """More malformed chains, built by hand. Returns the token."""
    q = g.queues[queue]
    mem = g.mem
    last = mem.regions[-1]
    token = ("hostile", name)
    d = q.reserve(3)
    hdr = q.raw_alloc(64)
    resp = q.raw_alloc(128)
    if name == "indirect_outside":
        q.raw_desc(d[0], mem.unmapped_gpa() + 4096, 2 * DESC_SIZE, I)
    elif name == "indirect_straddles_end":
        q.raw_desc(d[0], last.end - DESC_SIZE, 4 * DESC_SIZE, I)
    elif name == "indirect_overflows":
        q.raw_desc(d[0], (1 << 64) - DESC_SIZE, 4 * DESC_SIZE, I)
    elif name == "indirect_huge":
        q.raw_desc(d[0], hdr, 0xFFFF_FFF0, I)
    elif name == "len_huge":
        q.raw_desc(d[0], hdr, 0xFFFF_FFFF, 0)
    elif name == "writable_outside":
        q.raw_desc(d[0], hdr, 64, N, d[1])
        q.raw_desc(d[1], mem.unmapped_gpa() + 8192, 128, W)
    elif name == "writable_overflows":
        q.raw_desc(d[0], hdr, 64, N, d[1])
        q.raw_desc(d[1], (1 << 64) - 64, 128, W)
    elif name == "write_then_read_then_write":
        q.raw_desc(d[0], resp, 64, W | N, d[1])
        q.raw_desc(d[1], hdr, 64, N, d[2])
        q.raw_desc(d[2], resp + 64, 64, W)
    elif name == "next_to_self":
        q.raw_desc(d[0], hdr, 64, N, d[0])
    elif name == "indirect_entry_next_out_of_range":
        tbl = q.alloc_desc_table([(hdr, 64, N, 7), (resp, 128, W, 0)])
        q.raw_desc(d[0], tbl, 2 * DESC_SIZE, I)
    elif name == "indirect_entry_outside":
        tbl = q.alloc_desc_table([(hdr, 64, N, 1), (mem.unmapped_gpa(), 128, W, 0)])
        q.raw_desc(d[0], tbl, 2 * DESC_SIZE, I)
    elif name == "indirect_not_at_head":
        tbl = q.alloc_desc_table([(resp, 128, W, 0)])
        q.raw_desc(d[0], hdr, 64, N, d[1])
        q.raw_desc(d[1], tbl, DESC_SIZE, I)
    else:
        raise AssertionError(name)
    q.submit_raw(d[0], d, token=token)
    return token


CUSTOM = ["indirect_outside", "indirect_straddles_end", "indirect_overflows", "indirect_huge",
          "len_huge", "writable_outside", "writable_overflows", "write_then_read_then_write",
          "next_to_self", "indirect_entry_next_out_of_range", "indirect_entry_outside",
          "indirect_not_at_head"]


def filled(g: Guest, queue: int, n: int, byte: int = 0x77) -> tuple[int, int]:
    """A guest buffer of ``n`` bytes set to ``byte`` (to see whether the device wrote it)."""
    gpa = g.queues[queue].raw_alloc(max(n, 1))
    g.mem.fill(gpa, max(n, 1), byte)
    return gpa, n


def submit_bad(g: Guest, queue: int, name: str):
    if name in HOSTILE:
        getattr(g.queues[queue].hostile, name)()
        return ("hostile", name)
    return custom_chain(g, queue, name)


# =========================================================================== request queue

@pytest.mark.parametrize("name", HOSTILE + CUSTOM)
def test_malformed_chain_fails_only_its_request(daemon, baseline, name):
    g = Guest(daemon)
    try:
        mark = daemon.mark()
        token = submit_bad(g, 2, name)
        g.kick(2)
        c = g.wait_token(token, 2)
        assert c.len == 0
        rec = daemon.wait_since(mark, "bad_descriptor_chain", queue=0)
        assert rec.get("reason")
        # The queue goes on: the next request (and a second bad one, and another good one).
        assert g.command(vs.test_unit_ready()).response.ok
        token = submit_bad(g, 2, name)
        h = g.submit(vs.inquiry(alloc_len=36), data_in_len=36)
        assert g.wait(h).response.ok
        assert g.wait_token(token, 2).len == 0
        assert not daemon.since(mark, "ring_broken")
        # The other request queue was never disturbed.
        assert g.command(vs.test_unit_ready(), queue=3).response.ok
    finally:
        g.close_and_wait()


def test_indirect_table_longer_than_the_queue(daemon, baseline):
    """Linux builds those (seg_max > queue size): bounded by the table, never an overrun."""
    g = Guest(daemon)
    try:
        g.queues[2].hostile.indirect_longer_than_queue()
        g.kick(2)
        assert g.wait_token(("hostile", "indirect_longer_than_queue"), 2).len == 0
        assert g.command(vs.test_unit_ready()).response.ok
    finally:
        g.close_and_wait()


def _header(cdb: bytes = vs.test_unit_ready(), cdb_size: int = 32) -> bytes:
    return vs.encode_cmd_req(0, 1, cdb, cdb_size=cdb_size)


@pytest.mark.parametrize("out_len", [0, 1, 18, 19, 50])
def test_header_shorter_than_the_virtio_scsi_header(daemon, baseline, out_len):
    g = Guest(daemon)
    try:
        mark = daemon.mark()
        q = g.queues[2]
        out = [_header()[:out_len]] if out_len else []
        q.add(out, [108], token="short-header", publish=True)
        g.kick(2)
        c = g.wait_token("short-header")
        assert c.len == 12
        assert vs.parse_cmd_resp(c.in_data[0]).response == vs.VIRTIO_SCSI_S_FAILURE
        daemon.wait_since(mark, "request_too_short")
        assert g.command(vs.test_unit_ready()).response.ok
    finally:
        g.close_and_wait()


@pytest.mark.parametrize("in_len,expect_len", [(0, 0), (1, 0), (11, 0), (12, 12), (64, 12),
                                              (107, 12)])
def test_response_buffer_shorter_than_the_response(daemon, baseline, in_len, expect_len):
    """FAILURE when the writable part can hold a response header, else length 0 and
    the buffer untouched."""
    g = Guest(daemon)
    try:
        mark = daemon.mark()
        q = g.queues[2]
        buf = filled(g, 2, in_len)
        q.add([_header(vs.read10(0, 1))], [buf] if in_len else [], token="short-resp",
              publish=True)
        g.kick(2)
        c = g.wait_token("short-resp")
        assert c.len == expect_len
        data = g.mem.read(buf[0], in_len)
        if expect_len:
            r = vs.parse_cmd_resp(data + bytes(108))
            assert r.response == vs.VIRTIO_SCSI_S_FAILURE
            assert data[12:] == b"\x77" * (in_len - 12)
        else:
            assert data == b"\x77" * in_len
        daemon.wait_since(mark, "request_too_short")
        assert g.command(vs.test_unit_ready()).response.ok
    finally:
        g.close_and_wait()


def _broken_ring(g: Guest, queue: int, how: str) -> None:
    q = g.queues[queue]
    if how == "head_out_of_range":
        q.hostile.head_out_of_range()
    elif how == "head_0xffff":
        q.submit_raw(0xFFFF, ())
    elif how == "avail_jump":
        q.hostile.avail_idx_jump()
    elif how == "avail_jump_half":
        q.hostile.avail_idx_jump(0x8000)
    elif how == "avail_backwards":
        q.hostile.avail_idx_jump(0xFFFF)
    else:
        raise AssertionError(how)
    g.kick(queue)


BROKEN = ["head_out_of_range", "head_0xffff", "avail_jump", "avail_jump_half", "avail_backwards"]


@pytest.mark.parametrize("how", BROKEN)
def test_broken_request_ring_stops_only_that_queue(daemon, baseline, how):
    g = Guest(daemon, err=True)
    try:
        assert g.command(vs.test_unit_ready()).response.ok
        mark = daemon.mark()
        _broken_ring(g, 2, how)
        assert daemon.wait_since(mark, "ring_broken", queue=0).get("reason")
        rec = daemon.wait_since(mark, "ring_needs_reset", conn=g.conn, ring=2)
        assert rec.get("reason")
        assert g.err_signalled(2), "the ring's error eventfd was not signalled"
        assert g.fe.get(Request.GET_STATUS).payload.value & 0x40    # DEVICE_NEEDS_RESET
        # The queue is stopped: a good request there is not served...
        h = g.submit(vs.test_unit_ready())
        assert g.nothing_completes(2)
        # ...but the other request queue and the control queue are.
        payload = os.urandom(4096)
        assert g.command(vs.write10(8, 8), queue=3, data_out=payload).response.ok
        assert g.command(vs.read10(8, 8), queue=3, data_in_len=4096).data_in == payload
        assert g.tmf().response == vs.VIRTIO_SCSI_S_OK
        # Stopping the broken ring answers at once.
        g.fe.get_vring_base(2)
        assert not h.done
    finally:
        g.close_and_wait()


def test_err_eventfd_given_before_the_kick_is_signalled(daemon, baseline):
    g = Guest(daemon, err=True, err_before_kick=True)
    try:
        mark = daemon.mark()
        _broken_ring(g, 2, "avail_jump")
        daemon.wait_since(mark, "ring_needs_reset", conn=g.conn, ring=2)
        assert g.err_signalled(2)
    finally:
        g.close_and_wait()


# =========================================================================== control queue

@pytest.mark.parametrize("name", HOSTILE + CUSTOM + ["indirect_longer_than_queue"])
def test_malformed_control_chain_fails_only_its_request(daemon, baseline, name):
    g = Guest(daemon)
    try:
        mark = daemon.mark()
        if name == "indirect_longer_than_queue":
            g.queues[0].hostile.indirect_longer_than_queue()
            token = ("hostile", name)
        else:
            token = submit_bad(g, 0, name)
        g.kick(0)
        assert g.wait_token(token, 0).len == 0
        if name != "indirect_longer_than_queue":
            assert daemon.wait_since(mark, "bad_descriptor_chain", conn=g.conn, vq=0).get("reason")
        assert g.tmf().response == vs.VIRTIO_SCSI_S_OK
        # The LOGICAL UNIT RESET left a POWER ON, RESET unit attention, reported once.
        si = g.command(vs.test_unit_ready()).response.sense_key()
        assert si is not None and (si.key, si.asc, si.ascq) == (6, 0x29, 0)
        assert g.command(vs.test_unit_ready()).response.ok
        assert not daemon.since(mark, "ring_broken")
    finally:
        g.close_and_wait()


@pytest.mark.parametrize("req,in_len", [(b"", 1), (b"\0\0", 1), (struct.pack("<I", 0), 1),
                                        (vs.encode_tmf_req(0, 0, 1)[:20], 1),
                                        (vs.encode_tmf_req(0, 0, 1), 0),
                                        (vs.encode_an_req(1, 0, 0)[:10], 5),
                                        (vs.encode_an_req(1, 0, 0), 4),
                                        (struct.pack("<I", 7) + bytes(20), 8),
                                        (struct.pack("<I", 0xFFFF_FFFF) + bytes(20), 8)])
def test_short_or_unknown_control_requests(daemon, baseline, req, in_len):
    g = Guest(daemon)
    try:
        q = g.queues[0]
        buf = filled(g, 0, in_len)
        q.add([req] if req else [], [buf] if in_len else [], token="ctl", publish=True)
        g.kick(0)
        c = g.wait_token("ctl", 0)
        assert c.len == 0
        assert g.mem.read(buf[0], in_len) == b"\x77" * in_len
        assert g.tmf().response == vs.VIRTIO_SCSI_S_OK
    finally:
        g.close_and_wait()


@pytest.mark.parametrize("how", BROKEN)
def test_broken_control_ring_is_contained(daemon, baseline, how):
    g = Guest(daemon, err=True)
    try:
        mark = daemon.mark()
        _broken_ring(g, 0, how)
        assert daemon.wait_since(mark, "ring_broken", conn=g.conn, vq=0).get("reason")
        payload = os.urandom(512)
        for qi in (2, 3):
            assert g.command(vs.write10(qi, 1), queue=qi, data_out=payload).response.ok
            assert g.command(vs.read10(qi, 1), queue=qi, data_in_len=512).data_in == payload
        g.kick(0)          # more kicks on the broken ring change nothing
        g.fe.get_vring_base(0)
    finally:
        g.close_and_wait()


def test_broken_control_ring_signals_err_and_needs_reset(daemon, baseline):
    g = Guest(daemon, err=True)
    try:
        mark = daemon.mark()
        _broken_ring(g, 0, "avail_jump")
        daemon.wait_since(mark, "ring_broken", conn=g.conn, vq=0)
        assert g.err_signalled(0)
        assert g.fe.get(Request.GET_STATUS).payload.value & 0x40
    finally:
        g.close_and_wait()


# =========================================================================== guard regions

def test_nothing_outside_the_guest_regions_is_touched(daemon, baseline):
    """Regions with a gap between them, each at a non-zero offset in its memfd (the bytes
    before it are mapped by the daemon but are not guest memory), plus a canary region
    the driver never uses. Every hostile access below is refused; afterwards every
    canary byte is as it was and the disk holds none of them."""
    mib = 1 << 20
    off = 8192
    canary_gpa, canary_size = 8 * mib, 64 << 10
    mem = FrontendMemory(regions=[(0, 4 * mib, off), (canary_gpa, canary_size, off)])
    tails = []
    for r in mem.regions:   # bytes past each region's end in its memfd
        os.ftruncate(r.fd, off + r.size + 8192)
        os.pwrite(r.fd, b"\x5a" * 8192, off + r.size)
        tails.append(off + r.size)
    main, canary = mem.regions
    canary.view[:] = b"\xc3" * canary_size
    tail_gpa = main.end - 4096
    main_tail = bytes(mem.read(tail_gpa, 4096))
    g = Guest(daemon, mem=mem)
    before_image = daemon.image.read_bytes()[:1 << 20]
    try:
        q = g.queues[2]
        hdr_read = vs.encode_cmd_req(0, 1, vs.read10(0, 8))
        hdr_write = vs.encode_cmd_req(0, 2, vs.write10(0, 8))
        chains = {
            # writable buffers that run off the end of a region (into the gap / past the end)
            "resp_straddles_main_end": ([hdr_read], [(main.end - 64, 4096)]),
            "resp_straddles_canary_end": ([hdr_read], [(canary.end - 16, 108 + 4096)]),
            "resp_in_gap": ([hdr_read], [(main.end + 4096, 108 + 4096)]),
            "resp_before_canary": ([hdr_read], [(canary.gpa - 16, 108 + 4096)]),
            "data_in_straddles": ([hdr_read], [108, (canary.end - 100, 4096)]),
            # a well-placed writable buffer in a chain that is malformed afterwards
            "good_resp_then_out_of_range": None,
            "good_resp_then_readable": None,
            # data-out that would read outside the regions
            "data_out_straddles": ([hdr_write, (main.end - 100, 4096)], [108]),
            "data_out_before_canary": ([hdr_write, (canary.gpa - 2048, 4096)], [108]),
            "data_out_in_gap": ([hdr_write, (main.end, 4096)], [108]),
        }
        tokens = []
        for name, spec in chains.items():
            if spec is None:
                d = q.reserve(2)
                q.raw_desc(d[0], canary.gpa + 256, 108 + 4096, W | N, d[1])
                if name == "good_resp_then_out_of_range":
                    q.raw_desc(d[1], canary.gpa + 8192, 64, W | N, q.size + 3)
                else:
                    q.raw_desc(d[1], canary.gpa + 8192, 64, 0)
                q.submit_raw(d[0], d, token=name, publish=False)
            else:
                q.add(spec[0], spec[1], token=name)
            tokens.append(name)
        # an indirect table that straddles the end of the canary region
        d = q.reserve(1)
        q.raw_desc(d[0], canary.end - 2 * DESC_SIZE, 4 * DESC_SIZE, I)
        q.submit_raw(d[0], d, token="indirect_straddles", publish=False)
        tokens.append("indirect_straddles")
        q.publish()
        g.kick(2)
        for t in tokens:
            assert g.wait_token(t, 2).len == 0, t
        # the control queue too
        q0 = g.queues[0]
        q0.add([vs.encode_tmf_req(5, 0, 1)], [(canary.end - 1, 2)], token="tmf_straddles",
               publish=True)
        q0.add([(main.end - 8, 24)], [1], token="tmf_req_straddles", publish=True)
        g.kick(0)
        assert g.wait_token("tmf_straddles", 0).len == 0
        assert g.wait_token("tmf_req_straddles", 0).len == 0
        # good I/O still works, in both regions
        payload = os.urandom(4096)
        assert g.command(vs.write10(16, 8), data_out=payload).response.ok
        assert g.command(vs.read10(16, 8), data_in_len=4096).data_in == payload
        assert g.tmf().response == vs.VIRTIO_SCSI_S_OK
    finally:
        g.close_and_wait()
    try:
        assert bytes(canary.view) == b"\xc3" * canary_size, "the canary region was written"
        assert bytes(main.view[-4096:]) == main_tail, "bytes at the end of a region were written"
        for r, tail in zip(mem.regions, tails):
            assert os.pread(r.fd, off, 0) == bytes([POISON]) * off, "bytes before a region changed"
            assert os.pread(r.fd, 8192, tail) == b"\x5a" * 8192, "bytes after a region changed"
        image = daemon.image.read_bytes()[:1 << 20]
        changed = image[:16 * 512] + image[24 * 512:]
        assert changed == before_image[:16 * 512] + before_image[24 * 512:]
        assert b"\xc3" * 16 not in image and bytes([POISON]) * 16 not in image
        assert b"\x5a" * 16 not in image
    finally:
        mem.close()
