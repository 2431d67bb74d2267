"""Writers of malformed split rings, for the device's robustness tests (test code only).

:class:`RawQueue` is a :class:`~vscsid.bench.driverq.DriverQueue` that can also
write arbitrary descriptors, avail entries, flags and event indices, reserve
descriptors for hand-built chains and submit them tracked like normal ones.
:class:`HostileChains` (``RawQueue.hostile``) builds ready-made malformed chains
on top of it. Ring facts come from :mod:`vscsid.virtio.defs`.
"""
from __future__ import annotations

from typing import Any, Sequence

from vscsid.bench.driverq import _DESC, _U16, DriverQueue, DriverQueueError, QueueFullError, _Inflight
from vscsid.virtio._ring import lib
from vscsid.virtio.defs import DESC_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

__all__ = ["RawQueue", "HostileChains"]


class RawQueue(DriverQueue):
    """A driver queue with raw access to its ring (and :attr:`hostile` chain builders)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._hostile: HostileChains | None = None
        self._raw_allocs: list[int] = []

    def raw_desc(self, i: int, addr: int, len: int, flags: int, next: int = 0) -> None:  # noqa: A002
        """Write an arbitrary descriptor at ring index ``i`` (fields are truncated to their widths)."""
        self._check_index(i)
        _DESC.pack_into(self._v, DESC_SIZE * i, addr & (2**64 - 1), len & 0xFFFFFFFF,
                        flags & 0xFFFF, next & 0xFFFF)

    def write_desc_table(self, gpa: int, descs: Sequence[tuple[int, int, int, int]]) -> None:
        """Write ``(addr, len, flags, next)`` descriptors at ``gpa`` (e.g. an indirect table)."""
        buf = bytearray(DESC_SIZE * len(descs))
        for k, (addr, ln, fl, nx) in enumerate(descs):
            _DESC.pack_into(buf, DESC_SIZE * k, addr & (2**64 - 1), ln & 0xFFFFFFFF, fl & 0xFFFF, nx & 0xFFFF)
        self.mem.write(gpa, buf)

    def alloc_desc_table(self, descs: Sequence[tuple[int, int, int, int]], *,
                         extra: int = 0) -> int:
        """Allocate (and own until :meth:`close`) a descriptor table; returns its GPA."""
        gpa = self.mem.alloc(max(1, DESC_SIZE * len(descs) + extra), 16)
        self._raw_allocs.append(gpa)
        if descs:
            self.write_desc_table(gpa, descs)
        return gpa

    def raw_alloc(self, size: int, align: int = 16) -> int:
        """Guest buffer owned by the queue until :meth:`close` (for hand-built chains)."""
        gpa = self.mem.alloc(size, align)
        self._raw_allocs.append(gpa)
        return gpa

    def reserve(self, n: int = 1) -> list[int]:
        """Take ``n`` descriptors out of the free list for hand-built chains."""
        if n > len(self._free):
            raise QueueFullError(f"cannot reserve {n} descriptors, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def unreserve(self, idxs: Sequence[int]) -> None:
        for i in idxs:
            self._check_index(i)
            if i in self._free:
                raise ValueError(f"descriptor {i} is already free")
        self._free.extend(idxs)

    def submit_raw(self, head: int, descs: Sequence[int] = (), *, token: Any = None,
                   publish: bool = True) -> int:
        """Put ``head`` into the avail ring and track it like a normal chain.

        ``descs`` are (reserved) descriptor indices returned to the free list on
        completion.  ``head`` may be out of range: it is then not tracked.
        """
        rec = None
        if 0 <= head < self.size:
            if self._inflight[head] is not None:
                raise ValueError(f"head {head} is already in flight")
            rec = _Inflight(head if token is None else token, tuple(descs), None, None)
        self._offer(head, rec, publish)
        return head

    def raw_avail(self, entries: Sequence[int], idx: int | None = None, *, start: int | None = None) -> None:
        """Write arbitrary avail->ring entries from position ``start`` (default: the next free slot)
        and, if ``idx`` is given, store it into avail->idx (release-ordered).

        Does not track anything; the queue's shadow idx follows ``idx``.
        """
        if self._pending:
            raise DriverQueueError("publish() pending chains before raw_avail()")
        pos = self._avail_shadow if start is None else start
        for k, e in enumerate(entries):
            _U16.pack_into(self._v, self._a_ring + 2 * ((pos + k) & self.mask), e & 0xFFFF)
        if idx is not None:
            idx &= 0xFFFF
            lib.vq_wmb()
            lib.vq_store_u16(self._p, self._a_idx, idx)
            self._avail_shadow = idx

    def raw_avail_flags(self, flags: int) -> None:
        self._avail_flags = flags & 0xFFFF
        lib.vq_store_u16(self._p, self._a_flags, self._avail_flags)

    def raw_used_event(self, value: int) -> None:
        lib.vq_store_u16(self._p, self._a_used_event, value & 0xFFFF)

    @property
    def hostile(self) -> "HostileChains":
        if self._hostile is None:
            self._hostile = HostileChains(self)
        return self._hostile

    def close(self) -> None:
        """Free the hand-built tables and buffers too. Idempotent."""
        if not self._closed and not self.mem.closed:
            for g in self._raw_allocs:
                self.mem.free(g)
        self._raw_allocs = []
        super().close()


class HostileChains:
    """Ready-made malformed chains. Each method publishes one chain and returns its head.

    The chain's descriptors are reserved and tracked, so if the device does
    complete it (rather than failing the queue) ``get_used`` accounts for it;
    the token is ``("hostile", <name>)``.
    """

    def __init__(self, q: RawQueue) -> None:
        self.q = q

    def _buf(self, n: int = 64) -> int:
        return self.q.raw_alloc(n)

    def _submit(self, name: str, descs: list[int], publish: bool) -> int:
        return self.q.submit_raw(descs[0], descs, token=("hostile", name), publish=publish)

    def loop(self, n: int = 2, publish: bool = True) -> int:
        """n descriptors whose ``next`` links come back to the head."""
        q = self.q
        d = q.reserve(n)
        b = self._buf()
        for k in range(n):
            q.raw_desc(d[k], b, 16, VIRTQ_DESC_F_NEXT, d[(k + 1) % n])
        return self._submit("loop", d, publish)

    def next_out_of_range(self, publish: bool = True) -> int:
        q = self.q
        d = q.reserve(1)
        q.raw_desc(d[0], self._buf(), 16, VIRTQ_DESC_F_NEXT, q.size)
        return self._submit("next_out_of_range", d, publish)

    def indirect_bad_len(self, rem: int = 8, publish: bool = True) -> int:
        """INDIRECT descriptor whose len is not a multiple of 16."""
        q = self.q
        d = q.reserve(1)
        b = self._buf()
        tbl = q.alloc_desc_table([(b, 16, 0, 0), (b, 16, VIRTQ_DESC_F_WRITE, 0)])
        q.raw_desc(d[0], tbl, DESC_SIZE + rem, VIRTQ_DESC_F_INDIRECT, 0)
        return self._submit("indirect_bad_len", d, publish)

    def indirect_empty(self, publish: bool = True) -> int:
        q = self.q
        d = q.reserve(1)
        q.raw_desc(d[0], q.alloc_desc_table([]), 0, VIRTQ_DESC_F_INDIRECT, 0)
        return self._submit("indirect_empty", d, publish)

    def nested_indirect(self, publish: bool = True) -> int:
        """An indirect table containing an INDIRECT descriptor."""
        q = self.q
        d = q.reserve(1)
        b = self._buf()
        inner = q.alloc_desc_table([(b, 16, 0, 0)])
        outer = q.alloc_desc_table([(b, 16, VIRTQ_DESC_F_NEXT, 1), (inner, DESC_SIZE, VIRTQ_DESC_F_INDIRECT, 0)])
        q.raw_desc(d[0], outer, 2 * DESC_SIZE, VIRTQ_DESC_F_INDIRECT, 0)
        return self._submit("nested_indirect", d, publish)

    def indirect_with_next(self, publish: bool = True) -> int:
        """INDIRECT and NEXT set on the same descriptor (forbidden)."""
        q = self.q
        d = q.reserve(2)
        b = self._buf()
        tbl = q.alloc_desc_table([(b, 16, 0, 0)])
        q.raw_desc(d[0], tbl, DESC_SIZE, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, d[1])
        q.raw_desc(d[1], b, 16, VIRTQ_DESC_F_WRITE, 0)
        return self._submit("indirect_with_next", d, publish)

    def indirect_loop(self, publish: bool = True) -> int:
        """Indirect table whose entries link in a cycle."""
        q = self.q
        d = q.reserve(1)
        b = self._buf()
        tbl = q.alloc_desc_table([(b, 16, VIRTQ_DESC_F_NEXT, 1), (b, 16, VIRTQ_DESC_F_NEXT, 0)])
        q.raw_desc(d[0], tbl, 2 * DESC_SIZE, VIRTQ_DESC_F_INDIRECT, 0)
        return self._submit("indirect_loop", d, publish)

    def indirect_longer_than_queue(self, publish: bool = True) -> int:
        """Indirect table with queue size + 1 entries.

        The spec says a chain must not be longer than the queue size, yet Linux
        does build such indirect tables (seg_max > queue size): a device should
        accept them or bound them by its own limit, never overrun.
        """
        q = self.q
        d = q.reserve(1)
        b = self._buf()
        n = q.size + 1
        tbl = q.alloc_desc_table([(b, 16, VIRTQ_DESC_F_NEXT if k < n - 1 else 0, k + 1 if k < n - 1 else 0)
                                  for k in range(n)])
        q.raw_desc(d[0], tbl, n * DESC_SIZE, VIRTQ_DESC_F_INDIRECT, 0)
        return self._submit("indirect_longer_than_queue", d, publish)

    def addr_outside(self, publish: bool = True) -> int:
        """A descriptor pointing at unbacked guest-physical memory."""
        q = self.q
        d = q.reserve(1)
        q.raw_desc(d[0], q.mem.unmapped_gpa(), 512, 0, 0)
        return self._submit("addr_outside", d, publish)

    def addr_straddles_end(self, publish: bool = True) -> int:
        """A descriptor starting inside the last region and running past its end."""
        q = self.q
        d = q.reserve(1)
        r = q.mem.regions[-1]
        q.raw_desc(d[0], r.end - 16, 4096, 0, 0)
        return self._submit("addr_straddles_end", d, publish)

    def addr_overflow(self, publish: bool = True) -> int:
        """addr + len wraps around 2**64."""
        q = self.q
        d = q.reserve(1)
        q.raw_desc(d[0], 2**64 - 16, 4096, 0, 0)
        return self._submit("addr_overflow", d, publish)

    def read_after_write(self, publish: bool = True) -> int:
        """A device-readable descriptor following a device-writable one."""
        q = self.q
        d = q.reserve(2)
        b = self._buf(128)
        q.raw_desc(d[0], b, 64, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, d[1])
        q.raw_desc(d[1], b + 64, 64, 0, 0)
        return self._submit("read_after_write", d, publish)

    def zero_len(self, publish: bool = True) -> int:
        """A zero-length descriptor in the middle of a chain."""
        q = self.q
        d = q.reserve(3)
        b = self._buf(128)
        q.raw_desc(d[0], b, 64, VIRTQ_DESC_F_NEXT, d[1])
        q.raw_desc(d[1], b + 64, 0, VIRTQ_DESC_F_NEXT, d[2])
        q.raw_desc(d[2], b + 64, 64, VIRTQ_DESC_F_WRITE, 0)
        return self._submit("zero_len", d, publish)

    def head_out_of_range(self, publish: bool = True) -> int:
        """An avail entry naming a descriptor index >= queue size."""
        return self.q.submit_raw(self.q.size, (), publish=publish)

    def avail_idx_jump(self, delta: int | None = None) -> int:
        """Move avail->idx further than the queue size ahead of the device. Returns the new idx."""
        q = self.q
        new = (q.avail_idx + (q.size + 1 if delta is None else delta)) & 0xFFFF
        q.raw_avail([], new)
        return new
