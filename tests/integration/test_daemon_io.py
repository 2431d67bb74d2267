"""A real vscsid (supervisor + workers) driven by the Python front end over its socket,
with real memfd guest memory and eventfds."""
from __future__ import annotations

import os
import struct

import pytest

from tests.support.scsi import clear_unit_attentions
from tests.wait import WAIT
from vscsid.bench import virtio_scsi as vs
from vscsid.bench.driverq import DriverQueue
from vscsid.bench.frontend import Nack, VhostUserFrontend
from vscsid.bench.guestmem import FrontendMemory

pytestmark = pytest.mark.timeout(120)


class Guest:
    """Memory + front end + the control, event and request queues."""

    def __init__(self, daemon, *, queues=1, size=128, mem_size=64 << 20, event_idx=True,
                 regions=1, clear_ua=True):
        self.mem = FrontendMemory(mem_size, regions=regions)
        self.fe = VhostUserFrontend(daemon.socket_path)
        # VERSION_1, INDIRECT_DESC, PROTOCOL_FEATURES; EVENT_IDX, HOTPLUG and CHANGE
        # (LUN events) unless event_idx=False asks for the bare minimum.
        feats = (1 << 32) | (1 << 28) | (1 << 30)
        if event_idx:
            feats |= (1 << 29) | (1 << 1) | (1 << 2)
        self.fe.negotiate(features=feats)
        self.fe.set_mem_table(self.mem)
        self.queues = {}
        for index in [0, 1] + [2 + i for i in range(queues)]:
            q = DriverQueue(self.mem, size, event_idx=self.fe.event_idx)
            self.fe.setup_queue(index, q)
            self.queues[index] = q
        self.builders = {i: vs.ScsiRequestBuilder(q, self.mem) for i, q in self.queues.items()}
        if clear_ua:
            # Every LUN of a new front end reports POWER ON, RESET first.
            clear_unit_attentions(self.command)

    def command(self, cdb, *, lun=0, queue=2, data_out=None, data_in_len=0, timeout=WAIT, **kw):
        b = self.builders[queue]
        q = self.queues[queue]
        h = b.command(cdb, lun=lun, data_out=data_out, data_in_len=data_in_len, publish=True, **kw)
        if q.kick_needed():
            q.kick()
        return self.wait(h, queue, timeout)

    def wait(self, h, queue=2, timeout=WAIT):
        b = self.builders[queue]
        q = self.queues[queue]
        while not h.done:
            b.reap()
            if h.done:
                break
            assert q.wait_used(timeout), "no completion signalled"
        return h

    def close(self):
        self.fe.close()
        self.mem.close()


@pytest.fixture
def guest_factory():
    made = []

    def make(daemon, **kw):
        g = Guest(daemon, **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def test_inquiry_capacity_read_write(start_daemon, make_image, guest_factory):
    img = make_image(size=32 << 20)
    d = start_daemon("--lun", str(img))
    g = guest_factory(d)
    h = g.command(vs.inquiry(alloc_len=96), data_in_len=96)
    assert h.response.response == vs.VIRTIO_SCSI_S_OK and h.response.status == 0
    assert h.data_in[8:16] == b"VSCSID  "
    h = g.command(vs.read_capacity16(), data_in_len=32)
    last_lba, block = struct.unpack(">QI", h.data_in[:12])
    assert (last_lba + 1) * block == 32 << 20 and block == 512
    payload = os.urandom(64 * 1024)
    h = g.command(vs.write10(2048, len(payload) // 512), data_out=payload)
    assert h.response.status == 0 and h.response.residual == 0
    with open(img, "rb") as f:
        f.seek(2048 * 512)
        assert f.read(len(payload)) == payload
    h = g.command(vs.read10(2048, len(payload) // 512), data_in_len=len(payload), data_seg=4096 + 7)
    assert h.response.status == 0 and h.data_in == payload


def test_out_of_range_and_bad_target(start_daemon, make_image, guest_factory):
    img = make_image(size=1 << 20)
    d = start_daemon("--lun", str(img))
    g = guest_factory(d)
    h = g.command(vs.read10(4096, 1), data_in_len=512)
    assert h.response.status == 2
    sense = vs.parse_sense(h.response.sense)
    assert (sense.key, sense.asc, sense.ascq) == (0x5, 0x21, 0x00)
    h = g.command(vs.test_unit_ready(), target=3)
    assert h.response.response == vs.VIRTIO_SCSI_S_BAD_TARGET


def test_readonly_lun_refuses_writes(start_daemon, make_image, guest_factory):
    img = make_image(size=1 << 20)
    d = start_daemon("--lun", f"{img},ro")
    g = guest_factory(d)
    h = g.command(vs.write10(0, 1), data_out=b"x" * 512)
    sense = vs.parse_sense(h.response.sense)
    assert h.response.status == 2 and sense.key == 0x7 and sense.asc == 0x27
    assert open(img, "rb").read(512) == b"\0" * 512


def test_two_luns_and_report_luns(start_daemon, make_image, guest_factory):
    a, b = make_image("a.img", 1 << 20), make_image("b.img", 2 << 20)
    d = start_daemon("--lun", str(a), "--lun", str(b))
    g = guest_factory(d)
    h = g.command(vs.report_luns(alloc_len=64), data_in_len=64)
    assert h.response.status == 0
    assert struct.unpack(">I", h.data_in[:4])[0] == 16
    h = g.command(vs.read_capacity16(), lun=1, data_in_len=32)
    assert struct.unpack(">Q", h.data_in[:8])[0] + 1 == (2 << 20) // 512
    # Linux's REPORT LUNS well-known LUN form: lun[2]=0xC1, lun[3]=0x01
    h = g.command(vs.report_luns(alloc_len=64), lun=bytes([1, 0, 0xC1, 0x01, 0, 0, 0, 0]),
                  data_in_len=64)
    assert h.response.status == 0 and struct.unpack(">I", h.data_in[:4])[0] == 16


def test_multiqueue_workers_serve_their_own_rings(start_daemon, make_image, guest_factory):
    img = make_image(size=8 << 20)
    d = start_daemon("--lun", str(img), "--num-queues", "3")
    pids = d.worker_pids()
    assert len(set(pids)) == 3
    g = guest_factory(d, queues=3)
    for qi in (2, 3, 4):
        data = bytes([qi]) * 4096
        h = g.command(vs.write10(qi * 8, 8), queue=qi, data_out=data)
        assert h.response.status == 0
        h = g.command(vs.read10(qi * 8, 8), queue=qi, data_in_len=4096)
        assert h.data_in == data
    started = d.events("ring_started")
    assert {r.get("queue") for r in started if r.get("queue") is not None} == {0, 1, 2}


def test_get_vring_base_returns_next_avail_index(start_daemon, make_image, guest_factory):
    img = make_image(size=1 << 20)
    d = start_daemon("--lun", str(img))
    g = guest_factory(d)
    before = g.queues[2].avail_idx            # (the unit attentions were cleared)
    for _ in range(5):
        assert g.command(vs.test_unit_ready()).response.status == 0
    assert g.fe.get_vring_base(2) == before + 5
    assert g.fe.get_vring_base(0) == 0


def test_control_queue_tmf_and_an(start_daemon, make_image, guest_factory):
    img = make_image(size=1 << 20)
    d = start_daemon("--lun", str(img))
    g = guest_factory(d)
    b = g.builders[0]
    q = g.queues[0]
    cases = [(vs.VIRTIO_SCSI_T_TMF_ABORT_TASK, 0, vs.VIRTIO_SCSI_S_OK), (vs.VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, 0, vs.VIRTIO_SCSI_S_OK),
             (vs.VIRTIO_SCSI_T_TMF_QUERY_TASK, 0, vs.VIRTIO_SCSI_S_OK), (vs.VIRTIO_SCSI_T_TMF_CLEAR_ACA, 0, vs.VIRTIO_SCSI_S_FUNCTION_REJECTED),
             (vs.VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET, 0, vs.VIRTIO_SCSI_S_OK), (vs.VIRTIO_SCSI_T_TMF_ABORT_TASK, 9, vs.VIRTIO_SCSI_S_BAD_TARGET)]
    for subtype, lun, expected in cases:
        h = b.tmf(subtype, lun=lun, tag=77, publish=True)
        q.kick()
        g.wait(h, queue=0)
        assert h.response == expected, (subtype, h.response)
    h = b.an(vs.VIRTIO_SCSI_T_AN_QUERY, 0xFFFF, lun=0, publish=True)
    q.kick()
    g.wait(h, queue=0)
    assert (h.event_actual, h.response) == (0, vs.VIRTIO_SCSI_S_OK)


def test_config_space(start_daemon, make_image, guest_factory):
    img = make_image(size=1 << 20)
    d = start_daemon("--lun", str(img), "--num-queues", "2", "--queue-size", "256")
    g = guest_factory(d, queues=2)
    cfg = struct.unpack("<IIIIIIIHHI", g.fe.get_config(0, 36))
    assert cfg == (2, 254, 0xFFFF, 128, 16, 96, 32, 0, 0, 255)
    with pytest.raises(Nack):
        g.fe.set_config(0, struct.pack("<I", 9))
    assert g.fe.queue_num == 4


def test_reconnect_after_disconnect(start_daemon, make_image, guest_factory):
    img = make_image(size=1 << 20)
    d = start_daemon("--lun", str(img))
    g = guest_factory(d)
    g.command(vs.write10(1, 1), data_out=b"A" * 512)
    g.close()
    d.wait_for_log("session_closed")
    g2 = guest_factory(d)
    h = g2.command(vs.read10(1, 1), data_in_len=512)
    assert h.data_in == b"A" * 512


def test_next_front_end_waits_for_the_previous_session_to_close(start_daemon, guest_factory):
    # A VM that restarts at once connects while the previous session is still being
    # torn down (here: draining a request that takes half a second): it is served,
    # not refused.
    d = start_daemon("--lun", "null:64M,delay_us=500000")
    first = guest_factory(d)
    b, q = first.builders[2], first.queues[2]
    b.command(vs.read10(0, 8), data_in_len=4096)
    q.kick()
    from tests.wait import wait_for

    wait_for(lambda: q.avail_event() == q.avail_idx, what="the request to be popped")
    first.close()
    second = guest_factory(d)
    h = second.command(vs.test_unit_ready())
    assert h.response.ok and h.response.status == 0
    assert not d.events("connection_refused")
