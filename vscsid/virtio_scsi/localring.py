"""A ring the supervisor serves on its own event loop (the virtio-scsi control and
event queues): its view of guest memory, its kick fd watched by the loop, and the
lock that keeps a memory-table change from pulling the memory from under an
ongoing pass. The data path never comes here: request queues are workers'."""
from __future__ import annotations

import asyncio
import os
from typing import Callable

from vscsid.vhost.device import RingState
from vscsid.vhost.rings import RingAddrs, RingServer
from vscsid.virtio.memory import GuestMemory
from vscsid.virtio.splitq import RingError, SplitQueue

#: How long after an unsignalled publish the driver's wish is read again
#: (SplitQueue.call_missed: a driver that published it too late), doubling up to
#: LATE_CHECK_MAX_S while it may still come.
LATE_CHECK_S = 0.05
LATE_CHECK_MAX_S = 1.0


class LocalRing(RingServer):
    """One ring served in the supervisor. Subclasses say what a kick means."""

    def __init__(self, loop: asyncio.AbstractEventLoop, log, memory: Callable[[], GuestMemory | None],
                 on_broken: Callable[[int, str], None]):
        self.loop = loop
        self.log = log
        self.memory = memory
        self.on_broken = on_broken
        self.lock = asyncio.Lock()
        self.state: RingState | None = None
        self.addrs: RingAddrs | None = None
        self.event_idx = False
        self.queue: SplitQueue | None = None
        self.last_avail = 0
        self.late_calls = 0
        self._late: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ RingServer
    async def start(self, ring, addrs, *, event_idx, inflight, recover, resume) -> None:
        self.state, self.addrs, self.event_idx = ring, addrs, event_idx
        self.last_avail = ring.base
        self._build()
        self._watch_kick()
        self.log.info("ring_started", ring=ring.index, size=ring.num, base=ring.base)
        self.started()

    async def stop(self, ring) -> int:
        if self.state is None:
            return ring.base
        self._unwatch()
        self._cancel_late()
        async with self.lock:
            last = self.queue.last_avail if self.queue is not None else self.last_avail
            if self.queue is not None:
                self.queue.release()
                self.queue = None
        self.state = None
        return last

    async def kick_changed(self, ring) -> None:
        if self.state is not None:
            self._unwatch()
            self._watch_kick()

    # ------------------------------------------------------------------ subclass hooks
    def started(self) -> None:
        """The ring was started."""

    def kicked(self) -> None:
        """The driver kicked the ring."""

    # ------------------------------------------------------------------ calls
    def publish(self) -> None:
        """Publish what was pushed and signal the driver if it asked; if it did not,
        read its wish once more a little later (a driver whose store of it became
        visible only after should_notify read it still gets its call)."""
        q, state = self.queue, self.state
        q.publish()
        notify = q.should_notify()
        if state.call_fd < 0:
            return
        if notify:
            os.eventfd_write(state.call_fd, 1)
            q.call_used = q.used_idx
        elif self._late is None:
            self._late = self.loop.call_later(LATE_CHECK_S, self._late_check, LATE_CHECK_S)

    def _late_check(self, delay: float) -> None:
        """Until the driver is signalled or waits for a later entry."""
        self._late = None
        q, state = self.queue, self.state
        if q is None or state is None or state.call_fd < 0 or q.used_idx == q.call_used:
            return
        if not self.lock.locked() and not q.pushed:   # (no pass or memory change under way)
            if q.call_missed():
                os.eventfd_write(state.call_fd, 1)
                q.call_used = q.used_idx
                self.late_calls += 1
                return
            if q.waits_for_later():
                return
        delay = min(delay * 2, LATE_CHECK_MAX_S)
        self._late = self.loop.call_later(delay, self._late_check, delay)

    def _cancel_late(self) -> None:
        if self._late is not None:
            self._late.cancel()
            self._late = None

    # ------------------------------------------------------------------ memory
    def _build(self) -> None:
        a = self.addrs
        self.queue = SplitQueue(self.memory(), self.state.num, a.desc, a.avail, a.used,
                                event_idx=self.event_idx, last_avail=self.last_avail)

    def release_views(self) -> None:
        """Drop every view of guest memory (the caller holds ``lock``)."""
        if self.queue is not None:
            self.last_avail = self.queue.last_avail
            self.queue.release()
            self.queue = None

    def rebuild_views(self) -> None:
        """Map the ring in the new memory table (the caller holds ``lock``)."""
        if self.state is None:
            return
        try:
            self._build()
        except RingError as exc:
            self.log.error("ring_unmappable_after_memory_change", ring=self.state.index,
                           reason=str(exc))

    # ------------------------------------------------------------------ kicks
    def _watch_kick(self) -> None:
        fd = self.state.kick_fd
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._on_kick, fd)

    def _unwatch(self) -> None:
        if self.state is None:
            return
        try:
            self.loop.remove_reader(self.state.kick_fd)
        except (ValueError, OSError):
            pass

    def _on_kick(self, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except (BlockingIOError, OSError):
            pass
        self.kicked()

    def broken(self, reason: str) -> None:
        """The ring as a whole is unusable: stop serving it, tell the front end (err
        eventfd) and have the device marked as needing a reset."""
        state = self.state
        state.broken = True
        self._unwatch()
        self.log.error("ring_broken", ring=state.index, reason=reason)
        if state.err_fd >= 0:
            try:
                os.eventfd_write(state.err_fd, 1)
            except OSError:
                pass
        self.on_broken(state.index, reason)

    def close(self) -> None:
        self._unwatch()
        self._cancel_late()
        if self.queue is not None:
            self.queue.release()
            self.queue = None
        self.state = None
