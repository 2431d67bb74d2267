"""Python side of the C fast path (``_engine.c`` in ``vscsid.workers._fast``).

:class:`CQueue` owns one ``struct vsd_queue``: it points the C code at the ring
areas, the guest memory regions, the LUN table and the inflight region, all of
which are buffers this process already mapped. Requests the C code does not
serve come back as head indices; the worker runs them through the Python
reference path and completes them with :meth:`push`.

Buffer lifetimes: ``ffi.from_buffer`` pins a buffer export on the mmap, so every
pointer handed to C is released (:meth:`close`) before the memory table changes.
"""
from __future__ import annotations

import os

from ._fast import ffi, lib


class CQueue:
    def __init__(self, *, queue, mem, luns: dict, lun_flags: dict, cdb_size: int,
                 sense_size: int, inflight, call_fd: int, use_uring: bool, poll_us: int = 0):
        self._pins = []
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
        q.nluns = 0
        for number, disk in luns.items():
            if number >= lib.VSD_MAX_LUNS:
                continue
            flags = lun_flags.get(number, 0)
            entry = q.luns[number]
            entry.fd = flags.get("fd", -1)
            entry.flags = flags["flags"]
            entry.block_size = disk.info.block_size
            entry.block_shift = disk.info.block_size.bit_length() - 1
            entry.num_blocks = disk.info.num_blocks
            entry.max_transfer_bytes = disk.info.max_transfer_bytes
            entry.delay_ns = flags.get("delay_ns", 0)
            state = flags.get("state")
            entry.state = self._pin(state) if state is not None else ffi.NULL
            q.nluns = max(q.nluns, number + 1)
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
        self.uring = None
        self.uring_fd = -1
        if use_uring:
            self._setup_uring(size)

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
        self.uring_fd = efd
        self.q.uring = u

    # ------------------------------------------------------------------ data path
    def run(self, budget: int) -> list[int]:
        n = lib.vsd_run(self.q, self._slow, self.max_slow, budget)
        if n < 0:
            return None   # broken ring: see broken_reason
        return list(self._slow[0:n]) if n else []

    def serve(self, epfd: int, kick_fd: int, timeout_ms: int, budget: int) -> list[int] | None:
        """Serve the ring in C until Python is needed (see vsd_serve)."""
        n = lib.vsd_serve(self.q, epfd, kick_fd, self.uring_fd, timeout_ms, self._slow,
                          self.max_slow, budget)
        if n < 0:
            return None
        return list(self._slow[0:n]) if n else []

    @property
    def broken_reason(self) -> str | None:
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

    def resubmit(self, heads: list[int]) -> list[int]:
        arr = ffi.new("uint16_t[]", heads)
        n = lib.vsd_resubmit(self.q, arr, len(heads), self._slow)
        return list(self._slow[0:n])

    def claim(self, head: int) -> bool:
        """Hold a head recovered from the inflight region (False: invalid or held)."""
        return lib.vsd_claim(self.q, head) == 0

    def push(self, head: int, written: int) -> bool:
        """Complete a head the reference path served (False: it was not being served)."""
        return lib.vsd_push(self.q, head, written) == 0

    def flush(self) -> bool:
        return bool(lib.vsd_flush(self.q))

    def drain(self) -> list[int]:
        n = lib.vsd_drain(self.q, self._slow, self.max_slow)
        if n < 0:
            raise OSError(-n, f"io_uring failed while draining: {os.strerror(-n)}")
        return list(self._slow[0:n])

    def ack_uring_event(self) -> None:
        try:
            os.eventfd_read(self.uring_fd)
        except BlockingIOError:
            pass

    @property
    def last_avail(self) -> int:
        return self.q.last_avail

    @property
    def used_idx(self) -> int:
        return self.q.used_idx

    @property
    def in_flight(self) -> int:
        return self.q.in_flight

    def set_call_fd(self, fd: int) -> None:
        self.q.call_fd = fd

    def stats(self) -> dict:
        q = self.q
        return {"fast": q.st_fast, "slow": q.st_slow, "async": q.st_async,
                "c_bytes_in": q.st_bytes_in, "c_bytes_out": q.st_bytes_out,
                "c_calls": q.st_calls, "c_batches": q.st_batches,
                "c_max_in_flight": q.st_max_in_flight, "poll_hits": q.st_poll_hits,
                "c_kicks": q.st_kicks}

    def close(self) -> None:
        if self.uring is not None:
            lib.vsd_uring_free(self.uring)
            self.uring = None
            self.q.uring = ffi.NULL
        if self.uring_fd >= 0:
            os.close(self.uring_fd)
            self.uring_fd = -1
        for p in self._pins:
            ffi.release(p)
        self._pins = []
