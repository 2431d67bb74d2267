"""The device state machine: feature negotiation, ring settings, config space."""
from __future__ import annotations

import struct

import pytest

from vscsid.vhost.device import DeviceState, Rejected
from vscsid.vhost.protocol import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature
from vscsid.virtio.defs import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX
from vscsid.virtio.scsi_wire import CONFIG_SIZE, VIRTIO_SCSI_F_T10_PI
from vscsid.virtio_scsi.config import OFFERED_FEATURES, ScsiConfig, ScsiPersonality


def dev(queues=2):
    return DeviceState(personality=ScsiPersonality(ScsiConfig(num_queues=queues, seg_max=254)),
                       max_queue_size=256)


def test_offered_features_are_what_we_implement():
    # HOTPLUG (1) and CHANGE (2): LUN hot-add/remove and resize events
    assert OFFERED_FEATURES == ((1 << VIRTIO_F_VERSION_1) | (1 << 28) | (1 << 29) | (1 << 30)
                                | (1 << 1) | (1 << 2))
    d = dev()
    assert d.offered_protocol_features & (1 << ProtocolFeature.MQ)
    assert d.offered_protocol_features & (1 << ProtocolFeature.REPLY_ACK)
    assert d.offered_protocol_features & (1 << ProtocolFeature.CONFIG)
    assert not d.offered_protocol_features & (1 << ProtocolFeature.LOG_SHMFD)


def test_unoffered_feature_bits_are_ignored_not_negotiated():
    d = dev()
    unknown = d.set_features((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_SCSI_F_T10_PI)
                             | (1 << VIRTIO_RING_F_EVENT_IDX))
    assert unknown == 1 << VIRTIO_SCSI_F_T10_PI
    assert d.event_idx and not d.has_feature(VIRTIO_SCSI_F_T10_PI)


def test_protocol_features_must_have_been_offered():
    d = dev()
    with pytest.raises(Rejected):
        d.set_protocol_features(1 << ProtocolFeature.LOG_SHMFD)
    d.set_protocol_features((1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK))
    assert d.has_protocol(ProtocolFeature.REPLY_ACK)


def test_rings_enabled_on_start_depends_on_protocol_features():
    d = dev()
    d.set_features(1 << VIRTIO_F_VERSION_1)
    assert d.rings_enabled_on_start()
    d.set_features((1 << VIRTIO_F_VERSION_1) | (1 << VHOST_USER_F_PROTOCOL_FEATURES))
    assert not d.rings_enabled_on_start()


@pytest.mark.parametrize("num", [0, 3, 100, 512])
def test_bad_ring_sizes(num):
    with pytest.raises(Rejected):
        dev().set_vring_num(2, num)


def test_ring_index_range():
    d = dev(queues=2)
    assert d.num_rings == 4
    d.set_vring_num(3, 128)
    with pytest.raises(Rejected, match="out of range"):
        d.set_vring_num(4, 128)
    with pytest.raises(Rejected):
        d.ring(-1)


def test_started_ring_cannot_change():
    d = dev()
    r = d.set_vring_num(2, 64)
    r.started = True
    with pytest.raises(Rejected):
        d.set_vring_num(2, 128)
    with pytest.raises(Rejected):
        d.set_vring_base(2, 5)


def test_config_space_layout_and_writable_fields():
    d = dev(queues=4)
    raw = d.read_config(0, CONFIG_SIZE)
    assert struct.unpack("<IIIIIIIHHI", raw) == (4, 254, 0xFFFF, 128, 16, 96, 32, 0, 0, 255)
    assert d.read_config(20, 4) == struct.pack("<I", 96)
    d.write_config(20, struct.pack("<II", 64, 16), 0)
    assert (d.personality.config.sense_size, d.personality.config.cdb_size) == (64, 16)
    with pytest.raises(Rejected, match="read-only"):
        d.write_config(0, struct.pack("<I", 8), 0)
    with pytest.raises(Rejected):
        d.read_config(30, 10)
    with pytest.raises(Rejected):
        d.write_config(24, struct.pack("<I", 0), 0)
    d.reset()
    assert (d.personality.config.sense_size, d.personality.config.cdb_size) == (96, 32)
