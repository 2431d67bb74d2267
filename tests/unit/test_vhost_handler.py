"""The sans-IO vhost-user handler, in-process (h11-style): encoded messages in through
the codec, reply bytes out, and the calls the handler makes on the ring servers and
the device backend recorded by fakes. No socket, no daemon, no worker. Every
request kind of the codec's table is covered."""
from __future__ import annotations

import asyncio
import os

import pytest

from vscsid.vhost.device import DeviceState, Rejected
from vscsid.vhost.handler import VhostHandler
from vscsid.vhost.protocol import (
    REQUESTS, VHOST_USER_F_PROTOCOL_FEATURES, BackendCodec, ConfigPayload, Inflight,
    LogPayload, MemoryRegion, MemoryTable, MemRegionMsg, ProtocolFeature, Request, U64Payload,
    VringAddr, VringFile, VringState, encode_request,
)
from vscsid.vhost.rings import RingServer
from vscsid.virtio.defs import MAX_MEM_SLOTS, STATUS_NEEDS_RESET
from vscsid.virtio.inflight import queue_region_size
from vscsid.virtio_scsi.config import OFFERED_FEATURES, ScsiConfig, ScsiPersonality

MIB = 1 << 20


class NullLog:
    def __getattr__(self, name):
        return lambda *a, **k: None


class FakeRing(RingServer):
    def __init__(self, index: int, tracks_inflight: bool):
        self.index = index
        self.tracks_inflight = tracks_inflight
        self.calls: list = []
        self.next_avail = 0
        self.refuse = False

    async def start(self, ring, addrs, *, event_idx, inflight, recover, resume):
        if self.refuse:
            raise Rejected("refused")
        self.calls.append(("start", addrs, event_idx, inflight, recover, resume, ring.kick_fd))

    async def stop(self, ring):
        self.calls.append(("stop",))
        return self.next_avail

    async def kick_changed(self, ring):
        self.calls.append(("kick", ring.kick_fd))

    async def call_changed(self, ring):
        self.calls.append(("call", ring.call_fd))

    async def err_changed(self, ring):
        self.calls.append(("err", ring.err_fd))

    async def enabled_changed(self, ring):
        self.calls.append(("enable", ring.enabled))


class FakeBackend:
    def __init__(self, rings: int):
        self.rings = [FakeRing(i, tracks_inflight=i >= 2) for i in range(rings)]
        self.installed: list = []
        self.config_changes = 0
        self.memfds: list[int] = []
        self.closed: list[int] = []

    def ring_server(self, index):
        return self.rings[index]

    async def install_memory(self, mem):
        self.installed.append([s for s in mem.specs()])

    async def config_changed(self):
        self.config_changes += 1

    async def device_reset(self):
        self.resets = getattr(self, "resets", 0) + 1

    def memfd(self, name, size):
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        self.memfds.append(fd)
        return fd

    def close_fd(self, fd):
        self.closed.append(fd)
        os.close(fd)


class Rig:
    """A handler, a codec in front of it, and the fakes behind it."""

    def __init__(self, queues: int = 1):
        self.backend = FakeBackend(2 + queues)
        self.device = DeviceState(
            personality=ScsiPersonality(ScsiConfig(num_queues=queues, seg_max=126)),
            max_queue_size=128)
        self.handler = VhostHandler(self.device, self.backend, NullLog())
        self.codec = BackendCodec()
        self.loop = asyncio.new_event_loop()

    def send(self, request, payload=b"", fds=(), need_reply=False) -> list[tuple[bytes, list]]:
        self.codec.feed(encode_request(request, payload, need_reply=need_reply), list(fds))
        msg = self.codec.next_message()
        assert msg is not None
        return self.loop.run_until_complete(self.handler.handle(msg))

    def one(self, *a, **k) -> bytes:
        replies = self.send(*a, **k)
        assert len(replies) == 1, replies
        assert not replies[0][1]
        return replies[0][0]

    def none(self, *a, **k) -> None:
        assert self.send(*a, **k) == []

    def ack(self, request, payload=b"", fds=()) -> int:
        data = self.one(request, payload, fds, need_reply=True)
        return int.from_bytes(data[12:20], "little")

    def negotiate(self, reply_ack: bool = True) -> None:
        self.none(Request.SET_FEATURES, U64Payload(OFFERED_FEATURES))
        proto = (1 << ProtocolFeature.REPLY_ACK) if reply_ack else 0
        self.none(Request.SET_PROTOCOL_FEATURES, U64Payload(proto | (1 << ProtocolFeature.MQ)))

    def close(self) -> None:
        self.loop.run_until_complete(self.handler.close())
        self.loop.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def memfd(size=4 * MIB) -> int:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


UVA = 0x7F00_0000_0000


def table(size=4 * MIB, gpa=0, uva=UVA) -> MemoryTable:
    return MemoryTable((MemoryRegion(gpa, size, uva, 0),))


def u64(data: bytes) -> int:
    return int.from_bytes(data[12:20], "little")


def reply(request, payload) -> bytes:
    return BackendCodec.encode_reply(request, payload)


# ----------------------------------------------------------------------------- features, owner

def test_get_features(rig):
    assert rig.one(Request.GET_FEATURES) == reply(Request.GET_FEATURES, U64Payload(OFFERED_FEATURES))


def test_set_features_ignores_bits_not_offered(rig):
    rig.none(Request.SET_FEATURES, U64Payload(OFFERED_FEATURES | (1 << 3)))
    assert rig.device.acked_features == OFFERED_FEATURES


def test_protocol_features(rig):
    data = rig.one(Request.GET_PROTOCOL_FEATURES)
    offered = u64(data)
    assert offered & (1 << ProtocolFeature.REPLY_ACK) and offered & (1 << ProtocolFeature.MQ)
    rig.none(Request.SET_PROTOCOL_FEATURES, U64Payload(1 << ProtocolFeature.REPLY_ACK))
    assert rig.device.has_protocol(ProtocolFeature.REPLY_ACK)
    # One not offered: refused (a failed REPLY_ACK now that it is negotiated).
    assert rig.ack(Request.SET_PROTOCOL_FEATURES, U64Payload(1 << ProtocolFeature.LOG_SHMFD)) != 0


def test_reply_ack_policy(rig):
    # Without REPLY_ACK negotiated, need_reply on a reply-less request gets nothing.
    assert rig.send(Request.SET_OWNER, need_reply=True) == []
    rig.negotiate()
    assert rig.ack(Request.SET_OWNER) == 0
    assert rig.device.owner


def test_reset_owner_and_reset_device(rig):
    rig.negotiate()
    rig.none(Request.SET_STATUS, U64Payload(0x0F))
    rig.none(Request.RESET_OWNER)
    assert rig.device.status == 0 and rig.device.acked_features == 0
    rig.none(Request.SET_STATUS, U64Payload(0x0F))
    changes = rig.backend.config_changes
    rig.none(Request.RESET_DEVICE)
    assert rig.device.status == 0 and rig.backend.config_changes == changes + 1


def test_queue_num_status(rig):
    assert u64(rig.one(Request.GET_QUEUE_NUM)) == 3
    rig.negotiate()
    assert rig.ack(Request.SET_STATUS, U64Payload(0x0B)) == 0
    assert u64(rig.one(Request.GET_STATUS)) == 0x0B
    assert rig.ack(Request.SET_STATUS, U64Payload(0x100)) != 0


# ----------------------------------------------------------------------------- config space

def test_get_and_set_config(rig):
    data = rig.one(Request.GET_CONFIG, ConfigPayload(20, 8, 0, bytes(8)))
    assert data == reply(Request.GET_CONFIG, ConfigPayload(20, 8, 0, (96).to_bytes(4, "little")
                                                           + (32).to_bytes(4, "little")))
    rig.negotiate()
    assert rig.ack(Request.SET_CONFIG, ConfigPayload(20, 8, 0, (64).to_bytes(4, "little")
                                                     + (16).to_bytes(4, "little"))) == 0
    assert rig.backend.config_changes == 1
    # A read-only field, and a read outside the space (its own reply, zero size).
    assert rig.ack(Request.SET_CONFIG, ConfigPayload(0, 4, 0, bytes(4))) != 0
    assert rig.one(Request.GET_CONFIG, ConfigPayload(30, 10, 0, bytes(10))) == \
        reply(Request.GET_CONFIG, ConfigPayload(30, 0, 0, b""))


# ----------------------------------------------------------------------------- memory

def test_set_mem_table_installs_and_replaces(rig):
    rig.negotiate()
    fd = memfd()
    assert rig.ack(Request.SET_MEM_TABLE, table(), [fd]) == 0
    assert [s.memory_size for s in rig.backend.installed[-1]] == [4 * MIB]
    fd2 = memfd(8 * MIB)
    assert rig.ack(Request.SET_MEM_TABLE, table(8 * MIB), [fd2]) == 0
    assert rig.handler.mem.regions[0].size == 8 * MIB
    # The old table's fd was closed with it; a bad table (a region larger than its
    # file) is refused and its fds closed.
    assert fd in rig.backend.closed and fd2 not in rig.backend.closed
    fd3 = memfd(MIB)
    assert rig.ack(Request.SET_MEM_TABLE, table(4 * MIB), [fd3]) != 0
    assert fd3 in rig.backend.closed


def test_mem_slots(rig):
    rig.negotiate()
    assert u64(rig.one(Request.GET_MAX_MEM_SLOTS)) == MAX_MEM_SLOTS
    a, b = memfd(), memfd()
    assert rig.ack(Request.ADD_MEM_REG, MemRegionMsg(MemoryRegion(0, 4 * MIB, UVA, 0)), [a]) == 0
    assert rig.ack(Request.ADD_MEM_REG,
                   MemRegionMsg(MemoryRegion(1 << 32, 4 * MIB, UVA + (1 << 32), 0)), [b]) == 0
    assert len(rig.handler.mem.regions) == 2
    assert rig.ack(Request.REM_MEM_REG,
                   MemRegionMsg(MemoryRegion(1 << 32, 4 * MIB, UVA + (1 << 32), 0))) == 0
    assert len(rig.handler.mem.regions) == 1
    # No such region.
    assert rig.ack(Request.REM_MEM_REG, MemRegionMsg(MemoryRegion(9 << 32, MIB, 0, 0))) != 0


# ----------------------------------------------------------------------------- rings

def configure_ring(rig, index=2, num=64):
    rig.none(Request.SET_VRING_NUM, VringState(index, num))
    rig.none(Request.SET_VRING_BASE, VringState(index, 5))
    rig.none(Request.SET_VRING_ADDR, VringAddr(index, 0, UVA + 0x10000, UVA + 0x12000,
                                               UVA + 0x11000, 0))


def test_ring_lifecycle_reaches_its_server(rig):
    rig.negotiate()
    rig.none(Request.SET_MEM_TABLE, table(), [memfd()])
    configure_ring(rig)
    server = rig.backend.rings[2]
    call = os.eventfd(0)
    rig.none(Request.SET_VRING_CALL, VringFile(2, False), [call])
    kick = os.eventfd(0)
    assert rig.ack(Request.SET_VRING_KICK, VringFile(2, False), [kick]) == 0
    kind, addrs, event_idx, inflight, recover, resume, _kick = server.calls[-1]
    assert kind == "start" and (addrs.desc, addrs.avail, addrs.used) == (0x10000, 0x11000, 0x12000)
    assert inflight is not None and inflight.size == queue_region_size(128)
    assert rig.device.rings[2].started and rig.device.rings[2].base == 5
    # Swaps on a started ring go to its server.
    rig.none(Request.SET_VRING_KICK, VringFile(2, False), [os.eventfd(0)])
    rig.none(Request.SET_VRING_CALL, VringFile(2, True))
    rig.none(Request.SET_VRING_ERR, VringFile(2, False), [os.eventfd(0)])
    rig.none(Request.SET_VRING_ENABLE, VringState(2, 1))
    assert [c[0] for c in server.calls[1:]] == ["kick", "call", "err", "enable"]
    # GET_VRING_BASE stops it and answers with the server's next index.
    server.next_avail = 77
    assert rig.one(Request.GET_VRING_BASE, VringState(2, 0)) == \
        reply(Request.GET_VRING_BASE, VringState(2, 77))
    assert server.calls[-1] == ("stop",) and not rig.device.rings[2].started


def test_ring_settings_are_validated(rig):
    rig.negotiate()
    assert rig.ack(Request.SET_VRING_NUM, VringState(2, 100)) != 0          # not a power of 2
    assert rig.ack(Request.SET_VRING_NUM, VringState(9, 64)) != 0           # no such ring
    assert rig.ack(Request.SET_VRING_BASE, VringState(2, 0x10000)) != 0
    assert rig.ack(Request.SET_VRING_ADDR, VringAddr(2, 1, 0, 0, 0, 0)) != 0  # dirty logging
    assert rig.ack(Request.SET_VRING_ENABLE, VringState(2, 2)) != 0
    # No memory table: a kick cannot start the ring, and its fd is not kept.
    configure_ring(rig)
    kick = os.eventfd(0)
    assert rig.ack(Request.SET_VRING_KICK, VringFile(2, False), [kick]) != 0
    assert rig.device.rings[2].kick_fd == -1 and kick in rig.backend.closed
    assert rig.ack(Request.SET_VRING_KICK, VringFile(2, True)) != 0           # polling mode


def test_refused_start_is_a_nack(rig):
    rig.negotiate()
    rig.none(Request.SET_MEM_TABLE, table(), [memfd()])
    configure_ring(rig)
    rig.backend.rings[2].refuse = True
    assert rig.ack(Request.SET_VRING_KICK, VringFile(2, False), [os.eventfd(0)]) != 0
    assert not rig.device.rings[2].started


def test_control_queue_rings_get_no_inflight_region(rig):
    rig.negotiate()
    rig.none(Request.SET_MEM_TABLE, table(), [memfd()])
    configure_ring(rig, index=0)
    rig.none(Request.SET_VRING_KICK, VringFile(0, False), [os.eventfd(0)])
    assert rig.backend.rings[0].calls[-1][3] is None


def test_ring_broken_marks_needs_reset(rig):
    rig.handler.ring_broken(2, "test")
    assert rig.device.rings[2].broken and rig.device.status & STATUS_NEEDS_RESET
    assert u64(rig.one(Request.GET_STATUS)) & STATUS_NEEDS_RESET


# ----------------------------------------------------------------------------- inflight

def test_get_inflight_fd_replies_with_its_fd(rig):
    replies = rig.send(Request.GET_INFLIGHT_FD, Inflight(0, 0, 3, 128))
    assert len(replies) == 1
    data, fds = replies[0]
    size = queue_region_size(128) * 3
    assert data == reply(Request.GET_INFLIGHT_FD, Inflight(size, 0, 3, 128))
    assert len(fds) == 1 and os.fstat(fds[0]).st_size == size
    # Refused: its own reply, an empty region.
    assert rig.one(Request.GET_INFLIGHT_FD, Inflight(0, 0, 9, 128)) == \
        reply(Request.GET_INFLIGHT_FD, Inflight(0, 0, 0, 0))


def test_set_inflight_fd_is_recovered_from(rig):
    rig.negotiate()
    size = queue_region_size(64) * 3
    fd = memfd(size)
    assert rig.ack(Request.SET_INFLIGHT_FD, Inflight(size, 0, 3, 64), [fd]) == 0
    rig.none(Request.SET_MEM_TABLE, table(), [memfd()])
    configure_ring(rig)
    rig.none(Request.SET_VRING_KICK, VringFile(2, False), [os.eventfd(0)])
    _kind, _a, _e, inflight, recover, _resume, _k = rig.backend.rings[2].calls[-1]
    assert recover and inflight.fd == fd
    small = memfd(100)
    assert rig.ack(Request.SET_INFLIGHT_FD, Inflight(100, 0, 3, 64), [small]) != 0


# ----------------------------------------------------------------------------- not offered

@pytest.mark.parametrize("request_, payload, nfds", [
    (Request.SET_LOG_BASE, LogPayload(4096, 0), 1),
    (Request.SET_LOG_FD, b"", 1),
    (Request.SET_BACKEND_REQ_FD, b"", 1),
    (Request.SET_VRING_ENDIAN, VringState(2, 0), 0),
])
def test_requests_not_offered_are_refused_and_their_fds_closed(rig, request_, payload, nfds):
    rig.negotiate()
    fds = [os.eventfd(0) for _ in range(nfds)]
    assert rig.ack(request_, payload, fds) != 0
    for fd in fds:
        assert fd in rig.backend.closed


def test_every_request_kind_is_covered():
    import sys

    source = open(sys.modules[__name__].__file__).read()
    missing = [Request(code).name for code in REQUESTS if f"Request.{Request(code).name}" not in source]
    assert not missing, missing
    assert VHOST_USER_F_PROTOCOL_FEATURES == 30
