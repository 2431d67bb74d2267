"""The state a vhost-user front end negotiates with a device, without I/O.

This holds what the front end negotiated and configured — features, protocol
features, owner, status, the per-ring settings — and validates every change.
What is particular to a device type (the features it offers, its number of
rings, its config space) comes from a :class:`Personality` (for virtio-scsi:
vscsid.virtio_scsi.config.ScsiPersonality). The vhost-user handler turns the
state changes into effects; this module only decides what is valid.

Ring states follow docs/interop/vhost-user.rst: a ring is *stopped* or
*started* and, separately, *enabled* or *disabled*. It starts when it gets a
kick fd (SET_VRING_KICK) and stops on GET_VRING_BASE. Without
VHOST_USER_F_PROTOCOL_FEATURES rings are enabled as soon as they start;
with it they begin disabled and SET_VRING_ENABLE switches them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from vscsid.virtio.defs import VIRTIO_RING_F_EVENT_IDX

from .protocol import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature, feature_mask

#: vhost-user protocol features the handler implements (device independent)
OFFERED_PROTOCOL_FEATURES = feature_mask(
    ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG,
    ProtocolFeature.RESET_DEVICE, ProtocolFeature.STATUS, ProtocolFeature.INFLIGHT_SHMFD,
    ProtocolFeature.CONFIGURE_MEM_SLOTS,
)


class Rejected(Exception):
    """A well-formed request the device refuses (answered with a NACK and a log line)."""


class Personality(Protocol):
    """What a device type brings to vhost-user."""

    #: virtio feature bits offered (VHOST_USER_F_PROTOCOL_FEATURES included)
    offered_features: int
    #: virtqueues of the device
    num_rings: int

    def read_config(self, offset: int, size: int) -> bytes:
        """Bytes of the config space (Rejected when outside it)."""

    def write_config(self, offset: int, data: bytes, flags: int) -> None:
        """A driver write (flags 1: migration restores everything); Rejected if refused."""

    def reset(self) -> None:
        """Back to the config space's initial values."""


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
class DeviceState:
    personality: Personality
    max_queue_size: int
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
        return self.personality.num_rings

    @property
    def offered_features(self) -> int:
        return self.personality.offered_features

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
        return self.personality.read_config(offset, size)

    def write_config(self, offset: int, data: bytes, flags: int) -> None:
        self.personality.write_config(offset, data, flags)

    def reset(self) -> None:
        """Back to the initial device state (RESET_DEVICE / RESET_OWNER); fds are the
        caller's to close first."""
        self.acked_features = 0
        self.features_set = False
        self.status = 0
        self.personality.reset()
        self.rings = [RingState(i) for i in range(self.num_rings)]
