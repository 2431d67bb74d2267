"""A data-plane worker: serves one request virtqueue.

The worker is a plain process with an epoll loop (no asyncio): it waits on its
control channel, on the ring's kick eventfd and on completion sources. An
:class:`~vscsid.workers.engine.Engine` takes requests off the ring — the C fast
path serves the common READ/WRITE itself, in its own loop that polls and sleeps
until Python is needed — and every other request runs through the reference
path here: virtio-scsi framing, the SCSI target, the backend. Completions are
published and signalled once per pass (subject to EVENT_IDX / NO_INTERRUPT); the C
engine's own loop also publishes every few completions of a long pass.

Requests may complete out of order (the virtio spec allows it): a LUN with
injected latency (``delay_us``) completes its I/O from a timer, a command
that loops over the medium (VERIFY, WRITE SAME, UNMAP) runs a slice per loop
iteration, and a LUN on network storage (NBD, RBD: :mod:`.backends.net`) has its
I/O in flight on the server while the loop goes on, so one queue keeps many
requests in flight. Fault injection (``inject=``, :mod:`vscsid.inject`) happens
here too, for every kind of LUN: such LUNs and network LUNs bypass the C fast
path. Every popped head is
recorded in the queue's inflight region (shared memory that outlives this
process, see :mod:`vscsid.virtio.inflight`) until the used index covering it is
published, so a replacement worker — or a restarted daemon, with QEMU's help —
resubmits exactly the requests that were lost; one that was lost twice is failed
instead (the poison-request quarantine).

Control messages (:mod:`vscsid.messages`) configure the LUNs, map guest memory,
start/stop/enable the ring and swap its fds. A ring is processed only while it
is *started* and *enabled*; kicks that arrive while it is disabled are not lost.
Before the ring stops or the memory table changes, the worker drains: it waits
for every request in flight to complete, so no view of the old memory survives
and GET_VRING_BASE reports an index with nothing outstanding.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import mmap
import os
import select
import socket
import time
from typing import Any

from vscsid import log as vlog
from vscsid import lunstate
from vscsid import messages as M
from vscsid.config import LunSpec
from vscsid.inject import InjectError, Injector
from vscsid.virtio.inflight import InflightQueue
from vscsid.virtio.memory import (
    GuestMemory, GuestMemoryError, RegionSpec, fault_count, guard_mapping, unguard_mapping,
)
from vscsid.virtio.scsi_wire import (
    REQ_HDR, REQ_HDR_SIZE, RESP_HDR, RESP_HDR_SIZE, RESPONSE_NAMES, VIRTIO_SCSI_CDB_DEFAULT_SIZE,
    VIRTIO_SCSI_S_ABORTED, VIRTIO_SCSI_S_BAD_TARGET, VIRTIO_SCSI_S_FAILURE, VIRTIO_SCSI_S_OK,
    VIRTIO_SCSI_S_OVERRUN, VIRTIO_SCSI_S_RESET,
    VIRTIO_SCSI_SENSE_DEFAULT_SIZE, decode_address, gather, scatter, split_views,
)
from vscsid.virtio.splitq import ChainError, RingError, SplitQueue

from ._fast import ffi, lib
from .engine import CEngine, Engine, PyEngine
from .scsi import ScsiResult, SGList
from .scsi.cdb import describe_cdb, op_class
from .scsi.constants import Status
from .scsi.sense import (
    INTERNAL_TARGET_FAILURE, UNRECOVERED_READ_ERROR, WRITE_ERROR, describe_sense, parse_sense,
)
from .scsi.target import run_ios
from .stats import StatsPage
from .stats import layout as stats_layout
from .timers import Timers

BATCH_LIMIT = 1024   # requests per pass before the control channel gets a look
#: TMFs whose matching commands end with the command aborted (the others report only)
_ABORTING_TMFS = frozenset(("abort_task", "abort_task_set", "clear_task_set",
                            "logical_unit_reset", "i_t_nexus_reset"))
_RESET_TMFS = frozenset(("logical_unit_reset", "i_t_nexus_reset"))


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

#: seconds between two ticks of the network backends while they have work or are down
NET_TICK = 0.25


def _fault_sense(fault: str, op: str):
    """The sense of an injected fault (vscsid.inject)."""
    if fault == "hardware":
        return INTERNAL_TARGET_FAILURE
    return UNRECOVERED_READ_ERROR if op in ("read", "verify") else WRITE_ERROR


#: trace records a worker keeps for the supervisor before it drops (and counts) more
TRACE_BUFFER = 4096
#: records per TraceRecords message
TRACE_BATCH = 256


class LunRef:
    """One LUN this worker serves: its slot, address, spec and Disk."""

    __slots__ = ("slot", "target", "number", "spec", "disk", "removing")

    def __init__(self, slot, target, number, spec, disk):
        self.slot = slot
        self.target = target
        self.number = number
        self.spec = spec
        self.disk = disk
        self.removing = False


class Req:
    """What a request's completion is counted and traced by: its LUN's slot (-1: no
    LUN), address, operation class, start time (0: not timed) and CDB."""

    __slots__ = ("slot", "target", "lun", "op", "t0", "cdb", "traced")

    def __init__(self, slot, target, lun, op, t0, cdb, traced):
        self.slot = slot
        self.target = target
        self.lun = lun
        self.op = op
        self.t0 = t0
        self.cdb = cdb
        self.traced = traced


class Pending:
    """A request whose I/O is in flight (completes later, possibly out of order)."""

    __slots__ = ("head", "plan", "in_", "in_data_len", "out_data_len", "resp_len", "lun", "tag",
                 "steps", "gen", "abort", "req", "target", "slot", "held")

    def __init__(self, head, plan, in_, in_data_len, out_data_len, resp_len, lun, tag,
                 req: Req | None = None, target: int = 0):
        self.req = req
        self.target = target
        self.slot = req.slot if req is not None else -1
        self.held = False          # counted in its LUN's in-flight gauge (Worker._hold)
        self.steps = None          # the slices still to run (IoPlan.steps) of a long command
        self.gen = None            # its backend operations (IoPlan.ios) on an asynchronous backend
        self.abort = None          # a TMF aborted it: the virtio-scsi response it completes with
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
        self.glog = vlog.GuestLog(self.log)     # what a guest can make us log, rate limited
        self.epoll = select.epoll()
        self.mem: GuestMemory | None = None
        self.queue: SplitQueue | None = None
        self.eng: Engine | None = None
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
        self.running = True
        self.targets: dict[int, Any] = {}      # target id -> ScsiTarget
        self._no_target = None                 # a target without LUNs (internal failures)
        self.luns: dict[int, LunRef] = {}      # slot -> LUN
        self.by_address: dict[tuple[int, int], LunRef] = {}
        self.delays: dict[int, float] = {}     # slot -> injected latency (seconds)
        self.queues = 1
        self.state_mm: mmap.mmap | None = None
        self._state_buf = None                 # cffi view of the state page (atomics)
        self.page = StatsPage(None)            # replaced by the supervisor's page
        self.latency_sample = 1
        self._lat_tick = 0
        self.waiting: list[tuple[M.Request, int, str]] = []   # (request, slot, action)
        self.trace_all = False
        self.trace_slots: set[int] = set()
        self.trace_buf: collections.deque = collections.deque()
        self.trace_dropped = 0
        self.engine_kind = "python"
        self.poll_us = 0
        self.cdb_size = VIRTIO_SCSI_CDB_DEFAULT_SIZE
        self.sense_size = VIRTIO_SCSI_SENSE_DEFAULT_SIZE
        self.timers = Timers()                 # delayed requests (Pending)
        self.long_ops: collections.deque = collections.deque()   # sliced commands (Pending)
        self.resubmit: list[int] = []          # heads recovered from the inflight region
        self.poisoned: list[int] = []          # heads to fail instead of resubmitting
        self.stats = {"requests": 0, "batches": 0, "calls": 0, "kicks": 0, "bad_chains": 0,
                      "bad_target": 0, "failed": 0, "check_condition": 0,
                      "bytes_in": 0, "bytes_out": 0, "resubmitted": 0, "quarantined": 0,
                      "max_inflight": 0}
        self._ring: M.StartRing | None = None   # the ring's settings while started
        self._faults = fault_count()
        self.epoll.register(self.timers.fd, select.EPOLLIN)
        # Network LUNs and fault injection (the reference path only).
        self.special: set[int] = set()         # slots of the LUNs that need _execute_special
        self.injectors: dict[int, Injector] = {}   # slot -> its fault injection
        self.net: dict[int, Any] = {}          # slot -> asynchronous backend
        self.net_fds: dict[int, Any] = {}      # fd registered in epoll -> its backend
        self.net_pending: set[Pending] = set()  # I/O out in an asynchronous backend
        self.hung: list[Pending] = []          # injected commands that never complete
        self.tmfs: list[list] = []             # [TaskMgmt msg, {Pending} it waits for]
        self._net_dirty: set = set()
        self.ticker = Timers()                 # tick of the network backends
        self.epoll.register(self.ticker.fd, select.EPOLLIN)
        self._deferred: collections.deque = collections.deque()   # control ops during a drain
        self.stats.update(injected=0, aborted=0, hung=0)

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        self.epoll.register(self.chan.fileno(), select.EPOLLIN)
        while self.running:
            while self._deferred and self.running:
                # Control ops that came while a drain waited on network I/O.
                self._dispatch(self._deferred.popleft())
            if not self.running:
                break
            if self._net_dirty:
                # Commands submitted since the last wait: their backend's fd must be
                # watched for what the library now waits for (a long write may need
                # EPOLLOUT) before the loop sleeps.
                self._net_service()
                self._flush()
            if self.ticker:
                self.ticker.arm()
            if (self._can_process() and not self.timers and not self.resubmit
                    and not self.poisoned and not self.long_ops and not self.waiting):
                slow = self.eng.serve(self.epoll.fileno(), self.kick_fd,
                                      0 if self.more else 1000, BATCH_LIMIT)
                if slow is not None:
                    # The engine's loop waited, polled and served until Python was needed.
                    self.more = False
                    self._finish_pass(slow)
                    if not self.running:
                        break
                    timeout = 0          # now look at the control channel (or timers)
                else:
                    timeout = 0 if self.more else 1.0
            elif self.more or self.long_ops:
                timeout = 0
            elif self.timers:
                # The timerfd (ns resolution) wakes us; epoll's own timeout is in ms.
                self.timers.arm()
                timeout = 1.0
            elif self.waiting:
                timeout = 0.01    # a LUN removal waits for its requests in flight
            else:
                timeout = 1.0
            if timeout and self.eng is not None and self.started:
                self.eng.late_call()     # (the C engine's own loop does this before it sleeps)
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
                elif self.eng is not None and fd == self.eng.completion_fd:
                    self.eng.ack_completion()
                    kicked = True
                elif fd == self.timers.fd:
                    self.timers.ack()
                elif fd == self.ticker.fd:
                    self.ticker.ack()
                    self._net_tick()
                else:
                    b = self.net_fds.get(fd)
                    if b is not None:
                        b.handle_events(_ev)
                        self._net_dirty.add(b)
            if self._net_dirty:
                self._net_service()
            if self.timers:
                self._expire_timers()
            if self.long_ops:
                self._step_long_ops()
            if kicked and self._can_process():
                self.process()
            elif kicked and self._finishing():
                self._finish_pass(self.eng.run(0))
            self._flush()
            if self.waiting:
                self._check_waiting()
            if self.trace_buf:
                self._send_trace()
            if fault_count() != self._faults:
                self._memory_fault()
        return 0

    def _can_process(self) -> bool:
        return self.started and self.enabled and not self.broken and self.eng is not None

    def _finishing(self) -> bool:
        """A broken ring pops nothing more, but its I/O in flight still completes."""
        return self.broken and self.started and self.eng is not None and self.eng.in_flight > 0

    @property
    def lun_specs(self) -> dict[int, LunSpec]:
        """slot -> the LUN's spec as it is now (injections change at run time)."""
        return {slot: r.spec for slot, r in self.luns.items()}

    @property
    def in_flight(self) -> int:
        return (len(self.timers) + len(self.long_ops) + len(self.net_pending) + len(self.hung)
                + (self.eng.in_flight if self.eng is not None else 0))

    # ------------------------------------------------------------------ data path
    def process(self) -> None:
        """One pass: quarantined and recovered heads first, then the ring."""
        eng = self.eng
        self._quarantine(self._take_poisoned())
        heads = self._take_resubmit()
        if heads:
            for head in eng.resubmit(heads):
                self._start(head)
        self._finish_pass(eng.run(BATCH_LIMIT))

    def _finish_pass(self, slow: list[int]) -> None:
        """After the engine ran: serve what it handed over, publish, check health.
        What the reference path pushed in this pass is published here (the C engine
        published its own as it went): a head pushed and not yet published is not the
        driver's, so offering it again breaks the ring."""
        if slow:
            for slot in self.eng.maps_lost():
                self._map_lost(slot)
        for head in slow:
            self._start(head)
        self._flush()
        if self.eng.more or slow:
            self.more = True
        if self.eng.broken:
            self._ring_broken(self.eng.broken)
        if fault_count() != self._faults:
            self._memory_fault()

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
        for head in heads:
            if not self.eng.claim(head):
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
                target_id, lun = decode_address(lun_bytes)
                info = {"target": target_id, "lun": lun, "tag": tag,
                        "cdb": hdr[REQ_HDR_SIZE:].hex()}
                t = self.targets.get(target_id) or self._no_target
                res = t.internal_failure(lun)
                req = self._req(target_id, lun, hdr[REQ_HDR_SIZE:])
                written = self._result(res, chain.in_, chain.in_len - resp_len,
                                       chain.out_len - hdr_len, resp_len, req)
            elif chain.in_len >= RESP_HDR_SIZE:
                self._respond(chain.in_, 0, 0, 0, VIRTIO_SCSI_S_FAILURE, b"")
                written = RESP_HDR_SIZE
            self.glog.error("request_quarantined", head=head,
                            reason="in flight when the worker died twice: failed instead of "
                                   "resubmitted again", **info)
            self._complete(head, written)

    def _start(self, head: int) -> None:
        """Begin one request: complete it now, or leave its I/O in flight."""
        try:
            chain = self.queue.walk(head)
        except ChainError as exc:
            self.stats["bad_chains"] += 1
            self._guest_warning("bad_descriptor_chain", head=head, reason=exc.reason)
            self._complete(head, 0)
            return
        written = self._execute(chain)
        if written is not None:
            self._complete(head, written)

    def _complete(self, head: int, written: int) -> None:
        if not self.eng.push(head, written):
            # Nothing completes twice or without being served (cannot happen).
            self.glog.error("completion_refused", head=head,
                            reason="head is not being served by this queue")

    def _flush(self) -> None:
        """Publish the used entries pushed so far; one call signal per pass."""
        if self.eng is not None and self.eng.flush():
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
        target_id, lun = decode_address(lun_bytes)
        out_data_len = chain.out_len - hdr_len
        in_data_len = chain.in_len - resp_len
        target = self.targets.get(target_id)
        cdb = hdr[REQ_HDR_SIZE:]
        req = self._req(target_id, lun, cdb)
        if target is None:
            self.stats["bad_target"] += 1
            self._respond(in_, 0, in_data_len or out_data_len, 0, VIRTIO_SCSI_S_BAD_TARGET, b"")
            if req.traced:
                self._trace(req, VIRTIO_SCSI_S_BAD_TARGET, 0, b"", 0, 0)
            return resp_len
        if out_data_len and in_data_len:
            # Bidirectional commands need VIRTIO_SCSI_F_INOUT, which we do not offer.
            self.stats["failed"] += 1
            self._guest_warning("bidirectional_request", head=chain.head, lun=lun)
            self._respond(in_, 0, in_data_len, 0, VIRTIO_SCSI_S_FAILURE, b"")
            self._count(req, VIRTIO_SCSI_S_FAILURE, 0, b"", 0, 0)
            return resp_len
        data_out = SGList(split_views(chain.out, hdr_len) if out_data_len else [])
        data_in = SGList(split_views(in_, resp_len) if in_data_len else [])
        plan = target.plan(lun, cdb, data_out, data_in, task_tag=tag)
        if type(plan) is not ScsiResult:
            slot = req.slot
            if slot in self.special:
                return self._execute_special(
                    Pending(chain.head, plan, in_, in_data_len, out_data_len, resp_len, lun, tag,
                            req, target_id))
            delay = self.delays.get(slot)
            if delay or plan.sliced:
                p = Pending(chain.head, plan, in_, in_data_len, out_data_len, resp_len, lun, tag,
                            req, target_id)
                self._hold(p)
                if delay:
                    self.timers.add(delay, p)
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
        return self._result(plan, in_, in_data_len, out_data_len, resp_len, req)

    def _req(self, target_id: int, lun: int, cdb) -> Req:
        ref = self.by_address.get((target_id, lun))
        slot = ref.slot if ref is not None and not ref.removing else -1
        t0 = 0
        every = self.latency_sample
        if every:
            self._lat_tick += 1
            if self._lat_tick >= every:
                self._lat_tick = 0
                t0 = time.monotonic_ns()
        traced = self.trace_all or (slot >= 0 and slot in self.trace_slots)
        if traced and not t0:
            t0 = time.monotonic_ns()
        return Req(slot, target_id, lun, op_class(cdb[0]) if len(cdb) else 2, t0, cdb, traced)

    def _hold(self, p: Pending) -> None:
        """``p`` stays in flight: it counts in its LUN's in-flight gauge (shared with
        the C engine's own I/O in the statistics page) until it completes (_release);
        a LUN removal waits for that gauge to drop to 0."""
        if not p.held and p.slot >= 0:
            p.held = True
            self.page.lun(p.slot).in_flight += 1

    def _release(self, p: Pending) -> None:
        if p.held:
            p.held = False
            ls = self.page.lun(p.slot)
            if ls.in_flight:
                ls.in_flight -= 1

    # ------------------------------------------------------------------ network LUNs, injection
    def _execute_special(self, p: Pending) -> int | None:
        """A data-path command on a network LUN or a LUN with injected faults."""
        plan = p.plan
        delay = self.delays.get(p.slot, 0.0)
        inj = self.injectors.get(p.slot)
        if inj is not None:
            d = inj.decide(plan.op, plan.extents())
            if d is not None:
                self.stats["injected"] += 1
                delay += d.delay
                if d.fault == "hang":
                    self.stats["hung"] += 1
                    self.glog.warning("fault_injected", fault="hang", lun=f"{p.target}:{p.lun}",
                                      tag=p.tag, op=plan.op, lba=plan.lba, blocks=plan.nblocks)
                    self._hold(p)
                    self.hung.append(p)
                    self._note_inflight()
                    return None
                if d.fault is not None:
                    self.glog.warning("fault_injected", fault=d.fault, lun=f"{p.target}:{p.lun}",
                                      tag=p.tag, op=plan.op, lba=d.lba)
                    p.gen = plan.faulty_ios(_fault_sense(d.fault, plan.op), d.lba)
        if delay:
            self._hold(p)
            self.timers.add(delay, p)
            self._note_inflight()
            return None
        return self._run_pending(p)

    def _note_inflight(self) -> None:
        n = self.in_flight
        if n > self.stats["max_inflight"]:
            self.stats["max_inflight"] = n

    def _run_pending(self, p: Pending) -> int | None:
        """Run a request's I/O now: finished (the bytes written), or None when it
        stays in flight (an asynchronous backend, or a sliced command)."""
        plan = p.plan
        backend = plan.backend
        if getattr(backend, "asynchronous", False):
            if p.gen is None:
                p.gen = plan.ios()
            self._hold(p)
            self.net_pending.add(p)
            self._note_inflight()
            self._net_advance(p, None)
            return None
        if p.gen is not None:
            try:
                n = run_ios(backend, p.gen)
            except Exception as exc:  # the injected fault, or the backend's OSError
                n = exc
        elif plan.sliced:
            self._hold(p)
            self._start_long(p)
            return None
        else:
            try:
                n = plan.run()
            except Exception as exc:
                n = exc
        res = plan.finish(n)
        self._release(p)
        return self._result(res, p.in_, p.in_data_len, p.out_data_len, p.resp_len, p.req)

    def _net_advance(self, p: Pending, result) -> None:
        """Feed the last backend operation's result into the request's IoPlan.ios()
        generator and submit the next operation, or finish the request."""
        gen = p.gen
        try:
            if result is None:
                io = next(gen)
            elif isinstance(result, BaseException):
                io = gen.throw(result)
            else:
                io = gen.send(result)
        except StopIteration as done:
            self._finish(p, done.value)
            return
        except Exception as exc:  # OSError, Miscompare, the injected fault
            self._finish(p, exc)
            return
        if p.abort is not None:
            # Aborted while an earlier operation was out: the rest is not started.
            self._finish(p, None)
            return
        backend = p.plan.backend
        backend.submit(io, p)
        self._net_dirty.add(backend)

    def _net_service(self) -> None:
        """Collect the network backends' completions, keep their fds registered."""
        while self._net_dirty:
            b = self._net_dirty.pop()
            while b.has_completions:
                for ctx, res in b.completions():
                    self._net_advance(ctx, res)
            self._net_sync(b)
        if not self.ticker and any(b.needs_tick for b in self.net.values()):
            self.ticker.add(NET_TICK, None)

    def _net_tick(self) -> None:
        for _ in self.ticker.due():
            pass
        now = time.monotonic()
        for b in self.net.values():
            if b.needs_tick:
                b.tick(now)
                self._net_dirty.add(b)
        self._net_service()

    def _net_sync(self, b) -> None:
        """Register the backend's fd for the events it waits for. A connection that
        died took its fd with it (epoll drops a closed fd by itself), so a changed
        ``fd_epoch`` only forgets the old registration; so does a handshake in
        progress (libnbd may move to another socket of a TCP address list)."""
        fd = b.fileno()
        ev = b.events() if fd >= 0 else 0
        reg = getattr(b, "_reg", None)
        if reg is not None and (reg[0] != b.fd_epoch or reg[1] != fd or b.connecting):
            if self.net_fds.get(reg[1]) is b:
                del self.net_fds[reg[1]]
            reg = b._reg = None
        if fd < 0 or not ev:
            return
        if reg is None:
            try:
                self.epoll.register(fd, ev)
            except FileExistsError:
                self.epoll.modify(fd, ev)
            self.net_fds[fd] = b
            b._reg = (b.fd_epoch, fd, ev)
        elif reg[2] != ev:
            self.epoll.modify(fd, ev)
            b._reg = (reg[0], fd, ev)

    def _net_unwatch(self, b) -> None:
        """The backend is about to close a live fd: unregister it while it is ours."""
        reg = getattr(b, "_reg", None)
        if reg is None:
            return
        b._reg = None
        if self.net_fds.get(reg[1]) is b:
            del self.net_fds[reg[1]]
            if reg[0] == b.fd_epoch:
                try:
                    self.epoll.unregister(reg[1])
                except OSError:
                    pass

    def _abort(self, p: Pending, response: int) -> bool:
        """A TMF aborts ``p``: True if it is completed now (with ``response``), False
        if its I/O is out on a server and it completes when that comes back."""
        self.stats["aborted"] += 1
        if p in self.net_pending:
            p.abort = response
            if not p.plan.backend.abort(p):
                return False
            self._finish(p, None)
            return True
        p.abort = response
        self._finish(p, None)
        return True

    def _result(self, res: ScsiResult, in_, in_data_len: int, out_data_len: int,
                resp_len: int, req: Req | None = None) -> int:
        sense = res.sense[:self.sense_size]
        if res.status:
            self.stats["check_condition"] += 1
        if res.overrun:
            self._respond(in_, 0, in_data_len or out_data_len, 0, VIRTIO_SCSI_S_OVERRUN, b"")
            if req is not None:
                self._count(req, VIRTIO_SCSI_S_OVERRUN, 0, b"", 0, 0)
            return resp_len
        if in_data_len:
            residual = in_data_len - res.data_in_len
            self.stats["bytes_in"] += res.data_in_len
        else:
            residual = out_data_len - res.data_out_len
            self.stats["bytes_out"] += res.data_out_len
        self._respond(in_, len(sense), residual, res.status, VIRTIO_SCSI_S_OK, sense)
        if req is not None:
            self._count(req, VIRTIO_SCSI_S_OK, res.status, sense, res.data_in_len,
                        res.data_out_len)
        return resp_len + res.data_in_len

    def _count(self, req: Req, response: int, status: int, sense, data_in: int,
               data_out: int) -> None:
        """Statistics (and the trace) of one request the reference path completed."""
        latency = time.monotonic_ns() - req.t0 if req.t0 else None
        if req.slot >= 0:
            key = None
            if status == Status.CHECK_CONDITION:
                try:
                    key = parse_sense(bytes(sense))[0]
                except ValueError:
                    key = 0
            self.page.count(req.slot, req.op, data_in, data_out, key,
                            response != VIRTIO_SCSI_S_OK, latency)
        if req.traced:
            self._trace(req, response, status, sense, data_in, data_out, latency)

    # ------------------------------------------------------------------ trace
    def _trace(self, req: Req, response: int, status: int, sense, data_in: int, data_out: int,
               latency: int | None = None) -> None:
        if latency is None and req.t0:
            latency = time.monotonic_ns() - req.t0
        if len(self.trace_buf) >= TRACE_BUFFER:
            self.trace_dropped += 1
            return
        name, lba, blocks = describe_cdb(req.cdb)
        sense_text = None
        if status == Status.CHECK_CONDITION:
            try:
                sense_text = describe_sense(*parse_sense(bytes(sense)))
            except ValueError:
                sense_text = f"sense {bytes(sense).hex()}"
        try:
            status_text = Status(status).name.replace("_", " ")
        except ValueError:
            status_text = f"{status:#04x}"
        self.trace_buf.append({
            "time": time.time(), "target": req.target, "lun": req.lun, "op": name,
            "cdb": bytes(req.cdb).rstrip(b"\0").hex() or "00", "lba": lba, "blocks": blocks,
            "response": RESPONSE_NAMES.get(response, str(response)),
            "status": status_text if response == VIRTIO_SCSI_S_OK else None,
            "sense": sense_text, "data_in": data_in, "data_out": data_out,
            "latency_us": round(latency / 1000, 1) if latency is not None else None})

    def _send_trace(self) -> None:
        """Hand the trace records to the supervisor, without ever blocking: when its
        socket is full they wait here, and beyond TRACE_BUFFER they are dropped and
        counted."""
        while self.trace_buf:
            n = min(TRACE_BATCH, len(self.trace_buf))
            batch = [self.trace_buf[i] for i in range(n)]
            msg = M.TraceRecords(records=batch, dropped=self.trace_dropped)
            try:
                M.send(self.chan, msg, flags=socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.log.error("control_send_failed", error=str(exc))
                self.running = False
                return
            self.trace_dropped = 0
            for _ in range(n):
                self.trace_buf.popleft()

    def _test_poison(self, opcode: int) -> None:
        action = _POISON.get(opcode)
        if action == "crash":
            self.log.warning("test_poison", action=action, opcode=hex(opcode))
            os.abort()
        elif action == "hang":
            self.log.warning("test_poison", action=action, opcode=hex(opcode))
            while True:
                time.sleep(3600)

    def _start_long(self, p: Pending) -> None:
        """A command that loops over the medium: run it a slice at a time between
        the loop's other work (see IoPlan.steps)."""
        self._hold(p)
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
        self._finish(p, result)

    def _finish(self, p: Pending, result) -> None:
        self.net_pending.discard(p)
        self._release(p)
        if p.abort is not None:
            # Aborted by a TMF (virtio-scsi: VIRTIO_SCSI_S_ABORTED, or _RESET for a reset).
            self._respond(p.in_, 0, p.in_data_len or p.out_data_len, 0, p.abort, b"")
            if p.req is not None:
                self._count(p.req, p.abort, 0, b"", 0, 0)
            self._complete(p.head, p.resp_len)
        else:
            res = p.plan.finish(result)
            self._complete(p.head, self._result(res, p.in_, p.in_data_len, p.out_data_len,
                                                p.resp_len, p.req))
        if self.tmfs:
            self._tmf_progress(p)

    def _expire_timers(self, everything: bool = False) -> None:
        for p in self.timers.due(everything):
            written = self._run_pending(p)
            if written is not None:
                self._complete(p.head, written)

    def drain(self) -> None:
        """Complete everything in flight (before a stop or a memory change)."""
        self._drain_local()
        if self.hung:
            # Injected commands that never complete: reset (Linux retries those).
            for p in list(self.hung):
                self.hung.remove(p)
                p.abort = VIRTIO_SCSI_S_RESET
                self._finish(p, None)
        if self.net_pending:
            self._drain_net()
        self._flush()

    def _drain_local(self) -> None:
        """What completes without waiting for anyone: the engine's own I/O, delayed
        requests (their I/O runs now), long commands."""
        if self.eng is not None:
            for head in self.eng.drain():
                self._start(head)      # failed asynchronous I/O: the reference path answers
        if self.timers:
            self._expire_timers(everything=True)
        while self.long_ops:
            self._step_long_ops()

    def _drain_net(self) -> None:
        """Wait for the I/O out on network servers. The wait is bounded by each
        backend's hold time (a dead server's requests fail as soon as the drain
        starts); heartbeats are answered meanwhile and other control ops wait
        until the drain is done."""
        for b in self.net.values():
            b.draining = True
        waits = select.epoll()
        try:
            waits.register(self.chan.fileno(), select.EPOLLIN)
            waits.register(self.ticker.fd, select.EPOLLIN)
            start = time.monotonic()
            self._net_tick()
            while self.net_pending and self.running:
                watched = {}
                for b in self.net.values():
                    fd = b.fileno()
                    ev = b.events() if fd >= 0 else 0
                    if ev:
                        waits.register(fd, ev)
                        watched[fd] = b
                if self.ticker:
                    self.ticker.arm()
                try:
                    events = waits.poll(NET_TICK)
                except InterruptedError:
                    events = []
                for fd in watched:
                    waits.unregister(fd)
                for fd, ev in events:
                    if fd == self.chan.fileno():
                        self._control_while_draining()
                    elif fd == self.ticker.fd:
                        self.ticker.ack()
                    elif fd in watched:
                        watched[fd].handle_events(ev)
                        self._net_dirty.add(watched[fd])
                self._net_tick()
            if self.net_pending:
                self.log.error("network_drain_incomplete", left=len(self.net_pending))
            else:
                self.log.info("network_drained", seconds=round(time.monotonic() - start, 3))
        finally:
            waits.close()
            for b in self.net.values():
                b.draining = False
            self._net_service()

    def _control_while_draining(self) -> None:
        """A control message during a drain: heartbeats are answered, the rest waits."""
        try:
            msg = M.recv(self.chan, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except (M.ChannelClosed, M.ChannelError, OSError) as exc:
            self.log.error("control_channel_error", error=str(exc) or "closed")
            self.running = False
            return
        if isinstance(msg, M.Ping):
            self.on_ping(msg)
        else:
            self._deferred.append(msg)

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
        self._send(M.Event(event="memory_fault"))

    def _map_lost(self, slot: int) -> None:
        """A LUN's memory file faulted under its mapping (once per LUN and mapping)."""
        ref = self.luns.get(slot)
        self.log.warning("lun_map_fault", lun=f"{ref.target}:{ref.number}" if ref else slot,
                         reason="SIGBUS on the LUN's memory file: it shrank under the "
                                "mapping, or its tmpfs had no page for a hole",
                         effect="the request and the LUN's later ones are served by system "
                                "calls, which answer with their errors")

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
        self._send(M.Event(event="ring_broken", reason=reason))

    # ------------------------------------------------------------------ control
    def _send(self, msg: M.Message) -> None:
        try:
            M.send(self.chan, msg)
        except OSError as exc:
            self.log.error("control_send_failed", error=str(exc))
            self.running = False

    def _reply(self, req: M.Request, ok: bool = True, error: str | None = None,
               result=None) -> None:
        body = vars(result) if result is not None else {}
        self._send(M.Reply(seq=req.seq, ok=ok, error=error, body=body))

    def _control(self) -> bool:
        try:
            msg = M.recv(self.chan)
        except M.ChannelClosed:
            self.log.info("supervisor_gone")
            return False
        except BlockingIOError:
            return True
        except (M.ChannelError, OSError) as exc:
            self.log.error("control_channel_error", error=str(exc))
            return False
        return self._dispatch(msg)

    def _dispatch(self, msg: M.Message) -> bool:
        handler = getattr(self, f"on_{msg.op}", None) if isinstance(msg, M.Request) else None
        if handler is None:
            for fd in msg.fds():
                os.close(fd)
            self.log.error("unknown_control_op", op=msg.op)
            if isinstance(msg, M.Request):
                self._reply(msg, ok=False, error=f"unknown op {msg.op!r}")
            return True
        try:
            handler(msg)
        except Exception as exc:  # a failed op must not kill the worker silently
            self.log.exception("control_op_failed", op=msg.op)
            self._reply(msg, ok=False, error=f"{type(exc).__name__}: {exc}")
        return self.running

    def on_configure(self, msg: M.Configure) -> None:
        from .scsi import ScsiTarget

        self.engine_kind = msg.engine
        self.poll_us = msg.poll_us
        self.cdb_size = msg.cdb_size
        self.sense_size = msg.sense_size
        self.queues = msg.queues
        self.latency_sample = max(0, int(msg.latency_sample))
        if msg.state_page is not None:
            try:
                self.state_mm = mmap.mmap(msg.state_page, lunstate.PAGE_SIZE, mmap.MAP_SHARED,
                                          mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(msg.state_page)
            self._state_buf = ffi.from_buffer("uint8_t[]", self.state_mm, require_writable=True)
        if msg.stats_page is not None:
            self.page.close()
            self.page = StatsPage(msg.stats_page)
        for b in self.net.values():
            b.close()
        self.luns, self.by_address, self.targets = {}, {}, {}
        self.delays, self.net, self.injectors, self.special = {}, {}, {}, set()
        reports = []
        entries = list(zip(msg.lun_entries(), msg.lun_fds))
        for i, (entry, fd) in enumerate(entries):
            try:
                report = self._add_lun(entry, fd)
            except OSError as exc:
                # A server that cannot be reached, a library that is not installed: the
                # supervisor reports it (no traceback: nothing here is a bug).
                for _, rest in entries[i + 1:]:
                    if rest is not None:
                        os.close(rest)
                for b in self.net.values():
                    b.close()
                self.net = {}
                self.log.error("lun_open_failed", lun=f"{entry.target}:{entry.lun}",
                               spec=entry.spec.get("path"), error=str(exc))
                self._reply(msg, ok=False, error=f"LUN {entry.target}:{entry.lun} "
                                                 f"({entry.spec.get('path')}): {exc}")
                return
            if report is not None:
                reports.append(report)
        self._no_target = ScsiTarget({}, log=self.glog)
        self._net_service()
        self.log.info("worker_configured", luns=sorted(f"{r.target}:{r.number}"
                                                       for r in self.luns.values()),
                      engine=self.engine_kind, network=sorted(self.net),
                      inject=sorted(self.injectors))
        self._reply(msg, result=M.ConfigureResult(luns=reports, stats_layout=stats_layout()))

    def _add_lun(self, entry: M.LunEntry, fd: int | None) -> dict | None:
        """Open the LUN's backend on ``fd`` (ours from here on) and serve it. For a
        network LUN: its identity as the worker built it from the server (reported to
        the supervisor, which hands it to every later worker)."""
        from .scsi import Disk, DiskInfo, LunState, ScsiTarget
        from .scsi.disk import UnitAttentions

        spec = LunSpec.from_dict(entry.spec)
        slot, target, number = int(entry.slot), int(entry.target), int(entry.lun)
        if not 0 <= slot < lib.VSD_MAX_LUNS or slot in self.luns:
            if fd is not None:
                os.close(fd)
            raise ValueError(f"LUN slot {slot} is taken or out of range")
        # Injected latency is served by the worker's timers (the I/O stays in flight),
        # not by sleeping in the backend.
        backend = _make_backend(spec, -1 if fd is None else fd, queues=self.queues,
                                facts=entry.facts, log=self.log.bind(lun=f"{target}:{number}"))
        info = DiskInfo(**entry.info)
        report = None
        if getattr(backend, "asynchronous", False):
            if not info.num_blocks:
                # The first worker to reach the server: the LUN's identity follows
                # what the server advertises, and the supervisor keeps it.
                info = dataclasses.replace(info, **backend.disk_overrides(info))
            report = {"lun": slot, "info": dataclasses.asdict(info), "facts": backend.facts()}
            self.log.info("network_lun", lun=number, target=target, **backend.describe())
        try:
            inj = Injector.from_text(spec.inject) if spec.inject else None
        except InjectError:
            backend.close()
            raise
        if self.state_mm is not None:
            mode = lunstate.mode_offset(slot)
            ua = lunstate.ua_offset(slot)
            state = LunState.from_buffer(memoryview(self.state_mm)[mode:mode + 1])
            ptr = self._state_buf + ua
            uas = UnitAttentions(memoryview(self.state_mm)[ua:ua + lunstate.UA_KINDS],
                                 exchange=lambda kind: lib.vsd_ua_take(ptr + kind, 1) == 0)
        else:
            state = LunState(wce=not spec.writethrough)
            uas = None
        disk = Disk(info, backend, state=state, log=self.glog.bind(lun=f"{target}:{number}"),
                    ua=uas)
        ref = LunRef(slot, target, number, spec, disk)
        self.luns[slot] = ref
        self.by_address[(target, number)] = ref
        if spec.delay_us:
            self.delays[slot] = spec.delay_us / 1e6
        if getattr(backend, "asynchronous", False):
            self.net[slot] = backend
            backend.release_fd = lambda b=backend: self._net_unwatch(b)
            self._net_dirty.add(backend)
        if inj is not None:
            self.injectors[slot] = inj
        self.special = set(self.net) | set(self.injectors)
        t = self.targets.get(target)
        if t is None:
            t = self.targets[target] = ScsiTarget({}, log=self.glog)
        t.set_lun(number, disk)
        return report

    def on_inject(self, msg: M.SetInjections) -> None:
        """Replace a LUN's fault injection rules (vscsid.inject; "" removes them).
        ``msg.lun`` is the LUN's slot."""
        slot = msg.lun
        ref = self.luns.get(slot)
        if ref is None or ref.removing:
            self._reply(msg, ok=False, error=f"no LUN {slot} (slot)")
            return
        try:
            inj = Injector.from_text(msg.inject)
        except InjectError as exc:
            self._reply(msg, ok=False, error=str(exc))
            return
        text = "+".join(r.text() for r in inj.rules) if inj is not None else ""
        ref.spec = dataclasses.replace(ref.spec, inject=text)
        if inj is None:
            self.injectors.pop(slot, None)
        else:
            self.injectors[slot] = inj
        self.special = set(self.net) | set(self.injectors)
        if self.eng is not None:
            self.eng.set_lun(slot, ref)
        released = 0
        if self.hung and (inj is None or not inj.hangs()):
            # Commands held by a hang rule that is gone run now.
            for p in [p for p in self.hung if p.slot == slot]:
                self.hung.remove(p)
                released += 1
                written = self._run_pending(p)
                if written is not None:
                    self._complete(p.head, written)
            self._flush()
        self.log.info("injection_changed", lun=f"{ref.target}:{ref.number}", inject=text,
                      released=released)
        self._reply(msg)

    def on_add_lun(self, msg: M.AddLun) -> None:
        entry = msg.entry()
        have = self.by_address.get((entry.target, entry.lun))
        if have is not None or entry.slot in self.luns:
            if msg.lun_fd is not None:
                os.close(msg.lun_fd)
            if have is not None and have.slot == entry.slot:
                self._reply(msg)     # configured with it already (a restart raced the add)
            else:
                self._reply(msg, ok=False, error=f"LUN {entry.target}:{entry.lun} or slot "
                                                 f"{entry.slot} is taken")
            return
        try:
            report = self._add_lun(entry, msg.lun_fd)
        except (OSError, InjectError, ValueError) as exc:
            self.log.error("lun_open_failed", lun=f"{entry.target}:{entry.lun}",
                           spec=entry.spec.get("path"), error=str(exc))
            self._reply(msg, ok=False, error=str(exc))
            return
        ref = self.luns[entry.slot]
        self.page.clear_slot(ref.slot)
        if self.trace_all:
            self.trace_slots.add(ref.slot)
        if self.eng is not None:
            self.eng.set_lun(ref.slot, ref)
            if ref.slot in self.trace_slots:
                self.eng.set_fast(ref.slot, False)
        self._net_service()
        self.log.info("lun_added", lun=f"{ref.target}:{ref.number}", slot=ref.slot,
                      blocks=ref.disk.num_blocks)
        self._reply(msg, result=M.ConfigureResult(luns=[report] if report else []))

    def on_remove_lun(self, msg: M.RemoveLun) -> None:
        """New requests to the LUN get a missing LUN's answer at once; the reply
        waits for its requests in flight (see _check_waiting)."""
        ref = self.luns.get(msg.slot)
        if ref is None:
            self._reply(msg)             # gone already (configured without it)
            return
        ref.removing = True
        t = self.targets.get(ref.target)
        if t is not None:
            t.remove_lun(ref.number)
            if not t.luns:
                del self.targets[ref.target]    # no LUN left: the target is gone too
        self.by_address.pop((ref.target, ref.number), None)
        if self.eng is not None:
            self.eng.clear_lun(ref.slot, ref)
        self.trace_slots.discard(ref.slot)
        self.waiting.append((msg, ref.slot, "remove"))
        self._check_waiting()

    def on_resize_lun(self, msg: M.ResizeLun) -> None:
        ref = self.luns.get(msg.slot)
        if ref is None or ref.removing:
            self._reply(msg, ok=False, error=f"no LUN in slot {msg.slot}")
            return
        if msg.num_blocks < ref.disk.num_blocks:
            self.waiting.append((msg, ref.slot, "shrink"))   # once nothing is in flight
            self._check_waiting()
            return
        self._resize(msg, ref)

    def _resize(self, msg: M.ResizeLun, ref: LunRef) -> None:
        disk = ref.disk
        old = disk.num_blocks
        backend = disk.backend
        if self.eng is not None:
            self.eng.release_map(ref.slot)      # the engine maps a memory file's old size
        resized = getattr(backend, "resized", None)
        if resized is not None:
            resized(msg.num_blocks * disk.block_size)
        else:
            backend.size = msg.num_blocks * disk.block_size
        try:
            disk.resize(msg.num_blocks)
        except ValueError as exc:
            self._reply(msg, ok=False, error=str(exc))
            return
        if self.eng is not None:
            self.eng.set_lun(ref.slot, ref)
        self.log.info("lun_resized", lun=f"{ref.target}:{ref.number}", blocks=msg.num_blocks,
                      old_blocks=old)
        self._reply(msg)

    def _lun_in_flight(self, slot: int) -> int:
        """The LUN's requests in flight: the C engine's I/O and the reference path's
        held requests, both in the statistics page's gauge."""
        return int(self.page.lun(slot).in_flight)

    def _check_waiting(self) -> None:
        """Answer the LUN removals and shrinks whose LUN has nothing in flight."""
        if not self.waiting:
            return
        still = []
        for msg, slot, action in self.waiting:
            if self._lun_in_flight(slot):
                still.append((msg, slot, action))
                continue
            ref = self.luns.get(slot)
            if action == "remove":
                if ref is not None:
                    del self.luns[slot]
                    if self.eng is not None:
                        self.eng.clear_lun(slot, ref)
                    self.delays.pop(slot, None)
                    self.injectors.pop(slot, None)
                    b = self.net.pop(slot, None)
                    self.special = set(self.net) | set(self.injectors)
                    if b is not None:
                        self._net_unwatch(b)
                    ref.disk.backend.close()
                    self.log.info("lun_removed", lun=f"{ref.target}:{ref.number}", slot=slot)
                self._reply(msg)
            elif ref is None or ref.removing:
                self._reply(msg, ok=False, error=f"no LUN in slot {slot}")
            else:
                self._resize(msg, ref)
        self.waiting = still

    def on_trace_start(self, msg: M.TraceStart) -> None:
        if msg.slots is None:
            self.trace_all = True
            slots = set(self.luns)
        else:
            slots = {int(x) for x in msg.slots if int(x) in self.luns}
        self.trace_slots |= slots
        if self.eng is not None:
            for slot in slots:
                self.eng.set_fast(slot, False)
        self.log.info("trace_started", luns="all" if msg.slots is None else sorted(slots))
        self._reply(msg)

    def on_trace_stop(self, msg: M.TraceStop) -> None:
        self.trace_all = False
        self.trace_slots = set()
        if self.eng is not None:
            for slot in self.luns:
                self.eng.set_fast(slot, True)
        self._send_trace()
        self.trace_buf.clear()
        self.log.info("trace_stopped", dropped=self.trace_dropped)
        self.trace_dropped = 0
        self._reply(msg)

    def on_mem(self, msg: M.MapMemory) -> None:
        specs = [RegionSpec.from_dict(r) for r in msg.regions]
        fds = [fd for fd in msg.region_fds if fd is not None]
        try:
            new = GuestMemory.map(specs, fds, max_regions=msg.max_regions,
                                  generation=msg.generation)
        except GuestMemoryError as exc:
            for fd in fds:
                os.close(fd)
            self._reply(msg, ok=False, error=str(exc))
            return
        for fd in fds:
            os.close(fd)      # the mappings keep the memory alive
        # Quiesce: nothing in flight may keep a view of the old mapping.
        self.drain()
        self._close_engine()
        last_avail = self.queue.last_avail if self.queue is not None else None
        self._drop_queue_views()
        self._close_memory()
        self.mem = new
        if self._ring is not None and self.started:
            try:
                self._build_queue(self._ring, last_avail)
                self._open_engine()
            except (RingError, ValueError) as exc:
                self._ring_broken(f"ring not in the new memory table: {exc}")
            else:
                self.more = True
        self.log.info("memory_mapped", generation=new.generation, regions=len(specs))
        self._reply(msg)

    def _open_engine(self) -> None:
        if self.engine_kind == "c":
            live = {slot: r for slot, r in self.luns.items() if not r.removing}
            slow = set(live) if self.trace_all else set(self.trace_slots)
            self.eng = CEngine(queue=self.queue, mem=self.mem, luns=live,
                               state_page=self.state_mm,
                               cdb_size=self.cdb_size, sense_size=self.sense_size,
                               inflight=self.inflight, call_fd=self.call_fd,
                               poll_us=self.poll_us, log=self.log, stats=self.page.st,
                               latency_sample=self.latency_sample, slow=frozenset(slow))
        else:
            self.eng = PyEngine(self.queue, self.inflight, self.call_fd, stats=self.page.st)
        if self.eng.completion_fd >= 0:
            self.epoll.register(self.eng.completion_fd, select.EPOLLIN)

    def _merged_stats(self) -> dict:
        out = dict(self.stats)
        if self.eng is not None:
            for k, v in self.eng.stats().items():
                out[k] = out.get(k, 0) + v
        return out

    def _close_engine(self) -> None:
        if self.eng is None:
            return
        self.stats = self._merged_stats()
        if self.eng.completion_fd >= 0:
            try:
                self.epoll.unregister(self.eng.completion_fd)
            except OSError:
                pass
        self.eng.close()
        self.eng = None

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

    def _build_queue(self, p: M.StartRing, last_avail: int) -> None:
        self._drop_queue_views()
        self.queue = SplitQueue(self.mem, p.size, p.desc, p.avail, p.used,
                                event_idx=p.event_idx, last_avail=last_avail)

    def _map_inflight(self, msg: M.StartRing, fd: int) -> None:
        self._unmap_inflight()
        offset = msg.inflight_offset
        size = msg.inflight_size
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
            self.inflight = InflightQueue(view, msg.size)
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

    def on_start(self, msg: M.StartRing) -> None:
        if msg.err is not None:
            self._set_fd("err_fd", msg.err)
        if self.started:
            self._stop()
        kick, call, inflight_fd = msg.kick, msg.call, msg.inflight
        if self.mem is None or kick is None:
            for fd in (kick, call, inflight_fd):
                if fd is not None:
                    os.close(fd)
            self._reply(msg, ok=False, error="no memory table" if self.mem is None else "no kick fd")
            return
        try:
            self._build_queue(msg, msg.last_avail)
            q = self.queue
            if inflight_fd is not None:
                fd, inflight_fd = inflight_fd, None      # the mapping owns it from here on
                self._map_inflight(msg, fd)
                self._recover(q, msg)
            self._open_engine()
        except Exception as exc:  # RingError, a bad inflight region, the engine refusing
            # A ring that cannot start keeps nothing: fds, mappings and views go.
            for fd in (kick, call, inflight_fd):
                if fd is not None:
                    os.close(fd)
            self._close_engine()
            self._drop_queue_views()
            self._unmap_inflight()
            self.resubmit = []
            self.poisoned = []
            self.log.error("ring_start_failed", error=f"{type(exc).__name__}: {exc}")
            self._reply(msg, ok=False, error=str(exc))
            return
        self._ring = msg
        self._set_kick(kick)
        if call is not None:
            self._set_fd("call_fd", call)
            self.eng.set_call_fd(call)
        self.started = True
        self.broken = False
        self.enabled = msg.enabled
        self.log.info("ring_started", size=msg.size, last_avail=q.last_avail,
                      used_idx=q.used_idx, event_idx=msg.event_idx,
                      enabled=self.enabled, inflight=self.inflight is not None,
                      engine=self.engine_kind,
                      io_uring=isinstance(self.eng, CEngine) and self.eng.uring is not None)
        self.more = True      # requests may already be waiting
        self._reply(msg)

    def _recover(self, q: SplitQueue, msg: M.StartRing) -> None:
        """Pick up what a dead predecessor (or a previous daemon) left in flight:
        resubmit it, except what was resubmitted once already and is still in
        flight: that request was there when a worker died twice, and is failed
        (quarantined) rather than replayed into a third death."""
        recovered = None
        if msg.recover:
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
        if heads or msg.resume or q.last_avail != base:
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

    def on_kick(self, msg: M.SetKick) -> None:
        self._set_kick(msg.kick if msg.kick is not None else -1)
        self.more = True
        self._reply(msg)

    def on_call(self, msg: M.SetCall) -> None:
        self._set_fd("call_fd", msg.call if msg.call is not None else -1)
        if self.eng is not None:
            self.eng.set_call_fd(self.call_fd)
        if self.call_fd >= 0 and self.started:
            # Completions published while there was no call fd must not be
            # left unsignalled; a spurious interrupt is harmless.
            os.eventfd_write(self.call_fd, 1)
        self._reply(msg)

    def on_err(self, msg: M.SetErr) -> None:
        self._set_fd("err_fd", msg.err if msg.err is not None else -1)
        self._reply(msg)

    def on_enable(self, msg: M.EnableRing) -> None:
        self.enabled = bool(msg.on)
        if self.enabled:
            self.more = True   # kicks that came while disabled are not lost
        self.log.info("ring_enabled" if self.enabled else "ring_disabled")
        self._reply(msg)

    def _stop(self) -> int:
        self.drain()
        self._close_engine()
        q = self.queue
        last = q.last_avail if q is not None else (self._ring.last_avail if self._ring else 0)
        used = q.used_idx if q is not None else None
        self.started = False
        self._set_kick(-1)
        self._drop_queue_views()
        self._unmap_inflight()
        self._ring = None
        self.resubmit = []
        self.poisoned = []
        self.log.info("ring_stopped", last_avail=last, used_idx=used, **self.stats)
        return last

    def on_stop(self, msg: M.StopRing) -> None:
        self._reply(msg, result=M.StopResult(last_avail=self._stop()))

    def on_params(self, msg: M.SetParams) -> None:
        self.cdb_size = msg.cdb_size
        self.sense_size = msg.sense_size
        if self.eng is not None:
            self.eng.set_params(self.cdb_size, self.sense_size)
        self._reply(msg)

    def on_unmap(self, msg: M.Unmap) -> None:
        """The front end went away: drop the ring and the guest memory."""
        if self.started:
            self._stop()
        self._set_fd("call_fd", -1)
        self._set_fd("err_fd", -1)
        self._drop_queue_views()
        self._close_memory()
        self.broken = False
        self.enabled = False
        self._reply(msg)

    def _matches(self, msg: M.TaskMgmt, p: Pending) -> bool:
        if p.target != msg.target or (msg.lun is not None and p.lun != msg.lun):
            return False
        return p.tag == msg.tag if msg.kind in ("abort_task", "query_task") else True

    def on_tmf(self, msg: M.TaskMgmt) -> None:
        """Task management. When the answer goes out, nothing matching is active any
        more: delayed requests and long commands run to completion first (with their
        real result), injected never-completing commands and requests held for an
        unreachable server are completed as aborted (VIRTIO_SCSI_S_ABORTED, or
        VIRTIO_SCSI_S_RESET for a reset), and requests whose I/O is out on a network
        server are aborted when the server gives their buffers back -- the answer
        then waits for them, while the loop goes on."""
        m = self._matches
        found = any(m(msg, p) for p in itertools.chain(
            self.timers.items(), self.long_ops, self.net_pending, self.hung))
        if not found or msg.kind not in _ABORTING_TMFS:
            self._reply(msg, result=M.TaskMgmtResult(found=found))
            return
        if any(m(msg, p) for p in itertools.chain(self.timers.items(), self.long_ops)):
            self._drain_local()
        response = VIRTIO_SCSI_S_RESET if msg.kind in _RESET_TMFS else VIRTIO_SCSI_S_ABORTED
        for p in [p for p in self.hung if m(msg, p)]:
            self.hung.remove(p)
            self._abort(p, response)
        waiting = {p for p in list(self.net_pending) if m(msg, p) and not self._abort(p, response)}
        self._flush()
        if waiting:
            self.tmfs.append([msg, waiting])
            self.log.info("tmf_waiting", tmf=msg.kind, lun=msg.lun, tag=msg.tag,
                          in_flight=len(waiting))
        else:
            self._reply(msg, result=M.TaskMgmtResult(found=True))

    def _tmf_progress(self, p: Pending) -> None:
        for t in list(self.tmfs):
            t[1].discard(p)
            if not t[1]:
                self.tmfs.remove(t)
                self._flush()
                self._reply(t[0], result=M.TaskMgmtResult(found=True))

    def on_log_level(self, msg: M.SetLogLevel) -> None:
        vlog.set_level(msg.level)
        self._reply(msg)

    def on_ping(self, msg: M.Ping) -> None:
        self._reply(msg, result=M.PingResult(stats=self._merged_stats(), started=self.started,
                                             enabled=self.enabled, broken=self.broken,
                                             in_flight=self.in_flight))

    def on_exit(self, msg: M.Exit) -> None:
        if self.started:
            self.drain()
        self.running = False
        self._reply(msg)

    def close(self) -> None:
        for b in self.net.values():
            b.close()
        self.net = {}
        self.ticker.close()
        self.timers.close()
        self._close_engine()
        self.page.close()
        self._set_kick(-1)
        self._set_fd("call_fd", -1)
        self._set_fd("err_fd", -1)
        self._drop_queue_views()
        self._unmap_inflight()
        self._close_memory()


def _make_backend(spec: LunSpec, fd: int, *, queues: int = 1, facts: dict | None = None, log=None):
    from .backends import FileBackend, NullBackend

    if spec.is_nbd:
        from .backends.net import NbdBackend

        b = NbdBackend(spec.path, readonly=spec.readonly, hold=spec.hold, facts=facts, log=log)
        # Several connections to a server that does not promise a shared cache
        # (NBD multi-conn): every write goes out FUA (see docs/network-storage.md).
        b.writethrough = queues > 1 and not b.client.can_multi_conn and not b.readonly
        return b
    if spec.is_rbd:
        from .backends.net import RbdBackend

        pool, ns, image, snap = spec.rbd_name()
        return RbdBackend(pool, image, namespace=ns, snap=snap, conf=spec.conf or None,
                          client_id=spec.client_id or "admin", readonly=spec.readonly,
                          hold=spec.hold, log=log)
    if spec.is_null:
        return NullBackend(spec.null_size, readonly=spec.readonly)
    return FileBackend.from_fd(fd, readonly=spec.readonly, path=spec.path, direct=spec.direct)
