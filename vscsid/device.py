"""The vhost-user SCSI device's state, without I/O.

This holds what the front end negotiated and configured — features, protocol
features, owner, status, the per-ring settings and the virtio-scsi config
space — and validates every change. The supervisor turns the resulting state
changes into effects (mapping memory, starting workers' rings); this module
only decides what is valid.

Ring states follow docs/interop/vhost-user.rst: a ring is *stopped* or
*started* and, separately, *enabled* or *disabled*. It starts when it gets a
kick fd (SET_VRING_KICK) and stops on GET_VRING_BASE. Without
VHOST_USER_F_PROTOCOL_FEATURES rings are enabled as soon as they start;
with it they begin disabled and SET_VRING_ENABLE switches them.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .vhost.protocol import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature, feature_mask
from .virtio.defs import (  # noqa: F401  (re-exported for the supervisor)
    STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
)
from .virtio.scsi_wire import (  # noqa: F401
    CONFIG as SCSI_CONFIG, CONFIG_SIZE, EVENT_SIZE as EVENT_INFO_SIZE, FIRST_REQUEST_QUEUE,
    MAX_CDB_SIZE, MAX_SENSE_SIZE, VIRTIO_SCSI_CDB_DEFAULT_SIZE as DEFAULT_CDB_SIZE, VIRTIO_SCSI_F_CHANGE,
    VIRTIO_SCSI_SENSE_DEFAULT_SIZE as DEFAULT_SENSE_SIZE,
)

OFFERED_FEATURES = feature_mask(VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
                                VIRTIO_RING_F_EVENT_IDX, VHOST_USER_F_PROTOCOL_FEATURES)

OFFERED_PROTOCOL_FEATURES = feature_mask(
    ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG,
    ProtocolFeature.RESET_DEVICE, ProtocolFeature.STATUS, ProtocolFeature.INFLIGHT_SHMFD,
    ProtocolFeature.CONFIGURE_MEM_SLOTS,
)

_SENSE_SIZE_OFF = 20
_CDB_SIZE_OFF = 24


class Rejected(Exception):
    """A well-formed request the device refuses (answered with a NACK and a log line)."""


@dataclass
class RingState:
    index: int
    num: int = 0
    desc_uva: int = 0
    used_uva: int = 0
    avail_uva: int = 0
    addr_set: bool = False
    base: int = 0
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    started: bool = False
    enabled: bool = False
    broken: bool = False

    def fds(self) -> list[int]:
        return [fd for fd in (self.kick_fd, self.call_fd, self.err_fd) if fd >= 0]


@dataclass
class ScsiConfig:
    num_queues: int
    seg_max: int
    max_sectors: int = 0xFFFF
    cmd_per_lun: int = 128
    event_info_size: int = EVENT_INFO_SIZE
    sense_size: int = DEFAULT_SENSE_SIZE
    cdb_size: int = DEFAULT_CDB_SIZE
    max_channel: int = 0
    max_target: int = 0
    max_lun: int = 16383

    def pack(self) -> bytes:
        return SCSI_CONFIG.pack(self.num_queues, self.seg_max, self.max_sectors,
                                self.cmd_per_lun, self.event_info_size, self.sense_size,
                                self.cdb_size, self.max_channel, self.max_target, self.max_lun)


@dataclass
class DeviceState:
    num_request_queues: int
    max_queue_size: int
    config: ScsiConfig
    offered_features: int = OFFERED_FEATURES
    offered_protocol_features: int = OFFERED_PROTOCOL_FEATURES
    acked_features: int = 0
    features_set: bool = False
    acked_protocol_features: int = 0
    owner: bool = False
    status: int = 0
    rings: list[RingState] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.rings:
            self.rings = [RingState(i) for i in range(self.num_rings)]

    @property
    def num_rings(self) -> int:
        return FIRST_REQUEST_QUEUE + self.num_request_queues

    # ------------------------------------------------------------------ features
    def has_protocol(self, bit: int) -> bool:
        return bool(self.acked_protocol_features & (1 << int(bit)))

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features & (1 << bit))

    @property
    def event_idx(self) -> bool:
        return self.has_feature(VIRTIO_RING_F_EVENT_IDX)

    @property
    def protocol_features_negotiated(self) -> bool:
        return self.has_feature(VHOST_USER_F_PROTOCOL_FEATURES)

    def set_features(self, value: int) -> int:
        """Record the acked features; returns the bits the front end set that we never
        offered (QEMU passes some device-property bits through, e.g. SCSI CHANGE):
        those are ignored, not treated as negotiated."""
        unknown = value & ~self.offered_features
        self.acked_features = value & self.offered_features
        self.features_set = True
        return unknown

    def set_protocol_features(self, value: int) -> None:
        unknown = value & ~self.offered_protocol_features
        if unknown:
            raise Rejected(f"protocol features {unknown:#x} were not offered")
        self.acked_protocol_features = value

    # ------------------------------------------------------------------ rings
    def ring(self, index: int) -> RingState:
        if not 0 <= index < self.num_rings:
            raise Rejected(f"ring index {index} out of range (device has {self.num_rings})")
        return self.rings[index]

    def set_vring_num(self, index: int, num: int) -> RingState:
        ring = self.ring(index)
        if ring.started:
            raise Rejected(f"ring {index} is started; its size cannot change")
        if num == 0 or num & (num - 1) or num > self.max_queue_size:
            raise Rejected(f"ring size {num} is not a power of two <= {self.max_queue_size}")
        ring.num = num
        return ring

    def set_vring_base(self, index: int, base: int) -> RingState:
        ring = self.ring(index)
        if ring.started:
            raise Rejected(f"ring {index} is started; its base cannot change")
        if base > 0xFFFF:
            # Packed rings put a wrap counter in bit 15 of a 16-bit value; split
            # rings use plain 16-bit indices. Anything wider is garbage.
            raise Rejected(f"ring base {base:#x} does not fit 16 bits")
        ring.base = base
        return ring

    def rings_enabled_on_start(self) -> bool:
        return not self.protocol_features_negotiated

    # ------------------------------------------------------------------ config space
    def read_config(self, offset: int, size: int) -> bytes:
        if size == 0 or offset + size > CONFIG_SIZE:
            raise Rejected(f"config read {offset}+{size} outside the {CONFIG_SIZE}-byte space")
        return self.config.pack()[offset:offset + size]

    def write_config(self, offset: int, data: bytes, flags: int) -> None:
        size = len(data)
        if size == 0 or offset + size > CONFIG_SIZE:
            raise Rejected(f"config write {offset}+{size} outside the {CONFIG_SIZE}-byte space")
        current = bytearray(self.config.pack())
        new = bytearray(current)
        new[offset:offset + size] = data
        if flags != 1:  # 1 = migration: the front end restores everything
            for i in range(offset, offset + size):
                if not (_SENSE_SIZE_OFF <= i < _CDB_SIZE_OFF + 4) and new[i] != current[i]:
                    raise Rejected(f"config byte {i} is read-only for the driver")
        values = SCSI_CONFIG.unpack(bytes(new))
        sense_size, cdb_size = values[5], values[6]
        if not 0 < sense_size <= MAX_SENSE_SIZE or not 0 < cdb_size <= MAX_CDB_SIZE:
            raise Rejected(f"sense_size {sense_size} / cdb_size {cdb_size} out of range")
        if cdb_size < 6:
            raise Rejected(f"cdb_size {cdb_size} is smaller than any CDB")
        if flags == 1:
            (self.config.num_queues, self.config.seg_max, self.config.max_sectors,
             self.config.cmd_per_lun, self.config.event_info_size, _s, _c,
             self.config.max_channel, self.config.max_target, self.config.max_lun) = values
        self.config.sense_size = sense_size
        self.config.cdb_size = cdb_size

    def reset(self) -> None:
        """Back to the initial device state (RESET_DEVICE / RESET_OWNER); fds are the
        caller's to close first."""
        self.acked_features = 0
        self.features_set = False
        self.status = 0
        self.config.sense_size = DEFAULT_SENSE_SIZE
        self.config.cdb_size = DEFAULT_CDB_SIZE
        self.rings = [RingState(i) for i in range(self.num_rings)]
