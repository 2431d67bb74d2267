"""The virtio-scsi event queue (vq 1): the driver posts buffers for events the
device may report (virtio 1.x, 5.6.6.3). The buffers are kept, not consumed,
until there is an event to report: a kick only means more buffers.

Events vscsid sends, when the driver negotiated the feature they need:

* ``TRANSPORT_RESET`` with ``RESCAN`` when a LUN is added, ``REMOVED`` when it is
  removed (VIRTIO_SCSI_F_HOTPLUG);
* ``PARAM_CHANGE`` with the ASC/ASCQ in ``reason`` (``asc | ascq << 8``): 2A/09
  CAPACITY DATA HAS CHANGED after a resize, 2A/01 MODE PARAMETERS CHANGED after
  the daemon changed the write cache (VIRTIO_SCSI_F_CHANGE).

When an event finds no buffer (the driver had none posted, or only unusable
ones) it is lost, and the next buffer the driver posts gets ``NO_EVENT`` with
the ``EVENTS_MISSED`` flag, so the driver rescans (Linux then rescans the whole
host). A buffer that cannot hold an event (too short, read-only, a broken
chain) is returned unused (length 0) and logged (rate limited).
"""
from __future__ import annotations

from dataclasses import dataclass

from vscsid import log as vlog
from vscsid.virtio.memory import fault_count
from vscsid.virtio.scsi_wire import (
    EVENT, EVENT_SIZE, VIRTIO_SCSI_EVT_RESET_REMOVED, VIRTIO_SCSI_EVT_RESET_RESCAN,
    VIRTIO_SCSI_F_CHANGE, VIRTIO_SCSI_F_HOTPLUG, VIRTIO_SCSI_T_EVENTS_MISSED,
    VIRTIO_SCSI_T_NO_EVENT, VIRTIO_SCSI_T_PARAM_CHANGE, VIRTIO_SCSI_T_TRANSPORT_RESET,
    encode_event_lun, scatter,
)
from vscsid.virtio.splitq import ChainError, RingError

from .localring import LocalRing

#: events waiting for the ring to start (or memory to be remapped) before they count as missed
MAX_QUEUED = 64

EVENT_NAMES = {VIRTIO_SCSI_T_NO_EVENT: "no_event", VIRTIO_SCSI_T_TRANSPORT_RESET: "transport_reset",
               VIRTIO_SCSI_T_PARAM_CHANGE: "param_change"}
REASON_NAMES = {VIRTIO_SCSI_EVT_RESET_RESCAN: "rescan", VIRTIO_SCSI_EVT_RESET_REMOVED: "removed"}


@dataclass
class ScsiEvent:
    event: int
    target: int
    lun: int
    reason: int

    def describe(self) -> dict:
        name = EVENT_NAMES.get(self.event & ~VIRTIO_SCSI_T_EVENTS_MISSED, hex(self.event))
        if self.event & VIRTIO_SCSI_T_EVENTS_MISSED:
            name += "+events_missed"
        if self.event == VIRTIO_SCSI_T_TRANSPORT_RESET:
            reason = REASON_NAMES.get(self.reason, hex(self.reason))
        elif self.event == VIRTIO_SCSI_T_PARAM_CHANGE:
            reason = f"{self.reason & 0xFF:02X}/{self.reason >> 8:02X}"
        else:
            reason = self.reason
        return {"type": name, "lun": f"{self.target}:{self.lun}", "reason": reason}


class EventQueue(LocalRing):
    """``features()`` gives the features the front end acked (to decide which events
    the driver understands)."""

    def __init__(self, loop, log, memory, on_broken, *, features=lambda: 0, memory_fault=None):
        super().__init__(loop, log, memory, on_broken)
        self.features = features
        self.memory_fault = memory_fault
        self.events_dropped = False
        self.queued: list[ScsiEvent] = []
        self.stats = {"sent": 0, "missed": 0, "bad_buffers": 0, "not_negotiated": 0}
        self.by_type: dict[str, int] = {}
        self.glog = vlog.GuestLog(self.log)

    # ------------------------------------------------------------------ the device's side
    def lun_added(self, target: int, lun: int) -> bool:
        return self._report(VIRTIO_SCSI_F_HOTPLUG, ScsiEvent(
            VIRTIO_SCSI_T_TRANSPORT_RESET, target, lun, VIRTIO_SCSI_EVT_RESET_RESCAN))

    def lun_removed(self, target: int, lun: int) -> bool:
        return self._report(VIRTIO_SCSI_F_HOTPLUG, ScsiEvent(
            VIRTIO_SCSI_T_TRANSPORT_RESET, target, lun, VIRTIO_SCSI_EVT_RESET_REMOVED))

    def param_change(self, target: int, lun: int, asc: int, ascq: int) -> bool:
        return self._report(VIRTIO_SCSI_F_CHANGE, ScsiEvent(
            VIRTIO_SCSI_T_PARAM_CHANGE, target, lun, asc | (ascq << 8)))

    def _report(self, feature: int, ev: ScsiEvent) -> bool:
        """Send ``ev`` now if the driver understands it; True if it was sent."""
        if not self.features() & (1 << feature):
            self.stats["not_negotiated"] += 1
            self.log.info("event_not_sent", why="feature not negotiated", **ev.describe())
            return False
        if self.queue is None or self.state is None or not self.state.enabled \
                or self.state.broken or self.lock.locked():
            # Not running (or being remapped) right now: send it when it is.
            if len(self.queued) < MAX_QUEUED:
                self.queued.append(ev)
            else:
                self._missed(ev)
            return False
        return self._send(ev)

    def _missed(self, ev: ScsiEvent) -> None:
        self.events_dropped = True
        self.stats["missed"] += 1
        self.log.warning("event_missed", why="no event buffer posted", **ev.describe())
        q = self.queue
        if q is not None:
            try:
                # Be kicked when the next buffer comes (EVENT_IDX: avail_event).
                if q.enable_kicks():
                    self.loop.call_soon(self._flush_queued)
            except RingError:
                pass

    def _send(self, ev: ScsiEvent) -> bool:
        before = fault_count()
        try:
            sent = self._send_locked(ev)
        except RingError as exc:
            self.broken(str(exc))
            return False
        finally:
            if fault_count() != before and self.memory_fault is not None:
                self.memory_fault("the supervisor (event queue)")
        if not sent:
            self._missed(ev)
        return sent

    def _send_locked(self, ev: ScsiEvent) -> bool:
        """Put ``ev`` in the next usable buffer (with EVENTS_MISSED if events were lost
        since the last one); False if there is none."""
        q = self.queue
        while True:
            heads = q.pop_heads(1)
            if not heads:
                return False
            head = heads[0]
            try:
                chain = q.walk(head)
            except ChainError as exc:
                self._bad_buffer(head, exc.reason)
                continue
            if chain.in_len < EVENT_SIZE or chain.out_len:
                self._bad_buffer(head, f"{chain.in_len} writable and {chain.out_len} readable "
                                       f"bytes (an event buffer is {EVENT_SIZE} writable bytes)")
                continue
            event = ev.event
            if self.events_dropped:
                event |= VIRTIO_SCSI_T_EVENTS_MISSED
                self.events_dropped = False
            scatter(chain.in_, EVENT.pack(event, encode_event_lun(ev.target, ev.lun), ev.reason))
            q.push(head, EVENT_SIZE)
            self.publish()
            self.stats["sent"] += 1
            kind = ScsiEvent(event, ev.target, ev.lun, ev.reason).describe()
            self.by_type[kind["type"]] = self.by_type.get(kind["type"], 0) + 1
            self.log.info("event_sent", **kind)
            return True

    def _bad_buffer(self, head: int, reason: str) -> None:
        self.stats["bad_buffers"] += 1
        self.glog.warning("bad_event_buffer", head=head, reason=reason)
        self.queue.push(head, 0)
        self.publish()

    # ------------------------------------------------------------------ the driver's side
    def started(self) -> None:
        self._flush_queued()

    def kicked(self) -> None:
        """More buffers: report lost events, and what waited."""
        self._flush_queued()

    async def enabled_changed(self, ring) -> None:
        if ring.enabled:
            self._flush_queued()

    async def call_changed(self, ring) -> None:
        pass

    def rebuild_views(self) -> None:
        super().rebuild_views()
        # (the caller holds the lock; what waited goes out once it is released)
        self.loop.call_soon(self._flush_queued)

    def _flush_queued(self) -> None:
        if self.queue is None or self.state is None or not self.state.enabled \
                or self.state.broken or self.lock.locked():
            return
        waiting, self.queued = self.queued, []
        for ev in waiting:
            self._send(ev)
        if self.events_dropped and self.queue is not None and self.queue.pending():
            self._send(ScsiEvent(VIRTIO_SCSI_T_NO_EVENT, 0, 0, 0))

    def close(self) -> None:
        super().close()
        self.queued = []

