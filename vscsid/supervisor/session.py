"""One front end's session: the vhost-user transport, the sans-IO handler, and the
device behind it — the virtio-scsi control and event queues served here, and one
worker process per request queue (:class:`WorkerRing`).

    socket → Transport (framing, fds, backpressure) → VhostHandler (validate, apply,
    decide the reply) → ring servers / memory → Transport (replies)
"""
from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from vscsid import log as vlog
from vscsid import lunstate
from vscsid import messages as M
from vscsid.config import DaemonConfig
from vscsid.vhost.device import DeviceState, Rejected
from vscsid.vhost.handler import MemoryFault, VhostHandler
from vscsid.vhost.protocol import ProtocolError
from vscsid.vhost.rings import RingServer
from vscsid.vhost.transport import Transport
from vscsid.virtio.defs import MAX_MEM_SLOTS
from vscsid.virtio.memory import GuestMemory
from vscsid.virtio.scsi_wire import CONTROL_QUEUE, EVENT_QUEUE, FIRST_REQUEST_QUEUE
from vscsid.virtio_scsi.config import ScsiConfig, ScsiPersonality
from vscsid.virtio_scsi.controlq import ControlQueue
from vscsid.virtio_scsi.eventq import EventQueue

from .luns import LunTable
from .osops import OsOps
from .workerpool import WorkerGone, WorkerHandle


class Host(Protocol):
    """What a session uses of the supervisor that runs it."""
    cfg: DaemonConfig
    loop: asyncio.AbstractEventLoop
    ops: OsOps
    luns: LunTable
    workers: list[WorkerHandle]


class WorkerRing(RingServer):
    """A request queue: served by its worker process, driven over its channel."""

    tracks_inflight = True

    def __init__(self, session: "Session", queue: int):
        self.session = session
        self.queue = queue

    @property
    def worker(self) -> WorkerHandle:
        return self.session.sup.workers[self.queue]

    async def start(self, ring, addrs, *, event_idx, inflight, recover, resume) -> None:
        msg = M.StartRing(
            size=ring.num, desc=addrs.desc, avail=addrs.avail, used=addrs.used,
            last_avail=ring.base, event_idx=event_idx, enabled=ring.enabled,
            recover=recover, resume=resume, kick=ring.kick_fd,
            call=ring.call_fd if ring.call_fd >= 0 else None,
            err=ring.err_fd if ring.err_fd >= 0 else None,
            inflight=inflight.fd if inflight is not None else None,
            inflight_offset=inflight.offset if inflight is not None else 0,
            inflight_size=inflight.size if inflight is not None else 0)
        rep = await self.worker.request(msg)
        if not rep.ok:
            raise Rejected(f"ring {ring.index}: worker refused to start: {rep.error}")

    async def stop(self, ring) -> int:
        try:
            rep = await self.worker.request(M.StopRing())
        except WorkerGone as exc:
            self.session.log.error("ring_stop_without_worker", ring=ring.index, error=str(exc))
            return ring.base
        return rep.result(M.StopRing).last_avail if rep.ok else ring.base

    async def kick_changed(self, ring) -> None:
        await self.worker.request(M.SetKick(kick=ring.kick_fd))

    async def call_changed(self, ring) -> None:
        await self.worker.request(M.SetCall(call=ring.call_fd if ring.call_fd >= 0 else None))

    async def err_changed(self, ring) -> None:
        await self.worker.request(M.SetErr(err=ring.err_fd if ring.err_fd >= 0 else None))

    async def enabled_changed(self, ring) -> None:
        await self.worker.request(M.EnableRing(on=ring.enabled))


class Session:
    """One front-end connection (the DeviceBackend of its handler)."""

    def __init__(self, sup: Host, sock: socket.socket, conn_id: int):
        self.sup = sup
        self.conn_id = conn_id
        self.loop = sup.loop
        self.ops = sup.ops
        self.log = vlog.get(conn=conn_id)
        cfg = sup.cfg
        personality = ScsiPersonality(ScsiConfig(
            num_queues=cfg.num_queues, seg_max=cfg.seg_max or max(1, cfg.queue_size - 2),
            max_sectors=cfg.max_sectors, cmd_per_lun=cfg.cmd_per_lun,
            max_target=max(sup.luns.targets(), default=0)))
        self.device = DeviceState(personality=personality, max_queue_size=cfg.queue_size)
        self.config = personality.config
        self.transport = Transport(sock, self.loop, self.log, self.ops.close)
        self.handler = VhostHandler(self.device, self, self.log)
        qlog = vlog.get(conn=conn_id, vq=CONTROL_QUEUE)
        self.control = ControlQueue(self.loop, qlog, self._memory, self.handler.ring_broken,
                                    task_management=self._task_management,
                                    lun_exists=sup.luns.exists, memory_fault=self.memory_fault)
        self.events = EventQueue(self.loop, vlog.get(conn=conn_id, vq=EVENT_QUEUE), self._memory,
                                 self.handler.ring_broken,
                                 features=lambda: self.device.acked_features,
                                 memory_fault=self.memory_fault)
        self.servers: list[RingServer] = [self.control, self.events] + [
            WorkerRing(self, q) for q in range(cfg.num_queues)]
        self.closed = asyncio.Event()

    @property
    def mem(self) -> GuestMemory | None:
        return self.handler.mem

    def _memory(self) -> GuestMemory | None:
        return self.handler.mem

    # ------------------------------------------------------------------ DeviceBackend
    def ring_server(self, index: int) -> RingServer:
        return self.servers[index]

    async def install_memory(self, mem: GuestMemory) -> None:
        """Quiesce, remap, resume: the control and event queues drop their views under
        their locks and rebuild them on the new mapping; every worker drains its
        in-flight requests, remaps and rebuilds its ring at the same indices. Only
        then does the handler close the old mapping, so no view of it survives."""
        local = (self.control, self.events)
        for q in local:
            await q.lock.acquire()
        try:
            for q in local:
                q.release_views()
            for q in local:
                q.rebuild_views()
        finally:
            for q in local:
                q.lock.release()
        await self.send_memory_to_workers()

    async def device_reset(self) -> None:
        """The virtio device was reset: every LU was too (POWER ON unit attention)."""
        self.sup.luns.establish_all(lunstate.UA_POWER_ON)

    async def config_changed(self) -> None:
        """Tell every worker the current cdb_size/sense_size (config space)."""
        for w in self.sup.workers:
            if w.chan is not None:
                try:
                    await w.request(M.SetParams(cdb_size=self.config.cdb_size,
                                                sense_size=self.config.sense_size))
                except (WorkerGone, asyncio.TimeoutError) as exc:
                    # A restarting worker gets them with its configure message.
                    self.log.warning("worker_params_failed", queue=w.queue, error=str(exc))

    def memfd(self, name: str, size: int) -> int:
        return self.ops.memfd(name, size)

    def close_fd(self, fd: int) -> None:
        self.ops.close(fd)

    # ------------------------------------------------------------------ workers
    async def send_memory_to_workers(self, workers=None) -> None:
        mem = self.handler.mem
        if mem is None:
            return
        regions = [s.as_dict() for s in mem.specs()]
        targets = [w for w in (workers or self.sup.workers) if w.chan is not None]
        results = await asyncio.gather(*(
            w.request(M.MapMemory(regions=regions, region_fds=mem.fds(),
                                  generation=self.handler.mem_generation,
                                  max_regions=MAX_MEM_SLOTS))
            for w in targets), return_exceptions=True)
        for w, res in zip(targets, results):
            if isinstance(res, BaseException) or not res.ok:
                self.log.error("worker_memory_failed", queue=w.queue,
                               error=str(res) if isinstance(res, BaseException) else res.error)

    async def _task_management(self, kind: str, target: int, lun: int | None, tag: int) -> bool:
        """One TMF on every worker; True if any had a matching command in flight. A
        LOGICAL UNIT RESET (or I_T NEXUS RESET: every LU of the target) leaves a
        POWER ON, RESET unit attention on the LUs it reset."""
        found = False
        for w in self.sup.workers:
            if w.chan is None:
                continue
            try:
                rep = await w.request(M.TaskMgmt(kind=kind, target=target, lun=lun, tag=tag),
                                      timeout=30)
            except (WorkerGone, asyncio.TimeoutError) as exc:
                self.control.glog.error("tmf_worker_unreachable", tmf=kind, queue=w.queue,
                                        error=str(exc))
                continue
            found = found or rep.result(M.TaskMgmt).found
        if kind in ("logical_unit_reset", "i_t_nexus_reset"):
            self.sup.luns.establish_all(lunstate.UA_POWER_ON, target=target, lun=lun)
        return found

    async def resume_worker(self, w: WorkerHandle) -> None:
        """Bring a restarted worker back to where its predecessor was."""
        if self.handler.mem is None:
            return
        await self.send_memory_to_workers([w])      # (configure carried cdb/sense sizes)
        ring = self.device.rings[w.queue + FIRST_REQUEST_QUEUE]
        if ring.started and ring.kick_fd >= 0:
            ring.started = False
            # The replacement worker recovers from the ring's inflight region:
            # whatever its predecessor popped and did not complete is resubmitted.
            await self.handler.start_ring(ring, resume=True)
            self.log.info("worker_resumed", queue=w.queue, ring=ring.index)

    def on_worker_event(self, worker: WorkerHandle, msg: M.Event) -> None:
        if msg.event == "memory_fault":
            self.memory_fault(f"worker {worker.queue}")
        elif msg.event == "ring_broken":
            self.handler.ring_broken(worker.queue + FIRST_REQUEST_QUEUE, msg.reason or "")

    def memory_fault(self, where: str) -> None:
        """Guest memory faulted (SIGBUS, survived): this front end's memory is gone."""
        if self.transport.eof_seen:
            return
        self.log.error("frontend_dropped", reason=f"guest memory fault in {where}: the front "
                       "end shrank or removed its memory; closing its connection")
        self.transport.fail()

    # ------------------------------------------------------------------ the session
    def start(self) -> asyncio.Task:
        # A new front end is a new initiator: every LU reports POWER ON first.
        self.sup.luns.establish_all(lunstate.UA_POWER_ON)
        self.transport.start()
        return self.loop.create_task(self._process())

    def end(self) -> None:
        self.transport.end()

    async def _process(self) -> None:
        try:
            await self.config_changed()          # nothing of a previous front end's config
            while True:
                if self.transport.send_failed:
                    self.log.info("frontend_disconnected", reason="connection lost while replying")
                    break
                item = await self.transport.next()
                if self.transport.send_failed:
                    continue
                if item is None:
                    self.log.info("frontend_disconnected")
                    break
                if isinstance(item, ProtocolError):
                    self.log.error("protocol_error", reason=item.reason, request=item.request_name,
                                   fatal=item.fatal, **item.detail)
                    if item.fatal:
                        break
                    replies = self.handler.refuse_malformed(item.request, item.need_reply)
                else:
                    try:
                        replies = await self.handler.handle(item)
                    except MemoryFault as exc:
                        self.memory_fault(f"the supervisor ({exc})")
                        continue
                for data, fds in replies:
                    self.transport.send(data, fds)
        finally:
            await self.teardown()

    @property
    def ending(self) -> bool:
        """The front end is gone (or dropped): the session is closing."""
        return self.transport.eof_seen or self.closed.is_set()

    async def teardown(self) -> None:
        self.transport.stop_reading()
        await self.handler.close()
        self.control.close()
        self.events.close()
        # Workers drop their mappings too, so the guest's memory is released.
        for w in self.sup.workers:
            if w.chan is not None:
                try:
                    await w.request(M.Unmap(), timeout=10)
                except (WorkerGone, asyncio.TimeoutError):
                    pass
        self.transport.close()
        self.closed.set()
        self.log.info("session_closed")

