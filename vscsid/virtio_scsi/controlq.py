"""The virtio-scsi control queue (vq 0), served by the supervisor.

Control queue requests (virtio spec 5.6.6.2)::

    TMF:  readable {le32 type=0, le32 subtype, u8 lun[8], le64 id}   writable {u8 response}
    AN:   readable {le32 type=1|2, u8 lun[8], le32 event_requested} writable {le32 event_actual, u8 response}

Task management is answered after every worker has confirmed that no
matching command is still running (workers complete requests between control
messages, and report what they still have in flight): the ``task_management``
callable given here does that round. We support no asynchronous notification
events, so AN queries and subscriptions are answered with ``event_actual = 0``
and OK.
"""
from __future__ import annotations

import asyncio
import os
from typing import Awaitable, Callable

from vscsid import log as vlog
from vscsid.virtio.memory import fault_count
from vscsid.virtio.scsi_wire import (
    AN_REQ, AN_RESP, CTRL_TYPE, LUN_BAD_TARGET, TMF_NAMES, TMF_REQ, VIRTIO_SCSI_S_BAD_TARGET,
    VIRTIO_SCSI_S_FUNCTION_REJECTED, VIRTIO_SCSI_S_FUNCTION_SUCCEEDED, VIRTIO_SCSI_S_OK,
    VIRTIO_SCSI_T_AN_QUERY, VIRTIO_SCSI_T_AN_SUBSCRIBE, VIRTIO_SCSI_T_TMF,
    VIRTIO_SCSI_T_TMF_CLEAR_ACA, VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET, VIRTIO_SCSI_T_TMF_QUERY_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET, WLUN_REPORT_LUNS, decode_address, gather, scatter,
)
from vscsid.virtio.splitq import ChainError, RingError

from .localring import LocalRing

#: control requests served before the supervisor's event loop gets a turn
CONTROL_BUDGET = 64


class ControlQueue(LocalRing):
    """``task_management(kind, target, lun | None, tag)`` runs a TMF on every worker
    and says whether a matching command was found; ``lun_exists(target, lun | None)``
    (None: any LUN on the target); ``memory_fault(where)`` is called when guest
    memory faulted in a pass."""

    def __init__(self, loop, log, memory, on_broken, *,
                 task_management: Callable[[str, int, int | None, int], Awaitable[bool]],
                 lun_exists: Callable[[int, int | None], bool],
                 memory_fault: Callable[[str], None]):
        super().__init__(loop, log, memory, on_broken)
        self.task_management_round = task_management
        self.lun_exists = lun_exists
        self.memory_fault = memory_fault
        self._task: asyncio.Task | None = None
        self._again = False
        self.stats = {"tmf": 0, "an": 0, "bad": 0}
        self.glog = vlog.GuestLog(self.log)     # what a guest can make us log, rate limited

    # ------------------------------------------------------------------ RingServer
    def started(self) -> None:
        self._schedule()

    def kicked(self) -> None:
        self._schedule()

    async def call_changed(self, ring) -> None:
        if ring.call_fd >= 0:
            os.eventfd_write(ring.call_fd, 1)   # do not leave a completion unsignalled

    async def enabled_changed(self, ring) -> None:
        if ring.enabled:
            self._schedule()

    def close(self) -> None:
        super().close()
        if self._task is not None:
            self._task.cancel()

    def _schedule(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        before = fault_count()
        try:
            await self._run_locked()
        finally:
            if fault_count() != before:
                self.memory_fault("the supervisor (control queue)")

    async def _run_locked(self) -> None:
        while True:
            async with self.lock:
                self._again = False
                state = self.state
                if state is None or self.queue is None or not state.enabled or state.broken:
                    return
                try:
                    more = await self._drain()
                except RingError as exc:
                    self.broken(str(exc))
                    return
            if not more and not self._again:
                return
            # A guest that floods its control queue gets a share of the
            # supervisor, not all of it: with the lock released, the event loop
            # (vhost-user messages, memory changes, workers, signals) runs, then
            # the queue is served again.
            await asyncio.sleep(0)

    async def _drain(self) -> bool:
        """Serve up to CONTROL_BUDGET requests; True if more may be waiting."""
        served = 0
        while True:
            q = self.queue
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
                self.publish()
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
            target, _number = decode_address(lun)
            response = (VIRTIO_SCSI_S_BAD_TARGET if target == LUN_BAD_TARGET
                        or not self.lun_exists(target, None) else VIRTIO_SCSI_S_OK)
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
        target, number = decode_address(lun_bytes)
        if target == LUN_BAD_TARGET or not self.lun_exists(target, None) or (
                number != WLUN_REPORT_LUNS and subtype != VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET
                and not self.lun_exists(target, number)):
            self.glog.warning("tmf_bad_lun", tmf=name, lun=lun_bytes.hex())
            return VIRTIO_SCSI_S_BAD_TARGET
        if subtype not in TMF_NAMES or subtype == VIRTIO_SCSI_T_TMF_CLEAR_ACA:
            self.glog.warning("tmf_rejected", tmf=name, lun=number)
            return VIRTIO_SCSI_S_FUNCTION_REJECTED
        scope_lun = None if subtype == VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET else number
        # Every worker answers only after finishing what it was doing, and says
        # whether a matching command is still in flight (queued I/O).
        found = await self.task_management_round(name, target, scope_lun, tag)
        self.glog.info("task_management", tmf=name, lun=f"{target}:{number}", tag=tag,
                       found=found)
        if subtype in (VIRTIO_SCSI_T_TMF_QUERY_TASK, VIRTIO_SCSI_T_TMF_QUERY_TASK_SET):
            return VIRTIO_SCSI_S_FUNCTION_SUCCEEDED if found else VIRTIO_SCSI_S_OK
        return VIRTIO_SCSI_S_OK
