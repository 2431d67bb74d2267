"""Driver side of a virtio 1.x split virtqueue, laid out in :class:`FrontendMemory`.

Layout (virtio 1.x, 2.7; all fields little endian)::

    desc  table   16 * size  : {le64 addr, le32 len, le16 flags, le16 next}   align 16
    avail ring    6 + 2*size : {le16 flags, le16 idx, le16 ring[size], le16 used_event}   align 2
    used  ring    6 + 8*size : {le16 flags, le16 idx, {le32 id, le32 len}[size], le16 avail_event}   align 4

``layout="legacy"`` (default) puts the used ring on the next 4 KiB boundary, as
the legacy interface did; ``layout="compact"`` packs the three parts with only
the spec's minimum alignments (so a device that assumes legacy placement fails).

Ordering: descriptors and avail entries are written with plain stores; the
avail index is published with a release fence + release store
(``vq_wmb``/``vq_store_u16``).  ``kick_needed`` issues a full fence before
reading the device's suppression fields; ``get_used`` reads ``used->idx`` with
an acquire load before reading the entries.

Free descriptors are a Python-side stack (never read back from shared memory,
so a hostile device cannot corrupt the driver's bookkeeping).  In-flight chains
are remembered per head; a used entry for an unknown head is a device error
(:class:`DeviceProtocolError`) unless the queue is created with ``strict=False``,
in which case it is reported with an :class:`UnknownHead` token.

The ring's flags and sizes and the EVENT_IDX test come from :mod:`vscsid.virtio.defs`
(their one definition). Writers of malformed rings, for the device's robustness
tests, are test code: ``tests/support/rawq.py``.
"""
from __future__ import annotations

import os
import struct
from typing import Any, NamedTuple, Sequence

from vscsid.virtio._ring import ffi, lib
from vscsid.virtio.defs import (
    DESC_SIZE, MAX_QUEUE_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY, ring_sizes, vring_need_event,
)

from .guestmem import FrontendMemory

__all__ = [
    "DriverQueueError", "QueueFullError", "DeviceProtocolError",
    "UnknownHead", "Completion", "VringAddr", "DriverQueue",
]

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class DriverQueueError(Exception):
    pass


class QueueFullError(DriverQueueError):
    """Not enough free descriptors for the chain."""


class DeviceProtocolError(DriverQueueError):
    """The device wrote something to the used ring that violates the spec.

    ``completed`` holds the completions consumed before the bad entry.
    """

    def __init__(self, msg: str, completed: list | None = None) -> None:
        super().__init__(msg)
        self.completed = completed or []


class UnknownHead(int):
    """Token reported (when ``strict=False``) for a used id that is not in flight."""

    def __repr__(self) -> str:
        return f"UnknownHead({int(self)})"


class Completion(NamedTuple):
    token: Any
    len: int            # 'len' written by the device into the used element
    head: int
    in_data: list       # snapshot of queue-allocated device-writable buffers (bytes), else []


class VringAddr(NamedTuple):
    """Front-end virtual addresses for VHOST_USER_SET_VRING_ADDR."""

    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


def _align_up(v: int, a: int) -> int:
    return (v + a - 1) & ~(a - 1)


class _Inflight:
    __slots__ = ("token", "descs", "owned", "auto_in")

    def __init__(self, token, descs, owned, auto_in) -> None:
        self.token = token
        self.descs = descs          # descriptor indices to return to the free list
        self.owned = owned          # GPAs allocated by the queue, freed on completion
        self.auto_in = auto_in      # [(gpa, len)] queue-allocated device-writable buffers


class DriverQueue:
    """The guest's view of one split virtqueue."""

    def __init__(self, mem: FrontendMemory, size: int, *, event_idx: bool = False,
                 start_idx: int = 0, layout: str = "legacy", region: int | None = None,
                 strict: bool = True, kick_fd: int | None = None, call_fd: int | None = None) -> None:
        if size < 1 or size > MAX_QUEUE_SIZE or size & (size - 1):
            raise ValueError("queue size must be a power of two in 1..32768")
        if not 0 <= start_idx <= 0xFFFF:
            raise ValueError("start_idx must be a 16-bit value")
        self.mem = mem
        self.size = size
        self.mask = size - 1
        self.event_idx = bool(event_idx)
        self.strict = strict
        self.layout = layout
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        dsz, asz, usz = ring_sizes(size)
        if layout == "legacy":
            self._avail_off = dsz
            self._used_off = _align_up(dsz + asz, 4096)
            align = 4096
        elif layout == "compact":
            self._avail_off = dsz
            self._used_off = _align_up(dsz + asz, 4)
            align = 16
        else:
            raise ValueError("layout must be 'legacy' or 'compact'")
        total = self._used_off + usz
        self._base = mem.alloc(total, align, region=region)
        self._total = total
        self._v = mem.gpa_view(self._base, total)
        self._v[:] = bytes(total)
        self._p = ffi.from_buffer("uint8_t[]", self._v)

        a, u = self._avail_off, self._used_off
        self._a_flags = a
        self._a_idx = a + 2
        self._a_ring = a + 4
        self._a_used_event = a + lib.vq_used_event_off(size)
        self._u_flags = u
        self._u_idx = u + 2
        self._u_ring = u + 4
        self._u_avail_event = u + lib.vq_avail_event_off(size)

        self.vring_base = start_idx
        self._avail_shadow = start_idx     # avail->idx as last published
        self._pending = 0                  # entries written to avail->ring but not yet published
        self._kick_old = start_idx         # avail idx at the previous kick decision
        self._last_used = start_idx
        self._intr_enabled = True
        self._avail_flags = 0
        # A ring "that has been running": avail->idx == used->idx == start_idx.
        _U16.pack_into(self._v, self._a_idx, start_idx)
        _U16.pack_into(self._v, self._u_idx, start_idx)
        if self.event_idx:
            _U16.pack_into(self._v, self._a_used_event, start_idx)
            _U16.pack_into(self._v, self._u_avail_event, start_idx)
        lib.vq_mb()

        self._free: list[int] = list(range(size - 1, -1, -1))   # pop() yields 0, 1, 2, ...
        self._inflight: list[_Inflight | None] = [None] * size
        self._n_inflight = 0
        self._ind_cache: list[tuple[int, int] | None] = [None] * size   # head -> (gpa, capacity)
        self._closed = False

    # ----------------------------------------------------------- addresses
    @property
    def desc_addr(self) -> int:
        return self._base

    @property
    def avail_addr(self) -> int:
        return self._base + self._avail_off

    @property
    def used_addr(self) -> int:
        return self._base + self._used_off

    @property
    def desc_uva(self) -> int:
        return self.mem.uva(self.desc_addr)

    @property
    def avail_uva(self) -> int:
        return self.mem.uva(self.avail_addr)

    @property
    def used_uva(self) -> int:
        return self.mem.uva(self.used_addr)

    def vring_addr(self, flags: int = 0, log_guest_addr: int = 0) -> VringAddr:
        return VringAddr(flags, self.desc_uva, self.used_uva, self.avail_uva, log_guest_addr)

    # --------------------------------------------------------------- state
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return self._n_inflight

    @property
    def avail_idx(self) -> int:
        """avail->idx as published (excludes unpublished adds)."""
        return self._avail_shadow

    @property
    def pending(self) -> int:
        """Chains added but not yet published."""
        return self._pending

    @property
    def last_used(self) -> int:
        return self._last_used

    def used_idx(self) -> int:
        """The device's used->idx (acquire load)."""
        return lib.vq_load_u16(self._p, self._u_idx)

    def used_flags(self) -> int:
        return lib.vq_load_u16(self._p, self._u_flags)

    def avail_event(self) -> int:
        return lib.vq_load_u16(self._p, self._u_avail_event)

    def used_event(self) -> int:
        return lib.vq_load_u16(self._p, self._a_used_event)

    def avail_flags(self) -> int:
        return lib.vq_load_u16(self._p, self._a_flags)

    def read_desc(self, i: int, table_gpa: int | None = None) -> tuple[int, int, int, int]:
        """(addr, len, flags, next) of descriptor ``i`` of the ring (or of a table at ``table_gpa``)."""
        if table_gpa is None:
            self._check_index(i)
            return _DESC.unpack_from(self._v, DESC_SIZE * i)
        return _DESC.unpack(self.mem.read(table_gpa + DESC_SIZE * i, DESC_SIZE))

    def read_avail_entry(self, pos: int) -> int:
        return _U16.unpack_from(self._v, self._a_ring + 2 * (pos & self.mask))[0]

    def read_used_elem(self, pos: int) -> tuple[int, int]:
        return _USED_ELEM.unpack_from(self._v, self._u_ring + 8 * (pos & self.mask))

    # ------------------------------------------------------------ adding
    def add(self, out: Sequence = (), in_: Sequence = (), *, indirect: bool = False,
            token: Any = None, publish: bool = False) -> int:
        """Queue one chain; returns its head descriptor index.

        ``out`` items are ``(gpa, len)`` tuples or bytes-like (copied into
        buffers the queue allocates); ``in_`` items are ``(gpa, len)`` tuples or
        ints (sizes of buffers the queue allocates; their contents are in
        :meth:`get_used_detailed`).  Device-readable descriptors come first.
        The chain becomes visible to the device on :meth:`publish`
        (or immediately with ``publish=True``).  ``token`` defaults to the head.
        """
        n = len(out) + len(in_)
        if n == 0:
            raise ValueError("a chain needs at least one descriptor")
        if n > self.size and not indirect:
            # (an indirect table may be longer than the queue, as Linux does for large seg_max)
            raise ValueError(f"chain of {n} descriptors exceeds the queue size {self.size}")
        free = self._free
        need = 1 if indirect else n
        if need > len(free):
            raise QueueFullError(f"queue full: chain needs {need} descriptors, {len(free)} free")

        mem = self.mem
        owned: list[int] | None = None
        auto_in: list[tuple[int, int]] | None = None
        segs: list[tuple[int, int, int]] = []
        try:
            for o in out:
                if isinstance(o, (tuple, list)):
                    segs.append((o[0], o[1], 0))
                else:
                    ln = len(o) if not isinstance(o, memoryview) else o.nbytes
                    g = mem.alloc(ln or 1)
                    if owned is None:
                        owned = []
                    owned.append(g)
                    mem.write(g, o)
                    segs.append((g, ln, 0))
            for i in in_:
                if isinstance(i, (tuple, list)):
                    segs.append((i[0], i[1], VIRTQ_DESC_F_WRITE))
                else:
                    g = mem.alloc(i or 1)
                    if owned is None:
                        owned = []
                        auto_in = []
                    elif auto_in is None:
                        auto_in = []
                    owned.append(g)
                    auto_in.append((g, i))
                    segs.append((g, i, VIRTQ_DESC_F_WRITE))
        except BaseException:
            for g in owned or ():
                mem.free(g)
            raise

        v = self._v
        pack = _DESC.pack_into
        if indirect:
            head = free.pop()
            ent = self._ind_cache[head]
            if ent is None or ent[1] < n:
                if ent is not None:
                    mem.free(ent[0])
                cap = max(n, 8)
                ent = (mem.alloc(DESC_SIZE * cap, 16), cap)
                self._ind_cache[head] = ent
            tbl = mem.gpa_view(ent[0], DESC_SIZE * n)
            last = n - 1
            for k, (addr, ln, fl) in enumerate(segs):
                if k != last:
                    pack(tbl, DESC_SIZE * k, addr, ln, fl | VIRTQ_DESC_F_NEXT, k + 1)
                else:
                    pack(tbl, DESC_SIZE * k, addr, ln, fl, 0)
            tbl.release()
            pack(v, DESC_SIZE * head, ent[0], DESC_SIZE * n, VIRTQ_DESC_F_INDIRECT, 0)
            descs: tuple[int, ...] = (head,)
        else:
            idxs = [free.pop() for _ in range(n)]
            last = n - 1
            for k, (addr, ln, fl) in enumerate(segs):
                if k != last:
                    pack(v, DESC_SIZE * idxs[k], addr, ln, fl | VIRTQ_DESC_F_NEXT, idxs[k + 1])
                else:
                    pack(v, DESC_SIZE * idxs[k], addr, ln, fl, 0)
            head = idxs[0]
            descs = tuple(idxs)

        self._offer(head, _Inflight(head if token is None else token, descs, owned, auto_in), publish)
        return head

    def publish(self) -> int:
        """Make every added chain visible: one release-ordered avail->idx update. Returns the count."""
        n = self._pending
        if n:
            new = (self._avail_shadow + n) & 0xFFFF
            lib.vq_wmb()
            lib.vq_store_u16(self._p, self._a_idx, new)
            self._avail_shadow = new
            self._pending = 0
        return n

    def kick_needed(self) -> bool:
        """Whether the device wants a notification for what was published since the last call.

        EVENT_IDX: ``vring_need_event(used->avail_event, new, old)``; otherwise
        the device's ``VIRTQ_USED_F_NO_NOTIFY`` flag.  Full fence first.
        """
        lib.vq_mb()
        new = self._avail_shadow
        old = self._kick_old
        self._kick_old = new
        if new == old:
            return False
        if self.event_idx:
            return vring_need_event(lib.vq_load_u16(self._p, self._u_avail_event), new, old)
        return not (lib.vq_load_u16(self._p, self._u_flags) & VIRTQ_USED_F_NO_NOTIFY)

    def kick(self) -> None:
        """Notify the device unconditionally (writes 1 to ``kick_fd``)."""
        if self.kick_fd is None:
            raise DriverQueueError("no kick_fd configured")
        os.eventfd_write(self.kick_fd, 1)

    def publish_and_kick(self) -> bool:
        """publish(); kick if needed and ``kick_fd`` is set. Returns whether a kick was needed."""
        self.publish()
        need = self.kick_needed()
        if need and self.kick_fd is not None:
            os.eventfd_write(self.kick_fd, 1)
        return need

    # ---------------------------------------------------------- reaping
    def _reap(self, max_n: int | None, detailed: bool) -> list:
        used_idx = lib.vq_load_u16(self._p, self._u_idx)   # acquire
        last = self._last_used
        avail = (used_idx - last) & 0xFFFF
        if avail == 0:
            return []
        if avail > self._n_inflight and self.strict:
            raise DeviceProtocolError(
                f"used->idx moved by {avail} but only {self._n_inflight} chains are in flight "
                f"(last_used={last}, used->idx={used_idx})")
        if max_n is not None and avail > max_n:
            avail = max_n
        lib.vq_rmb()
        v = self._v
        unpack = _USED_ELEM.unpack_from
        ring = self._u_ring
        mask = self.mask
        inflight = self._inflight
        free = self._free
        mem = self.mem
        res: list = []
        for _ in range(avail):
            hid, ln = unpack(v, ring + 8 * (last & mask))
            last = (last + 1) & 0xFFFF
            rec = inflight[hid] if hid < self.size else None
            if rec is None:
                if self.strict:
                    self._last_used = last
                    self._after_reap()
                    raise DeviceProtocolError(f"used element id {hid} is not an in-flight head", res)
                tok = UnknownHead(hid)
                res.append(Completion(tok, ln, hid, []) if detailed else (tok, ln))
                continue
            inflight[hid] = None
            self._n_inflight -= 1
            free.extend(rec.descs)
            data: list = []
            if rec.owned:
                if detailed and rec.auto_in:
                    data = [mem.read(g, n) for g, n in rec.auto_in]
                for g in rec.owned:
                    mem.free(g)
            res.append(Completion(rec.token, ln, hid, data) if detailed else (rec.token, ln))
        self._last_used = last
        self._after_reap()
        return res

    def _after_reap(self) -> None:
        if self.event_idx:
            ev = self._last_used if self._intr_enabled else (self._last_used - 1) & 0xFFFF
            _U16.pack_into(self._v, self._a_used_event, ev)
            lib.vq_mb()

    def get_used(self, max_n: int | None = None) -> list[tuple[Any, int]]:
        """Consume used entries since the last call: ``[(token, written_len)]``, freeing descriptors."""
        return self._reap(max_n, False)

    def get_used_detailed(self, max_n: int | None = None) -> list[Completion]:
        return self._reap(max_n, True)

    def has_used(self) -> bool:
        return lib.vq_load_u16(self._p, self._u_idx) != self._last_used

    def wait_used(self, timeout: float | None = None) -> bool:
        """After a reap: True at once if entries are already pending, else wait for a call.

        Reaping writes ``used_event`` and fences, so a completion the device published
        before it could see the new ``used_event`` (and therefore did not signal) is
        caught by this re-check instead of being waited for forever."""
        if self.has_used():
            return True
        return self.wait_call(timeout)

    def wait_call(self, timeout: float | None = None) -> bool:
        """Block on ``call_fd`` until the device signals (or timeout). Returns True if signalled."""
        if self.call_fd is None:
            raise DriverQueueError("no call_fd configured")
        import select
        r, _, _ = select.select([self.call_fd], [], [], timeout)
        if not r:
            return False
        os.eventfd_read(self.call_fd)
        return True

    # ------------------------------------------------------- interrupts
    def disable_interrupts(self) -> None:
        """Ask the device not to signal used buffers (a hint: it may still do so)."""
        self._intr_enabled = False
        if self.event_idx:
            # an event index just behind last_used is crossed only after 65535 more entries
            _U16.pack_into(self._v, self._a_used_event, (self._last_used - 1) & 0xFFFF)
        else:
            self._avail_flags |= VIRTQ_AVAIL_F_NO_INTERRUPT
            lib.vq_store_u16(self._p, self._a_flags, self._avail_flags)

    def enable_interrupts(self) -> bool:
        """Re-enable signalling. Returns True if used entries are already pending (poll again)."""
        self._intr_enabled = True
        if self.event_idx:
            lib.vq_store_u16(self._p, self._a_used_event, self._last_used)
        else:
            self._avail_flags &= ~VIRTQ_AVAIL_F_NO_INTERRUPT
            lib.vq_store_u16(self._p, self._a_flags, self._avail_flags)
        lib.vq_mb()
        return lib.vq_load_u16(self._p, self._u_idx) != self._last_used

    def enable_interrupts_delayed(self) -> bool:
        """Like :meth:`enable_interrupts` but (EVENT_IDX) only after ~3/4 of in-flight chains complete."""
        if not self.event_idx:
            return self.enable_interrupts()
        self._intr_enabled = True
        ev = (self._last_used + (self._n_inflight * 3 // 4)) & 0xFFFF
        lib.vq_store_u16(self._p, self._a_used_event, ev)
        lib.vq_mb()
        return ((lib.vq_load_u16(self._p, self._u_idx) - self._last_used) & 0xFFFF) > \
            ((ev - self._last_used) & 0xFFFF)

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.size:
            raise IndexError(f"descriptor index {i} outside the table (size {self.size})")

    def _offer(self, head: int, rec: "_Inflight | None", publish: bool) -> None:
        """Put ``head`` into the next avail->ring slot, tracked as ``rec`` (None: untracked)."""
        if rec is not None:
            self._inflight[head] = rec
            self._n_inflight += 1
        _U16.pack_into(self._v, self._a_ring + 2 * ((self._avail_shadow + self._pending) & self.mask),
                       head & 0xFFFF)
        self._pending += 1
        if publish:
            self.publish()

    # ------------------------------------------------------------ close
    def close(self) -> None:
        """Free the ring memory and every buffer the queue allocated. Idempotent."""
        if self._closed:
            return
        self._closed = True
        mem = self.mem
        if mem.closed:
            return
        ffi.release(self._p)
        self._v.release()
        for rec in self._inflight:
            if rec is not None and rec.owned:
                for g in rec.owned:
                    mem.free(g)
        for ent in self._ind_cache:
            if ent is not None:
                mem.free(ent[0])
        mem.free(self._base)

    def __enter__(self) -> "DriverQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"DriverQueue(size={self.size}, desc=0x{self.desc_addr:x}, avail=0x{self.avail_addr:x}, "
                f"used=0x{self.used_addr:x}, event_idx={self.event_idx}, avail_idx={self._avail_shadow}, "
                f"last_used={self._last_used}, free={len(self._free)})")

