"""The device side of a virtio split virtqueue (virtio 1.x, section 2.7).

The three ring areas live in guest memory shared with the driver::

    descriptor table  16 B x size   {addr le64, len le32, flags le16, next le16}
    available ring    6 + 2 x size  {flags, idx, ring[size], used_event}
    used ring         6 + 8 x size  {flags, idx, ring[size] of {id le32, len le32}, avail_event}

The guest is untrusted. Everything read from these areas is validated before
use: a head index must be < size, a chain may not be longer than the table it
walks (this also catches loops), ``next`` must be in range, indirect tables
must be a non-zero multiple of 16 bytes, lie in guest memory and not nest,
device-writable descriptors may not be followed by device-readable ones, and
every buffer must lie inside the guest memory regions. A request whose chain is
bad is failed on its own (:class:`ChainError`); a ring that is broken as a
whole (its available index jumped by more than the ring size, or a head index
out of range) raises :class:`RingError`, after which the queue must be stopped.

Memory ordering: the driver's writes to descriptors happen before its write of
``avail->idx``; we read ``avail->idx`` and then fence before reading entries.
We write used elements, fence, then publish ``used->idx``, and put a full
fence between publishing and reading ``used_event`` / ``avail->flags`` (the
classic store→load ordering case that x86 does not give for free). The fences
are the ``vscsid.virtio._ring`` cffi helpers (fences.h).
"""
from __future__ import annotations

import struct

from ._ring import lib as _lib
from .defs import (
    HEAD_BUSY, HEAD_DONE, HEAD_FREE, MAX_QUEUE_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
    ring_sizes, vring_need_event,
)
from .memory import GuestMemory, GuestMemoryError

DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")

_mb = _lib.vq_mb
_rmb = _lib.vq_rmb
_wmb = _lib.vq_wmb


class RingError(Exception):
    """The ring as a whole is unusable: stop the queue (DEVICE_NEEDS_RESET).
    ``heads``: valid heads popped before the bad entry (to be served)."""

    def __init__(self, reason: str, heads: list[int] | None = None):
        super().__init__(reason)
        self.heads = heads or []


class ChainError(Exception):
    """One descriptor chain is malformed: fail that request only."""

    def __init__(self, reason: str, head: int):
        super().__init__(reason)
        self.reason = reason
        self.head = head


class Chain:
    """A popped descriptor chain: device-readable and device-writable buffers."""

    __slots__ = ("head", "out", "in_", "out_len", "in_len")

    def __init__(self, head: int, out: list, in_: list, out_len: int, in_len: int):
        self.head = head
        self.out = out          # list[memoryview] (device-readable)
        self.in_ = in_          # list[memoryview] (device-writable)
        self.out_len = out_len
        self.in_len = in_len


used_event_off = _lib.vq_used_event_off       # (fences.h)
avail_event_off = _lib.vq_avail_event_off


def peek_indices(mem: GuestMemory, size: int, avail_gpa: int, used_gpa: int) -> dict:
    """The ring's indices and notification fields as guest memory holds them now
    (a snapshot for diagnosis: a queue whose ``avail_idx`` stays ahead of the
    device's ``last_avail`` missed a kick; one whose driver waits with ``used_idx``
    past ``used_event`` missed a call). Raises GuestMemoryError off the map."""
    _dsz, asz, usz = ring_sizes(size)
    avail = mem.gpa_view(avail_gpa, asz)
    used = mem.gpa_view(used_gpa, usz)
    try:
        return {"avail_flags": U16.unpack_from(avail, 0)[0],
                "avail_idx": U16.unpack_from(avail, 2)[0],
                "used_event": U16.unpack_from(avail, used_event_off(size))[0],
                "used_flags": U16.unpack_from(used, 0)[0],
                "used_idx": U16.unpack_from(used, 2)[0],
                "avail_event": U16.unpack_from(used, avail_event_off(size))[0]}
    finally:
        avail.release()
        used.release()


class SplitQueue:
    """Device-side split virtqueue over guest memory."""

    __slots__ = ("mem", "size", "mask", "desc", "avail", "used", "event_idx",
                 "last_avail", "used_idx", "signalled_used", "signalled_valid", "call_used",
                 "_used_event_off", "_avail_event_off", "hstate", "pushed")

    def __init__(self, mem: GuestMemory, size: int, desc_gpa: int, avail_gpa: int,
                 used_gpa: int, *, event_idx: bool, last_avail: int):
        if size == 0 or size & (size - 1) or size > MAX_QUEUE_SIZE:
            raise RingError(f"queue size {size} is not a power of two <= {MAX_QUEUE_SIZE}")
        if desc_gpa % 16 or avail_gpa % 2 or used_gpa % 4:
            raise RingError("ring addresses are not aligned as the spec requires "
                            f"(desc {desc_gpa:#x}, avail {avail_gpa:#x}, used {used_gpa:#x})")
        dsz, asz, usz = ring_sizes(size)
        try:
            self.desc = mem.gpa_view(desc_gpa, dsz)
            self.avail = mem.gpa_view(avail_gpa, asz)
            self.used = mem.gpa_view(used_gpa, usz)
        except GuestMemoryError as exc:
            raise RingError(f"ring not inside guest memory: {exc}") from None
        self.mem = mem
        self.size = size
        self.mask = size - 1
        self.event_idx = event_idx
        self.last_avail = last_avail & 0xFFFF
        # Per the vhost-user spec the used index is read from guest memory.
        self.used_idx = U16.unpack_from(self.used, 2)[0]
        self.signalled_used = self.used_idx
        self.signalled_valid = False
        self.call_used = self.used_idx   # used_idx at the last call (the signalling caller sets it)
        self._used_event_off = used_event_off(size)
        self._avail_event_off = avail_event_off(size)
        # Which heads the device holds (HEAD_*): a head is popped only when FREE,
        # pushed only when BUSY; the heads pushed since the last publish are at
        # most ``size`` distinct ones.
        self.hstate = bytearray(size)
        self.pushed: list[int] = []

    def release(self) -> None:
        """Drop the views of guest memory (before the memory table is unmapped)."""
        self.desc.release()
        self.avail.release()
        self.used.release()

    # ------------------------------------------------------------------ avail side
    def avail_idx(self) -> int:
        return U16.unpack_from(self.avail, 2)[0]

    def pending(self) -> int:
        """Number of new available entries; validates the index jump."""
        n = (self.avail_idx() - self.last_avail) & 0xFFFF
        if n > self.size:
            raise RingError(
                f"available index jumped by {n}, more than the queue size {self.size}")
        return n

    def pop_heads(self, limit: int | None = None) -> list[int]:
        """Consume available entries and return their head indices (validated < size,
        and not held by the device already).

        On a broken ring the heads validated before the bad entry are consumed and
        stay BUSY; RingError carries them (``heads``) so they can still be served."""
        n = self.pending()
        if not n:
            return []
        if limit is not None and n > limit:
            n = limit
        _rmb()  # entries are read after the index
        avail = self.avail
        size = self.size
        mask = self.mask
        start = self.last_avail
        hstate = self.hstate
        heads = []
        for i in range(n):
            head = U16.unpack_from(avail, 4 + 2 * ((start + i) & mask))[0]
            if head >= size or hstate[head] != HEAD_FREE:
                # Consume what we validated so far, then report the broken ring.
                self.last_avail = (start + i) & 0xFFFF
                if head >= size:
                    why = f"names descriptor {head}, queue size is {size}"
                else:
                    why = f"names descriptor {head}, which is still in flight (offered twice)"
                raise RingError(f"available ring entry {(start + i) & 0xFFFF} {why}",
                                heads=heads)
            hstate[head] = HEAD_BUSY
            heads.append(head)
        self.last_avail = (start + n) & 0xFFFF
        return heads

    def claim(self, head: int) -> bool:
        """Hold a head that was not just popped (recovered from the inflight region
        after a crash). False if it is out of range or held already."""
        if not 0 <= head < self.size or self.hstate[head] != HEAD_FREE:
            return False
        self.hstate[head] = HEAD_BUSY
        return True

    def walk(self, head: int) -> Chain:
        """Map a chain's buffers to memoryviews, validating every descriptor."""
        table = self.desc
        limit = self.size
        mem = self.mem
        out: list = []
        in_: list = []
        out_len = in_len = 0
        i = head
        count = 0
        indirect = False
        while True:
            addr, length, flags, nxt = DESC.unpack_from(table, 16 * i)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise ChainError("nested indirect descriptor", head)
                if count:
                    raise ChainError("indirect descriptor is not the chain head", head)
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError("indirect descriptor has the NEXT flag", head)
                if length == 0 or length % 16:
                    raise ChainError(f"indirect table length {length} is not a "
                                     "non-zero multiple of 16", head)
                if length // 16 > MAX_QUEUE_SIZE:
                    raise ChainError(f"indirect table of {length // 16} entries is too long", head)
                try:
                    table = mem.gpa_view(addr, length)
                except GuestMemoryError as exc:
                    raise ChainError(f"indirect table outside guest memory: {exc}", head) from None
                indirect = True
                limit = length // 16
                i = 0
                continue
            count += 1
            if count > limit:
                raise ChainError("descriptor chain is longer than its table (loop?)", head)
            if length:
                try:
                    views = mem.views(addr, length)
                except GuestMemoryError as exc:
                    raise ChainError(f"buffer outside guest memory: {exc}", head) from None
                if flags & VIRTQ_DESC_F_WRITE:
                    in_.extend(views)
                    in_len += length
                else:
                    if in_:
                        raise ChainError("device-readable descriptor after a "
                                         "device-writable one", head)
                    out.extend(views)
                    out_len += length
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= limit:
                raise ChainError(f"next descriptor {nxt} out of range (table has {limit})", head)
            i = nxt
        return Chain(head, out, in_, out_len, in_len)

    # ------------------------------------------------------------------ used side
    def push(self, head: int, written: int) -> bool:
        """Stage a used element; it becomes visible at :meth:`publish`. False (and
        nothing written) for a head the device is not serving."""
        if not 0 <= head < self.size or self.hstate[head] != HEAD_BUSY:
            return False
        USED_ELEM.pack_into(self.used, 4 + 8 * (self.used_idx & self.mask), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.hstate[head] = HEAD_DONE
        self.pushed.append(head)
        return True

    def publish(self) -> list[int]:
        """Make the staged used elements visible; returns their heads (now the
        driver's again)."""
        _wmb()  # used elements before the index
        U16.pack_into(self.used, 2, self.used_idx)
        heads, self.pushed = self.pushed, []
        hstate = self.hstate
        for head in heads:
            hstate[head] = HEAD_FREE
        return heads

    def should_notify(self) -> bool:
        """After :meth:`publish`: must the driver be signalled?"""
        _mb()  # the index store must be visible before we read the driver's wishes
        if self.event_idx:
            old = self.signalled_used
            new = self.signalled_used = self.used_idx
            valid = self.signalled_valid
            self.signalled_valid = True
            if not valid:
                return True
            used_event = U16.unpack_from(self.avail, self._used_event_off)[0]
            return vring_need_event(used_event, new, old)
        return not (U16.unpack_from(self.avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT)

    def waits_for_later(self) -> bool:
        """EVENT_IDX: the driver has re-armed for an entry not published yet (it saw
        every one published so far): no call it asked for can be missing."""
        return self.event_idx and (
            U16.unpack_from(self.avail, self._used_event_off)[0] == self.used_idx)

    def call_missed(self) -> bool:
        """With nothing staged, before the queue sleeps: does the driver wait for a
        call that was not sent? (EVENT_IDX: its used_event names an entry published
        since ``call_used``; otherwise: entries were published since and interrupts
        are on.) A driver that orders its own store and load wrongly -- QEMU 7.2's
        TCG for a one-vCPU guest -- publishes its wish after :meth:`should_notify`
        read it. The C engine's vsd_late_call is the same test."""
        if self.used_idx == self.call_used:
            return False
        _mb()
        if self.event_idx:
            used_event = U16.unpack_from(self.avail, self._used_event_off)[0]
            return self.signalled_valid and vring_need_event(used_event, self.used_idx,
                                                             self.call_used)
        return not (U16.unpack_from(self.avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT)

    # ------------------------------------------------------------------ kick suppression
    def disable_kicks(self) -> None:
        if not self.event_idx:
            U16.pack_into(self.used, 0, VIRTQ_USED_F_NO_NOTIFY)
        # With EVENT_IDX, leaving avail_event behind suppresses kicks.

    def enable_kicks(self) -> bool:
        """Ask for kicks again; return True if work arrived meanwhile (process it)."""
        if self.event_idx:
            U16.pack_into(self.used, self._avail_event_off, self.last_avail)
        else:
            U16.pack_into(self.used, 0, 0)
        _mb()  # publish the wish before re-reading avail->idx
        return self.avail_idx() != self.last_avail
