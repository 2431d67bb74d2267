"""Driver side of vscsid, for tests and ``vscsid-bench``.

* :mod:`vscsid.client.guestmem` -- memfd-backed guest memory + allocators
* :mod:`vscsid.client.driverq` -- the guest's half of a split virtqueue
* :mod:`vscsid.client.virtio_scsi` -- virtio-scsi request/response framing and CDB helpers

Nothing here imports the device side (``vscsid.workers`` is used only for its
cffi fences).
"""
from .driverq import (
    Completion,
    DeviceProtocolError,
    DriverQueue,
    DriverQueueError,
    HostileChains,
    QueueFullError,
    UnknownHead,
    VringAddr,
    vring_need_event,
)
from .guestmem import (
    BumpArena,
    FrontendMemory,
    GuestMemoryError,
    MemTableEntry,
    OutOfGuestMemory,
    Region,
    SlabPool,
)
from .virtio_scsi import CmdHandle, CmdResp, ScsiRequestBuilder

__all__ = [
    "BumpArena", "CmdHandle", "CmdResp", "Completion", "DeviceProtocolError", "DriverQueue",
    "DriverQueueError", "FrontendMemory", "GuestMemoryError", "HostileChains", "MemTableEntry",
    "OutOfGuestMemory", "QueueFullError", "Region", "ScsiRequestBuilder", "SlabPool", "UnknownHead",
    "VringAddr", "vring_need_event",
]
