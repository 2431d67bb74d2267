"""The virtio-scsi event queue (vq 1): the driver posts buffers for events the
device may report (virtio 1.x, 5.6.6.3). The buffers are kept, not consumed,
until there is an event to report: a kick only means more buffers."""
from __future__ import annotations

from .localring import LocalRing


class EventQueue(LocalRing):
    pass
