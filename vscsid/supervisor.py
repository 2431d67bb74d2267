"""The supervisor: owns the vhost-user socket, the guest memory table and the workers.

It runs a uvloop event loop that

* accepts one front-end connection at a time on the vhost-user socket and, for
  each, runs a :class:`Session` that parses messages with the sans-IO codec,
  validates them against :class:`~vscsid.device.DeviceState` and applies them;
* spawns one worker per request virtqueue at start-up, hands each its LUNs,
  then per connection the guest memory and its ring, and watches them;
* serves the control and event virtqueues itself (:mod:`vscsid.control`).

When a front end disconnects, the session's rings are stopped, its memory
unmapped, and the daemon waits for the next connection.
"""
from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import stat
import struct

from . import ipc
from . import log as vlog
from . import systemd
from .config import DaemonConfig, LunSpec
from .control import ControlQueues
from .device import (
    DEFAULT_CDB_SIZE, DEFAULT_SENSE_SIZE,
    FIRST_REQUEST_QUEUE, STATUS_NEEDS_RESET, DeviceState, Rejected, RingState, ScsiConfig,
)
from .virtio.memory import GuestMemory, GuestMemoryError, RegionSpec, fault_count, seal_against_shrink
from .osops import OsOps
from .vhost.protocol import (
    MAX_FDS, BackendCodec, ConfigPayload, Message, MemoryTable, ProtocolError,
    ProtocolFeature, Request, U64Payload, VringAddr, VringFile, VringState,
)
from .vhost.protocol import error_reply
from .vhost.protocol import Inflight as InflightPayload
from .virtio.defs import MAX_MEM_SLOTS, MEMORY_BASELINE_NREGIONS
from .virtio.inflight import queue_region_size
from .lifecycle import Action, Policy, WState
from .workerpool import WorkerGone, WorkerHandle, describe_exit

BLKGETSIZE64 = 0x80081272
RECV_SIZE = 65536
MAX_QUEUED = 64            # parsed messages waiting for the dispatcher before reading pauses
MAX_UNSENT = 1 << 20       # reply bytes a front end may leave unread before it is dropped
WRITE_HIGH = 64 << 10      # unread reply bytes that pause request processing …
WRITE_LOW = 16 << 10       # … until the front end has read down to this
UNREAD_TIMEOUT = 30.0      # seconds a paused session waits for the front end to read


# ---------------------------------------------------------------------------- LUNs

class LunTable:
    """The LUNs the supervisor opened once; fds are handed to every worker."""

    def __init__(self, specs: tuple[LunSpec, ...], ops: OsOps):
        self.specs = specs
        self.fds: list[int] = []
        self.sizes: list[int] = []
        self.ops = ops
        for spec in specs:
            if spec.is_null:
                self.fds.append(-1)
                self.sizes.append(spec.null_size)
                continue
            fd = ops.open_lun(spec.path, spec.readonly, spec.direct)
            self.fds.append(fd)
            self.sizes.append(_fd_size(fd))
        # One byte of shared per-LUN state (write cache enable) for all workers.
        self.state_fd = ops.memfd("vscsid-lun-state", 4096)
        self.state_mm = ops.map_shared(self.state_fd, 4096)
        for i, spec in enumerate(specs):
            self.state_mm[i] = 0 if spec.writethrough else 1

    def worker_config(self) -> tuple[list[dict], list[int]]:
        entries = []
        fds = []
        for i, spec in enumerate(self.specs):
            entries.append({"lun": i, "spec": spec.as_dict(), "info": disk_info(spec, i, self.sizes[i])})
            if self.fds[i] >= 0:
                fds.append(self.fds[i])
        fds.append(self.state_fd)
        return entries, fds

    def close(self) -> None:
        for fd in self.fds:
            if fd >= 0:
                self.ops.close(fd)
        self.state_mm.close()
        self.ops.close(self.state_fd)


def _fd_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("<Q", buf)[0]
    return st.st_size


def disk_info(spec: LunSpec, index: int, size: int) -> dict:
    """The static identity of a LUN (what the SCSI target reports), as plain data.
    The NAA designator (VPD 83) is derived from the serial by the target itself."""
    serial = spec.effective_serial(index)
    return {
        "block_size": spec.block_size,
        "num_blocks": size // spec.block_size,
        "readonly": spec.readonly,
        "serial": serial,
        "rotational": spec.rotational,
        "vendor": spec.vendor,
        "product": spec.product,
        "write_cache": not spec.writethrough,
        "discard": spec.discard,
    }


# ---------------------------------------------------------------------------- session

class Session:
    """One front-end connection."""

    def __init__(self, sup: "Supervisor", sock: socket.socket, conn_id: int):
        self.sup = sup
        self.sock = sock
        self.conn_id = conn_id
        self.loop = sup.loop
        self.ops = sup.ops
        self.log = vlog.get(conn=conn_id)
        self.codec = BackendCodec(close_fd=self.ops.close)
        self.device = DeviceState(
            num_request_queues=sup.cfg.num_queues,
            max_queue_size=sup.cfg.queue_size,
            config=ScsiConfig(num_queues=sup.cfg.num_queues,
                              seg_max=sup.cfg.seg_max or max(1, sup.cfg.queue_size - 2),
                              max_sectors=sup.cfg.max_sectors, cmd_per_lun=sup.cfg.cmd_per_lun),
        )
        self.mem: GuestMemory | None = None
        self.mem_generation = 0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = asyncio.Event()
        self.control = ControlQueues(self)
        self._warned_features = False
        self.inflight: Inflight | None = None
        self.inflight_recover: set[int] = set()
        self._reading = False
        self._eof_seen = False
        self._writing = False
        self._outq: list = []
        self._unsent = 0
        self._send_failed = False
        self._drained = asyncio.Event()
        self._drained.set()

    # ------------------------------------------------------------------ I/O
    #
    # Reading: at most ``MAX_QUEUED`` parsed messages wait for the dispatcher;
    # beyond that the session stops reading the socket (backpressure) and
    # resumes once the dispatcher has caught up.
    # Writing: replies go out with non-blocking sendmsg; what the peer does not
    # take is buffered and flushed when the socket becomes writable. A front end
    # that stops reading its replies past ``MAX_UNSENT`` bytes is dropped.

    def start(self) -> asyncio.Task:
        self.sock.setblocking(False)
        self._reading = False
        self._resume_reading()
        return self.loop.create_task(self._process())

    def _resume_reading(self) -> None:
        if not self._reading and not self._eof_seen:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True

    def _on_readable(self) -> None:
        try:
            data, anc, flags, _ = self.sock.recvmsg(
                min(self.codec.wanted(), RECV_SIZE), socket.CMSG_SPACE(MAX_FDS * 4),
                socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.log.warning("connection_error", error=str(exc))
            self._eof()
            return
        fds = ipc.fds_from_ancdata(anc)
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                self.ops.close(fd)
            self.log.error("protocol_error", reason="too many fds attached (control data truncated)")
            self._eof()
            return
        if not data:
            for fd in fds:
                self.ops.close(fd)
            pending = self.codec.pending_bytes
            if pending:
                self.log.error("protocol_error", reason="truncated message: connection closed "
                               "in the middle of a message", pending_bytes=pending, fatal=True)
            self._eof()
            return
        self.codec.feed(data, fds)
        while True:
            try:
                msg = self.codec.next_message()
            except ProtocolError as err:
                self.queue.put_nowait(err)
                if err.fatal:
                    self._eof_seen = True
                    self._stop_reading()
                    return
                continue
            if msg is None:
                break
            self.queue.put_nowait(msg)
        if self.queue.qsize() >= MAX_QUEUED:
            self._stop_reading()      # backpressure: resumed by _process

    def _stop_reading(self) -> None:
        if self._reading:
            try:
                self.loop.remove_reader(self.sock.fileno())
            except (ValueError, OSError):
                pass
            self._reading = False

    def _eof(self) -> None:
        self._eof_seen = True
        self._stop_reading()
        self.queue.put_nowait(None)

    async def _send(self, data: bytes, fds=()) -> None:
        """Queue a reply (never blocks the event loop)."""
        if self._send_failed:
            return
        self._outq.append((memoryview(data), list(fds)))
        self._unsent += len(data)
        if self._unsent > MAX_UNSENT:
            self.log.error("frontend_not_reading", unsent_bytes=self._unsent,
                           reason="the front end does not read its replies")
            self._send_failed = True
            self._outq.clear()
            self._drop()
            return
        if not self._writing:
            self._flush_out()

    def _flush_out(self) -> None:
        while self._outq:
            view, fds = self._outq[0]
            try:
                if fds:
                    n = self.sock.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                    struct.pack(f"{len(fds)}i", *fds))])
                    self._outq[0] = (view, [])      # fds travel with the first byte
                else:
                    n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.log.warning("reply_failed", error=str(exc))
                self._send_failed = True
                self._outq.clear()
                self._drop()
                break
            self._unsent -= n
            if n < len(view):
                self._outq[0] = (view[n:], [])
                break
            self._outq.pop(0)
        if self._unsent <= WRITE_LOW:
            self._drained.set()
        want_write = bool(self._outq)
        if want_write and not self._writing:
            self.loop.add_writer(self.sock.fileno(), self._flush_out)
            self._writing = True
        elif not want_write and self._writing:
            self.loop.remove_writer(self.sock.fileno())
            self._writing = False

    async def _wait_drained(self) -> bool:
        self._stop_reading()
        self._drained.clear()
        if self._unsent <= WRITE_LOW:
            self._drained.set()
        try:
            await asyncio.wait_for(self._drained.wait(), UNREAD_TIMEOUT)
            if self._send_failed:
                return False
        except asyncio.TimeoutError:
            self.log.error("frontend_not_reading", unsent_bytes=self._unsent,
                           reason=f"replies left unread for {UNREAD_TIMEOUT:.0f}s")
            self._send_failed = True
            self._outq.clear()
            self._drop()
            return False
        return True

    def _drop(self) -> None:
        """End the session from our side (the dispatcher sees EOF next)."""
        self._drained.set()         # wake a dispatcher waiting for the peer to read
        if not self._eof_seen:
            self._eof()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    async def _process(self) -> None:
        try:
            await self._push_params()          # nothing of a previous front end's config
            while True:
                if self._send_failed:
                    self.log.info("frontend_disconnected", reason="connection lost while replying")
                    break
                if self._unsent > WRITE_HIGH:
                    # The front end is not reading its replies: stop taking requests.
                    if not await self._wait_drained():
                        continue
                if self.queue.qsize() <= MAX_QUEUED // 4:
                    self._resume_reading()
                item = await self.queue.get()
                if item is None:
                    self.log.info("frontend_disconnected")
                    break
                if isinstance(item, ProtocolError):
                    self.log.error("protocol_error", reason=item.reason, request=item.request_name,
                                   fatal=item.fatal, **item.detail)
                    if item.fatal:
                        break
                    if item.need_reply:
                        await self._send(BackendCodec.encode_ack(item.request or 0, ok=False))
                    continue
                await self._dispatch(item)
        finally:
            await self.teardown()

    # ------------------------------------------------------------------ dispatch
    async def _dispatch(self, msg: Message) -> None:
        handler = getattr(self, f"_h_{Request(msg.request).name.lower()}", None)
        reply_ack = msg.need_reply and self.device.has_protocol(ProtocolFeature.REPLY_ACK)
        if handler is None:
            for fd in msg.fds:
                self.ops.close(fd)
            self.log.warning("unsupported_request", request=msg.name)
            await self._refuse(msg, msg.need_reply)
            return
        self.log.debug("request", request=msg.name, payload=repr(msg.payload))
        faults = fault_count()
        try:
            reply = await handler(msg)
        except Rejected as exc:
            for fd in msg.fds:
                self.ops.close(fd)
            self.log.warning("request_rejected", request=msg.name, reason=str(exc))
            reply = _NACK
        except (GuestMemoryError, WorkerGone) as exc:
            for fd in msg.fds:
                self.ops.close(fd)
            self.log.error("request_failed", request=msg.name, reason=str(exc))
            reply = _NACK
        if fault_count() != faults:
            self.memory_fault(f"the supervisor ({msg.name})")
            return
        if reply is _REPLIED:
            return
        if reply is _NACK:
            await self._refuse(msg, reply_ack)
        elif reply is not None:
            await self._send(BackendCodec.encode_reply(msg.request, reply))
        elif reply_ack:
            await self._send(BackendCodec.encode_ack(msg.request, ok=True))

    async def _refuse(self, msg: Message, ack: bool) -> None:
        """Answer a request we refused: its own reply with the failure marker, or a
        failed REPLY_ACK when one is due."""
        payload = error_reply(msg)
        if payload is not None:
            await self._send(BackendCodec.encode_reply(msg.request, payload))
        elif ack:
            await self._send(BackendCodec.encode_ack(msg.request, ok=False))

    # -- features and ownership
    async def _h_get_features(self, msg):
        return U64Payload(self.device.offered_features)

    async def _h_set_features(self, msg):
        unknown = self.device.set_features(msg.payload.value)
        if unknown and not self._warned_features:
            self._warned_features = True
            self.log.info("features_not_offered_ignored", bits=hex(unknown))
        self.log.info("features_set", features=hex(self.device.acked_features),
                      event_idx=self.device.event_idx)
        return None

    async def _h_get_protocol_features(self, msg):
        return U64Payload(self.device.offered_protocol_features)

    async def _h_set_protocol_features(self, msg):
        self.device.set_protocol_features(msg.payload.value)
        self.log.info("protocol_features_set", features=hex(msg.payload.value))
        return None

    async def _h_set_owner(self, msg):
        self.device.owner = True
        return None

    async def _h_reset_owner(self, msg):
        await self._reset("RESET_OWNER")
        return None

    async def _h_reset_device(self, msg):
        await self._reset("RESET_DEVICE")
        return None

    async def _reset(self, why: str) -> None:
        for ring in self.device.rings:
            if ring.started:
                await self._stop_ring(ring)
            for fd in ring.fds():
                self.ops.close(fd)
        self.device.reset()
        self.inflight_recover.clear()
        await self._push_params()
        self.log.info("device_reset", reason=why)

    async def _h_get_queue_num(self, msg):
        return U64Payload(self.device.num_rings)

    async def _h_get_status(self, msg):
        return U64Payload(self.device.status)

    async def _h_set_status(self, msg):
        value = msg.payload.value
        if value > 0xFF:
            raise Rejected(f"status {value:#x} does not fit 8 bits")
        self.device.status = value
        return None

    # -- config space
    async def _h_get_config(self, msg):
        p = msg.payload
        data = self.device.read_config(p.offset, p.size)   # Rejected: zero-size reply
        return ConfigPayload(p.offset, p.size, p.flags, data)

    async def _h_set_config(self, msg):
        p = msg.payload
        self.device.write_config(p.offset, p.data, p.flags)
        await self._push_params()
        return None

    async def _push_params(self) -> None:
        """Tell every worker the current cdb_size/sense_size (config space)."""
        cfg = self.device.config
        for w in self.sup.workers:
            if w.chan is not None:
                try:
                    await w.request("params", cdb_size=cfg.cdb_size, sense_size=cfg.sense_size)
                except (WorkerGone, asyncio.TimeoutError) as exc:
                    # A restarting worker gets them with its configure message.
                    self.log.warning("worker_params_failed", queue=w.queue, error=str(exc))

    # -- memory
    async def _h_set_mem_table(self, msg):
        table: MemoryTable = msg.payload
        specs = [RegionSpec(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
                 for r in table.regions]
        fds = list(msg.fds)
        msg.fds = []
        try:
            new = GuestMemory.map(specs, fds, max_regions=MEMORY_BASELINE_NREGIONS,
                                  generation=self.mem_generation + 1)
        except GuestMemoryError:
            for fd in fds:
                self.ops.close(fd)
            raise
        await self._swap_memory(new)
        return None

    async def _swap_memory(self, new: GuestMemory) -> None:
        """Install a new memory table everywhere: quiesce, remap, resume.

        The control queues drop their views under their lock and rebuild them on
        the new mapping; every worker drains its in-flight requests, remaps and
        rebuilds its ring at the same indices. Only then is the old mapping
        closed, so no view of it survives anywhere. The session owns the region
        fds (each Region records its own): those the new table no longer uses
        are closed with the old mapping."""
        old = self.mem
        self.mem_generation += 1
        async with self.control.lock:
            self.control.release_views()
            self.mem = new
            self.control.rebuild_views()
        await self._send_memory_to_workers()
        if old is not None:
            retired = set(old.fds()) - set(new.fds())
            _close_memory(old)
            for fd in retired:
                self.ops.close(fd)
        self.log.info("memory_table_set", generation=self.mem_generation,
                      regions=[r for r in new.region_info()])

    # -- CONFIGURE_MEM_SLOTS
    async def _h_get_max_mem_slots(self, msg):
        return U64Payload(MAX_MEM_SLOTS)

    async def _h_add_mem_reg(self, msg):
        r = msg.payload.region
        fd = msg.fds[0]
        msg.fds = []
        spec = RegionSpec(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        specs = (self.mem.specs() if self.mem is not None else []) + [spec]
        fds = (self.mem.fds() if self.mem is not None else []) + [fd]
        try:
            new = GuestMemory.map(specs, fds, max_regions=MAX_MEM_SLOTS,
                                  generation=self.mem_generation + 1)
        except GuestMemoryError:
            self.ops.close(fd)
            raise
        await self._swap_memory(new)
        return None

    async def _h_rem_mem_reg(self, msg):
        for fd in msg.fds:       # the spec allows (and says to close) a stray fd
            self.ops.close(fd)
        msg.fds = []
        r = msg.payload.region
        if self.mem is None:
            raise Rejected("REM_MEM_REG without a memory table")
        keep = [(s, fd) for s, fd in zip(self.mem.specs(), self.mem.fds())
                if not (s.guest_phys_addr == r.guest_phys_addr and s.memory_size == r.memory_size
                        and s.userspace_addr == r.userspace_addr)]
        if len(keep) == len(self.mem.regions):
            raise Rejected(f"REM_MEM_REG: no region at GPA {r.guest_phys_addr:#x} size "
                           f"{r.memory_size:#x}")
        if keep:
            new = GuestMemory.map([k[0] for k in keep], [k[1] for k in keep],
                                  max_regions=MAX_MEM_SLOTS, generation=self.mem_generation + 1)
        else:
            new = GuestMemory([], generation=self.mem_generation + 1)
        await self._swap_memory(new)
        return None

    async def _send_memory_to_workers(self, workers=None) -> None:
        if self.mem is None:
            return
        regions = [s.as_dict() for s in self.mem.specs()]
        targets = [w for w in (workers or self.sup.workers) if w.chan is not None]
        results = await asyncio.gather(*(
            w.request("mem", self.mem.fds(), regions=regions, generation=self.mem_generation,
                      max_regions=MAX_MEM_SLOTS)
            for w in targets), return_exceptions=True)
        for w, res in zip(targets, results):
            if isinstance(res, BaseException) or not res.get("ok"):
                self.log.error("worker_memory_failed", queue=w.queue,
                               error=str(res) if isinstance(res, BaseException) else res.get("error"))

    # -- rings
    async def _h_set_vring_num(self, msg):
        self.device.set_vring_num(msg.payload.index, msg.payload.num)
        return None

    async def _h_set_vring_base(self, msg):
        self.device.set_vring_base(msg.payload.index, msg.payload.num)
        return None

    async def _h_set_vring_addr(self, msg):
        p: VringAddr = msg.payload
        ring = self.device.ring(p.index)
        if ring.started:
            raise Rejected(f"ring {p.index} is started; its addresses cannot change")
        if p.flags & ~VringAddr.F_LOG:
            raise Rejected(f"unknown vring address flags {p.flags:#x}")
        if p.flags & VringAddr.F_LOG:
            raise Rejected("dirty logging requested but not offered")
        ring.desc_uva, ring.used_uva, ring.avail_uva = p.desc_user_addr, p.used_user_addr, p.avail_user_addr
        ring.addr_set = True
        if self.mem is not None and ring.num:
            self._ring_gpas(ring)     # validate now, while the front end can still hear a NACK
        return None

    def _ring_gpas(self, ring: RingState) -> tuple[int, int, int]:
        if self.mem is None:
            raise Rejected(f"ring {ring.index}: no memory table yet")
        if not ring.num:
            raise Rejected(f"ring {ring.index}: size not set")
        if not ring.addr_set:
            raise Rejected(f"ring {ring.index}: addresses not set")
        n = ring.num
        try:
            desc = self.mem.uva_to_gpa(ring.desc_uva, 16 * n)
            avail = self.mem.uva_to_gpa(ring.avail_uva, 6 + 2 * n)
            used = self.mem.uva_to_gpa(ring.used_uva, 6 + 8 * n)
        except GuestMemoryError as exc:
            raise Rejected(f"ring {ring.index}: {exc}") from None
        if desc % 16 or avail % 2 or used % 4:
            raise Rejected(f"ring {ring.index}: misaligned ring addresses")
        return desc, avail, used

    async def _h_get_vring_base(self, msg):
        ring = self.device.ring(msg.payload.index)
        last = await self._stop_ring(ring)
        return VringState(ring.index, last)

    async def _stop_ring(self, ring: RingState) -> int:
        """Stop a ring; returns the next available index to process."""
        last = ring.base
        if ring.started:
            if ring.index < FIRST_REQUEST_QUEUE:
                last = await self.control.stop(ring)
            else:
                w = self.sup.worker_for(ring.index)
                try:
                    rep = await w.request("stop")
                    if rep.get("ok"):
                        last = int(rep["last_avail"])
                except WorkerGone as exc:
                    self.log.error("ring_stop_without_worker", ring=ring.index, error=str(exc))
                    last = ring.base
            ring.started = False
            ring.base = last
            self.log.info("ring_stopped", ring=ring.index, last_avail=last)
        if ring.kick_fd >= 0:
            self.ops.close(ring.kick_fd)
            ring.kick_fd = -1
        return last

    async def _h_set_vring_kick(self, msg):
        p: VringFile = msg.payload
        ring = self.device.ring(p.index)
        if p.nofd:
            raise Rejected(f"ring {p.index}: polling mode (no kick fd) is not supported")
        fd = msg.fds[0]
        msg.fds = []                     # ours now: the ring owns it from here on
        old = ring.kick_fd
        ring.kick_fd = fd
        if old >= 0:
            self.ops.close(old)
        if ring.started:
            # A new kick fd for a running ring: swap it.
            if ring.index < FIRST_REQUEST_QUEUE:
                self.control.set_kick(ring)
            else:
                await self.sup.worker_for(ring.index).request("kick", [fd])
            return None
        try:
            await self._start_ring(ring)
        except BaseException:
            # Not started: do not keep the fd (its number may be reused).
            self.ops.close(ring.kick_fd)
            ring.kick_fd = -1
            raise
        return None

    async def _start_ring(self, ring: RingState, resume: bool = False) -> None:
        desc, avail, used = self._ring_gpas(ring)
        if not ring.started:
            ring.enabled = ring.enabled or self.device.rings_enabled_on_start()
        if ring.index < FIRST_REQUEST_QUEUE:
            self.control.start(ring, desc, avail, used)
            ring.started = True
            self.log.info("ring_started", ring=ring.index, size=ring.num, base=ring.base)
            return
        w = self.sup.worker_for(ring.index)
        inflight = self._inflight_for(ring)
        recover = resume or ring.index in self.inflight_recover
        fds = [ring.kick_fd] + ([ring.call_fd] if ring.call_fd >= 0 else [])
        fields = {}
        if inflight is not None:
            fds.append(inflight[0])
            fields = {"inflight_offset": inflight[1], "inflight_size": inflight[2]}
        if ring.err_fd >= 0:
            fds.append(ring.err_fd)
        rep = await w.request("start", fds, size=ring.num, desc=desc, avail=avail, used=used,
                              last_avail=ring.base, event_idx=self.device.event_idx,
                              enabled=ring.enabled, has_call=ring.call_fd >= 0,
                              has_inflight=inflight is not None, has_err=ring.err_fd >= 0,
                              recover=recover, resume=resume, **fields)
        if not rep.get("ok"):
            raise Rejected(f"ring {ring.index}: worker refused to start: {rep.get('error')}")
        self.inflight_recover.discard(ring.index)
        ring.started = True
        ring.broken = False

    # -- inflight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)
    def _inflight_for(self, ring: RingState) -> tuple[int, int, int] | None:
        """(fd, offset, size) of the ring's inflight region, creating our own
        region when the front end did not provide one."""
        if self.inflight is None:
            qs = self.device.max_queue_size
            per = queue_region_size(qs)
            fd = self.ops.memfd("vscsid-inflight", per * self.device.num_rings)
            self.inflight = Inflight(fd=fd, offset=0, per_queue=per, queue_size=qs,
                                     num_queues=self.device.num_rings, from_frontend=False)
        inf = self.inflight
        if ring.index >= inf.num_queues or ring.num > inf.queue_size:
            self.log.warning("inflight_region_unusable", ring=ring.index, size=ring.num,
                             region_queues=inf.num_queues, region_queue_size=inf.queue_size)
            return None
        return inf.fd, inf.offset + ring.index * inf.per_queue, inf.per_queue

    def _drop_inflight(self) -> None:
        if self.inflight is not None:
            self.ops.close(self.inflight.fd)
            self.inflight = None

    async def _h_get_inflight_fd(self, msg):
        p: InflightPayload = msg.payload
        if not 0 < p.num_queues <= self.device.num_rings:
            raise Rejected(f"GET_INFLIGHT_FD for {p.num_queues} queues (device has "
                           f"{self.device.num_rings})")
        qs = p.queue_size
        if not 0 < qs <= MAX_INFLIGHT_QUEUE_SIZE or qs & (qs - 1):
            raise Rejected(f"GET_INFLIGHT_FD queue size {qs} is not a power of two <= "
                           f"{MAX_INFLIGHT_QUEUE_SIZE}")
        per = queue_region_size(qs)
        size = per * p.num_queues
        fd = self.ops.memfd("vscsid-inflight", size)
        seal_memfd(fd)
        self._drop_inflight()
        self.inflight = Inflight(fd=fd, offset=0, per_queue=per, queue_size=qs,
                                 num_queues=p.num_queues, from_frontend=True)
        self.inflight_recover.clear()
        self.log.info("inflight_region_created", queues=p.num_queues, queue_size=qs, bytes=size)
        await self._send(BackendCodec.encode_reply(
            msg.request, InflightPayload(size, 0, p.num_queues, qs)), [fd])
        return _REPLIED

    async def _h_set_inflight_fd(self, msg):
        p: InflightPayload = msg.payload
        fd = msg.fds[0]
        msg.fds = []
        try:
            if not 0 < p.num_queues <= self.device.num_rings:
                raise Rejected(f"SET_INFLIGHT_FD for {p.num_queues} queues")
            qs = p.queue_size
            if not 0 < qs <= MAX_INFLIGHT_QUEUE_SIZE or qs & (qs - 1):
                raise Rejected(f"SET_INFLIGHT_FD queue size {qs} is not a power of two")
            per = queue_region_size(qs)
            if p.mmap_size < per * p.num_queues:
                raise Rejected(f"inflight region of {p.mmap_size} bytes is too small for "
                               f"{p.num_queues} queues of {qs}")
            seal_against_shrink(fd)      # it is mapped by workers: no truncation under them
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < p.mmap_offset + p.mmap_size:
                raise Rejected("inflight fd is not a file covering the region")
        except Rejected:
            self.ops.close(fd)
            raise
        self._drop_inflight()
        self.inflight = Inflight(fd=fd, offset=p.mmap_offset, per_queue=per, queue_size=qs,
                                 num_queues=p.num_queues, from_frontend=True)
        # The front end kept this region while we were away: recover from it
        # when each ring starts.
        self.inflight_recover = set(range(p.num_queues))
        self.log.info("inflight_region_set", queues=p.num_queues, queue_size=qs)
        return None

    async def _h_set_vring_call(self, msg):
        p: VringFile = msg.payload
        ring = self.device.ring(p.index)
        fd = -1 if p.nofd else msg.fds[0]
        msg.fds = []
        if ring.call_fd >= 0:
            self.ops.close(ring.call_fd)
        ring.call_fd = fd
        if ring.started:
            if ring.index < FIRST_REQUEST_QUEUE:
                self.control.set_call(ring)
            else:
                await self.sup.worker_for(ring.index).request("call", [fd] if fd >= 0 else [])
        return None

    async def _h_set_vring_err(self, msg):
        p: VringFile = msg.payload
        ring = self.device.ring(p.index)
        fd = -1 if p.nofd else msg.fds[0]
        msg.fds = []
        if ring.err_fd >= 0:
            self.ops.close(ring.err_fd)
        ring.err_fd = fd
        if ring.started and ring.index >= FIRST_REQUEST_QUEUE:
            await self.sup.worker_for(ring.index).request("err", [fd] if fd >= 0 else [])
        return None

    async def _h_set_vring_enable(self, msg):
        p: VringState = msg.payload
        ring = self.device.ring(p.index)
        if p.num not in (0, 1):
            raise Rejected(f"SET_VRING_ENABLE value {p.num} is not 0 or 1")
        if not self.device.protocol_features_negotiated and self.device.features_set:
            raise Rejected("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        ring.enabled = bool(p.num)
        if ring.started:
            if ring.index < FIRST_REQUEST_QUEUE:
                self.control.set_enabled(ring)
            else:
                await self.sup.worker_for(ring.index).request("enable", on=ring.enabled)
        return None

    async def resume_worker(self, w: WorkerHandle) -> None:
        """Bring a restarted worker back to where its predecessor was."""
        if self.mem is None:
            return
        await self._send_memory_to_workers([w])      # (configure carried cdb/sense sizes)
        ring = self.device.rings[w.queue + FIRST_REQUEST_QUEUE]
        if ring.started and ring.kick_fd >= 0:
            ring.started = False
            # The replacement worker recovers from the ring's inflight region:
            # whatever its predecessor popped and did not complete is resubmitted.
            await self._start_ring(ring, resume=True)
            self.log.info("worker_resumed", queue=w.queue, ring=ring.index)

    # ------------------------------------------------------------------ events from workers
    def memory_fault(self, where: str) -> None:
        """Guest memory faulted (SIGBUS, survived): this front end's memory is gone."""
        if self._eof_seen:
            return
        self.log.error("frontend_dropped", reason=f"guest memory fault in {where}: the front "
                       "end shrank or removed its memory; closing its connection")
        self._send_failed = True
        self._outq.clear()
        self._drop()

    def on_worker_event(self, worker: WorkerHandle, msg: dict) -> None:
        if msg.get("event") == "memory_fault":
            self.memory_fault(f"worker {worker.queue}")
            return
        if msg.get("event") == "ring_broken":
            ring = self.device.rings[worker.queue + FIRST_REQUEST_QUEUE]
            ring.broken = True
            self.device.status |= STATUS_NEEDS_RESET
            self.log.error("ring_needs_reset", ring=ring.index, reason=msg.get("reason"))

    # ------------------------------------------------------------------ teardown
    async def teardown(self) -> None:
        self._stop_reading()
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
            self._writing = False
        for ring in self.device.rings:
            try:
                if ring.started:
                    await self._stop_ring(ring)
            except Exception:  # keep tearing down
                self.log.exception("ring_stop_failed", ring=ring.index)
            for fd in ring.fds():
                self.ops.close(fd)
            ring.kick_fd = ring.call_fd = ring.err_fd = -1
        self.control.close()
        self._drop_inflight()
        if self.mem is not None:
            fds = self.mem.fds()
            _close_memory(self.mem)
            self.mem = None
            for fd in fds:
                self.ops.close(fd)
        self.codec.close()
        # Workers drop their mappings too, so the guest's memory is released.
        for w in self.sup.workers:
            if w.chan is not None:
                try:
                    await w.request("unmap", timeout=10)
                except (WorkerGone, asyncio.TimeoutError):
                    pass
        try:
            self.sock.close()
        except OSError:
            pass
        self.closed.set()
        self.log.info("session_closed")


def _close_memory(mem: GuestMemory) -> None:
    try:
        mem.close()
    except BufferError:
        pass


class _Nack:
    pass


_NACK = _Nack()
_REPLIED = _Nack()     # the handler sent its own reply (with fds)


class Inflight:
    """The inflight-tracking region of a session (ours, or the front end's)."""

    __slots__ = ("fd", "offset", "per_queue", "queue_size", "num_queues", "from_frontend")

    def __init__(self, *, fd, offset, per_queue, queue_size, num_queues, from_frontend):
        self.fd = fd
        self.offset = offset
        self.per_queue = per_queue
        self.queue_size = queue_size
        self.num_queues = num_queues
        self.from_frontend = from_frontend


MAX_INFLIGHT_QUEUE_SIZE = 32768


def seal_memfd(fd: int) -> None:
    import fcntl as _f
    try:
        _f.fcntl(fd, _f.F_ADD_SEALS, _f.F_SEAL_GROW | _f.F_SEAL_SHRINK | _f.F_SEAL_SEAL)
    except OSError:
        pass


# ---------------------------------------------------------------------------- supervisor

class Supervisor:
    def __init__(self, cfg: DaemonConfig, listener: socket.socket, luns: LunTable,
                 ops: OsOps | None = None, policy: Policy | None = None,
                 stats_interval: float = 60.0):
        self.cfg = cfg
        self.listener = listener
        self.luns = luns
        self.ops = ops or OsOps()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.workers: list[WorkerHandle] = []
        self.session: Session | None = None
        self.conn_counter = 0
        self.log = vlog.get()
        self.stopping = False
        self.exit_code = 0
        self._stop_event: asyncio.Event | None = None
        self._signal_queue: list[int] = []
        self.log_settings = vlog.settings()
        self.policy = policy or Policy()
        self.stats_interval = stats_interval
        self.early_signals: list[int] = []
        from .stats import ProcessStats
        self.proc_stats = ProcessStats()

    def worker_for(self, ring_index: int) -> WorkerHandle:
        return self.workers[ring_index - FIRST_REQUEST_QUEUE]

    # ------------------------------------------------------------------ workers
    def _spawn(self, w: WorkerHandle) -> None:
        w.spawn(self.log_settings["format"], self.log_settings["level"])
        if self.cfg.cpu_affinity:
            from .stats import apply_affinity, format_cpus, worker_cpus

            cpus = worker_cpus(self.cfg.cpu_affinity, w.queue)
            try:
                apply_affinity(w.pid, cpus)
                w.log.info("worker_pinned", cpus=format_cpus(cpus))
            except (OSError, ValueError) as exc:
                w.log.error("worker_pin_failed", cpus=format_cpus(cpus), error=str(exc))

    async def _configure(self, w: WorkerHandle) -> None:
        entries, fds = self.luns.worker_config()
        cfg = self.session.device.config if self.session else None
        rep = await w.request("configure", fds, queue=w.queue, luns=entries, state_page=True,
                              engine=self.cfg.engine, poll_us=self.cfg.poll_us,
                              cdb_size=cfg.cdb_size if cfg else DEFAULT_CDB_SIZE,
                              sense_size=cfg.sense_size if cfg else DEFAULT_SENSE_SIZE,
                              timeout=60)
        if not rep.get("ok"):
            raise RuntimeError(f"worker {w.queue} failed to configure: {rep.get('error')}")
        w.life.configured(self.ops.monotonic())

    def _on_worker_exit(self, w: WorkerHandle, code: int) -> None:
        if self.stopping:
            w.life.stopping()
        decision = w.life.exited(self.ops.monotonic(), code)
        if decision.action == Action.NONE:
            w.log.info("worker_exited", status=describe_exit(code))
            return
        w.log.error("worker_died", status=describe_exit(code), next=decision.action.value,
                    delay=decision.delay, reason=decision.reason)
        if decision.action == Action.FATAL:
            self.log.critical("worker_failing_repeatedly", queue=w.queue, reason=decision.reason,
                              status=describe_exit(code))
            self.exit_code = 1
            self.request_stop()
            return
        self.loop.create_task(self._restart(w, decision.delay))

    async def _restart(self, w: WorkerHandle, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self.stopping:
            return
        self._spawn(w)
        try:
            await self._configure(w)
            if self.session is not None:
                await self.session.resume_worker(w)
        except Exception as exc:
            w.log.error("worker_restart_failed", error=str(exc))
            w.signal(signal.SIGKILL)

    async def _heartbeat_loop(self) -> None:
        """Ping every worker; a worker that stops answering gets SIGABRT (it dumps
        its stack), then SIGKILL; its exit then restarts it like any crash."""
        interval = self.policy.heartbeat_interval
        last_stats = self.ops.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = self.ops.monotonic()
            pings = [w for w in self.workers if w.alive and w.chan is not None
                     and w.state in (WState.RUNNING, WState.STARTING)]
            results = await asyncio.gather(*(w.request("ping", timeout=interval)
                                             for w in pings), return_exceptions=True)
            now = self.ops.monotonic()
            for w, res in zip(pings, results):
                if isinstance(res, dict) and res.get("ok"):
                    w.life.heartbeat(now)
                    w.last_stats = res
            for w in self.workers:
                if not w.alive:
                    continue
                d = w.life.check(now)
                if d.action == Action.ABORT:
                    w.log.error("worker_hung", reason=d.reason, action="SIGABRT")
                    w.signal(signal.SIGABRT)
                elif d.action == Action.KILL:
                    w.log.error("worker_hung", reason=d.reason, action="SIGKILL")
                    w.signal(signal.SIGKILL)
            if self.stats_interval and now - last_stats >= self.stats_interval:
                last_stats = now
                self.log_stats()

    def log_stats(self) -> None:
        """One structured line per worker (and one for the supervisor): CPU time,
        context switches and private memory (USS: RSS also counts the guest
        memory every worker maps) from psutil, request counters from the worker."""
        keys = ("cpu_user_s", "cpu_system_s", "ctx_voluntary", "ctx_involuntary", "mem_uss",
                "num_fds")
        for w in self.workers:
            sample = self.proc_stats.sample(w.pid) if w.alive else None
            ring = (w.last_stats or {}).get("stats", {})
            w.log.info("worker_stats", state=w.state.value, restarts=w.life.restarts,
                       requests=ring.get("requests"), fast=ring.get("fast"),
                       in_flight=(w.last_stats or {}).get("in_flight"),
                       **({k: sample[k] for k in keys} if sample else {}))
        me = self.proc_stats.sample(os.getpid())
        if me:
            self.log.info("supervisor_stats", **{k: me[k] for k in keys})

    # ------------------------------------------------------------------ main
    def request_stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()

    def _on_signal(self, sig: int) -> None:
        # Handlers only enqueue; the loop acts.
        self._signal_queue.append(sig)
        self.loop.call_soon(self._handle_signals)

    def _handle_signals(self) -> None:
        while self._signal_queue:
            sig = self._signal_queue.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.log.info("shutdown_requested", signal=signal.Signals(sig).name)
                self.request_stop()
            elif sig == signal.SIGHUP:
                systemd.reloading("reopening logs")
                vlog.reopen()
                self.log.info("logs_reopened")
                systemd.ready(self._status_text())

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        for sig in self.early_signals:      # arrived before the loop ran
            self._on_signal(sig)
        self.workers = [WorkerHandle(q, self.loop, self.ops, on_event=self._on_worker_event,
                                     on_exit=self._on_worker_exit, policy=self.policy)
                        for q in range(self.cfg.num_queues)]
        for w in self.workers:
            self._spawn(w)
        results = await asyncio.gather(*(self._configure(w) for w in self.workers),
                                       return_exceptions=True)
        for w, res in zip(self.workers, results):
            if isinstance(res, BaseException):
                self.log.critical("worker_boot_failed", queue=w.queue, error=str(res))
                await self._shutdown()
                return 1
        self.listener.setblocking(False)
        accept_task = self.loop.create_task(self._accept_loop())
        heartbeat_task = self.loop.create_task(self._heartbeat_loop())
        self.log.info("ready", socket=self.cfg.socket_path or f"fd:{self.cfg.listen_fd}",
                      queues=self.cfg.num_queues, luns=len(self.luns.specs),
                      workers=[w.pid for w in self.workers])
        systemd.ready(self._status_text())
        watchdog_task = None
        interval = systemd.watchdog_interval()
        if interval:
            watchdog_task = self.loop.create_task(self._watchdog_loop(interval))
        await self._stop_event.wait()
        systemd.stopping("draining in-flight requests")
        accept_task.cancel()
        heartbeat_task.cancel()
        if watchdog_task is not None:
            watchdog_task.cancel()
        await self._shutdown()
        return self.exit_code

    def _status_text(self) -> str:
        where = self.cfg.socket_path or f"fd {self.cfg.listen_fd}"
        if self.session is not None:
            return (f"serving {len(self.luns.specs)} LUN(s) on {self.cfg.num_queues} queue(s) "
                    f"to front end #{self.session.conn_id}")
        return f"{len(self.luns.specs)} LUN(s), {self.cfg.num_queues} queue(s); waiting for a front end on {where}"

    def healthy(self) -> bool:
        """No worker hung or failing: what the systemd watchdog vouches for."""
        return all(w.life.aborted_at is None and w.state != WState.FATAL for w in self.workers)

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            if self.healthy():
                systemd.watchdog_ping()
            await asyncio.sleep(interval)

    async def _accept_loop(self) -> None:
        while True:
            conn, _ = await self.loop.sock_accept(self.listener)
            if self.session is not None:
                self.log.warning("connection_refused", reason="a front end is already connected")
                conn.close()
                continue
            self.conn_counter += 1
            self.session = Session(self, conn, self.conn_counter)
            self.log.info("frontend_connected", conn=self.conn_counter)
            systemd.status(self._status_text())
            task = self.session.start()
            task.add_done_callback(self._session_done)

    def _session_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("session_crashed", error=repr(task.exception()))
        self.session = None
        if not self.stopping:
            systemd.status(self._status_text())

    def _on_worker_event(self, w: WorkerHandle, msg: dict) -> None:
        if self.session is not None:
            self.session.on_worker_event(w, msg)

    async def _shutdown(self) -> None:
        self.stopping = True
        if self.session is not None:
            self.session.queue.put_nowait(None)
            try:
                await asyncio.wait_for(self.session.closed.wait(), 30)
            except asyncio.TimeoutError:
                self.log.error("session_teardown_timeout")
        for w in self.workers:
            w.life.stopping()
            if w.chan is not None:
                try:
                    await w.request("exit", timeout=5)
                except (WorkerGone, asyncio.TimeoutError):
                    pass
        deadline = self.ops.monotonic() + 5
        while any(w.alive for w in self.workers) and self.ops.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for w in self.workers:
            if w.alive:
                w.signal(signal.SIGKILL)
        while any(w.alive for w in self.workers):
            await asyncio.sleep(0.02)
        try:
            self.listener.close()
        except OSError:
            pass
        if self.cfg.socket_path:
            self.ops.unlink(self.cfg.socket_path)
        self.luns.close()
        self.log.info("stopped", exit_code=self.exit_code)
