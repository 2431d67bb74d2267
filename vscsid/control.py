"""The control (vq 0) and event (vq 1) virtqueues, served by the supervisor.

Control queue requests (virtio spec 5.6.6.2)::

    TMF:  readable {le32 type=0, le32 subtype, u8 lun[8], le64 id}   writable {u8 response}
    AN:   readable {le32 type=1|2, u8 lun[8], le32 event_requested} writable {le32 event_actual, u8 response}

Task management is answered after every worker has confirmed that no
matching command is still running (workers complete requests between control
messages, and report what they still have in flight). We support no
asynchronous notification events, so AN queries and subscriptions are
answered with ``event_actual = 0`` and OK.

The event queue's buffers are kept (not consumed) until there is an event to
report: the kick eventfd is only drained.
"""
from __future__ import annotations

import asyncio
import os
import struct
from typing import TYPE_CHECKING

from . import log as vlog
from .device import RingState
from .workerpool import WorkerGone

from .virtio.scsi_wire import (
    AN_REQ, AN_RESP, CTRL_TYPE, LUN_BAD_TARGET, TMF_NAMES, TMF_REQ, VIRTIO_SCSI_S_BAD_TARGET,
    VIRTIO_SCSI_S_FUNCTION_REJECTED, VIRTIO_SCSI_S_FUNCTION_SUCCEEDED, VIRTIO_SCSI_S_OK,
    VIRTIO_SCSI_T_AN_QUERY, VIRTIO_SCSI_T_AN_SUBSCRIBE, VIRTIO_SCSI_T_TMF,
    VIRTIO_SCSI_T_TMF_CLEAR_ACA, VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET, VIRTIO_SCSI_T_TMF_QUERY_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET, WLUN_REPORT_LUNS, decode_lun, gather, scatter,
)
from .virtio.splitq import ChainError, RingError, SplitQueue

if TYPE_CHECKING:
    from .supervisor import Session

#: control requests served before the supervisor's event loop gets a turn
CONTROL_BUDGET = 64


class _Ring:
    def __init__(self, state: RingState, desc: int, avail: int, used: int):
        self.state = state
        self.desc, self.avail, self.used = desc, avail, used
        self.queue: SplitQueue | None = None
        self.last_avail = state.base


class ControlQueues:
    def __init__(self, session: "Session"):
        self.session = session
        self.loop = session.loop
        self.log = vlog.get(conn=session.conn_id, vq=0)
        self.lock = asyncio.Lock()
        self.rings: dict[int, _Ring] = {}
        self._task: asyncio.Task | None = None
        self._again = False
        self.stats = {"tmf": 0, "an": 0, "bad": 0}
        self.glog = vlog.GuestLog(self.log)     # what a guest can make us log, rate limited

    # ------------------------------------------------------------------ lifecycle
    def start(self, state: RingState, desc: int, avail: int, used: int) -> None:
        ring = _Ring(state, desc, avail, used)
        self.rings[state.index] = ring
        self._build(ring)
        self._watch_kick(ring)
        if state.index == 0:
            self._schedule()

    def _build(self, ring: _Ring) -> None:
        mem = self.session.mem
        ring.queue = SplitQueue(mem, ring.state.num, ring.desc, ring.avail, ring.used,
                                event_idx=self.session.device.event_idx,
                                last_avail=ring.last_avail)

    def _watch_kick(self, ring: _Ring) -> None:
        fd = ring.state.kick_fd
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._on_kick, ring.state.index, fd)

    def _on_kick(self, index: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except (BlockingIOError, OSError):
            pass
        if index == 0:
            self._schedule()
        # Event queue: the driver added buffers; we keep them for future events.

    def set_kick(self, state: RingState) -> None:
        ring = self.rings.get(state.index)
        if ring is None:
            return
        self._unwatch(ring)
        self._watch_kick(ring)

    def _unwatch(self, ring: _Ring) -> None:
        try:
            self.loop.remove_reader(ring.state.kick_fd)
        except (ValueError, OSError):
            pass

    def set_call(self, state: RingState) -> None:
        if state.call_fd >= 0 and state.index == 0:
            os.eventfd_write(state.call_fd, 1)   # do not leave a completion unsignalled

    def set_enabled(self, state: RingState) -> None:
        if state.enabled and state.index == 0:
            self._schedule()

    async def stop(self, state: RingState) -> int:
        ring = self.rings.pop(state.index, None)
        if ring is None:
            return state.base
        self._unwatch(ring)
        async with self.lock:
            last = ring.queue.last_avail if ring.queue is not None else ring.last_avail
            if ring.queue is not None:
                ring.queue.release()
                ring.queue = None
        return last

    def release_views(self) -> None:
        for ring in self.rings.values():
            if ring.queue is not None:
                ring.last_avail = ring.queue.last_avail
                ring.queue.release()
                ring.queue = None

    def rebuild_views(self) -> None:
        for ring in self.rings.values():
            try:
                self._build(ring)
            except RingError as exc:
                self.log.error("ring_unmappable_after_memory_change", ring=ring.state.index,
                               reason=str(exc))

    def close(self) -> None:
        for ring in list(self.rings.values()):
            self._unwatch(ring)
            if ring.queue is not None:
                ring.queue.release()
        self.rings.clear()
        if self._task is not None:
            self._task.cancel()

    # ------------------------------------------------------------------ control queue
    def _schedule(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        from .virtio.memory import fault_count

        before = fault_count()
        try:
            await self._run_locked()
        finally:
            if fault_count() != before:
                self.session.memory_fault("the supervisor (control queue)")

    async def _run_locked(self) -> None:
        while True:
            async with self.lock:
                self._again = False
                ring = self.rings.get(0)
                if (ring is None or ring.queue is None or not ring.state.enabled
                        or ring.state.broken):
                    return
                try:
                    more = await self._drain(ring)
                except RingError as exc:
                    self._broken(ring, str(exc))
                    return
            if not more and not self._again:
                return
            # A guest that floods its control queue gets a share of the
            # supervisor, not all of it: with the lock released, the event loop
            # (vhost-user messages, memory changes, workers, signals) runs, then
            # the queue is served again.
            await asyncio.sleep(0)

    def _broken(self, ring: _Ring, reason: str) -> None:
        """The ring as a whole is unusable: stop serving it, tell the front end
        (err eventfd) and mark the device as needing a reset."""
        from .device import STATUS_NEEDS_RESET

        state = ring.state
        state.broken = True
        self.session.device.status |= STATUS_NEEDS_RESET
        self._unwatch(ring)
        self.log.error("ring_broken", ring=state.index, reason=reason)
        if state.err_fd >= 0:
            try:
                os.eventfd_write(state.err_fd, 1)
            except OSError:
                pass
        self.session.log.error("ring_needs_reset", ring=state.index, reason=reason)

    async def _drain(self, ring: _Ring) -> bool:
        """Serve up to CONTROL_BUDGET requests; True if more may be waiting."""
        served = 0
        while True:
            q = ring.queue
            if q is None:
                return False
            if served >= CONTROL_BUDGET:
                return True
            q.disable_kicks()
            heads = q.pop_heads(CONTROL_BUDGET - served)
            served += len(heads)
            for head in heads:
                try:
                    chain = q.walk(head)
                except ChainError as exc:
                    self.stats["bad"] += 1
                    self._guest_warning("bad_descriptor_chain", head=head, reason=exc.reason)
                    q.push(head, 0)
                    continue
                written = await self._handle(chain)
                q.push(head, written)
            if heads:
                q.publish()
                if q.should_notify() and ring.state.call_fd >= 0:
                    os.eventfd_write(ring.state.call_fd, 1)
            if not q.enable_kicks():
                return False

    def _guest_warning(self, event: str, **fields) -> None:
        self.glog.warning(event, **fields)

    async def _handle(self, chain) -> int:
        if chain.out_len < 4:
            self.stats["bad"] += 1
            self._guest_warning("control_request_too_short", readable=chain.out_len)
            return 0
        kind = CTRL_TYPE.unpack(gather(chain.out, 4))[0]
        if kind == VIRTIO_SCSI_T_TMF:
            if chain.out_len < TMF_REQ.size or chain.in_len < 1:
                self.stats["bad"] += 1
                self._guest_warning("tmf_request_too_short", readable=chain.out_len,
                                 writable=chain.in_len)
                return 0
            _t, subtype, lun, tag = TMF_REQ.unpack(gather(chain.out, TMF_REQ.size))
            response = await self.task_management(subtype, lun, tag)
            scatter(chain.in_, bytes([response]))
            self.stats["tmf"] += 1
            return 1
        if kind in (VIRTIO_SCSI_T_AN_QUERY, VIRTIO_SCSI_T_AN_SUBSCRIBE):
            if chain.out_len < AN_REQ.size or chain.in_len < AN_RESP.size:
                self.stats["bad"] += 1
                self._guest_warning("an_request_too_short", readable=chain.out_len,
                                 writable=chain.in_len)
                return 0
            _t, lun, requested = AN_REQ.unpack(gather(chain.out, AN_REQ.size))
            number = decode_lun(lun)
            response = VIRTIO_SCSI_S_BAD_TARGET if number == LUN_BAD_TARGET else VIRTIO_SCSI_S_OK
            scatter(chain.in_, AN_RESP.pack(0, response))
            self.stats["an"] += 1
            self.glog.info("async_notification_request",
                          kind="query" if kind == VIRTIO_SCSI_T_AN_QUERY else "subscribe",
                          requested=hex(requested), supported=0)
            return AN_RESP.size
        self.stats["bad"] += 1
        self._guest_warning("unknown_control_request", type=kind)
        return 0

    async def task_management(self, subtype: int, lun_bytes: bytes, tag: int) -> int:
        name = TMF_NAMES.get(subtype, f"unknown({subtype})")
        number = decode_lun(lun_bytes)
        sup = self.session.sup
        if number == LUN_BAD_TARGET or (number != WLUN_REPORT_LUNS
                                        and number >= len(sup.luns.specs)):
            self.glog.warning("tmf_bad_lun", tmf=name, lun=lun_bytes.hex())
            return VIRTIO_SCSI_S_BAD_TARGET
        if subtype not in TMF_NAMES or subtype == VIRTIO_SCSI_T_TMF_CLEAR_ACA:
            self.glog.warning("tmf_rejected", tmf=name, lun=number)
            return VIRTIO_SCSI_S_FUNCTION_REJECTED
        scope_lun = None if subtype == VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET else number
        # Every worker answers only after finishing what it was doing, and says
        # whether a matching command is still in flight (queued I/O).
        found = False
        for w in sup.workers:
            if w.chan is None:
                continue
            try:
                rep = await w.request("tmf", kind=name, lun=scope_lun, tag=tag, timeout=30)
            except (WorkerGone, asyncio.TimeoutError) as exc:
                self.glog.error("tmf_worker_unreachable", tmf=name, queue=w.queue, error=str(exc))
                continue
            found = found or bool(rep.get("found"))
        self.glog.info("task_management", tmf=name, lun=number, tag=tag, found=found)
        if subtype in (VIRTIO_SCSI_T_TMF_QUERY_TASK, VIRTIO_SCSI_T_TMF_QUERY_TASK_SET):
            return VIRTIO_SCSI_S_FUNCTION_SUCCEEDED if found else VIRTIO_SCSI_S_OK
        return VIRTIO_SCSI_S_OK
