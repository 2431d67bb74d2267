"""Inflight I/O tracking in shared memory (vhost-user INFLIGHT_SHMFD layout).

Per queue, a region laid out as QEMU's docs/interop/vhost-user.rst describes
for split rings::

    u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
    DescStateSplit desc[desc_num]:  u8 inflight; u8 padding[5]; u16 next; u64 counter;

The region lives in a memfd that outlives the process serving the queue: the
supervisor keeps it across worker restarts, and QEMU keeps it across daemon
restarts (GET_INFLIGHT_FD / SET_INFLIGHT_FD). A worker marks a head in flight
(with a rising counter) when it pops it, and clears it after the used index
that covers it is published. Recovery after a crash:

1. heads whose used entries lie between the recorded ``used_idx`` and the
   used index in guest memory were completed (published) but not yet cleared:
   clear them — reading the used ring tells exactly which ones (this
   generalises the spec's single ``last_batch_head`` to batches);
2. every head still marked is in flight: it is resubmitted, in counter order —
   unless it was resubmitted once already (its worker died again while serving
   it): the caller then fails it instead (the poison-request quarantine). The
   count lives in the entry's first padding byte;
3. the next available index is ``used_idx + number in flight``, because heads
   are marked in the order they are popped.
"""
from __future__ import annotations

import struct

from ._ring import lib as _lib

HEADER = struct.Struct("<QHHHH")          # features, version, desc_num, last_batch_head, used_idx
DESC = struct.Struct("<BB4xHQ")           # inflight, resubmits (padding[0]), padding, next, counter
HEADER_SIZE = _lib.VSD_INFLIGHT_HEADER
DESC_SIZE = _lib.VSD_INFLIGHT_DESC
VERSION = _lib.VSD_INFLIGHT_VERSION
ALIGN = _lib.VSD_INFLIGHT_ALIGN
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")

_OFF_VERSION = _lib.VSD_INFLIGHT_OFF_VERSION
_OFF_DESC_NUM = _lib.VSD_INFLIGHT_OFF_DESC_NUM
_OFF_LAST_BATCH = _lib.VSD_INFLIGHT_OFF_LAST_BATCH
_OFF_USED_IDX = _lib.VSD_INFLIGHT_OFF_USED_IDX
_E_RESUBMITS = _lib.VSD_INFLIGHT_E_RESUBMITS
assert (HEADER.size, DESC.size) == (HEADER_SIZE, DESC_SIZE)
assert DESC.size - 8 == _lib.VSD_INFLIGHT_E_COUNTER


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region, aligned like libvhost-user does (64 bytes)."""
    raw = HEADER_SIZE + DESC_SIZE * queue_size
    return (raw + ALIGN - 1) // ALIGN * ALIGN


class InflightQueue:
    """One queue's inflight region (a writable buffer, e.g. a slice of a shared mmap)."""

    __slots__ = ("buf", "size", "counter")

    def __init__(self, buf, size: int):
        if len(buf) < HEADER_SIZE + DESC_SIZE * size:
            raise ValueError(f"inflight region of {len(buf)} bytes is too small for {size} descriptors")
        self.buf = buf
        self.size = size
        self.counter = 0

    # ------------------------------------------------------------------ state
    @property
    def version(self) -> int:
        return _U16.unpack_from(self.buf, _OFF_VERSION)[0]

    @property
    def used_idx(self) -> int:
        return _U16.unpack_from(self.buf, _OFF_USED_IDX)[0]

    def entry(self, head: int) -> tuple[int, int]:
        inflight, _resubmits, _next, counter = DESC.unpack_from(self.buf,
                                                                HEADER_SIZE + DESC_SIZE * head)
        return inflight, counter

    def resubmits(self, head: int) -> int:
        """How often the request at ``head`` was resubmitted after a worker died."""
        return self.buf[HEADER_SIZE + DESC_SIZE * head + _E_RESUBMITS]

    def note_resubmitted(self, head: int) -> None:
        off = HEADER_SIZE + DESC_SIZE * head + _E_RESUBMITS
        self.buf[off] = min(255, self.buf[off] + 1)

    def reset(self, used_idx: int = 0) -> None:
        """Start afresh: nothing in flight."""
        self.buf[:HEADER_SIZE + DESC_SIZE * self.size] = bytes(HEADER_SIZE + DESC_SIZE * self.size)
        HEADER.pack_into(self.buf, 0, 0, VERSION, self.size, 0, used_idx & 0xFFFF)
        self.counter = 0

    def recover(self, used_idx: int, used_ring) -> tuple[int, list[int]] | None:
        """Rebuild state after a crash or reconnect.

        ``used_idx`` is the used index in guest memory and ``used_ring`` the
        used ring area (to read the entries published since the recorded
        index). Returns ``(next_avail_idx, heads_to_resubmit)`` or None when the
        region holds nothing to recover (fresh, or a different queue size).
        """
        version, desc_num = struct.unpack_from("<HH", self.buf, _OFF_VERSION)
        if version != VERSION or desc_num != self.size:
            return None
        recorded = self.used_idx
        n = (used_idx - recorded) & 0xFFFF
        if n > self.size:
            return None  # inconsistent with the ring: do not trust it
        for i in range(n):
            slot = (recorded + i) % self.size
            head = _USED_ELEM.unpack_from(used_ring, 4 + 8 * slot)[0]
            if head < self.size:
                self._set(head, 0, self.entry(head)[1])
        _U16.pack_into(self.buf, _OFF_USED_IDX, used_idx & 0xFFFF)
        pending = []
        top = 0
        for head in range(self.size):
            inflight, counter = self.entry(head)
            if inflight:
                pending.append((counter, head))
            top = max(top, counter)
        pending.sort()
        self.counter = top
        return (used_idx + len(pending)) & 0xFFFF, [h for _, h in pending]

    # ------------------------------------------------------------------ data path
    def _set(self, head: int, inflight: int, counter: int) -> None:
        DESC.pack_into(self.buf, HEADER_SIZE + DESC_SIZE * head, inflight, 0, 0, counter)

    def get(self, head: int) -> None:
        """A head was popped from the available ring."""
        self.counter += 1
        self._set(head, 1, self.counter)

    def put(self, heads, used_idx: int) -> None:
        """The used index covering ``heads`` has been published: clear them."""
        if not heads:
            return
        _U16.pack_into(self.buf, _OFF_LAST_BATCH, heads[-1])
        base = HEADER_SIZE
        for head in heads:
            self.buf[base + DESC_SIZE * head] = 0
        _U16.pack_into(self.buf, _OFF_USED_IDX, used_idx & 0xFFFF)

    def in_flight(self) -> list[int]:
        return [h for h in range(self.size) if self.buf[HEADER_SIZE + DESC_SIZE * h]]
