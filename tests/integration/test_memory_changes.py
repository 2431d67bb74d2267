"""Memory-table changes while rings run: SET_MEM_TABLE replacement and
ADD_MEM_REG / REM_MEM_REG (CONFIGURE_MEM_SLOTS) reach every worker safely."""
from __future__ import annotations

import os

import pytest

from tests.support.scsi import clear_unit_attentions
from tests.wait import WAIT
from vscsid.bench import virtio_scsi as vs
from vscsid.bench.driverq import DriverQueue
from vscsid.bench.frontend import VhostUserFrontend
from vscsid.bench.guestmem import FrontendMemory
from vscsid.vhost.protocol import (
    MemoryRegion, MemRegionMsg, ProtocolFeature, Request, feature_mask,
)

pytestmark = pytest.mark.timeout(120)

PROTO = feature_mask(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG,
                     ProtocolFeature.CONFIGURE_MEM_SLOTS)


def region_msg(r):
    return MemRegionMsg(MemoryRegion(r.gpa, r.size, r.user_addr, r.mmap_offset))


def wait(b, q, h, timeout=WAIT):
    while not h.done:
        b.reap()
        if not h.done:
            assert q.wait_used(timeout)
    return h


def _runner(b, q):
    def run(cdb, **kw):
        h = b.command(cdb, **kw)
        q.kick()
        wait(b, q, h)
        return h
    return run


def test_add_and_remove_regions_while_running(start_daemon, make_image):
    img = make_image(size=8 << 20)
    d = start_daemon("--lun", str(img), "--num-queues", "2")
    mem = FrontendMemory(regions=[(0, 16 << 20), (1 << 32, 16 << 20)])
    fe = VhostUserFrontend(d.socket_path)
    try:
        fe.negotiate(protocol=PROTO)
        assert fe.protocol_features & (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
        slots = fe.get(Request.GET_MAX_MEM_SLOTS).payload.value
        assert slots >= 8
        low, high = mem.regions
        fe.request(Request.ADD_MEM_REG, region_msg(low), [low.fd])
        queues = {}
        for index in range(4):
            q = DriverQueue(mem, 64, event_idx=fe.event_idx, region=0)
            fe.setup_queue(index, q)
            queues[index] = q
        builders = {i: vs.ScsiRequestBuilder(q, mem) for i, q in queues.items()}
        clear_unit_attentions(_runner(builders[2], queues[2]))   # a new front end's POWER ON

        def io(queue, lba, data, region):
            b, q = builders[queue], queues[queue]
            buf = mem.alloc(len(data), 512, region=region)
            mem.write(buf, data)
            h = b.command(vs.write10(lba, len(data) // 512), data_out_sg=[(buf, len(data))])
            q.kick()
            wait(b, q, h)
            back = mem.alloc(len(data), 512, region=region)
            h2 = b.command(vs.read10(lba, len(data) // 512), data_in_sg=[(back, len(data))])
            q.kick()
            wait(b, q, h2)
            ok = (h.response.status, h2.response.status) == (0, 0) and mem.read(back, len(data)) == data
            mem.free(buf)
            mem.free(back)
            return ok

        data = os.urandom(8192)
        assert io(2, 0, data, region=0) and io(3, 64, data, region=0)
        # Hot-add the high region while both workers' rings run; use it at once.
        fe.request(Request.ADD_MEM_REG, region_msg(high), [high.fd])
        assert io(2, 128, data, region=1) and io(3, 192, data, region=1)
        # Remove it again: buffers there are now outside guest memory.
        fe.request(Request.REM_MEM_REG, region_msg(high))
        assert io(2, 256, data, region=0)
        b, q = builders[2], queues[2]
        stray = mem.alloc(4096, 512, region=1)
        h = b.command(vs.read10(0, 8), data_in_sg=[(stray, 4096)])
        q.kick()
        wait(b, q, h)
        assert h.written_len == 0          # failed as a bad chain, nothing written
        assert io(2, 300, data, region=0)
        gens = [r["generation"] for r in d.events("memory_table_set")]
        assert gens == [1, 2, 3]
        assert len(d.events("memory_mapped")) >= 2 * 3
    finally:
        fe.close()
        mem.close()


def test_set_mem_table_replacement_keeps_rings_running(start_daemon, make_image):
    img = make_image(size=8 << 20)
    d = start_daemon("--lun", str(img))
    mem = FrontendMemory(32 << 20)
    fe = VhostUserFrontend(d.socket_path)
    try:
        fe.negotiate()
        fe.set_mem_table(mem)
        queues = {i: DriverQueue(mem, 64, event_idx=fe.event_idx) for i in range(3)}
        for i, q in queues.items():
            fe.setup_queue(i, q)
        b, q = vs.ScsiRequestBuilder(queues[2], mem), queues[2]
        clear_unit_attentions(_runner(b, q))                     # a new front end's POWER ON
        for round_ in range(3):
            data = os.urandom(4096)
            h = b.command(vs.write10(8 * round_, 8), data_out=data)
            q.kick()
            wait(b, q, h)
            fe.set_mem_table(mem)          # same memory, new mapping, rings keep going
            h = b.command(vs.read10(8 * round_, 8), data_in_len=4096)
            q.kick()
            wait(b, q, h)
            assert h.data_in == data
        assert [r["generation"] for r in d.events("memory_table_set")] == [1, 2, 3, 4]
    finally:
        fe.close()
        mem.close()
