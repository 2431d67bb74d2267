"""A data-plane worker: serves one request virtqueue.

The worker is a plain process with an epoll loop (no asyncio): it waits on its
control channel, on the ring's kick eventfd and on completion sources. On a kick
it drains every available request, runs each against the SCSI target, pushes the
used entries and signals the call eventfd once per batch (subject to EVENT_IDX /
NO_INTERRUPT suppression).

Requests may complete out of order (the virtio spec allows it): a LUN with
injected latency (``delay_us``) completes its I/O from a timer, so one queue keeps
many requests in flight. Every popped head is recorded in the queue's inflight
region (shared memory that outlives this process, see :mod:`.inflight`) until
the used index covering it is published, so a replacement worker — or a
restarted daemon, with QEMU's help — resubmits exactly the requests that were
lost.

Control messages (see :mod:`vscsid.ipc`) configure the LUNs, map guest memory,
start/stop/enable the ring and swap its fds. A ring is processed only while it
is *started* and *enabled*; kicks that arrive while it is disabled are not lost.
Before the ring stops or the memory table changes, the worker drains: it waits
for every request in flight to complete, so no view of the old memory survives
and GET_VRING_BASE reports an index with nothing outstanding.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import mmap
import os
import select
import socket
import time
from typing import Any

from vscsid import ipc
from vscsid import log as vlog
from vscsid.config import LunSpec
from vscsid.virtio.memory import (
    GuestMemory, GuestMemoryError, RegionSpec, fault_count, guard_mapping, unguard_mapping,
)

from vscsid.virtio.inflight import InflightQueue
from vscsid.virtio.scsi_wire import (
    LUN_BAD_TARGET, REQ_HDR, REQ_HDR_SIZE, RESP_HDR, RESP_HDR_SIZE, VIRTIO_SCSI_CDB_DEFAULT_SIZE,
    VIRTIO_SCSI_S_BAD_TARGET, VIRTIO_SCSI_S_FAILURE, VIRTIO_SCSI_S_OK, VIRTIO_SCSI_S_OVERRUN,
    VIRTIO_SCSI_SENSE_DEFAULT_SIZE, decode_lun, gather, scatter, split_views,
)
from vscsid.virtio.splitq import ChainError, RingError, SplitQueue

from ._fast import lib as _lib
from .scsi import ScsiResult, SGList

BATCH_LIMIT = 1024   # requests per pass before the control channel gets a look


def _test_poison(text: str | None) -> dict[int, str]:
    """Test-only fault hook: ``VSCSID_TEST_POISON="crash:0xc0,hang:0xc1"`` makes the
    worker abort (crash) or stop answering (hang) when it starts a command with
    that opcode, standing in for a command that kills its data plane; the tests
    use it to show the poison-request quarantine. Unset in production."""
    out: dict[int, str] = {}
    for item in filter(None, (text or "").split(",")):
        action, _, opcode = item.partition(":")
        if action in ("crash", "hang"):
            out[int(opcode, 0) & 0xFF] = action
    return out


_POISON = _test_poison(os.environ.get("VSCSID_TEST_POISON"))


class Pending:
    """A request whose I/O is in flight (completes later, possibly out of order)."""

    __slots__ = ("head", "plan", "in_", "in_data_len", "out_data_len", "resp_len", "lun", "tag",
                 "steps")

    def __init__(self, head, plan, in_, in_data_len, out_data_len, resp_len, lun, tag):
        self.steps = None          # the slices still to run (IoPlan.steps) of a long command
        self.head = head
        self.plan = plan
        self.in_ = in_
        self.in_data_len = in_data_len
        self.out_data_len = out_data_len
        self.resp_len = resp_len
        self.lun = lun
        self.tag = tag


class Worker:
    def __init__(self, chan: socket.socket, log=None):
        self.chan = chan
        self.log = log or vlog.get()
        self.epoll = select.epoll()
        self.mem: GuestMemory | None = None
        self.queue: SplitQueue | None = None
        self.inflight: InflightQueue | None = None
        self._inflight_mm: mmap.mmap | None = None
        self._inflight_guard = None
        self.kick_fd = -1
        self.call_fd = -1
        self.err_fd = -1
        self.started = False
        self.enabled = False
        self.broken = False
        self.more = False
        self.target = None
        self.luns: dict[int, Any] = {}
        self.delays: dict[int, float] = {}     # lun -> injected latency (seconds)
        self.state_mm: mmap.mmap | None = None
        self.cdb_size = VIRTIO_SCSI_CDB_DEFAULT_SIZE
        self.sense_size = VIRTIO_SCSI_SENSE_DEFAULT_SIZE
        self.running = True
        self.timers: list = []                 # heap of (deadline, seq, Pending)
        self.long_ops: collections.deque = collections.deque()   # sliced commands (Pending)
        self.poisoned: list[int] = []          # heads to fail instead of resubmitting
        self._seq = itertools.count()
        self.resubmit: list[int] = []          # heads recovered from the inflight region
        self.stats = {"requests": 0, "batches": 0, "calls": 0, "kicks": 0, "bad_chains": 0,
                      "bad_target": 0, "failed": 0, "check_condition": 0,
                      "bytes_in": 0, "bytes_out": 0, "resubmitted": 0, "quarantined": 0,
                      "max_inflight": 0}
        self._ring_params: dict | None = None
        self._faults = fault_count()
        self.glog = vlog.GuestLog(self.log)     # what a guest can make us log, rate limited
        self.timer_fd = _lib.vsd_timerfd_create()   # deadlines of delayed requests (ns)
        self._armed = 0.0
        self.epoll.register(self.timer_fd, select.EPOLLIN)
        self.engine = "python"
        self.poll_us = 0
        self.cq = None                          # CQueue when the C fast path is on
        self.lun_specs: dict[int, LunSpec] = {}

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        self.epoll.register(self.chan.fileno(), select.EPOLLIN)
        while self.running:
            if (self.cq is not None and self._can_process() and not self.timers
                    and not self.resubmit and not self.poisoned and not self.long_ops):
                # The C loop waits, polls and serves until Python is needed.
                self._serve_c()
                if not self.running:
                    break
                timeout = 0          # now look at the control channel (or timers)
            elif self.more or self.long_ops:
                timeout = 0
            elif self.timers:
                # The timerfd (ns resolution) wakes us; epoll's own timeout is in ms.
                self._arm_timer()
                timeout = 1.0
            else:
                timeout = 1.0
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
                elif self.cq is not None and fd == self.cq.uring_fd:
                    self.cq.ack_uring_event()
                    kicked = True
                elif fd == self.timer_fd:
                    try:
                        os.read(fd, 8)
                    except BlockingIOError:
                        pass
            if self.timers:
                self._expire_timers()
            if self.long_ops:
                self._step_long_ops()
            if kicked and self._can_process():
                self.process()
            elif kicked and self._finishing():
                self._finish_c_pass(self.cq.run(0))
            self._flush()
            if fault_count() != self._faults:
                self._memory_fault()
        return 0

    def _can_process(self) -> bool:
        return self.started and self.enabled and not self.broken and self.queue is not None

    def _finishing(self) -> bool:
        """A broken ring pops nothing more, but its I/O in flight still completes."""
        return (self.broken and self.started and self.cq is not None
                and self.cq.in_flight > 0)

    @property
    def in_flight(self) -> int:
        return (len(self.timers) + len(self.long_ops)
                + (self.cq.in_flight if self.cq is not None else 0))

    # ------------------------------------------------------------------ data path
    def process(self) -> None:
        if self.cq is not None:
            self._process_c()
            return
        q = self.queue
        done = 0
        self._quarantine(self._take_poisoned())
        for head in self._take_resubmit():
            if q.claim(head):
                self._start(head)
        while True:
            q.disable_kicks()
            broken = None
            try:
                heads = q.pop_heads(BATCH_LIMIT)
            except RingError as exc:
                heads, broken = exc.heads, exc
            inflight = self.inflight
            for head in heads:
                if inflight is not None:
                    inflight.get(head)
                self._start(head)
            if heads:
                done += len(heads)
                self.stats["requests"] += len(heads)
                self.stats["batches"] += 1
            # Published once per pass (as the C engine does): a head pushed in this
            # pass is not the driver's yet, so offering it again breaks the ring.
            if broken is not None:
                self._ring_broken(str(broken))
                return
            if done >= BATCH_LIMIT:
                self.more = True     # let the control channel in, then come back
                return
            if not q.enable_kicks():
                return

    def _take_resubmit(self) -> list[int]:
        """Heads recovered from the inflight region, to run again (once)."""
        heads, self.resubmit = self.resubmit, []
        if heads:
            self.stats["resubmitted"] += len(heads)
            self.log.info("resubmitting_inflight", heads=len(heads))
        return heads

    def _take_poisoned(self) -> list[int]:
        heads, self.poisoned = self.poisoned, []
        return heads

    def _quarantine(self, heads: list[int]) -> None:
        """Requests that were in flight when a worker died, twice: their second
        resubmission would most likely kill this worker too. Each is completed
        with CHECK CONDITION, HARDWARE ERROR (INTERNAL TARGET FAILURE) — or a
        virtio-scsi FAILURE when its header cannot be read — and named in the log."""
        claim = self.cq.claim if self.cq is not None else self.queue.claim
        for head in heads:
            if not claim(head):
                continue
            self.stats["quarantined"] += 1
            try:
                chain = self.queue.walk(head)
            except ChainError as exc:
                self.glog.error("request_quarantined", head=head, reason=exc.reason)
                self._complete(head, 0)
                continue
            written = 0
            info: dict = {}
            hdr_len = REQ_HDR_SIZE + self.cdb_size
            resp_len = RESP_HDR_SIZE + self.sense_size
            if chain.out_len >= hdr_len and chain.in_len >= resp_len:
                hdr = gather(chain.out, hdr_len)
                lun_bytes, tag, _attr, _prio, _crn = REQ_HDR.unpack_from(hdr, 0)
                lun = decode_lun(lun_bytes)
                cdb = hdr[REQ_HDR_SIZE:]
                info = {"lun": lun, "tag": tag, "cdb": cdb.hex()}
                res = self.target.internal_failure(lun)
                written = self._result(res, chain.in_, chain.in_len - resp_len,
                                       chain.out_len - hdr_len, resp_len)
            elif chain.in_len >= RESP_HDR_SIZE:
                self._respond(chain.in_, 0, 0, 0, VIRTIO_SCSI_S_FAILURE, b"")
                written = RESP_HDR_SIZE
            self.glog.error("request_quarantined", head=head,
                           reason="in flight when the worker died twice: failed instead of "
                                  "resubmitted again", **info)
            self._complete(head, written)

    def _serve_c(self) -> None:
        timeout_ms = 0 if self.more else 1000
        self.more = False
        self._finish_c_pass(self.cq.serve(self.epoll.fileno(), self.kick_fd, timeout_ms,
                                          BATCH_LIMIT))

    def _process_c(self) -> None:
        cq = self.cq
        self._quarantine(self._take_poisoned())
        heads = self._take_resubmit()
        if heads:
            for head in cq.resubmit(heads):
                self._start(head)
        self._finish_c_pass(cq.run(BATCH_LIMIT))

    def _finish_c_pass(self, slow: list[int] | None) -> None:
        """After the C code ran: serve what it handed back, publish, check health."""
        cq = self.cq
        if slow is None:
            self._flush()
            self._ring_broken(cq.broken_reason or "ring broken")
            return
        for head in slow:
            self._start(head)
        self._flush()
        if cq.more or slow:
            self.more = True
        if cq.q.broken:
            self._ring_broken(cq.broken_reason)
        if fault_count() != self._faults:
            self._memory_fault()

    def _start(self, head: int) -> None:
        """Begin one request: complete it now, or leave its I/O in flight."""
        q = self.queue
        try:
            chain = q.walk(head)
        except ChainError as exc:
            self.stats["bad_chains"] += 1
            self._guest_warning("bad_descriptor_chain", head=head, reason=exc.reason)
            self._complete(head, 0)
            return
        written = self._execute(chain)
        if written is not None:
            self._complete(head, written)

    def _complete(self, head: int, written: int) -> None:
        q = self.cq if self.cq is not None else self.queue
        if not q.push(head, written):
            # Nothing completes twice or without being served (cannot happen).
            self.glog.error("completion_refused", head=head,
                           reason="head is not being served by this queue")

    def _flush(self) -> None:
        """Publish the used entries pushed so far; one call signal per batch."""
        if self.cq is not None:
            if self.cq.flush():
                self.stats["calls"] += 1
            return
        q = self.queue
        if q is None or not q.pushed:
            return
        heads = q.publish()
        if self.inflight is not None:
            self.inflight.put(heads, q.used_idx)
        if q.should_notify() and self.call_fd >= 0:
            os.eventfd_write(self.call_fd, 1)
            self.stats["calls"] += 1

    def _execute(self, chain) -> int | None:
        """Run one virtio-scsi command. Returns the bytes written to the writable
        part, or None when the I/O is left in flight."""
        cdb_size = self.cdb_size
        hdr_len = REQ_HDR_SIZE + cdb_size
        resp_len = RESP_HDR_SIZE + self.sense_size
        in_ = chain.in_
        if chain.out_len < hdr_len or chain.in_len < resp_len:
            self.stats["failed"] += 1
            self._guest_warning("request_too_short", head=chain.head, readable=chain.out_len,
                                writable=chain.in_len, need_readable=hdr_len,
                                need_writable=resp_len)
            if chain.in_len >= RESP_HDR_SIZE:
                self._respond(in_, 0, 0, 0, VIRTIO_SCSI_S_FAILURE, b"")
                return RESP_HDR_SIZE
            return 0
        hdr = gather(chain.out, hdr_len)
        if _POISON:
            self._test_poison(hdr[REQ_HDR_SIZE])
        lun_bytes, tag, _attr, _prio, _crn = REQ_HDR.unpack_from(hdr, 0)
        lun = decode_lun(lun_bytes)
        out_data_len = chain.out_len - hdr_len
        in_data_len = chain.in_len - resp_len
        if lun == LUN_BAD_TARGET:
            self.stats["bad_target"] += 1
            self._respond(in_, 0, in_data_len or out_data_len, 0, VIRTIO_SCSI_S_BAD_TARGET, b"")
            return resp_len
        if out_data_len and in_data_len:
            # Bidirectional commands need VIRTIO_SCSI_F_INOUT, which we do not offer.
            self.stats["failed"] += 1
            self._guest_warning("bidirectional_request", head=chain.head, lun=lun)
            self._respond(in_, 0, in_data_len, 0, VIRTIO_SCSI_S_FAILURE, b"")
            return resp_len
        data_out = SGList(split_views(chain.out, hdr_len) if out_data_len else [])
        data_in = SGList(split_views(in_, resp_len) if in_data_len else [])
        plan = self.target.plan(lun, hdr[REQ_HDR_SIZE:], data_out, data_in, task_tag=tag)
        if type(plan) is not ScsiResult:
            delay = self.delays.get(lun)
            if delay or plan.sliced:
                p = Pending(chain.head, plan, in_, in_data_len, out_data_len, resp_len, lun, tag)
                if delay:
                    heapq.heappush(self.timers, (time.monotonic() + delay, next(self._seq), p))
                else:
                    self._start_long(p)
                if self.in_flight > self.stats["max_inflight"]:
                    self.stats["max_inflight"] = self.in_flight
                return None
            try:
                n = plan.run()
            except Exception as exc:  # OSError from the backend, Miscompare from VERIFY
                n = exc
            plan = plan.finish(n)
        return self._result(plan, in_, in_data_len, out_data_len, resp_len)

    def _result(self, res: ScsiResult, in_, in_data_len: int, out_data_len: int,
                resp_len: int) -> int:
        sense = res.sense[:self.sense_size]
        if res.status:
            self.stats["check_condition"] += 1
        if res.overrun:
            self._respond(in_, 0, in_data_len or out_data_len, 0, VIRTIO_SCSI_S_OVERRUN, b"")
            return resp_len
        if in_data_len:
            residual = in_data_len - res.data_in_len
            self.stats["bytes_in"] += res.data_in_len
        else:
            residual = out_data_len - res.data_out_len
            self.stats["bytes_out"] += res.data_out_len
        self._respond(in_, len(sense), residual, res.status, VIRTIO_SCSI_S_OK, sense)
        return resp_len + res.data_in_len

    def _test_poison(self, opcode: int) -> None:
        action = _POISON.get(opcode)
        if action == "crash":
            self.log.warning("test_poison", action=action, opcode=hex(opcode))
            os.abort()
        elif action == "hang":
            self.log.warning("test_poison", action=action, opcode=hex(opcode))
            while True:
                time.sleep(3600)

    def _arm_timer(self) -> None:
        deadline = self.timers[0][0]
        if deadline != self._armed:
            _lib.vsd_timerfd_arm(self.timer_fd, max(1, int(deadline * 1e9)))
            self._armed = deadline

    def _start_long(self, p: Pending) -> None:
        """A command that loops over the medium: run it a slice at a time between
        the loop's other work (see IoPlan.steps)."""
        p.steps = p.plan.steps()
        self.long_ops.append(p)

    def _step_long_ops(self) -> None:
        """One slice of the oldest long command; it then goes to the back."""
        p = self.long_ops.popleft()
        try:
            next(p.steps)
        except StopIteration as done:
            result = done.value
        except Exception as exc:  # OSError from the backend, Miscompare from VERIFY
            result = exc
        else:
            self.long_ops.append(p)
            return
        res = p.plan.finish(result)
        self._complete(p.head, self._result(res, p.in_, p.in_data_len, p.out_data_len,
                                            p.resp_len))

    def _expire_timers(self, everything: bool = False) -> None:
        now = time.monotonic()
        timers = self.timers
        while timers and (everything or timers[0][0] <= now):
            _, _, p = heapq.heappop(timers)
            if p.plan.sliced:
                self._start_long(p)
                continue
            try:
                n = p.plan.run()
            except Exception as exc:
                n = exc
            res = p.plan.finish(n)
            self._complete(p.head, self._result(res, p.in_, p.in_data_len, p.out_data_len,
                                                p.resp_len))

    def drain(self) -> None:
        """Complete everything in flight (before a stop or a memory change)."""
        if self.cq is not None:
            for head in self.cq.drain():
                self._start(head)      # failed asynchronous I/O: the reference path answers
        if self.timers:
            self._expire_timers(everything=True)
        while self.long_ops:
            self._step_long_ops()
        self._flush()

    def _respond(self, in_views, sense_len, residual, status, response, sense) -> None:
        first = in_views[0]
        if len(first) >= RESP_HDR_SIZE + sense_len:
            RESP_HDR.pack_into(first, 0, sense_len, residual, 0, status, response)
            if sense_len:
                first[RESP_HDR_SIZE:RESP_HDR_SIZE + sense_len] = sense
        else:
            scatter(in_views, RESP_HDR.pack(sense_len, residual, 0, status, response) + sense)

    def _guest_warning(self, event: str, **fields) -> None:
        """A warning the guest can trigger at will: rate limited per event."""
        self.glog.warning(event, **fields)

    def _memory_fault(self) -> None:
        """Guest memory vanished under us (the front end truncated its file): the
        SIGBUS guard kept us alive; stop the ring and have the supervisor drop
        the front end."""
        n = fault_count()
        self.log.error("guest_memory_fault", pages=n - self._faults,
                       reason="SIGBUS on guest memory: the front end shrank its memory file")
        self._faults = n
        self.broken = True
        self._send({"op": "event", "event": "memory_fault"})

    def _ring_broken(self, reason: str) -> None:
        if self.broken:
            return               # reported once
        self.broken = True
        self.log.error("ring_broken", reason=reason)
        if self.err_fd >= 0:
            try:
                os.eventfd_write(self.err_fd, 1)
            except OSError:
                pass
        self._send({"op": "event", "event": "ring_broken", "reason": reason})

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
        from .scsi import Disk, DiskInfo, LunState, ScsiTarget

        self.engine = msg.get("engine", "python")
        self.poll_us = int(msg.get("poll_us", 0))
        self.cdb_size = int(msg.get("cdb_size", VIRTIO_SCSI_CDB_DEFAULT_SIZE))
        self.sense_size = int(msg.get("sense_size", VIRTIO_SCSI_SENSE_DEFAULT_SIZE))
        lun_entries = msg["luns"]
        state_fd = fds[-1] if msg.get("state_page") else -1
        file_fds = fds[:-1] if msg.get("state_page") else fds
        if state_fd >= 0:
            self.state_mm = mmap.mmap(state_fd, mmap.PAGESIZE, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
            os.close(state_fd)
        fd_iter = iter(file_fds)
        luns = {}
        delays = {}
        for entry in lun_entries:
            spec = LunSpec.from_dict(entry["spec"])
            number = int(entry["lun"])
            fd = -1 if spec.is_null else next(fd_iter)
            # Injected latency is served by the worker's timers (the I/O stays in
            # flight), not by sleeping in the backend.
            backend = _make_backend(spec, fd)
            if spec.delay_us:
                delays[number] = spec.delay_us / 1e6
            info = DiskInfo(**entry["info"])
            state = (LunState.from_buffer(memoryview(self.state_mm)[number:number + 1])
                     if self.state_mm is not None else LunState(wce=not spec.writethrough))
            luns[number] = Disk(info, backend, state=state, log=self.glog.bind(lun=number))
            self.lun_specs[number] = spec
        self.luns = luns
        self.delays = delays
        self.target = ScsiTarget(luns, log=self.glog)
        self.log.info("worker_configured", luns=sorted(luns), engine=self.engine)
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
        # Quiesce: nothing in flight may keep a view of the old mapping.
        self.drain()
        last_avail = self._last_avail()
        self._close_cq()
        self._drop_queue_views()
        self._close_memory()
        self.mem = new
        if self._ring_params is not None and self.started:
            try:
                self._build_queue(self._ring_params, last_avail)
            except RingError as exc:
                self._ring_broken(f"ring not in the new memory table: {exc}")
            else:
                self._open_cq()
                self.more = True
        self.log.info("memory_mapped", generation=new.generation, regions=len(specs))
        self._reply(msg)

    def _last_avail(self) -> int | None:
        if self.cq is not None:
            return self.cq.last_avail
        return self.queue.last_avail if self.queue is not None else None

    def _open_cq(self) -> None:
        if self.engine != "c" or self.queue is None:
            return
        from .engine import CQueue

        def wants_uring(spec):
            if spec.aio == "uring":
                return True
            return spec.aio == "auto" and bool(spec.delay_us or spec.direct)

        use_uring = any(wants_uring(s) for s in self.lun_specs.values())
        flags = {}
        for number, disk in self.luns.items():
            spec = self.lun_specs[number]
            f = 1 | 8                                   # PRESENT | FAST
            if spec.readonly:
                f |= 2
            if spec.is_null:
                f |= 4
            if wants_uring(spec):
                f |= 16                                 # ASYNC (io_uring)
            flags[number] = {
                "flags": f, "fd": getattr(disk.backend, "fd", -1) if not spec.is_null else -1,
                "delay_ns": spec.delay_us * 1000,
                "state": (memoryview(self.state_mm)[number:number + 1]
                          if self.state_mm is not None else None),
            }
        self.cq = CQueue(queue=self.queue, mem=self.mem, luns=self.luns, lun_flags=flags,
                         cdb_size=self.cdb_size, sense_size=self.sense_size,
                         inflight=self.inflight, call_fd=self.call_fd, use_uring=use_uring,
                         poll_us=self.poll_us)
        if use_uring and self.cq.uring is None:
            self.log.warning("io_uring_unavailable", error=getattr(self.cq, "uring_error", "?"),
                             fallback="synchronous I/O; injected latency served by timers")
            for number in flags:
                self.cq.q.luns[number].flags &= ~16
        if self.cq.uring_fd >= 0:
            self.epoll.register(self.cq.uring_fd, select.EPOLLIN)

    def _merged_stats(self) -> dict:
        out = dict(self.stats)
        if self.cq is not None:
            for k, v in self.cq.stats().items():
                out[k] = out.get(k, 0) + v
            out["requests"] += self.cq.q.st_fast + self.cq.q.st_slow
        return out

    def _close_cq(self) -> None:
        if self.cq is None:
            return
        self.stats = self._merged_stats()
        if self.cq.uring_fd >= 0:
            try:
                self.epoll.unregister(self.cq.uring_fd)
            except OSError:
                pass
        if self.inflight is not None:
            self.inflight.counter = self.cq.q.counter
        if self.queue is not None:
            self.queue.last_avail = self.cq.last_avail
            self.queue.used_idx = self.cq.used_idx
        self.cq.close()
        self.cq = None

    def _close_memory(self) -> None:
        if self.mem is not None:
            try:
                self.mem.close()
            except BufferError:
                self.log.warning("old_memory_views_alive")
            self.mem = None

    def _drop_queue_views(self) -> None:
        if self.queue is not None:
            self.queue.release()
            self.queue = None

    def _build_queue(self, p: dict, last_avail: int) -> None:
        self._drop_queue_views()
        self.queue = SplitQueue(self.mem, int(p["size"]), int(p["desc"]), int(p["avail"]),
                                int(p["used"]), event_idx=bool(p["event_idx"]),
                                last_avail=last_avail)

    def _map_inflight(self, msg: dict, fd: int) -> None:
        self._unmap_inflight()
        offset = int(msg["inflight_offset"])
        size = int(msg["inflight_size"])
        page = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            self._inflight_mm = mmap.mmap(fd, size + offset - page, mmap.MAP_SHARED,
                                          mmap.PROT_READ | mmap.PROT_WRITE, offset=page)
        finally:
            os.close(fd)
        # The region may come from the front end (SET_INFLIGHT_FD): if it shrinks
        # the file, accesses fault like guest memory and are survived the same way.
        self._inflight_guard = guard_mapping(self._inflight_mm)
        view = memoryview(self._inflight_mm)[offset - page:offset - page + size]
        try:
            self.inflight = InflightQueue(view, int(msg["size"]))
        except ValueError:
            view.release()
            raise

    def _unmap_inflight(self) -> None:
        if self.inflight is not None:
            self.inflight.buf.release()
            self.inflight = None
        if self._inflight_mm is not None:
            self._inflight_mm.close()
            self._inflight_mm = None
            unguard_mapping(self._inflight_guard)
            self._inflight_guard = None

    def _op_start(self, msg: dict, fds: list[int]) -> None:
        fds = list(fds)
        kick = fds.pop(0)
        call = fds.pop(0) if msg.get("has_call") else -1
        inflight_fd = fds.pop(0) if msg.get("has_inflight") else -1
        err = fds.pop(0) if msg.get("has_err") and fds else -1
        for fd in fds:
            os.close(fd)
        if err >= 0:
            self._set_fd("err_fd", err)
        if self.started:
            self._op_stop({"op": "stop"}, [])
        if self.mem is None:
            for fd in (kick, call, inflight_fd):
                if fd >= 0:
                    os.close(fd)
            self._reply(msg, ok=False, error="no memory table")
            return
        try:
            self._build_queue(msg, int(msg["last_avail"]))
            q = self.queue
            if inflight_fd >= 0:
                fd, inflight_fd = inflight_fd, -1      # the mapping owns it from here on
                self._map_inflight(msg, fd)
                self._recover(q, msg)
            self._open_cq()
        except Exception as exc:  # RingError, a bad inflight region, the engine refusing
            # A ring that cannot start keeps nothing: fds, mappings and views go.
            for fd in (kick, call, inflight_fd):
                if fd >= 0:
                    os.close(fd)
            self._close_cq()
            self._drop_queue_views()
            self._unmap_inflight()
            self.resubmit = []
            self.poisoned = []
            self.log.error("ring_start_failed", error=f"{type(exc).__name__}: {exc}")
            self._reply(msg, ok=False, error=str(exc))
            return
        self._ring_params = dict(msg)
        self._set_kick(kick)
        if call >= 0:
            self._set_fd("call_fd", call)
            if self.cq is not None:
                self.cq.set_call_fd(call)
        self.started = True
        self.broken = False
        self.enabled = bool(msg.get("enabled", False))
        self.log.info("ring_started", size=msg["size"], last_avail=q.last_avail,
                      used_idx=q.used_idx, event_idx=bool(msg["event_idx"]),
                      enabled=self.enabled, inflight=self.inflight is not None,
                      engine="c" if self.cq is not None else "python",
                      io_uring=bool(self.cq is not None and self.cq.uring is not None))
        self.more = True      # requests may already be waiting
        self._reply(msg)

    def _recover(self, q: SplitQueue, msg: dict) -> None:
        """Pick up what a dead predecessor (or a previous daemon) left in flight:
        resubmit it, except what was resubmitted once already and is still in
        flight: that request was there when a worker died twice, and is failed
        (quarantined) rather than replayed into a third death."""
        recovered = None
        if msg.get("recover"):
            recovered = self.inflight.recover(q.used_idx, q.used)
        if recovered is None:
            self.inflight.reset(q.used_idx)
            return
        # The next available index is used_idx + in flight even when nothing is:
        # the front end's base can be stale (QEMU takes it from the used index
        # when the connection drops, and the dying worker may still publish
        # completions after that), and starting there would run requests that
        # were already answered a second time.
        base = q.last_avail
        q.last_avail, heads = recovered
        self.resubmit = []
        self.poisoned = []
        for head in heads:
            if self.inflight.resubmits(head):
                self.poisoned.append(head)
            else:
                self.inflight.note_resubmitted(head)
                self.resubmit.append(head)
        if heads or msg.get("resume") or q.last_avail != base:
            self.log.info("inflight_recovered", next_avail=q.last_avail, base=base,
                          used_idx=q.used_idx, resubmit=len(self.resubmit),
                          quarantine=len(self.poisoned))

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
        if self.cq is not None:
            self.cq.set_call_fd(self.call_fd)
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
        self.drain()
        self._close_cq()
        q = self.queue
        last = q.last_avail if q is not None else int((self._ring_params or {}).get("last_avail", 0))
        used = q.used_idx if q is not None else None
        self.started = False
        self._set_kick(-1)
        self._drop_queue_views()
        self._unmap_inflight()
        self._ring_params = None
        self.resubmit = []
        self.poisoned = []
        self.log.info("ring_stopped", last_avail=last, used_idx=used, **self.stats)
        self._reply(msg, last_avail=last)

    def _op_params(self, msg: dict, fds: list[int]) -> None:
        self.cdb_size = int(msg["cdb_size"])
        self.sense_size = int(msg["sense_size"])
        if self.cq is not None:
            self.cq.q.cdb_size = self.cdb_size
            self.cq.q.sense_size = self.sense_size
        self._reply(msg)

    def _op_unmap(self, msg: dict, fds: list[int]) -> None:
        """The front end went away: drop the ring and the guest memory."""
        if self.started:
            self._op_stop({"op": "stop"}, [])
        self._set_fd("call_fd", -1)
        self._set_fd("err_fd", -1)
        self._drop_queue_views()
        self._close_memory()
        self.broken = False
        self.enabled = False
        self._reply(msg)

    def _op_tmf(self, msg: dict, fds: list[int]) -> None:
        """Task management. Requests in flight (injected latency) that match are
        completed before the answer — with their real result, since the I/O
        cannot be recalled — so when the TMF completes nothing matching is active."""
        lun = msg.get("lun")
        tag = msg.get("tag")
        kind = msg.get("kind")
        found = False
        for p in itertools.chain((t[2] for t in self.timers), self.long_ops):
            if lun is not None and p.lun != lun:
                continue
            if kind in ("abort_task", "query_task"):
                if p.tag == tag:
                    found = True
            else:
                found = True
        if found and kind not in ("query_task", "query_task_set"):
            self.drain()
        self._reply(msg, found=found)

    def _op_ping(self, msg: dict, fds: list[int]) -> None:
        self._reply(msg, stats=self._merged_stats(), started=self.started, enabled=self.enabled,
                    broken=self.broken, in_flight=self.in_flight)

    def _op_exit(self, msg: dict, fds: list[int]) -> None:
        if self.started:
            self.drain()
        self.running = False
        self._reply(msg)

    def close(self) -> None:
        if self.timer_fd >= 0:
            os.close(self.timer_fd)
            self.timer_fd = -1
        self._close_cq()
        self._set_kick(-1)
        self._set_fd("call_fd", -1)
        self._set_fd("err_fd", -1)
        self._drop_queue_views()
        self._unmap_inflight()
        self._close_memory()


def _make_backend(spec: LunSpec, fd: int):
    from .backends import FileBackend, NullBackend

    if spec.is_null:
        return NullBackend(spec.null_size, readonly=spec.readonly)
    return FileBackend.from_fd(fd, readonly=spec.readonly, path=spec.path, direct=spec.direct)
