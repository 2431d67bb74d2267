"""virtio definitions (virtio 1.x): feature bits, device status bits and the split
ring's flags. The ring flags and sizes come from virtio.h, the one definition the
C code uses too."""
from __future__ import annotations

from ._ring import lib as _lib


def feature_mask(*bits: int) -> int:
    m = 0
    for b in bits:
        m |= 1 << int(b)
    return m


# feature bits (device independent)
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# device status bits
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# split ring
VIRTQ_DESC_F_NEXT = _lib.VIRTQ_DESC_F_NEXT
VIRTQ_DESC_F_WRITE = _lib.VIRTQ_DESC_F_WRITE
VIRTQ_DESC_F_INDIRECT = _lib.VIRTQ_DESC_F_INDIRECT
VIRTQ_AVAIL_F_NO_INTERRUPT = _lib.VIRTQ_AVAIL_F_NO_INTERRUPT
VIRTQ_USED_F_NO_NOTIFY = _lib.VIRTQ_USED_F_NO_NOTIFY
DESC_SIZE = _lib.VIRTQ_DESC_SIZE
MAX_QUEUE_SIZE = _lib.VIRTQ_MAX_SIZE

# the device side's state of each head (see virtio.h)
HEAD_FREE = _lib.VSD_HEAD_FREE
HEAD_BUSY = _lib.VSD_HEAD_BUSY
HEAD_DONE = _lib.VSD_HEAD_DONE

#: memory slots every layer holds (GET_MAX_MEM_SLOTS), and SET_MEM_TABLE's limit
MAX_MEM_SLOTS = _lib.VSD_MAX_REGIONS
MEMORY_BASELINE_NREGIONS = _lib.VHOST_MEMORY_BASELINE_NREGIONS


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Byte sizes of (descriptor table, available ring, used ring) with event fields."""
    return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True if ``event_idx`` lies in the window (old_idx, new_idx] (mod 2^16): the
    C definition (fences.h)."""
    return bool(_lib.vq_need_event(event_idx & 0xFFFF, new_idx & 0xFFFF, old_idx & 0xFFFF))
