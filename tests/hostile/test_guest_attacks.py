"""A stateful, attacking guest: the findings of the data-plane review, each against a
real daemon. Nothing a guest does may crash, hang or stop a worker or the daemon:
after every attack the test checks that no worker died or was replaced.

1. a READ whose data-in buffer overlays the available ring (and its own header), so
   that every READ re-offers the same head: the ring is broken (NEEDS_RESET, err
   eventfd), the head is never served twice, completion bookkeeping stays bounded;
2. VERIFY(16) with BYTCHK=11b over the whole LUN: refused per the Block Limits VPD;
   a long command that is allowed (WRITE SAME over 1 GiB) runs in slices while
   other requests on its queue complete;
3. a head offered again while its asynchronous I/O is in flight: broken ring, the I/O
   completes once, the queue drains;
4. (io_uring submit accounting after a short io_uring_enter: tests/unit/test_engine_c.py)
5. nine memory regions (memory hotplug): every layer serves the slots it advertises;
6. a control-queue flood: log lines stay within the rate limit.
"""
from __future__ import annotations

import os
import struct
import time

import pytest

from vscsid.bench import virtio_scsi as vs
from vscsid.bench.frontend import VhostUserFrontend
from vscsid.bench.guestmem import FrontendMemory
from vscsid.vhost.protocol import MemoryRegion, MemRegionMsg, ProtocolFeature, Request, feature_mask
from vscsid.virtio.defs import VIRTQ_DESC_F_NEXT as N, VIRTQ_DESC_F_WRITE as W

from tests.wait import wait_for

from .harness import PROTOCOL, Guest, assert_tur_ok, check_serves

pytestmark = pytest.mark.timeout(120)

BS = 512
HDR = 19 + 32          # virtio_scsi_cmd_req with the default cdb_size
RESP = 12 + 96         # virtio_scsi_cmd_resp with the default sense_size
ENGINES = ["c", "python"]


def _intact(d):
    return d.workers(), len(d.worker_deaths())


def _sense(resp) -> tuple[int, int, int]:
    s = vs.parse_sense(resp.sense)
    return (s.key, s.asc, s.ascq)


# ----------------------------------------------------------------------------- 1


@pytest.mark.parametrize("engine", ENGINES)
def test_read_overlaying_the_avail_ring_cannot_feed_itself(make_daemon, engine):
    d = make_daemon("--engine", engine)
    workers, deaths = _intact(d)
    g = Guest(d, size=4, err=True)
    try:
        q = g.queues[2]
        avail = q.avail_addr
        hdr_gpa = avail + 256             # inside the READ's data-in window
        resp = q.raw_alloc(RESP)
        head = q.reserve(3)
        h = head[0]
        base_idx = q.avail_idx
        lba0 = 1000
        # Block lba0+k is what the k-th READ writes over [avail, avail+512): the
        # available ring with one more entry naming the same head, and its own
        # header asking for block lba0+k+1 next.
        window = bytearray(g.mem.read(avail, BS))
        with open(d.image, "r+b") as f:
            for k in range(1100):
                blk = bytearray(window)
                struct.pack_into("<H", blk, 2, (base_idx + 2 + k) & 0xFFFF)
                struct.pack_into("<H", blk, 4 + 2 * ((base_idx + 1 + k) & q.mask), h)
                blk[256:256 + HDR] = vs.encode_cmd_req(0, 7, vs.read10(lba0 + k + 1, 1))
                f.seek((lba0 + k) * BS)
                f.write(blk)
        g.mem.write(hdr_gpa, vs.encode_cmd_req(0, 7, vs.read10(lba0, 1)))
        q.raw_desc(head[0], hdr_gpa, HDR, N, head[1])
        q.raw_desc(head[1], resp, RESP, W | N, head[2])
        q.raw_desc(head[2], avail, BS, W)
        mark = d.mark()
        q.submit_raw(h, head, token="self-feeding")
        q.kick()
        rec = d.wait_since(mark, "ring_broken", timeout=30)
        assert g.err_signalled(2)
        if engine == "c":
            # The fast path serves the READ inside its pass: the head is offered again
            # before its completion was published, which breaks the ring. It was
            # served once: exactly one used entry was published.
            assert "offered twice" in rec["reason"], rec
            wait_for(lambda: q.used_idx() != base_idx, what="the first completion")
            assert q.used_idx() == (base_idx + 1) & 0xFFFF
        else:
            # The reference path serves it after the pass, whose completion is
            # published before the next pass pops: each re-offer is a new request,
            # served once, until the crafted blocks run out (block lba0+1100 is
            # zeros: its READ sets avail->idx to 0, a jump that breaks the ring).
            assert "jumped" in rec["reason"], rec
            assert q.used_idx() == (base_idx + 1101) & 0xFFFF
        assert q.read_used_elem(base_idx)[0] == h
        status = g.fe.get(Request.GET_STATUS).payload.value
        assert status & 0x40, f"DEVICE_NEEDS_RESET not set: {status:#x}"
    finally:
        g.close_and_wait()
    d.assert_workers_intact(workers, deaths, "self-feeding READ")
    check_serves(d)


# ----------------------------------------------------------------------------- 2


def verify16(lba: int, blocks: int, bytchk: int) -> bytes:
    return struct.pack(">BBQIBB", 0x8F, bytchk << 1, lba, blocks, 0, 0)


def write_same16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", 0x93, 0, lba, blocks, 0, 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_verify_of_the_whole_lun_is_refused_and_long_commands_are_sliced(make_daemon, engine):
    # A 64 GiB LUN (sparse): comparing all of it would take minutes.
    d = make_daemon("--engine", engine, "--lun", "null:64G", image_size=2 << 30)
    workers, deaths = _intact(d)
    g = Guest(d)
    try:
        blocks = (64 << 30) // BS
        pattern = bytes(BS)
        t0 = time.monotonic()
        h = g.command(verify16(0, blocks, 0b11), lun=1, data_out=pattern, timeout=10)
        assert h.response.status == 0x02 and _sense(h.response) == (0x05, 0x24, 0x00), h.response
        assert time.monotonic() - t0 < 5
        # The limit is the advertised MAXIMUM TRANSFER LENGTH (Block Limits VPD B0).
        vpd = g.command(vs.inquiry(evpd=True, page=0xB0, alloc_len=64), lun=1,
                        data_in_len=64).data_in
        max_transfer = struct.unpack_from(">I", vpd, 8)[0]
        h = g.command(verify16(0, max_transfer + 1, 0b11), lun=1, data_out=pattern)
        assert _sense(h.response) == (0x05, 0x24, 0x00), h.response
        h = g.command(verify16(0, max_transfer, 0b11), lun=1, data_out=pattern)
        assert h.response.ok and h.response.status == 0, h.response
        # WRITE SAME of 1 GiB (the advertised maximum) on the file LUN is allowed; it runs
        # in slices, so a READ queued behind it completes first.
        vpd = g.command(vs.inquiry(evpd=True, page=0xB0, alloc_len=64), lun=0,
                        data_in_len=64).data_in
        max_ws = struct.unpack_from(">Q", vpd, 36)[0]
        assert max_ws * BS == 1 << 30
        ws = g.submit(write_same16(0, max_ws), data_out=b"\xa5" * BS)
        rd = g.submit(vs.read10(0, 8), data_in_len=8 * BS)
        g.wait(rd, timeout=30)
        assert rd.response.ok and rd.response.status == 0
        assert not ws.done, "the READ waited for the whole WRITE SAME"
        g.wait(ws, timeout=60)
        assert ws.response.ok and ws.response.status == 0, ws.response
        with open(d.image, "rb") as f:
            f.seek((1 << 30) - BS)
            assert f.read(BS) == b"\xa5" * BS
    finally:
        g.close_and_wait()
    d.assert_workers_intact(workers, deaths, "VERIFY / WRITE SAME")


# ----------------------------------------------------------------------------- 3


@pytest.mark.parametrize("engine", ENGINES)
def test_head_offered_again_while_its_io_is_in_flight(make_daemon, engine):
    # LUN 1 completes every I/O after 300 ms (io_uring timers on the C engine,
    # the reference path's timers otherwise): the request stays in flight.
    d = make_daemon("--engine", engine, "--lun", "null:64M,delay_us=300000")
    workers, deaths = _intact(d)
    mem = FrontendMemory(8 << 20)
    g = Guest(d, err=True, mem=mem)
    try:
        q = g.queues[2]
        base_idx = q.avail_idx
        mark = d.mark()
        rd = g.submit(vs.read10(0, 8), lun=1, data_in_len=8 * BS)
        head = q.read_avail_entry(base_idx)
        # Popped (the device moved its avail_event past it): its I/O is in flight.
        wait_for(lambda: q.avail_event() == (base_idx + 1) & 0xFFFF, what="the pop")
        q.raw_avail([head, head, head], idx=base_idx + 4)
        q.kick()
        rec = d.wait_since(mark, "ring_broken", timeout=10)
        assert "offered twice" in rec["reason"], rec
        assert g.err_signalled(2)
        g.wait(rd, timeout=10)
        assert rd.response.ok and rd.response.status == 0
        g.close_and_wait()       # the ring stops: the drain must not hang
        # Everything the device will ever publish is published now: once.
        assert q.used_idx() == (base_idx + 1) & 0xFFFF, "a head was completed twice"
    finally:
        g.close()
        mem.close()
    d.assert_workers_intact(workers, deaths, "duplicate head in flight")
    check_serves(d)


# ----------------------------------------------------------------------------- 5


def test_nine_memory_regions_are_served(make_daemon):
    d = make_daemon(num_queues=2)
    workers, deaths = _intact(d)
    proto = PROTOCOL | feature_mask(ProtocolFeature.CONFIGURE_MEM_SLOTS)
    mem = FrontendMemory(regions=[(i << 30, 4 << 20) for i in range(9)])
    fe = VhostUserFrontend(d.socket_path, timeout=10)
    try:
        fe.negotiate(protocol=proto)
        slots = fe.get(Request.GET_MAX_MEM_SLOTS).payload.value
        assert slots >= 9
        for r in mem.regions:
            fe.request(Request.ADD_MEM_REG,
                       MemRegionMsg(MemoryRegion(r.gpa, r.size, r.user_addr, r.mmap_offset)), [r.fd])
        from vscsid.bench.driverq import DriverQueue

        queues = {}
        for index in range(4):
            q = DriverQueue(mem, 64, event_idx=fe.event_idx, region=8)   # rings in the 9th
            fe.setup_queue(index, q)
            queues[index] = q
        assert_tur_ok(queues[2], mem, "the new front end's unit attentions")
        for qi in (2, 3):
            b = vs.ScsiRequestBuilder(queues[qi], mem)
            for region in range(9):
                data = os.urandom(4096)
                buf = mem.alloc(4096, 512, region=region)
                mem.write(buf, data)
                h = b.command(vs.write10(8 * region, 8), data_out_sg=[(buf, 4096)])
                queues[qi].kick()
                while not h.done:
                    b.reap()
                    if not h.done:
                        assert queues[qi].wait_used(10)
                back = mem.alloc(4096, 512, region=(region + 1) % 9)
                h = b.command(vs.read10(8 * region, 8), data_in_sg=[(back, 4096)])
                queues[qi].kick()
                while not h.done:
                    b.reap()
                    if not h.done:
                        assert queues[qi].wait_used(10)
                assert h.response.ok and mem.read(back, 4096) == data
                mem.free(buf)
                mem.free(back)
    finally:
        fe.close()
        mem.close()
    d.assert_workers_intact(workers, deaths, "nine regions")
    check_serves(d)


# ----------------------------------------------------------------------------- 6


def test_control_queue_flood_is_rate_limited(tmp_path):
    from .harness import HostileDaemon

    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    # The production default: 10 lines per second and event, bursts of 100.
    d = HostileDaemon(tmp_path, ["--lun", str(img)], tmp_path / "s.sock", guest_log_rate=None)
    try:
        workers, deaths = _intact(d)
        g = Guest(d)
        t_start = time.monotonic()
        try:
            b = g.builders[0]
            q = g.queues[0]
            for _round in range(30):        # 2 descriptors each: 120 of the 128
                hs = [b.an(vs.VIRTIO_SCSI_T_AN_QUERY, 0x7E, publish=False) for _ in range(40)]
                hs += [b.tmf(vs.VIRTIO_SCSI_T_TMF_QUERY_TASK, tag=1, publish=False)
                       for _ in range(20)]
                q.publish()
                q.kick()
                for h in hs:
                    g.wait(h, 0)
            # The supervisor still answers its front end at once.
            t0 = time.monotonic()
            assert g.fe.get(Request.GET_FEATURES).payload.value
            assert time.monotonic() - t0 < 2
        finally:
            g.close_and_wait()
        an = d.since(0, "async_notification_request")
        tmf = d.since(0, "task_management")
        # 1200 queries and 600 TMFs: each kind is logged at most its burst (100) plus
        # the rate (10/s) over the run, the lines that get through carrying the
        # count of those suppressed.
        elapsed = time.monotonic() - t_start
        for lines, sent in ((an, 1200), (tmf, 600)):
            assert len(lines) <= 100 + 10 * (elapsed + 1), (len(lines), elapsed)
            assert len(lines) < sent
        assert sum(r.get("suppressed", 0) for r in an) + len(an) <= 1200
        d.assert_workers_intact(workers, deaths, "control-queue flood")
    finally:
        d.stop()
