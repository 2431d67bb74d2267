"""The worker's engine: what takes requests off the ring and puts completions back.

One interface (after gunicorn's ``workers/base.py``), two implementations:

* :class:`PyEngine`, the reference: the split ring in Python
  (:class:`~vscsid.virtio.splitq.SplitQueue`); every request it pops is served by
  the worker's reference path (virtio-scsi framing, the SCSI target, the backend);
* :class:`CEngine`, the fast path (``_engine.c`` in ``vscsid.workers._fast``): it
  pops, validates and serves the common READ/WRITE itself, straight between the
  backing file and guest memory (synchronously or through io_uring), and hands
  every other request to the same reference path.

A pass (:meth:`Engine.run`) returns the heads the reference path must serve; the
worker completes each with :meth:`Engine.push` and publishes with
:meth:`Engine.flush`. Both engines hold the same rules: a head is served once
(a head offered while held breaks the ring), completion bookkeeping never exceeds
the queue size, every pass has a budget.

Buffer lifetimes: ``ffi.from_buffer`` pins a buffer export on the mmap, so every
pointer the C engine holds is released (:meth:`close`) before the memory table
changes.
"""
from __future__ import annotations

import os

from vscsid import lunstate
from vscsid.config import LunSpec
from vscsid.virtio.inflight import InflightQueue
from vscsid.virtio.memory import GuestMemory
from vscsid.virtio.splitq import RingError, SplitQueue

from ._fast import ffi, lib


class Engine:
    """The interface. ``broken``: why the ring is unusable as a whole (or None);
    ``more``: the last pass stopped at its budget and should be repeated soon."""

    broken: str | None = None
    more: bool = False
    #: an fd to wait on for asynchronous completions (-1: none)
    completion_fd: int = -1

    def run(self, budget: int) -> list[int]:
        """One pass: pop up to ``budget`` requests; the heads the reference path serves."""
        raise NotImplementedError

    def serve(self, epfd: int, kick_fd: int, timeout_ms: int, budget: int) -> list[int] | None:
        """Wait for and serve requests until the reference path is needed (the heads it
        must serve), or return None when this engine has no loop of its own."""
        return None

    def claim(self, head: int) -> bool:
        """Hold a head recovered from the inflight region (False: invalid or held)."""
        raise NotImplementedError

    def resubmit(self, heads: list[int]) -> list[int]:
        """Serve recovered heads; those the reference path must serve."""
        raise NotImplementedError

    def push(self, head: int, written: int) -> bool:
        """Complete a head the reference path served (False: it was not being served)."""
        raise NotImplementedError

    def flush(self) -> bool:
        """Publish the completions; True if the driver was signalled."""
        raise NotImplementedError

    def late_call(self) -> bool:
        """Before the queue sleeps: signal the driver if it asked for a call that was
        never sent (it published its wish only after the last flush read it); True
        if it was signalled."""
        return False

    def drain(self) -> list[int]:
        """Wait for the engine's own I/O in flight; heads the reference path must redo."""
        return []

    def ack_completion(self) -> None:
        """The completion fd was readable."""

    @property
    def in_flight(self) -> int:
        return 0

    @property
    def last_avail(self) -> int:
        raise NotImplementedError

    def set_call_fd(self, fd: int) -> None:
        raise NotImplementedError

    def set_params(self, cdb_size: int, sense_size: int) -> None:
        pass

    # ------------------------------------------------------------------ LUN table
    # (the C engine keeps its own copy of the worker's LUN table; the reference
    # engine reads the worker's)
    def set_lun(self, slot: int, lun) -> None:
        """Serve a LUN (a worker.LunRef) from now on, or apply what changed in it (its
        size, its spec's injections: which path serves it)."""

    def clear_lun(self, slot: int, lun) -> None:
        """Stop serving a LUN: its requests go to the reference path, which answers
        them as a missing LUN's."""

    def set_fast(self, slot: int, on: bool) -> None:
        """Let the fast path serve the LUN (False: every request of it takes the
        reference path, e.g. while it is traced)."""

    def release_map(self, slot: int) -> None:
        """Let go of the LUN's memory-file mapping (it is about to change size)."""

    def maps_lost(self) -> list[int]:
        """LUN slots whose memory-file mapping faulted since the last call (the engine
        stopped using it: a file shrank under it, or a full tmpfs had no page)."""
        return []

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class PyEngine(Engine):
    """The reference: pops heads for the worker's reference path, publishes, signals."""

    def __init__(self, queue: SplitQueue, inflight: InflightQueue | None, call_fd: int,
                 stats=None):
        self.queue = queue
        self.inflight = inflight
        self.call_fd = call_fd
        self.broken = None
        self.more = False
        self.st = {"requests": 0, "batches": 0}
        self.shared = stats        # struct vsd_stats * (the queue's counters), or None

    def run(self, budget: int) -> list[int]:
        q = self.queue
        self.more = False
        if self.broken:
            return []
        budget = min(budget, q.size)     # as the C engine: at most a queue's worth per pass
        heads: list[int] = []
        try:
            while True:
                q.disable_kicks()
                room = budget - len(heads)
                available = q.pending()
                if available and not room:
                    self.more = True
                    break
                new = q.pop_heads(room)
                self._got(new)
                heads += new
                if available > room:
                    self.more = True       # the budget is spent: the rest next pass
                    break
                if not q.enable_kicks():
                    break
        except RingError as exc:
            self._got(exc.heads)
            heads += exc.heads
            self.broken = str(exc)
        if heads:
            self.st["requests"] += len(heads)
            self.st["batches"] += 1
            if self.shared is not None:
                self.shared.q.slow += len(heads)
                self.shared.q.batches += 1
        return heads

    def _got(self, heads: list[int]) -> None:
        inflight = self.inflight
        if inflight is not None:
            for head in heads:
                inflight.get(head)

    def claim(self, head: int) -> bool:
        return self.queue.claim(head)

    def resubmit(self, heads: list[int]) -> list[int]:
        claimed = [h for h in heads if self.queue.claim(h)]
        if self.shared is not None:
            self.shared.q.slow += len(claimed)
        return claimed

    def push(self, head: int, written: int) -> bool:
        return self.queue.push(head, written)

    def flush(self) -> bool:
        q = self.queue
        if not q.pushed:
            return False
        heads = q.publish()
        if self.inflight is not None:
            self.inflight.put(heads, q.used_idx)
        if q.should_notify() and self.call_fd >= 0:
            if self.shared is not None:
                self.shared.q.calls += 1
            os.eventfd_write(self.call_fd, 1)
            q.call_used = q.used_idx
            return True
        return False

    def late_call(self) -> bool:
        q = self.queue
        if self.call_fd < 0 or q.pushed or not q.call_missed():
            return False
        if self.shared is not None:     # counted first: whoever the call wakes sees it
            self.shared.q.calls += 1
            self.shared.q.late_calls += 1
        os.eventfd_write(self.call_fd, 1)
        q.call_used = q.used_idx
        return True

    @property
    def last_avail(self) -> int:
        return self.queue.last_avail

    def set_call_fd(self, fd: int) -> None:
        self.call_fd = fd

    def stats(self) -> dict:
        return dict(self.st)


_QSTATS = ("fast", "slow", "bytes_in", "bytes_out", "calls", "batches", "async",
           "max_in_flight", "poll_hits", "kicks", "nowait_miss", "write_blocked", "unaligned",
           "late_calls", "map_faults")


def lun_flags(spec: LunSpec, uring: bool) -> int:
    """The engine's view of a LUN (LUN_* of _engine.h).

    aio=auto (the default): reads of a buffered file or device are tried inline
    without waiting (RWF_NOWAIT) and go to io_uring when they would wait for the
    disk; writes run inline until one blocks (then io_uring for a while); FUA writes
    and SYNCHRONIZE CACHE always go to io_uring; O_DIRECT and injected latency put
    every I/O through io_uring. aio=sync: everything inline (preadv/pwritev).
    aio=uring: every I/O through io_uring.

    Network LUNs and LUNs with injected faults are served by the reference path
    only (no LUN_FAST)."""
    f = lib.LUN_PRESENT
    if not (spec.is_network or spec.inject):
        f |= lib.LUN_FAST
    if spec.readonly:
        f |= lib.LUN_RO
    if spec.is_null:
        f |= lib.LUN_NULL
    if spec.direct:
        f |= lib.LUN_DIRECT
    if spec.aio == "sync" and not spec.delay_us:
        f |= lib.LUN_SYNC
    elif uring and (spec.aio == "uring" or spec.delay_us or spec.direct):
        f |= lib.LUN_ASYNC
    elif uring and not spec.is_null:
        f |= lib.LUN_NOWAIT
    return f


def wants_uring(spec: LunSpec) -> bool:
    """Whether the LUN needs io_uring: every file LUN but aio=sync (for the reads that
    would wait, durable writes, flushes), and injected latency (its timers)."""
    if spec.delay_us:
        return True
    return not spec.is_null and spec.aio != "sync"


class CEngine(Engine):
    """One ``struct vsd_queue``: the C code is pointed at the ring areas, the guest
    memory regions, the LUN table and the inflight region, all of them buffers this
    process already mapped."""

    def __init__(self, *, queue: SplitQueue, mem: GuestMemory, luns: dict, state_page,
                 cdb_size: int, sense_size: int, inflight: InflightQueue | None,
                 call_fd: int, poll_us: int = 0, log=None, stats=None, latency_sample: int = 1,
                 slow: frozenset = frozenset()):
        """``luns``: slot -> worker.LunRef; ``stats``: the queue's struct vsd_stats (its
        shared page; a private one when None); ``slow``: slots the fast path leaves to
        the reference path (traced LUNs)."""
        self._pins = []
        self._map_pins: dict[int, object] = {}
        self._maps_lost: set[int] = set()      # slots maps_lost() has reported
        self.uring = None
        self.completion_fd = -1
        try:
            self.queue = queue
            self.inflight = inflight
            self.q = q = ffi.new("struct vsd_queue *")
            size = queue.size
            q.desc = self._pin(queue.desc)
            q.avail = self._pin(queue.avail)
            q.used = self._pin(queue.used)
            q.size = size
            q.mask = size - 1
            q.last_avail = queue.last_avail
            q.used_idx = queue.used_idx
            q.signalled_used = queue.used_idx
            q.call_used = queue.used_idx
            q.signalled_valid = 0
            q.event_idx = 1 if queue.event_idx else 0
            q.call_fd = call_fd
            if len(mem.regions) > lib.VSD_MAX_REGIONS:
                raise ValueError(f"{len(mem.regions)} memory regions; the engine holds "
                                 f"{lib.VSD_MAX_REGIONS}")
            for i, r in enumerate(mem.regions):
                q.regions[i].gpa = r.gpa
                q.regions[i].size = r.size
                q.regions[i].host = self._pin(r.view)
            q.nregions = len(mem.regions)
            q.last_region = 0
            q.cdb_size = cdb_size
            q.sense_size = sense_size
            if inflight is not None:
                q.inflight = self._pin(inflight.buf)
                q.counter = inflight.counter
            else:
                q.inflight = ffi.NULL
            q.poll_max_ns = max(0, int(poll_us)) * 1000
            q.poll_ns = 0
            self._completed = ffi.new("uint16_t[]", size)
            q.completed = self._completed
            self._hstate = ffi.new("uint8_t[]", size)      # every head FREE
            q.hstate = self._hstate
            self._slow = ffi.new("uint16_t[]", size)
            self.max_slow = size
            self.uring_error = None
            use_uring = any(wants_uring(r.spec) for r in luns.values())
            if use_uring:
                self._setup_uring(size)
                if self.uring is None and log is not None:
                    log.warning("io_uring_unavailable", error=self.uring_error,
                                fallback="synchronous I/O; injected latency served by timers")
            # Statistics: the worker's shared page (or a private one).
            self._stats_keep = None
            if stats is None:
                stats = self._stats_keep = ffi.new("struct vsd_stats *")
            q.st = stats
            self._base = {k: int(getattr(stats.q, k)) for k in _QSTATS}
            self._map_faults_seen = self._base["map_faults"]
            q.lat_every = max(0, int(latency_sample))
            q.lat_tick = 0
            self._lunmap = ffi.new("uint16_t[]", lib.VSD_MAX_TARGETS * lib.VSD_TARGET_LUNS)
            q.lunmap = self._lunmap
            self.state_page = state_page
            self.log = log
            self._state_pins: dict[int, tuple] = {}
            self._fast_by_spec: dict[int, bool] = {}
            self.slow = set(slow)
            q.nluns = 0
            for slot, lun in luns.items():
                self.set_lun(slot, lun)
        except BaseException:
            self._release()     # a start that fails keeps no pointer into guest memory
            raise

    def _pin(self, buf):
        p = ffi.from_buffer("uint8_t[]", buf, require_writable=True)
        self._pins.append(p)
        return p

    def _setup_uring(self, size: int) -> None:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        err = ffi.new("int *")
        u = lib.vsd_uring_new(2 * size, efd, size, err)
        if u == ffi.NULL:
            os.close(efd)
            self.uring_error = os.strerror(-err[0])
            return
        self.uring = u
        self.completion_fd = efd
        self.q.uring = u

    # ------------------------------------------------------------------ data path
    def _slow_heads(self, n: int) -> list[int]:
        return list(self._slow[0:n]) if n > 0 else []

    def run(self, budget: int) -> list[int]:
        return self._slow_heads(lib.vsd_run(self.q, self._slow, self.max_slow, budget))

    def serve(self, epfd: int, kick_fd: int, timeout_ms: int, budget: int) -> list[int]:
        """Serve the ring in C until Python is needed (see vsd_serve)."""
        return self._slow_heads(lib.vsd_serve(self.q, epfd, kick_fd, self.completion_fd,
                                              timeout_ms, self._slow, self.max_slow, budget))

    @property
    def broken(self) -> str | None:
        q = self.q
        b = q.broken
        if b == lib.VSD_BROKEN_AVAIL_JUMP:
            return f"available index jumped by more than the queue size {q.size}"
        if b == lib.VSD_BROKEN_HEAD_RANGE:
            return (f"available ring names descriptor {q.broken_head}, >= the queue size "
                    f"{q.size}")
        if b == lib.VSD_BROKEN_HEAD_BUSY:
            return (f"available ring names descriptor {q.broken_head}, which is still in "
                    "flight (offered twice)")
        return None

    @property
    def more(self) -> bool:
        return bool(self.q.more)

    def claim(self, head: int) -> bool:
        return lib.vsd_claim(self.q, head) == 0

    def resubmit(self, heads: list[int]) -> list[int]:
        arr = ffi.new("uint16_t[]", heads)
        return self._slow_heads(lib.vsd_resubmit(self.q, arr, len(heads), self._slow))

    def push(self, head: int, written: int) -> bool:
        return lib.vsd_push(self.q, head, written) == 0

    def flush(self) -> bool:
        return bool(lib.vsd_flush(self.q))

    def late_call(self) -> bool:
        return bool(lib.vsd_late_call(self.q))

    def drain(self) -> list[int]:
        n = lib.vsd_drain(self.q, self._slow, self.max_slow)
        if n < 0:
            raise OSError(-n, f"io_uring failed while draining: {os.strerror(-n)}")
        return self._slow_heads(n)

    def ack_completion(self) -> None:
        try:
            os.eventfd_read(self.completion_fd)
        except BlockingIOError:
            pass

    @property
    def last_avail(self) -> int:
        return self.q.last_avail

    @property
    def in_flight(self) -> int:
        return self.q.in_flight

    def set_call_fd(self, fd: int) -> None:
        self.q.call_fd = fd

    def set_params(self, cdb_size: int, sense_size: int) -> None:
        self.q.cdb_size = cdb_size
        self.q.sense_size = sense_size

    # ------------------------------------------------------------------ LUN table
    def set_lun(self, slot: int, lun) -> None:
        """``lun``: a worker.LunRef (disk, spec, target, number)."""
        if not 0 <= slot < lib.VSD_MAX_LUNS:
            return
        q = self.q
        disk, spec = lun.disk, lun.spec
        entry = q.luns[slot]
        new = not entry.flags & lib.LUN_PRESENT
        entry.fd = -1 if spec.is_null else getattr(disk.backend, "fd", -1)
        flags = lun_flags(spec, self.uring is not None)
        self._fast_by_spec[slot] = bool(flags & lib.LUN_FAST)
        if slot in self.slow:
            flags &= ~lib.LUN_FAST
        entry.flags = flags
        entry.block_size = disk.info.block_size
        entry.block_shift = disk.info.block_size.bit_length() - 1
        entry.num_blocks = disk.num_blocks
        entry.max_transfer_bytes = disk.info.max_transfer_bytes
        entry.delay_ns = spec.delay_us * 1000
        if self.state_page is not None:
            if slot not in self._state_pins:
                mode = lunstate.mode_offset(slot)
                ua = lunstate.ua_offset(slot)
                self._state_pins[slot] = (
                    self._pin(memoryview(self.state_page)[mode:mode + 1]),
                    self._pin(memoryview(self.state_page)[ua:ua + lunstate.UA_KINDS]))
            state, ua = self._state_pins[slot]
            entry.state = state
            entry.ua = ffi.cast("uint32_t *", ua)
        else:
            entry.state = ffi.NULL
            entry.ua = ffi.NULL
        entry.dio_align = getattr(disk.backend, "dio_align", 1)
        entry.mem_align = getattr(disk.backend, "mem_align", 1)
        if new:
            entry.buffered_fd = -1
            if spec.direct and not spec.is_null:
                try:
                    entry.buffered_fd = disk.backend.buffered_fd
                except OSError as exc:
                    if self.log is not None:
                        self.log.warning("buffered_fd_unavailable", lun=slot, error=str(exc),
                                         effect="unaligned O_DIRECT requests take the "
                                                "reference path")
            entry.write_async_until = 0
        if slot not in self._map_pins:
            entry.map = ffi.NULL
            entry.map_faults = ffi.NULL
            mapping = getattr(disk.backend, "memory_map", lambda: None)()
            if mapping is not None and len(mapping) >= disk.num_blocks * disk.info.block_size:
                counter = disk.backend.map_faults
                p = ffi.from_buffer("uint8_t[]", mapping)
                self._map_pins[slot] = (p, counter)     # both live while the engine uses them
                entry.map_faults = ffi.cast("unsigned long *", counter.address)
                entry.map = p
        # (the engine clears map when the mapping faulted: then writes stay system calls)
        if entry.map != ffi.NULL and getattr(disk.backend, "map_writable", False):
            entry.flags |= lib.LUN_MAP_WRITE
        if lun.number < lib.VSD_TARGET_LUNS and 0 <= lun.target < lib.VSD_MAX_TARGETS:
            self._lunmap[lun.target * lib.VSD_TARGET_LUNS + lun.number] = slot + 1
        q.nluns = max(q.nluns, slot + 1)

    def clear_lun(self, slot: int, lun) -> None:
        if not 0 <= slot < lib.VSD_MAX_LUNS:
            return
        if lun.number < lib.VSD_TARGET_LUNS and 0 <= lun.target < lib.VSD_MAX_TARGETS:
            i = lun.target * lib.VSD_TARGET_LUNS + lun.number
            if self._lunmap[i] == slot + 1:
                self._lunmap[i] = 0
        self.q.luns[slot].flags = 0
        # (I/O in flight keeps its own copy of the fd and buffers; the worker closes
        # the backend only once the LUN has nothing in flight)
        self.release_map(slot)

    def set_fast(self, slot: int, on: bool) -> None:
        """Traced LUNs leave the fast path (LUN_FAST cleared); back when the trace ends
        (unless the LUN never had it: network LUNs, injections)."""
        if on:
            self.slow.discard(slot)
        else:
            self.slow.add(slot)
        if 0 <= slot < lib.VSD_MAX_LUNS:
            entry = self.q.luns[slot]
            if entry.flags & lib.LUN_PRESENT:
                if not on:
                    entry.flags &= ~lib.LUN_FAST
                elif self._fast_by_spec.get(slot):
                    entry.flags |= lib.LUN_FAST

    def release_map(self, slot: int) -> None:
        pin = self._map_pins.pop(slot, None)
        if pin is not None:
            entry = self.q.luns[slot]
            entry.map = ffi.NULL
            entry.flags &= ~lib.LUN_MAP_WRITE
            entry.map_faults = ffi.NULL
            self._maps_lost.discard(slot)
            ffi.release(pin[0])

    def maps_lost(self) -> list[int]:
        n = int(self.q.st.q.map_faults)
        if n == self._map_faults_seen:
            return []
        self._map_faults_seen = n
        lost = [slot for slot in self._map_pins
                if self.q.luns[slot].map == ffi.NULL and slot not in self._maps_lost]
        self._maps_lost.update(lost)
        return lost

    def stats(self) -> dict:
        """The counters since this engine started (the shared page goes on counting
        across engines and workers: this is the difference since the start)."""
        st = self.q.st.q
        now = {k: int(getattr(st, k)) for k in _QSTATS}
        d = {k: now[k] - self._base[k] for k in _QSTATS}
        return {"fast": d["fast"], "slow": d["slow"], "async": d["async"],
                "c_bytes_in": d["bytes_in"], "c_bytes_out": d["bytes_out"],
                "c_calls": d["calls"], "c_batches": d["batches"],
                "c_max_in_flight": now["max_in_flight"], "poll_hits": d["poll_hits"],
                "c_kicks": d["kicks"], "requests": d["fast"] + d["slow"],
                "nowait_misses": d["nowait_miss"], "writes_blocked": d["write_blocked"],
                "unaligned_direct": d["unaligned"], "late_calls": d["late_calls"],
                "map_faults": d["map_faults"]}

    def close(self) -> None:
        """Hand the ring's state back to the SplitQueue and inflight region, release
        every pointer into guest memory."""
        if self.inflight is not None:
            self.inflight.counter = self.q.counter
        self.queue.last_avail = self.q.last_avail
        self.queue.used_idx = self.q.used_idx
        self._release()

    def _release(self) -> None:
        if self.uring is not None:
            lib.vsd_uring_free(self.uring)
            self.uring = None
            self.q.uring = ffi.NULL
        if self.completion_fd >= 0:
            os.close(self.completion_fd)
            self.completion_fd = -1
        for p in self._pins:
            ffi.release(p)
        self._pins = []
        for slot in list(self._map_pins):
            self.release_map(slot)
