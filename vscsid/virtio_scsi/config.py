"""The virtio-scsi personality of the vhost-user device: the features it offers and
its config space (virtio 1.x, 5.6.4)."""
from __future__ import annotations

from dataclasses import dataclass

from vscsid.vhost.device import Rejected
from vscsid.vhost.protocol import VHOST_USER_F_PROTOCOL_FEATURES
from vscsid.virtio.defs import (
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, feature_mask,
)
from vscsid.virtio.scsi_wire import (
    CONFIG, CONFIG_SIZE, EVENT_SIZE, FIRST_REQUEST_QUEUE, MAX_CDB_SIZE, MAX_SENSE_SIZE,
    VIRTIO_SCSI_CDB_DEFAULT_SIZE, VIRTIO_SCSI_F_CHANGE, VIRTIO_SCSI_F_HOTPLUG,
    VIRTIO_SCSI_SENSE_DEFAULT_SIZE,
)

# HOTPLUG: LUNs come and go with TRANSPORT_RESET events (RESCAN, REMOVED); CHANGE:
# PARAM_CHANGE events (a resize). QEMU's vhost-user-scsi offers the guest HOTPLUG
# only when the back end does (property hotplug=on, the default), and CHANGE
# whenever its param_change property is on (the default); both reach the back end
# in SET_FEATURES when the guest acks them (QEMU 7.2 and 10.0).
OFFERED_FEATURES = feature_mask(VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
                                VIRTIO_RING_F_EVENT_IDX, VHOST_USER_F_PROTOCOL_FEATURES,
                                VIRTIO_SCSI_F_HOTPLUG, VIRTIO_SCSI_F_CHANGE)

#: the highest LUN number vscsid serves (config.MAX_LUN_NUMBER: single-level LUNs)
MAX_LUN = 255

# the driver-writable fields: sense_size (offset 20) and cdb_size (24)
_SENSE_SIZE_OFF = 20
_CDB_SIZE_OFF = 24


@dataclass
class ScsiConfig:
    num_queues: int
    seg_max: int
    max_sectors: int = 0xFFFF
    cmd_per_lun: int = 128
    event_info_size: int = EVENT_SIZE
    sense_size: int = VIRTIO_SCSI_SENSE_DEFAULT_SIZE
    cdb_size: int = VIRTIO_SCSI_CDB_DEFAULT_SIZE
    max_channel: int = 0
    max_target: int = 0             # the highest target with a LUN when the session began
    max_lun: int = MAX_LUN

    def pack(self) -> bytes:
        return CONFIG.pack(self.num_queues, self.seg_max, self.max_sectors,
                                self.cmd_per_lun, self.event_info_size, self.sense_size,
                                self.cdb_size, self.max_channel, self.max_target, self.max_lun)



class ScsiPersonality:
    """The virtio-scsi device: one control queue, one event queue, then the request
    queues; the config space, of which the driver may write sense_size and cdb_size."""

    def __init__(self, config: ScsiConfig, offered_features: int = OFFERED_FEATURES):
        self.config = config
        self.offered_features = offered_features
        self.num_rings = FIRST_REQUEST_QUEUE + config.num_queues

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
        values = CONFIG.unpack(bytes(new))
        sense_size, cdb_size = values[5], values[6]
        if not 0 < sense_size <= MAX_SENSE_SIZE or not 0 < cdb_size <= MAX_CDB_SIZE:
            raise Rejected(f"sense_size {sense_size} / cdb_size {cdb_size} out of range")
        if cdb_size < 6:
            raise Rejected(f"cdb_size {cdb_size} is smaller than any CDB")
        c = self.config
        if flags == 1:
            (c.num_queues, c.seg_max, c.max_sectors, c.cmd_per_lun, c.event_info_size, _s, _c,
             c.max_channel, c.max_target, c.max_lun) = values
        c.sense_size = sense_size
        c.cdb_size = cdb_size

    def reset(self) -> None:
        self.config.sense_size = VIRTIO_SCSI_SENSE_DEFAULT_SIZE
        self.config.cdb_size = VIRTIO_SCSI_CDB_DEFAULT_SIZE
