"""Driver-side split virtqueue + front-end guest memory, checked against a tiny,
independent device-side reader (``RefDevice``) written here from the virtio spec.

``RefDevice`` maps the memfds itself from the SET_MEM_TABLE tuples (offset 0,
adding ``mmap_offset``) and finds the rings through their front-end virtual
addresses, exactly as a vhost-user back end must.
"""
from __future__ import annotations

import mmap
import os
import struct
import warnings
from dataclasses import dataclass

import pytest

from tests.support.rawq import RawQueue
from vscsid.bench.driverq import (
    DeviceProtocolError,
    DriverQueue,
    QueueFullError,
    UnknownHead,
)
from vscsid.bench.guestmem import (
    POISON,
    FrontendMemory,
    GuestMemoryError,
    OutOfGuestMemory,
)
from vscsid.virtio.defs import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    vring_need_event,
)

MiB = 1 << 20
GiB = 1 << 30


# --------------------------------------------------------------------------- reference device
class ChainError(Exception):
    pass


@dataclass
class Chain:
    head: int
    readable: list
    writable: list


def _need_event(event: int, new: int, old: int) -> bool:
    # written independently of the module under test
    return ((new - event - 1) % 65536) < ((new - old) % 65536)


class RefDevice:
    """Just enough of a device to pop chains and push used entries."""

    def __init__(self, mem_table, desc_uva, avail_uva, used_uva, size, *, event_idx=False, base=0):
        self.maps = []
        for gpa, sz, uva, off, fd in mem_table:
            mm = mmap.mmap(fd, off + sz, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.maps.append((gpa, sz, uva, off, mm))
        self.size = size
        self.event_idx = event_idx
        self.desc = self._uva2gpa(desc_uva)
        self.avail = self._uva2gpa(avail_uva)
        self.used = self._uva2gpa(used_uva)
        self.last_avail = base
        self.used_idx = self.u16(self.used + 2)

    @classmethod
    def for_queue(cls, q: DriverQueue, **kw):
        a = q.vring_addr()
        return cls(q.mem.regions_for_mem_table(), a.desc_user_addr, a.avail_user_addr,
                   a.used_user_addr, q.size, event_idx=q.event_idx, base=q.vring_base, **kw)

    def close(self):
        for *_, mm in self.maps:
            mm.close()

    def _uva2gpa(self, uva):
        for gpa, sz, base, _off, _mm in self.maps:
            if base <= uva < base + sz:
                return gpa + uva - base
        raise ChainError("ring address not in memory table")

    def _loc(self, gpa, n):
        if gpa < 0 or n < 0 or gpa + n > 2**64:
            raise ChainError("address overflow")
        for rgpa, sz, _uva, off, mm in self.maps:
            if rgpa <= gpa and gpa + n <= rgpa + sz:
                return mm, off + gpa - rgpa
        raise ChainError("address outside guest memory")

    def read(self, gpa, n):
        mm, p = self._loc(gpa, n)
        return mm[p:p + n]

    def write(self, gpa, data):
        mm, p = self._loc(gpa, len(data))
        mm[p:p + len(data)] = data

    def u16(self, gpa):
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def set_u16(self, gpa, v):
        self.write(gpa, struct.pack("<H", v & 0xFFFF))

    # --- rings
    def avail_idx(self):
        return self.u16(self.avail + 2)

    def set_used_flags(self, f):
        self.set_u16(self.used, f)

    def set_avail_event(self, v):
        self.set_u16(self.used + 4 + 8 * self.size, v)

    def used_event(self):
        return self.u16(self.avail + 4 + 2 * self.size)

    def pop(self, update_event=True):
        idx = self.avail_idx()
        if idx == self.last_avail:
            return None
        if (idx - self.last_avail) % 65536 > self.size:
            raise ChainError("avail idx jump")
        head = self.u16(self.avail + 4 + 2 * (self.last_avail % self.size))
        self.last_avail = (self.last_avail + 1) % 65536
        if self.event_idx and update_event:
            self.set_avail_event(self.last_avail)
        if head >= self.size:
            raise ChainError("head out of range")
        return self.walk(head)

    def pop_all(self):
        out = []
        while (c := self.pop()) is not None:
            out.append(c)
        return out

    def walk(self, head):
        readable, writable = [], []
        table, tsize, i, seen, in_indirect = self.desc, self.size, head, 0, False
        while True:
            if i >= tsize:
                raise ChainError("next out of range")
            seen += 1
            if seen > tsize:
                raise ChainError("loop")
            addr, ln, fl, nx = struct.unpack("<QIHH", self.read(table + 16 * i, 16))
            if fl & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise ChainError("nested indirect")
                if fl & VIRTQ_DESC_F_NEXT:
                    raise ChainError("indirect with next")
                if ln == 0 or ln % 16:
                    raise ChainError("bad indirect len")
                self._loc(addr, ln)
                table, tsize, i, seen, in_indirect = addr, ln // 16, 0, 0, True
                continue
            self._loc(addr, ln)
            if fl & VIRTQ_DESC_F_WRITE:
                writable.append((addr, ln))
            else:
                if writable:
                    raise ChainError("readable after writable")
                readable.append((addr, ln))
            if not fl & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable)
            i = nx

    def gather(self, segs):
        return b"".join(self.read(a, n) for a, n in segs)

    def scatter(self, segs, data):
        pos = 0
        for a, n in segs:
            take = data[pos:pos + n]
            if not take:
                break
            self.write(a, take)
            pos += len(take)
        return pos

    def push(self, head, ln):
        """Returns whether the driver wants a call for this single entry."""
        old = self.used_idx
        self.write(self.used + 4 + 8 * (old % self.size), struct.pack("<II", head, ln))
        self.used_idx = (old + 1) % 65536
        self.set_u16(self.used + 2, self.used_idx)
        return self.need_call(old, self.used_idx)

    def push_many(self, items):
        old = self.used_idx
        for head, ln in items:
            self.write(self.used + 4 + 8 * (self.used_idx % self.size), struct.pack("<II", head, ln))
            self.used_idx = (self.used_idx + 1) % 65536
        self.set_u16(self.used + 2, self.used_idx)
        return self.need_call(old, self.used_idx)

    def need_call(self, old, new):
        if self.event_idx:
            return _need_event(self.used_event(), new, old)
        return not (self.u16(self.avail) & VIRTQ_AVAIL_F_NO_INTERRUPT)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def mem():
    m = FrontendMemory(8 * MiB)
    yield m
    m.close()


@pytest.fixture
def mr_mem():
    m = FrontendMemory(regions=[(0, 2 * MiB), (4 * GiB, 4 * MiB, 3 * 4096)])
    yield m
    m.close()


def make(mem, size=8, **kw):
    q = RawQueue(mem, size, **kw)
    return q, RefDevice.for_queue(q)


# --------------------------------------------------------------------------- layout
@pytest.mark.parametrize("layout", ["legacy", "compact"])
@pytest.mark.parametrize("size", [1, 8, 256, 32768])
def test_layout_alignment(layout, size):
    with FrontendMemory(16 * MiB) as mem:
        q = DriverQueue(mem, size, layout=layout)
        assert q.desc_addr % 16 == 0 and q.avail_addr % 2 == 0 and q.used_addr % 4 == 0
        assert q.avail_addr == q.desc_addr + 16 * size
        assert q.used_addr >= q.avail_addr + 6 + 2 * size
        if layout == "legacy":
            assert q.used_addr % 4096 == 0
        else:
            assert q.used_addr - (q.avail_addr + 6 + 2 * size) < 4
        for g, u in ((q.desc_addr, q.desc_uva), (q.avail_addr, q.avail_uva), (q.used_addr, q.used_uva)):
            assert mem.uva(g) == u
        a = q.vring_addr()
        assert (a.desc_user_addr, a.avail_user_addr, a.used_user_addr) == (q.desc_uva, q.avail_uva, q.used_uva)
        assert q.num_free == size
        q.close()
        assert mem.bytes_allocated == 0


@pytest.mark.parametrize("size", [0, 3, 100, 65536])
def test_bad_queue_size(mem, size):
    with pytest.raises(ValueError):
        DriverQueue(mem, size)


# --------------------------------------------------------------------------- chains
def test_direct_chain_roundtrip(mem):
    q, dev = make(mem)
    base_alloc = mem.bytes_allocated
    own_out = mem.alloc(4)
    mem.write(own_out, b"WXYZ")
    own_in = mem.alloc(8)
    head = q.add([b"hello", (own_out, 4)], [16, (own_in, 8)], token="t1")
    assert q.num_free == 4 and q.pending == 1
    assert dev.pop() is None                       # not published yet
    assert q.publish() == 1
    # descriptor flags / links as written
    d0 = q.read_desc(head)
    assert d0[2] == VIRTQ_DESC_F_NEXT and d0[1] == 5
    chain = dev.pop()
    assert chain.head == head
    assert [n for _, n in chain.readable] == [5, 4] and [n for _, n in chain.writable] == [16, 8]
    assert dev.gather(chain.readable) == b"helloWXYZ"
    walk, i = [], head
    while True:
        a, n, f, nx = q.read_desc(i)
        walk.append(f)
        if not f & VIRTQ_DESC_F_NEXT:
            break
        i = nx
    assert walk == [1, 1, 3, 2]
    payload = bytes(range(24))
    assert dev.scatter(chain.writable, payload) == 24
    dev.push(head, 24)
    done = q.get_used_detailed()
    assert len(done) == 1
    c = done[0]
    assert (c.token, c.len, c.head) == ("t1", 24, head)
    assert c.in_data == [payload[:16]]
    assert mem.read(own_in, 8) == payload[16:]
    assert q.num_free == 8 and q.in_flight == 0
    mem.free(own_out)
    mem.free(own_in)
    assert mem.bytes_allocated == base_alloc
    assert q.get_used() == []


def test_token_defaults_to_head(mem):
    q, dev = make(mem)
    h = q.add([b"x"], [], publish=True)
    dev.push(dev.pop().head, 0)
    assert q.get_used() == [(h, 0)]


def test_empty_or_oversized_chain_rejected(mem):
    q, _ = make(mem, size=4)
    with pytest.raises(ValueError):
        q.add([], [])
    with pytest.raises(ValueError):
        q.add([b"a"] * 5, [])                          # direct chain longer than the queue
    assert q.num_free == 4 and mem.bytes_allocated == q._total


def test_indirect_chain(mem):
    q, dev = make(mem, size=4)
    head = q.add([b"hdr", b"data-out"], [12, 100, 7], indirect=True, token="ind")
    assert q.num_free == 3
    addr, ln, flags, _ = q.read_desc(head)
    assert flags == VIRTQ_DESC_F_INDIRECT and ln == 5 * 16
    tbl = [q.read_desc(k, table_gpa=addr) for k in range(5)]
    assert [t[2] for t in tbl] == [1, 1, 3, 3, 2]
    assert [t[3] for t in tbl[:4]] == [1, 2, 3, 4]
    q.publish()
    chain = dev.pop()
    assert dev.gather(chain.readable) == b"hdrdata-out"
    assert [n for _, n in chain.writable] == [12, 100, 7]
    dev.scatter(chain.writable, b"\x01" * 119)
    dev.push(head, 119)
    (c,) = q.get_used_detailed()
    assert c.token == "ind" and [len(d) for d in c.in_data] == [12, 100, 7]
    assert q.num_free == 4
    # the cached table for that head is reused (no new allocation)
    before = mem.bytes_allocated
    h2 = q.add([b"a"], [4], indirect=True, publish=True)
    assert h2 == head and mem.bytes_allocated - before == 1 + 4     # just the two data buffers
    dev.push(dev.pop().head, 0)
    q.get_used()


def test_indirect_mixed_with_direct(mem):
    q, dev = make(mem, size=16)
    tokens = []
    for k in range(6):
        tokens.append(k)
        q.add([bytes([k]) * 3], [k + 1], indirect=bool(k % 2), token=k)
    q.publish()
    chains = dev.pop_all()
    assert len(chains) == 6
    for k, ch in enumerate(chains):
        assert dev.gather(ch.readable) == bytes([k]) * 3
        dev.scatter(ch.writable, bytes([0xF0 + k]) * (k + 1))
    dev.push_many([(c.head, len(c.writable)) for c in reversed(chains)])
    done = q.get_used_detailed()
    assert [c.token for c in done] == list(reversed(tokens))
    for c in done:
        assert c.in_data == [bytes([0xF0 + c.token]) * (c.token + 1)]
    assert q.num_free == 16


# --------------------------------------------------------------------------- indices
@pytest.mark.parametrize("event_idx", [False, True])
def test_wraparound_16bit(mem, event_idx):
    q, dev = make(mem, size=8, start_idx=65530, event_idx=event_idx)
    assert q.avail_idx == 65530 and dev.avail_idx() == 65530 and dev.used_idx == 65530
    seq = 0
    expected_done = []
    got_done = []
    for rnd in range(40):
        n = rnd % 4 + 1
        for _ in range(n):
            q.add([struct.pack("<I", seq)], [4], indirect=bool(seq % 3 == 0), token=seq)
            expected_done.append(seq)
            seq += 1
        q.publish()
        chains = dev.pop_all()
        assert len(chains) == n
        order = chains if rnd % 2 else list(reversed(chains))
        for ch in order:
            v = struct.unpack("<I", dev.gather(ch.readable))[0]
            dev.scatter(ch.writable, struct.pack("<I", v ^ 0xFFFFFFFF))
        dev.push_many([(c.head, 4) for c in order])
        for c in q.get_used_detailed():
            assert struct.unpack("<I", c.in_data[0])[0] == c.token ^ 0xFFFFFFFF
            got_done.append(c.token)
    assert sorted(got_done) == expected_done
    assert q.avail_idx == (65530 + seq) % 65536 < 65530     # wrapped
    assert q.last_used == q.avail_idx == dev.used_idx
    assert q.num_free == 8


def test_batching_single_idx_update(mem):
    q, dev = make(mem, size=8)
    for k in range(3):
        q.add([b"x"], [], token=k)
    assert q.pending == 3 and dev.avail_idx() == 0 and dev.pop() is None
    assert q.kick_needed() is False          # nothing published
    assert q.publish() == 3
    assert dev.avail_idx() == 3
    assert q.kick_needed() is True
    assert q.kick_needed() is False          # nothing new since
    assert len(dev.pop_all()) == 3
    assert q.publish() == 0


def test_publish_kwarg_and_kick_fd(mem):
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        q = DriverQueue(mem, 8, kick_fd=efd)
        q.add([b"a"], [])
        assert q.publish_and_kick() is True
        assert os.eventfd_read(efd) == 1
        q.add([b"a"], [], publish=True)
        assert q.avail_idx == 2
        q.kick()
        assert os.eventfd_read(efd) == 1
    finally:
        os.close(efd)


def test_kick_no_notify_flag(mem):
    q, dev = make(mem)
    dev.set_used_flags(VIRTQ_USED_F_NO_NOTIFY)
    q.add([b"a"], [], publish=True)
    assert q.kick_needed() is False
    dev.set_used_flags(0)
    q.add([b"a"], [], publish=True)
    assert q.kick_needed() is True


@pytest.mark.parametrize("event, new, old, want", [
    (0, 1, 0, True),
    (3, 5, 3, True),
    (4, 5, 3, True),
    (5, 5, 3, False),
    (2, 5, 3, False),
    (0xFFFF, 1, 0xFFFE, True),       # wraps across 0
    (0, 1, 0xFFFE, True),
    (1, 1, 0xFFFE, False),
    (0xFFFD, 1, 0xFFFE, False),
    (7, 7, 7, False),
])
def test_vring_need_event_math(event, new, old, want):
    assert vring_need_event(event, new, old) is want
    assert _need_event(event, new, old) is want


def test_event_idx_kick_suppression(mem):
    q, dev = make(mem, size=8, event_idx=True, start_idx=65534)
    q.add([b"a"], [], publish=True)
    assert q.kick_needed() is True           # avail_event == start: first entry crosses it
    # device has not consumed -> avail_event stays 65534: no more kicks
    q.add([b"b"], [], publish=True)
    assert q.kick_needed() is False
    # device consumes both and asks to be told about the next one (idx 0 after wrap)
    assert len(dev.pop_all()) == 2
    assert dev.u16(dev.used + 4 + 8 * 8) == 0
    q.add([b"c"], [])
    q.add([b"d"], [])
    q.publish()
    assert q.kick_needed() is True
    # device wants a kick only once avail idx passes 5: a batch 2..4 does not qualify
    dev.pop_all()
    dev.set_avail_event(5)
    for _ in range(3):
        q.add([b"e"], [])
    q.publish()                              # 2 -> 5
    assert q.kick_needed() is False
    q.add([b"f"], [], publish=True)          # 5 -> 6 crosses event 5
    assert q.kick_needed() is True


def test_used_event_and_interrupt_suppression(mem):
    q, dev = make(mem, size=8, event_idx=True, start_idx=100)
    assert dev.used_event() == 100
    for k in range(4):
        q.add([b"a"], [], token=k)
    q.publish()
    chains = dev.pop_all()
    assert dev.push(chains[0].head, 0) is True        # used_event == 100
    assert dev.push(chains[1].head, 0) is False       # driver has not caught up yet
    assert [t for t, _ in q.get_used()] == [0, 1]
    assert dev.used_event() == 102
    q.disable_interrupts()
    assert dev.used_event() == 101
    assert dev.push(chains[2].head, 0) is False
    assert q.get_used() == [(2, 0)]
    assert dev.used_event() == 102               # keeps trailing last_used while disabled
    assert dev.push(chains[3].head, 0) is False
    assert q.enable_interrupts() is True         # an entry is already pending
    assert q.get_used() == [(3, 0)]
    assert q.enable_interrupts() is False
    assert dev.used_event() == 104


def test_interrupt_flag_without_event_idx(mem):
    q, dev = make(mem)
    q.add([b"a"], [], publish=True)
    q.disable_interrupts()
    assert q.avail_flags() == VIRTQ_AVAIL_F_NO_INTERRUPT
    assert dev.push(dev.pop().head, 0) is False
    assert q.enable_interrupts() is True
    assert q.avail_flags() == 0
    q.get_used()
    q.add([b"a"], [], publish=True)
    assert dev.push(dev.pop().head, 0) is True


def test_enable_interrupts_delayed(mem):
    q, dev = make(mem, size=8, event_idx=True)
    for _ in range(8):
        q.add([b"a"], [])
    q.publish()
    chains = dev.pop_all()
    assert q.enable_interrupts_delayed() is False
    assert dev.used_event() == 6
    calls = [dev.push(c.head, 0) for c in chains]
    assert calls == [False] * 6 + [True, False]


# --------------------------------------------------------------------------- free list
def test_free_list_exhaustion(mem):
    q, dev = make(mem, size=4)
    heads = [q.add([b"a"], [], token=k) for k in range(4)]
    assert sorted(heads) == [0, 1, 2, 3] and q.num_free == 0
    allocated = mem.bytes_allocated
    with pytest.raises(QueueFullError, match="queue full"):
        q.add([b"b"], [])
    with pytest.raises(QueueFullError):
        q.add([b"b"], [], indirect=True)
    assert mem.bytes_allocated == allocated       # nothing leaked by the failed adds
    q.publish()
    c = dev.pop_all()
    dev.push(c[1].head, 0)
    assert q.get_used() == [(1, 0)] and q.num_free == 1
    with pytest.raises(QueueFullError):
        q.add([b"a"], [8])                          # needs 2
    q.add([b"a"], [8], indirect=True, token="i")  # needs 1
    assert q.num_free == 0
    q.publish()
    dev.push_many([(x.head, 0) for x in (c[0], c[2], c[3])] + [(dev.pop().head, 0)])
    assert [t for t, _ in q.get_used()] == [0, 2, 3, "i"]
    assert q.num_free == 4


def test_get_used_max_n(mem):
    q, dev = make(mem)
    for k in range(5):
        q.add([b"a"], [], token=k)
    q.publish()
    dev.push_many([(c.head, k) for k, c in enumerate(dev.pop_all())])
    assert q.get_used(max_n=2) == [(0, 0), (1, 1)]
    assert q.has_used()
    assert q.get_used() == [(2, 2), (3, 3), (4, 4)]
    assert not q.has_used()


def test_device_protocol_errors(mem):
    q, dev = make(mem)
    q.add([b"a"], [], token="ok", publish=True)
    h = dev.pop().head
    dev.push((h + 3) % 8, 0)                         # id not in flight
    with pytest.raises(DeviceProtocolError):
        q.get_used()
    dev.push(h, 5)
    assert q.get_used() == [("ok", 5)]
    # used idx moved further than what is in flight
    dev.set_u16(dev.used + 2, (dev.used_idx + 3) % 65536)
    with pytest.raises(DeviceProtocolError, match="in flight"):
        q.get_used()


def test_lenient_reports_unknown_heads(mem):
    q, dev = make(mem, strict=False)
    q.add([b"a"], [], token="ok", publish=True)
    h = dev.pop().head
    dev.push_many([(1000, 9), (h, 1)])
    got = q.get_used()
    assert isinstance(got[0][0], UnknownHead) and got[0] == (1000, 9)
    assert got[1] == ("ok", 1)


# --------------------------------------------------------------------------- hostile builders
def test_raw_desc_and_avail(mem):
    q, dev = make(mem, size=8)
    q.raw_desc(3, 2**64 + 5, 2**32 + 7, 0x1FFFF, 0x10009)    # truncated to field widths
    assert q.read_desc(3) == (5, 7, 0xFFFF, 9)
    with pytest.raises(IndexError):
        q.raw_desc(8, 0, 0, 0, 0)
    q.raw_avail([7, 6, 5], idx=2)
    assert dev.avail_idx() == 2 and q.avail_idx == 2
    assert [q.read_avail_entry(k) for k in range(3)] == [7, 6, 5]
    q.raw_avail([1], start=5)
    assert q.read_avail_entry(5) == 1 and dev.avail_idx() == 2
    q.raw_avail_flags(0xABCD)
    assert dev.u16(dev.avail) == 0xABCD
    q.raw_used_event(0x1234)
    assert dev.used_event() == 0x1234


@pytest.mark.parametrize("builder, reason", [
    ("loop", "loop"),
    ("next_out_of_range", "next out of range"),
    ("indirect_bad_len", "bad indirect len"),
    ("indirect_empty", "bad indirect len"),
    ("nested_indirect", "nested indirect"),
    ("indirect_with_next", "indirect with next"),
    ("indirect_loop", "loop"),
    ("addr_outside", "address outside guest memory"),
    ("addr_straddles_end", "address outside guest memory"),
    ("addr_overflow", "address overflow"),
    ("read_after_write", "readable after writable"),
    ("head_out_of_range", "head out of range"),
])
def test_hostile_chains_are_malformed(mr_mem, builder, reason):
    q, dev = make(mr_mem, size=8)
    getattr(q.hostile, builder)()
    with pytest.raises(ChainError, match=reason):
        dev.pop()
    q.close()
    assert mr_mem.bytes_allocated == 0


def test_hostile_zero_len_and_completion_accounting(mem):
    q, dev = make(mem, size=8)
    head = q.hostile.zero_len()
    assert q.num_free == 5
    ch = dev.pop()
    assert [n for _, n in ch.readable] == [64, 0] and [n for _, n in ch.writable] == [64]
    dev.push(head, 0)
    assert q.get_used() == [(("hostile", "zero_len"), 0)]
    assert q.num_free == 8


def test_indirect_longer_than_queue(mem):
    q, dev = make(mem, size=4)
    h = q.hostile.indirect_longer_than_queue()
    ch = dev.pop()
    assert len(ch.readable) == 5
    dev.push(h, 0)
    assert q.get_used() == [(("hostile", "indirect_longer_than_queue"), 0)]
    h2 = q.add([b"x"] * 6, [3], indirect=True, publish=True)     # the normal path allows it too
    assert len(dev.pop().readable) == 6
    dev.push(h2, 0)
    q.get_used()


def test_hostile_avail_idx_jump(mem):
    q, dev = make(mem, size=8)
    new = q.hostile.avail_idx_jump()
    assert new == 9 == dev.avail_idx()
    with pytest.raises(ChainError, match="avail idx jump"):
        dev.pop()


def test_reserve_unreserve(mem):
    q, _ = make(mem, size=4)
    r = q.reserve(3)
    assert q.num_free == 1
    with pytest.raises(QueueFullError):
        q.reserve(2)
    q.unreserve(r)
    assert q.num_free == 4
    with pytest.raises(ValueError):
        q.unreserve([r[0]])


# --------------------------------------------------------------------------- guest memory
def test_multi_region_translation(mr_mem):
    m = mr_mem
    r0, r1 = m.regions
    assert (r0.gpa, r0.size, r0.mmap_offset) == (0, 2 * MiB, 0)
    assert (r1.gpa, r1.size, r1.mmap_offset) == (4 * GiB, 4 * MiB, 3 * 4096)
    assert m.size == 6 * MiB
    m.write(4 * GiB + 100, b"high")
    m.write(2 * MiB - 4, b"tail")
    assert m.read(4 * GiB + 100, 4) == b"high" and m.read(2 * MiB - 4, 4) == b"tail"
    v = m.gpa_view(4 * GiB + 100, 4)
    v[0:1] = b"H"
    assert m.read(4 * GiB + 100, 4) == b"High"
    v.release()
    assert m.uva(4 * GiB + 100) == r1.user_addr + 100
    assert m.gpa_of_uva(r1.user_addr + 100) == 4 * GiB + 100
    assert r0.user_addr % 4096 == 0 and r0.user_addr != r1.user_addr
    for bad in [(2 * MiB, 1), (2 * MiB - 2, 4), (3 * GiB, 16), (4 * GiB - 1, 2),
                (4 * GiB + 4 * MiB - 1, 2), (-1, 1), (10 * GiB, 1)]:
        with pytest.raises(GuestMemoryError):
            m.read(*bad)
    with pytest.raises(GuestMemoryError):
        m.write(4 * GiB + 4 * MiB - 2, b"abc")
    assert m.gpa_view(2 * MiB, 0).nbytes == 0          # empty range at the end is fine
    assert m.unmapped_gpa() == 2 * MiB


def test_mem_table_and_mmap_offset(mr_mem):
    m = mr_mem
    table = m.regions_for_mem_table()
    assert [(t.guest_phys_addr, t.memory_size, t.mmap_offset) for t in table] == \
        [(0, 2 * MiB, 0), (4 * GiB, 4 * MiB, 3 * 4096)]
    assert [t.userspace_addr for t in table] == [r.user_addr for r in m.regions]
    assert [t.fd for t in table] == m.fds
    gpa, size, uva, off, fd = table[1]
    assert os.fstat(fd).st_size == off + size
    m.write(4 * GiB, b"first-guest-byte")
    # a device maps from offset 0 and must add mmap_offset
    with mmap.mmap(fd, off + size, mmap.MAP_SHARED, mmap.PROT_READ) as dm:
        assert dm[:off] == bytes([POISON]) * off
        assert dm[off:off + 16] == b"first-guest-byte"
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    assert os.get_inheritable(fd) is False


def test_queue_in_high_region(mr_mem):
    q = DriverQueue(mr_mem, 16, region=1, layout="compact")
    assert q.desc_addr >= 4 * GiB
    dev = RefDevice.for_queue(q)
    buf = mr_mem.alloc(64, region=1)
    mr_mem.write(buf, b"z" * 64)
    q.add([(buf, 64)], [(mr_mem.alloc(32, region=0), 32)], token="hi", publish=True)
    ch = dev.pop()
    assert dev.gather(ch.readable) == b"z" * 64 and ch.writable[0][0] < 2 * MiB
    dev.push(ch.head, 32)
    assert q.get_used() == [("hi", 32)]
    dev.close()


def test_contiguous_regions_split():
    with FrontendMemory(4 * MiB, regions=3) as m:
        rs = m.regions
        assert len(rs) == 3 and rs[1].gpa == rs[0].end and rs[2].gpa == rs[1].end
        assert len(set(m.fds)) == 3
        with pytest.raises(GuestMemoryError):
            m.read(rs[0].end - 2, 4)                   # a buffer never spans regions


def test_region_validation():
    with pytest.raises(ValueError):
        FrontendMemory(regions=[(0, 4096), (0, 4096)])
    with pytest.raises(ValueError):
        FrontendMemory(regions=[(100, 4096)])
    with pytest.raises(ValueError):
        FrontendMemory(regions=[(0, 1000)])
    with pytest.raises(ValueError):
        FrontendMemory(0)


def test_allocator(mem):
    a = mem.alloc(10)
    b = mem.alloc(100, align=4096)
    c = mem.alloc(1, align=2)
    assert a % 16 == 0 and b % 4096 == 0 and c % 2 == 0
    assert len({a, b, c}) == 3
    assert mem.allocated(b) == 100
    spans = sorted([(a, a + 10), (b, b + 100), (c, c + 1)])
    assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:]))
    total = mem.bytes_free + mem.bytes_allocated
    for g in (b, a, c):
        mem.free(g)
    assert mem.bytes_allocated == 0 and mem.bytes_free == total == 8 * MiB
    assert len(mem.regions[0]._free) == 1                  # fully coalesced
    with pytest.raises(ValueError):
        mem.free(a)
    with pytest.raises(ValueError):
        mem.alloc(0)
    with pytest.raises(ValueError):
        mem.alloc(8, align=3)
    big = mem.alloc(8 * MiB)
    with pytest.raises(OutOfGuestMemory):
        mem.alloc(1)
    mem.free(big)


def test_allocator_many_random(mem):
    import random
    rnd = random.Random(1)
    live = {}
    for _ in range(3000):
        if live and rnd.random() < 0.45:
            g = rnd.choice(list(live))
            assert mem.read(g, 4) == live.pop(g)
            mem.free(g)
        else:
            n = rnd.randint(1, 5000)
            g = mem.alloc(n, align=1 << rnd.randint(0, 12))
            tag = os.urandom(4)
            mem.write(g, tag + bytes(min(n, 4) - 4) if n >= 4 else tag[:n])
            live[g] = mem.read(g, 4) if n >= 4 else None
            if live[g] is None:
                mem.free(g)
                del live[g]
    for g in list(live):
        mem.free(g)
    assert mem.bytes_allocated == 0 and len(mem.regions[0]._free) == 1


def test_allocator_region_choice(mr_mem):
    g = mr_mem.alloc(3 * MiB)                 # does not fit region 0 -> region 1
    assert g >= 4 * GiB
    g2 = mr_mem.alloc(16, region=0)
    assert g2 < 2 * MiB
    mr_mem.free(g)
    mr_mem.free(g2)


def test_slab_and_arena(mem):
    s = mem.slab(4096, 4, align=4096)
    bufs = [s.get() for _ in range(4)]
    assert bufs == sorted(bufs) and all(b % 4096 == 0 for b in bufs)
    assert bufs[1] - bufs[0] == 4096
    with pytest.raises(OutOfGuestMemory):
        s.get()
    s.put(bufs[2])
    assert s.get() == bufs[2]
    with pytest.raises(ValueError):
        s.put(bufs[0] + 1)
    s.close()
    ar = mem.arena(1024, align=64)
    x = ar.take(10)
    y = ar.take(100, align=64)
    assert y % 64 == 0 and y >= x + 10
    with pytest.raises(OutOfGuestMemory):
        ar.take(2000)
    ar.reset()
    assert ar.take(10) == x
    ar.close()
    assert mem.bytes_allocated == 0


def test_close_releases_everything():
    m = FrontendMemory(MiB, regions=2)
    fds = m.fds
    m.close()
    m.close()                                     # idempotent
    assert m.closed
    for fd in fds:
        link = None
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            pass
        assert link is None or "vscsid-guest" not in link
    with pytest.raises(GuestMemoryError):
        m.read(0, 1)


def test_close_with_leaked_view_warns():
    m = FrontendMemory(MiB)
    v = m.gpa_view(0, 16)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m.close()
    assert any(issubclass(x.category, ResourceWarning) for x in w)
    v.release()


def test_context_manager_and_sealing():
    with FrontendMemory(MiB, allow_sealing=True) as m:
        import fcntl
        fcntl.fcntl(m.fds[0], fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        assert fcntl.fcntl(m.fds[0], fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    assert m.closed


def test_hugepages_error_is_clear():
    try:
        with open("/proc/meminfo") as f:
            free = int(next(line for line in f if line.startswith("HugePages_Free")).split()[1])
    except (OSError, StopIteration):
        pytest.skip("no /proc/meminfo")
    if free >= 2:
        with FrontendMemory(4 * MiB, hugepages=True) as m:
            m.write(0, b"x")
            assert m.read(0, 1) == b"x"
    else:
        with pytest.raises(OSError, match="hugepages"):
            FrontendMemory(4 * MiB, hugepages=True)
