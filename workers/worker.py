"""A data-plane worker: serves one request virtqueue.

The worker is a plain process with an epoll loop (no asyncio): it waits on its
control channel and on the ring's kick eventfd. On a kick it drains every
available request, runs each against the SCSI target, pushes the used entries
and signals the call eventfd once per batch (subject to EVENT_IDX / NO_INTERRUPT
suppression).

Control messages (see :mod:`vscsid.ipc`) configure the LUNs, map guest memory,
start/stop/enable the ring and swap its call fd. A ring is processed only while
it is *started* (it has a kick fd and was not stopped by GET_VRING_BASE) and
*enabled*; kicks that arrive while it is disabled are not lost: enabling
re-checks the ring.
"""
from __future__ import annotations

import errno
import mmap
import os
import select
import signal
import socket
import time
from typing import Any

from vscsid import ipc
from vscsid import log as vlog
from vscsid.config import LunSpec
from vscsid.memory import GuestMemory, GuestMemoryError, RegionSpec

from .request import (
    DEFAULT_CDB_SIZE, DEFAULT_SENSE_SIZE, LUN_BAD_TARGET, REQ_HDR, REQ_HDR_SIZE, RESP_HDR,
    RESP_HDR_SIZE, S_BAD_TARGET, S_FAILURE, S_OK, S_OVERRUN, decode_lun, gather, scatter,
    split_views,
)
from .virtqueue import ChainError, RingError, SplitQueue

BATCH_LIMIT = 1024   # requests per pass before the control channel gets a look


class Worker:
    def __init__(self, chan: socket.socket, log=None):
        self.chan = chan
        self.log = log or vlog.get()
        self.epoll = select.epoll()
        self.mem: GuestMemory | None = None
        self.mem_fds: list[int] = []
        self.queue: SplitQueue | None = None
        self.kick_fd = -1
        self.call_fd = -1
        self.err_fd = -1
        self.started = False
        self.enabled = False
        self.broken = False
        self.more = False
        self.target = None
        self.luns: dict[int, Any] = {}
        self.lun_fds: list[int] = []
        self.state_mm: mmap.mmap | None = None
        self.cdb_size = DEFAULT_CDB_SIZE
        self.sense_size = DEFAULT_SENSE_SIZE
        self.queue_index = -1
        self.running = True
        self.stats = {"requests": 0, "batches": 0, "calls": 0, "kicks": 0, "bad_chains": 0,
                      "bad_target": 0, "failed": 0, "check_condition": 0,
                      "bytes_in": 0, "bytes_out": 0}
        self._ring_params: dict | None = None

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        self.epoll.register(self.chan.fileno(), select.EPOLLIN)
        while self.running:
            timeout = 0 if self.more else 1.0
            try:
                events = self.epoll.poll(timeout)
            except InterruptedError:
                continue
            kicked = self.more
            self.more = False
            for fd, _ev in events:
                if fd == self.chan.fileno():
                    if not self._control():
                        return 0
                elif fd == self.kick_fd:
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                    self.stats["kicks"] += 1
                    kicked = True
            if kicked and self._can_process():
                self.process()
        return 0

    def _can_process(self) -> bool:
        return self.started and self.enabled and not self.broken and self.queue is not None

    # ------------------------------------------------------------------ data path
    def process(self) -> None:
        q = self.queue
        done = 0
        try:
            while True:
                q.disable_kicks()
                heads = q.pop_heads(BATCH_LIMIT)
                for head in heads:
                    try:
                        chain = q.walk(head)
                    except ChainError as exc:
                        self.stats["bad_chains"] += 1
                        self.log.warning("bad_descriptor_chain", head=head, reason=exc.reason)
                        q.push(head, 0)
                        continue
                    q.push(head, self.handle(chain))
                if heads:
                    done += len(heads)
                    self.stats["requests"] += len(heads)
                    self.stats["batches"] += 1
                    q.publish()
                    if q.should_notify() and self.call_fd >= 0:
                        os.eventfd_write(self.call_fd, 1)
                        self.stats["calls"] += 1
                if done >= BATCH_LIMIT:
                    # Let the control channel in; come back without waiting for a kick.
                    self.more = True
                    return
                if not q.enable_kicks():
                    return
        except RingError as exc:
            self._ring_broken(str(exc))

    def _ring_broken(self, reason: str) -> None:
        self.broken = True
        self.log.error("ring_broken", reason=reason)
        if self.err_fd >= 0:
            try:
                os.eventfd_write(self.err_fd, 1)
            except OSError:
                pass
        self._send({"op": "event", "event": "ring_broken", "reason": reason})

    def handle(self, chain) -> int:
        """Run one virtio-scsi command; return the bytes written to the writable part."""
        cdb_size = self.cdb_size
        hdr_len = REQ_HDR_SIZE + cdb_size
        resp_len = RESP_HDR_SIZE + self.sense_size
        in_ = chain.in_
        if chain.out_len < hdr_len or chain.in_len < resp_len:
            self.stats["failed"] += 1
            self.log.warning("request_too_short", head=chain.head, readable=chain.out_len,
                             writable=chain.in_len, need_readable=hdr_len, need_writable=resp_len)
            if chain.in_len >= RESP_HDR_SIZE:
                self._respond(in_, 0, 0, 0, S_FAILURE, b"")
                return RESP_HDR_SIZE
            return 0
        hdr = gather(chain.out, hdr_len)
        lun_bytes, tag, _attr, _prio, _crn = REQ_HDR.unpack_from(hdr, 0)
        lun = decode_lun(lun_bytes)
        out_data_len = chain.out_len - hdr_len
        in_data_len = chain.in_len - resp_len
        if lun == LUN_BAD_TARGET:
            self.stats["bad_target"] += 1
            self._respond(in_, 0, in_data_len or out_data_len, 0, S_BAD_TARGET, b"")
            return resp_len
        if out_data_len and in_data_len:
            # Bidirectional commands need VIRTIO_SCSI_F_INOUT, which we do not offer.
            self.stats["failed"] += 1
            self.log.warning("bidirectional_request", head=chain.head, lun=lun)
            self._respond(in_, 0, in_data_len, 0, S_FAILURE, b"")
            return resp_len
        data_out = SGList(split_views(chain.out, hdr_len) if out_data_len else [])
        data_in = SGList(split_views(in_, resp_len) if in_data_len else [])
        cdb = hdr[REQ_HDR_SIZE:]
        res = self.target.execute(lun, cdb, data_out, data_in, task_tag=tag)
        sense = res.sense[:self.sense_size]
        if res.status:
            self.stats["check_condition"] += 1
        if res.overrun:
            self._respond(in_, 0, in_data_len or out_data_len, 0, S_OVERRUN, b"")
            return resp_len
        if in_data_len:
            residual = in_data_len - res.data_in_len
            self.stats["bytes_in"] += res.data_in_len
        else:
            residual = out_data_len - res.data_out_len
            self.stats["bytes_out"] += res.data_out_len
        self._respond(in_, len(sense), residual, res.status, S_OK, sense)
        return resp_len + res.data_in_len

    def _respond(self, in_views, sense_len, residual, status, response, sense) -> None:
        first = in_views[0]
        if len(first) >= RESP_HDR_SIZE + sense_len:
            RESP_HDR.pack_into(first, 0, sense_len, residual, 0, status, response)
            if sense_len:
                first[RESP_HDR_SIZE:RESP_HDR_SIZE + sense_len] = sense
        else:
            scatter(in_views, RESP_HDR.pack(sense_len, residual, 0, status, response) + sense)

    # ------------------------------------------------------------------ control
    def _send(self, msg: dict, fds=()) -> None:
        try:
            ipc.send(self.chan, msg, fds)
        except OSError as exc:
            self.log.error("control_send_failed", error=str(exc))
            self.running = False

    def _reply(self, req: dict, ok: bool = True, **fields) -> None:
        if "seq" in req:
            self._send({"op": "reply", "seq": req["seq"], "ok": ok, **fields})

    def _control(self) -> bool:
        try:
            msg, fds = ipc.recv(self.chan)
        except ipc.ChannelClosed:
            self.log.info("supervisor_gone")
            return False
        except BlockingIOError:
            return True
        except (ipc.ChannelError, OSError) as exc:
            self.log.error("control_channel_error", error=str(exc))
            return False
        op = msg.get("op")
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            for fd in fds:
                os.close(fd)
            self.log.error("unknown_control_op", op=op)
            self._reply(msg, ok=False, error=f"unknown op {op!r}")
            return True
        try:
            handler(msg, fds)
        except Exception as exc:  # a failed op must not kill the worker silently
            self.log.exception("control_op_failed", op=op)
            self._reply(msg, ok=False, error=f"{type(exc).__name__}: {exc}")
        return self.running

    def _op_configure(self, msg: dict, fds: list[int]) -> None:
        from .backends import FileBackend, NullBackend  # noqa: F401  (imported lazily)
        from .scsi import Disk, DiskInfo, LunState, ScsiTarget

        self.queue_index = msg["queue"]
        self.cdb_size = int(msg.get("cdb_size", DEFAULT_CDB_SIZE))
        self.sense_size = int(msg.get("sense_size", DEFAULT_SENSE_SIZE))
        lun_entries = msg["luns"]
        state_fd = fds[-1] if msg.get("state_page") else -1
        file_fds = fds[:-1] if msg.get("state_page") else fds
        if state_fd >= 0:
            self.state_mm = mmap.mmap(state_fd, mmap.PAGESIZE, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
            os.close(state_fd)
        fd_iter = iter(file_fds)
        luns = {}
        for entry in lun_entries:
            spec = LunSpec.from_dict(entry["spec"])
            number = int(entry["lun"])
            fd = -1 if spec.is_null else next(fd_iter)
            backend = _make_backend(spec, fd)
            info = DiskInfo(**entry["info"])
            state = (LunState.from_buffer(memoryview(self.state_mm)[number:number + 1])
                     if self.state_mm is not None else LunState(wce=not spec.writethrough))
            luns[number] = Disk(info, backend, state=state, log=self.log.bind(lun=number))
        self.luns = luns
        self.target = ScsiTarget(luns, log=self.log)
        self.log.info("worker_configured", luns=sorted(luns))
        self._reply(msg)

    def _op_mem(self, msg: dict, fds: list[int]) -> None:
        specs = [RegionSpec.from_dict(r) for r in msg["regions"]]
        try:
            new = GuestMemory.map(specs, fds, max_regions=int(msg.get("max_regions", 8)),
                                  generation=int(msg.get("generation", 0)))
        except GuestMemoryError as exc:
            for fd in fds:
                os.close(fd)
            self._reply(msg, ok=False, error=str(exc))
            return
        for fd in fds:
            os.close(fd)      # the mappings keep the memory alive
        self._drop_queue_views()
        if self.mem is not None:
            try:
                self.mem.close()
            except BufferError:
                self.log.warning("old_memory_views_alive")
        self.mem = new
        if self._ring_params is not None and self.started:
            self._build_queue(self._ring_params, keep_index=True)
        self.log.info("memory_mapped", generation=new.generation, regions=len(specs))
        self._reply(msg)

    def _drop_queue_views(self) -> None:
        if self.queue is not None:
            self.queue.release()
            self.queue = None

    def _build_queue(self, p: dict, keep_index: bool = False) -> None:
        last_avail = self.queue.last_avail if (keep_index and self.queue) else int(p["last_avail"])
        self._drop_queue_views()
        self.queue = SplitQueue(self.mem, int(p["size"]), int(p["desc"]), int(p["avail"]),
                                int(p["used"]), event_idx=bool(p["event_idx"]),
                                last_avail=last_avail)
        if p.get("resume_from_used") and not keep_index:
            # In-order completion: everything past the used index is unanswered.
            self.queue.last_avail = self.queue.used_idx

    def _op_start(self, msg: dict, fds: list[int]) -> None:
        kick = fds[0]
        call = fds[1] if msg.get("has_call") and len(fds) > 1 else -1
        if self.started:
            self._op_stop({"op": "stop"}, [])
        if self.mem is None:
            for fd in fds:
                os.close(fd)
            self._reply(msg, ok=False, error="no memory table")
            return
        try:
            self._build_queue(msg)
        except RingError as exc:
            for fd in fds:
                os.close(fd)
            self._reply(msg, ok=False, error=str(exc))
            return
        self._ring_params = dict(msg)
        self._set_kick(kick)
        if call >= 0:
            self._set_fd("call_fd", call)
        self.started = True
        self.broken = False
        self.enabled = bool(msg.get("enabled", False))
        self.log.info("ring_started", size=msg["size"], last_avail=self.queue.last_avail,
                      used_idx=self.queue.used_idx, event_idx=bool(msg["event_idx"]),
                      enabled=self.enabled)
        self.more = True      # requests may already be waiting
        self._reply(msg)

    def _set_kick(self, fd: int) -> None:
        if self.kick_fd >= 0:
            try:
                self.epoll.unregister(self.kick_fd)
            except OSError:
                pass
            os.close(self.kick_fd)
        self.kick_fd = fd
        if fd >= 0:
            os.set_blocking(fd, False)
            self.epoll.register(fd, select.EPOLLIN)

    def _set_fd(self, name: str, fd: int) -> None:
        old = getattr(self, name)
        if old >= 0:
            os.close(old)
        setattr(self, name, fd)

    def _op_kick(self, msg: dict, fds: list[int]) -> None:
        self._set_kick(fds[0] if fds else -1)
        self.more = True
        self._reply(msg)

    def _op_call(self, msg: dict, fds: list[int]) -> None:
        self._set_fd("call_fd", fds[0] if fds else -1)
        if self.call_fd >= 0 and self.started:
            # Completions published while there was no call fd must not be
            # left unsignalled; a spurious interrupt is harmless.
            os.eventfd_write(self.call_fd, 1)
        self._reply(msg)

    def _op_err(self, msg: dict, fds: list[int]) -> None:
        self._set_fd("err_fd", fds[0] if fds else -1)
        self._reply(msg)

    def _op_enable(self, msg: dict, fds: list[int]) -> None:
        self.enabled = bool(msg["on"])
        if self.enabled:
            self.more = True   # kicks that came while disabled are not lost
        self.log.info("ring_enabled" if self.enabled else "ring_disabled")
        self._reply(msg)

    def _op_stop(self, msg: dict, fds: list[int]) -> None:
        last = self.queue.last_avail if self.queue is not None else int(
            (self._ring_params or {}).get("last_avail", 0))
        used = self.queue.used_idx if self.queue is not None else None
        self.started = False
        self._set_kick(-1)
        self._drop_queue_views()
        self._ring_params = None
        self.log.info("ring_stopped", last_avail=last, used_idx=used, **self.stats)
        self._reply(msg, last_avail=last)

    def _op_params(self, msg: dict, fds: list[int]) -> None:
        self.cdb_size = int(msg["cdb_size"])
        self.sense_size = int(msg["sense_size"])
        self._reply(msg)

    def _op_unmap(self, msg: dict, fds: list[int]) -> None:
        """The front end went away: drop the ring and the guest memory."""
        if self.started:
            self._op_stop({"op": "stop"}, [])
        self._set_fd("call_fd", -1)
        self._set_fd("err_fd", -1)
        self._drop_queue_views()
        if self.mem is not None:
            try:
                self.mem.close()
            except BufferError:
                self.log.warning("memory_views_alive_at_unmap")
            self.mem = None
        self.broken = False
        self.enabled = False
        self._reply(msg)

    def _op_tmf(self, msg: dict, fds: list[int]) -> None:
        """Task management: requests run to completion between control messages,
        so by the time this is read nothing of this queue is in flight."""
        self._reply(msg, found=False)

    def _op_ping(self, msg: dict, fds: list[int]) -> None:
        self._reply(msg, stats=self.stats, started=self.started, enabled=self.enabled,
                    broken=self.broken)

    def _op_exit(self, msg: dict, fds: list[int]) -> None:
        self.running = False
        self._reply(msg)

    def close(self) -> None:
        self._set_kick(-1)
        self._set_fd("call_fd", -1)
        self._set_fd("err_fd", -1)
        self._drop_queue_views()
        if self.mem is not None:
            try:
                self.mem.close()
            except BufferError:
                pass


def _make_backend(spec: LunSpec, fd: int):
    from .backends import FileBackend, NullBackend

    if spec.is_null:
        return NullBackend(spec.null_size, delay_us=spec.delay_us)
    return FileBackend.from_fd(fd, readonly=spec.readonly, path=spec.path,
                               delay_us=spec.delay_us)


# SGList is imported at module level lazily to keep this module importable while
# the SCSI package loads; it is the hot-path type so bind it once here.
from .scsi import SGList  # noqa: E402
