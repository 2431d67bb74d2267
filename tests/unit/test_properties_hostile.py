"""Property tests for the parts of the daemon that read what an untrusted guest or front
end wrote:

* the descriptor-chain walker, over real mmapped guest memory (memfds mapped by
  ``GuestMemory``): whatever the descriptor table and available ring hold, it returns
  chains whose every view lies inside the guest regions (and matches a reference
  walker written from the spec), or raises ``ChainError`` / ``RingError``; never any
  other exception, and in a bounded number of descriptor reads;
* the vhost-user codec fed random sequences of valid and invalid messages, split into
  reads the way a unix stream socket splits them: every valid message comes out
  intact, with exactly its fds; every other fd is closed exactly once;
* the virtio-scsi request framing helpers (LUN decoding, gather / scatter / split).
"""
from __future__ import annotations

import mmap
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vscsid.vhost import protocol as P
from vscsid.virtio.memory import GuestMemory, RegionSpec
from vscsid.virtio import scsi_wire as R
from vscsid.virtio import splitq as V
from vscsid.virtio._ring import ffi

WALK = settings(max_examples=3000, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
FAST = settings(max_examples=1000, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

# =========================================================================== descriptor chains

KIB = 1024
A_GPA, A_SIZE = 0x0, 64 * KIB            # ring + indirect tables + buffers
B_GPA, B_SIZE = 0x30000, 32 * KIB        # a second region behind a gap
C_GPA, C_SIZE = 0x38000, 16 * KIB        # adjacent to B: ranges may span B and C
DESC_GPA, AVAIL_GPA, USED_GPA = 0x0, 0x2000, 0x3000
TABLE_GPAS = (0x4000, 0x5000, B_GPA + 0x1000, C_GPA + C_SIZE - 64)
REGIONS = ((A_GPA, A_SIZE), (B_GPA, B_SIZE), (C_GPA, C_SIZE))
OFFSET = 4096                            # regions start this far into their memfds


class Guest:
    """Three memfd regions, mapped by GuestMemory (the device) and by the test itself."""

    def __init__(self):
        self.fds, self.maps, specs = [], [], []
        for i, (gpa, size) in enumerate(REGIONS):
            fd = os.memfd_create(f"prop-{i}", os.MFD_CLOEXEC)
            os.ftruncate(fd, OFFSET + size)
            self.fds.append(fd)
            self.maps.append(mmap.mmap(fd, OFFSET + size))
            specs.append(RegionSpec(gpa, size, 0x7F00_0000_0000 + (i << 24), OFFSET))
        self.mem = GuestMemory.map(specs, self.fds)
        self.ranges = []   # (host address, size, gpa) of each region as the device maps it
        for r in self.mem.regions:
            p = ffi.from_buffer(r.view)
            self.ranges.append((int(ffi.cast("uintptr_t", p)), r.size, r.gpa))
            ffi.release(p)

    def write(self, gpa: int, data: bytes) -> None:
        for (rg, size), m in zip(REGIONS, self.maps):
            if rg <= gpa and gpa + len(data) <= rg + size:
                m[OFFSET + gpa - rg:OFFSET + gpa - rg + len(data)] = data
                return
        raise AssertionError(f"test bug: {gpa:#x}+{len(data)}")

    def read(self, gpa: int, n: int) -> bytes | None:
        for (rg, size), m in zip(REGIONS, self.maps):
            if rg <= gpa and gpa + n <= rg + size:
                return bytes(m[OFFSET + gpa - rg:OFFSET + gpa - rg + n])
        return None

    def clear(self) -> None:
        for (_, size), m in zip(REGIONS, self.maps):
            m[OFFSET:OFFSET + size] = bytes(size)

    def host_addr(self, view) -> tuple[int, int]:
        p = ffi.from_buffer(view)
        try:
            return int(ffi.cast("uintptr_t", p)), len(view)
        finally:
            ffi.release(p)

    def close(self) -> None:
        self.mem.close()
        for m in self.maps:
            m.close()
        for fd in self.fds:
            os.close(fd)


@pytest.fixture(scope="module")
def guest():
    g = Guest()
    yield g
    g.close()


def in_memory(gpa: int, n: int) -> bool:
    """[gpa, gpa+n) is covered by the regions (B and C are adjacent)."""
    if n == 0:
        return True
    if gpa + n - 1 > (1 << 64) - 1:
        return False
    end = gpa + n
    if A_GPA <= gpa and end <= A_GPA + A_SIZE:
        return True
    return B_GPA <= gpa and end <= C_GPA + C_SIZE


def ref_walk(g: Guest, size: int, head: int, after_read=None):
    """Spec-derived walker: list of (gpa, len, writable) or None for a refused chain.
    ``after_read(gpa)`` is called after each descriptor is read (an adversary)."""
    table_gpa, limit, i, count, indirect = DESC_GPA, size, head, 0, False
    segs, seen_write = [], False
    while True:
        raw = g.read(table_gpa + 16 * i, 16)
        if after_read is not None:
            after_read(table_gpa + 16 * i)
        addr, ln, flags, nxt = struct.unpack("<QIHH", raw)
        if flags & V.VIRTQ_DESC_F_INDIRECT:
            if indirect or count or flags & V.VIRTQ_DESC_F_NEXT or ln == 0 or ln % 16:
                return None
            if ln // 16 > V.MAX_QUEUE_SIZE or g.read(addr, ln) is None:
                return None
            table_gpa, limit, i, indirect = addr, ln // 16, 0, True
            continue
        count += 1
        if count > limit:
            return None
        if ln:
            if not in_memory(addr, ln):
                return None
            w = bool(flags & V.VIRTQ_DESC_F_WRITE)
            if not w and seen_write:
                return None
            seen_write |= w
            segs.append((addr, ln, w))
        if not flags & V.VIRTQ_DESC_F_NEXT:
            return segs
        if nxt >= limit:
            return None
        i = nxt


def load_tables(g: Guest, descs, tables) -> None:
    """Write a ring's descriptor table and the indirect tables of a generated case."""
    g.clear()
    g.write(DESC_GPA, b"".join(struct.pack("<QIHH", *d) for d in descs))
    for gpa, tbl in zip(TABLE_GPAS, tables):
        data = b"".join(struct.pack("<QIHH", *d) for d in tbl)
        room = min(len(data), (A_SIZE if gpa < A_SIZE else C_GPA + C_SIZE) - gpa)
        g.write(gpa, data[:room])


def host_ranges(g: Guest, gpa: int, n: int) -> list[tuple[int, int]]:
    """Where the device must see [gpa, gpa+n): split at region boundaries."""
    out = []
    for base, size, rg in g.ranges:
        lo, hi = max(gpa, rg), min(gpa + n, rg + size)
        if lo < hi:
            out.append((base + lo - rg, hi - lo))
    return out


def merge(ranges):
    out = []
    for a, n in ranges:
        if out and out[-1][0] + out[-1][1] == a:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((a, n))
    return out


class CountingDesc:
    """Stands in for virtqueue.DESC to count descriptor reads."""

    def __init__(self):
        self.reads = 0
        self._s = struct.Struct("<QIHH")
        self.size = 16

    def unpack_from(self, buf, off=0):
        self.reads += 1
        return self._s.unpack_from(buf, off)


U64 = (1 << 64) - 1
edge_gpas = [A_GPA, A_SIZE - 16, A_SIZE - 1, A_SIZE, B_GPA - 16, B_GPA, B_GPA + B_SIZE - 16,
             C_GPA - 8, C_GPA, C_GPA + C_SIZE - 16, C_GPA + C_SIZE, U64 - 15, U64, 1 << 63,
             *TABLE_GPAS]
# Cheap strategies (generation dominates the cost): mostly values that sit on a boundary.
addr_st = st.one_of(st.sampled_from(edge_gpas), st.integers(0, C_GPA + C_SIZE + 4096))
len_st = st.one_of(st.sampled_from([0, 1, 15, 16, 32, 48, 64, 512, 4096, 0x10000, 0xFFFF_FFF0,
                                    0xFFFF_FFFF, 16 * V.MAX_QUEUE_SIZE + 16, 0x8000, 0x7FF0]),
                   st.integers(0, 0x12000))
flag_st = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 1, 3, 0xFFFF, 0x8001, 0x10, 0xFFF8])


@st.composite
def ring_case(draw):
    size = draw(st.sampled_from([1, 2, 4, 4, 8, 8, 16, 32]))
    descs = draw(st.lists(st.tuples(addr_st, len_st, flag_st, st.integers(0, 2 * size + 2)),
                          min_size=size, max_size=size))
    tables = draw(st.lists(st.lists(st.tuples(addr_st, len_st, flag_st, st.integers(0, 8)),
                                    min_size=1, max_size=3), min_size=len(TABLE_GPAS),
                           max_size=len(TABLE_GPAS)))
    last_avail = draw(st.sampled_from([0, 1, size - 1, 0xFFFF, 0xFFFE, 0x8000, 12345]))
    delta = draw(st.one_of(st.integers(0, size), st.sampled_from([size + 1, 0x8000, 0xFFFF])))
    entries = draw(st.lists(st.integers(0, size - 1), min_size=size, max_size=size))
    if draw(st.integers(0, 7)) == 0:
        entries[draw(st.integers(0, size - 1))] = draw(st.sampled_from([size, 0xFFFF, 2 * size]))
    return size, descs, tables, last_avail, delta, entries


def test_chain_walker_never_leaves_guest_memory(guest, monkeypatch):
    counter = CountingDesc()
    monkeypatch.setattr(V, "DESC", counter)
    stats = {"ok": 0, "chain_error": 0, "ring_error": 0}

    @WALK
    @given(ring_case())
    def prop(case):
        size, descs, tables, last_avail, delta, entries = case
        g = guest
        load_tables(g, descs, tables)
        idx = (last_avail + delta) & 0xFFFF
        g.write(AVAIL_GPA, struct.pack("<HH", 0, idx)
                + b"".join(struct.pack("<H", e) for e in entries))
        q = V.SplitQueue(g.mem, size, DESC_GPA, AVAIL_GPA, USED_GPA, event_idx=True,
                         last_avail=last_avail)
        try:
            try:
                heads = q.pop_heads()
            except V.RingError:
                stats["ring_error"] += 1
                offered = [entries[(last_avail + k) % size] for k in range(min(delta, size))]
                # A head out of range, or one offered twice while the device holds it.
                assert (delta > size or any(e >= size for e in offered)
                        or len(set(offered)) < len(offered))
                return
            assert delta <= size
            assert len(heads) == delta and q.last_avail == idx
            for head in heads:
                assert 0 <= head < size
                expect = ref_walk(g, size, head)
                counter.reads = 0
                try:
                    chain = q.walk(head)
                except V.ChainError as exc:
                    stats["chain_error"] += 1
                    assert exc.head == head and isinstance(exc.reason, str)
                    assert expect is None, f"refused a valid chain: {exc.reason}"
                    continue
                finally:
                    # bounded: the ring once, or one indirect descriptor and its table once
                    assert counter.reads <= max(size, V.MAX_QUEUE_SIZE) + 2
                stats["ok"] += 1
                assert expect is not None, "accepted a chain the spec forbids"
                assert chain.head == head
                assert chain.out_len == sum(n for _, n, w in expect if not w)
                assert chain.in_len == sum(n for _, n, w in expect if w)
                got_out = merge(g.host_addr(v) for v in chain.out)
                got_in = merge(g.host_addr(v) for v in chain.in_)
                want_out = merge(r for a, n, w in expect if not w for r in host_ranges(g, a, n))
                want_in = merge(r for a, n, w in expect if w for r in host_ranges(g, a, n))
                assert got_out == want_out and got_in == want_in
                for v in chain.out + chain.in_:     # inside one region's mapping, always
                    a, n = g.host_addr(v)
                    assert any(base <= a and a + n <= base + size for base, size, _ in g.ranges)
        finally:
            q.release()

    prop()
    # the strategies reach every outcome
    assert all(stats.values()), stats


@FAST
@given(size=st.sampled_from([0, 3, 6, 100, 1 << 16, 65536 * 2]),
       desc=st.sampled_from([0, 8, A_SIZE - 16, U64 - 15, 0x20000]),
       avail=st.sampled_from([0x2000, 0x2001, A_SIZE - 2, 0x20000]),
       used=st.sampled_from([0x3000, 0x3002, A_SIZE - 4, 0x20000]))
def test_ring_placement_is_validated(guest, size, desc, avail, used):
    try:
        q = V.SplitQueue(guest.mem, size, desc, avail, used, event_idx=False, last_avail=0)
    except V.RingError:
        return
    try:
        assert size and not size & (size - 1) and size <= V.MAX_QUEUE_SIZE
        d, a, u = V.ring_sizes(size)
        assert in_memory(desc, d) and in_memory(avail, a) and in_memory(used, u)
        assert desc % 16 == 0 and avail % 2 == 0 and used % 4 == 0
    finally:
        q.release()


# =========================================================================== codec sequences

FD_BASE = 1000


class FdLog:
    def __init__(self):
        self.closed: list[int] = []

    def __call__(self, fd: int) -> None:
        self.closed.append(fd)


@st.composite
def valid_message(draw):
    kind = draw(st.sampled_from(["get_features", "set_features", "vring_num", "vring_addr", "kick",
                                 "call_nofd", "mem_table", "get_config", "set_inflight",
                                 "rem_mem_reg", "status", "reset_owner"]))
    need = draw(st.booleans())
    if kind == "get_features":
        return P.Request.GET_FEATURES, P.Empty(), 0, need
    if kind == "set_features":
        return P.Request.SET_FEATURES, P.U64Payload(draw(st.integers(0, U64))), 0, need
    if kind == "vring_num":
        return P.Request.SET_VRING_NUM, P.VringState(draw(st.integers(0, 2**32 - 1)),
                                                     draw(st.integers(0, 2**32 - 1))), 0, need
    if kind == "vring_addr":
        return (P.Request.SET_VRING_ADDR,
                P.VringAddr(*draw(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                                            st.integers(0, U64), st.integers(0, U64),
                                            st.integers(0, U64), st.integers(0, U64)))), 0, need)
    if kind == "kick":
        return P.Request.SET_VRING_KICK, P.VringFile(draw(st.integers(0, 255)), False), 1, need
    if kind == "call_nofd":
        return P.Request.SET_VRING_CALL, P.VringFile(draw(st.integers(0, 255)), True), 0, need
    if kind == "mem_table":
        n = draw(st.integers(1, 8))
        regions = tuple(P.MemoryRegion(*draw(st.tuples(*[st.integers(0, U64)] * 4)))
                        for _ in range(n))
        return P.Request.SET_MEM_TABLE, P.MemoryTable(regions), n, need
    if kind == "get_config":
        size = draw(st.integers(0, 256))
        return (P.Request.GET_CONFIG, P.ConfigPayload(draw(st.integers(0, 2**32 - 1)), size,
                                                      draw(st.integers(0, 1)), bytes(size)), 0, need)
    if kind == "set_inflight":
        return P.Request.SET_INFLIGHT_FD, P.Inflight(draw(st.integers(0, U64)), 0, 2, 128), 1, need
    if kind == "rem_mem_reg":
        return (P.Request.REM_MEM_REG, P.MemRegionMsg(P.MemoryRegion(0, 4096, 0, 0)),
                draw(st.integers(0, 1)), need)
    if kind == "status":
        return P.Request.SET_STATUS, P.U64Payload(draw(st.integers(0, 255))), 0, need
    return P.Request.RESET_OWNER, P.Empty(), 0, need


def _hdr(code, flags, size):
    return struct.pack("<III", code, flags, size)


@st.composite
def item(draw):
    """(bytes, nfds, expected) — expected is ("msg", request, payload, need_reply),
    ("err", False) or ("err", True)."""
    kind = draw(st.sampled_from(["valid"] * 6 + ["unknown", "bad_size", "bad_fds", "bad_flags",
                                                 "oversize", "bad_table"]))
    if kind == "valid":
        req, payload, nfds, need = draw(valid_message())
        return P.encode_request(req, payload, need_reply=need), nfds, ("msg", req, payload, need)
    if kind == "unknown":
        code = draw(st.one_of(st.sampled_from([0, 26, 27, 44, 99]), st.integers(44, 2**32 - 1)))
        body = draw(st.binary(max_size=64))
        return _hdr(code, 1, len(body)) + body, draw(st.integers(0, 2)), ("err", False)
    if kind == "bad_size":
        code = draw(st.sampled_from([P.Request.GET_FEATURES, P.Request.SET_FEATURES,
                                     P.Request.SET_VRING_ADDR, P.Request.SET_VRING_KICK]))
        size = draw(st.integers(0, 64).filter(lambda n: n not in P.REQUESTS[code].sizes))
        return _hdr(code, 1, size) + bytes(size), draw(st.integers(0, 2)), ("err", True)
    if kind == "bad_fds":
        req, payload, nfds, need = draw(valid_message())
        allowed = {0, 1} if req == P.Request.REM_MEM_REG else {nfds}
        bad = draw(st.integers(0, 8).filter(lambda n: n not in allowed))
        return P.encode_request(req, payload), bad, ("err", True)
    if kind == "bad_flags":
        flags = draw(st.sampled_from([0, 2, 3, 1 | 4, 1 | 16, 1 | 0x100]))
        return _hdr(P.Request.GET_FEATURES, flags, 0), draw(st.integers(0, 1)), ("err", True)
    if kind == "oversize":
        return _hdr(P.Request.SET_FEATURES, 1, draw(st.integers(P.MAX_PAYLOAD + 1, 2**32 - 1))), \
            0, ("err", True)
    n = draw(st.sampled_from([0, 9, 200]))
    body = struct.pack("<II", n, 0) + bytes(32 * min(n, 8))
    return _hdr(P.Request.SET_MEM_TABLE, 1, len(body)) + body, draw(st.integers(0, 8)), ("err", True)


@settings(max_examples=2500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(items=st.lists(item(), min_size=1, max_size=8),
       reads=st.lists(st.integers(1, 300), min_size=1, max_size=50),
       use_wanted=st.booleans())
def test_codec_sequences_account_for_every_fd(items, reads, use_wanted):
    log = FdLog()
    codec = P.BackendCodec(close_fd=log)
    stream = b""
    segments = []                       # (start, end, fds)
    next_fd = FD_BASE
    for data, nfds, _ in items:
        fds = list(range(next_fd, next_fd + nfds))
        next_fd += nfds
        segments.append((len(stream), len(stream) + len(data), fds))
        stream += data
    all_fds = list(range(FD_BASE, next_fd))

    got: list = []
    handed: list[int] = []
    broken = False

    def drain():
        nonlocal broken
        while not broken:
            try:
                msg = codec.next_message()
            except P.ProtocolError as err:
                got.append(("err", err.fatal))
                broken = err.fatal
                continue
            if msg is None:
                return
            got.append(("msg", msg.request, msg.payload, msg.need_reply, msg.fds))
            handed.extend(msg.fds)

    # Deliver like a unix stream socket: a read never runs past the end of a segment
    # that carries fds, and the fds come with the read holding the segment's first byte.
    pos, k = 0, 0
    while pos < len(stream):
        n = reads[k % len(reads)]
        k += 1
        if use_wanted:
            n = min(n, codec.wanted())
        end = min(pos + n, len(stream))
        fds = []
        for s, e, f in segments:
            if f and s < end and e > pos:
                end = min(end, e)
                break
        for s, e, f in segments:
            if pos <= s < end:
                fds.extend(f)
        codec.feed(stream[pos:end], fds)
        pos = end
        drain()
    codec.close()

    # what the model expects: everything up to and including the first fatal error
    expected = []
    for (data, nfds, exp), (s, e, fds) in zip(items, segments):
        if exp[0] == "msg":
            expected.append((*exp, fds))
        else:
            expected.append(exp)
            if exp[1]:
                break
    assert got == expected
    assert sorted(handed + log.closed) == all_fds, "an fd was lost or closed twice"
    assert not set(handed) & set(log.closed)


# =========================================================================== request framing

views_st = st.lists(st.binary(min_size=0, max_size=40), min_size=0, max_size=6)


@FAST
@given(views=views_st, n=st.integers(0, 300))
def test_gather(views, n):
    mvs = [memoryview(v) for v in views]
    assert R.gather(mvs, n) == b"".join(views)[:n]


@FAST
@given(views=views_st, off=st.integers(0, 300))
def test_split_views(views, off):
    out = R.split_views([memoryview(v) for v in views], off)
    assert b"".join(bytes(v) for v in out) == b"".join(views)[off:]
    assert all(len(v) for v in out)


@FAST
@given(sizes=st.lists(st.integers(0, 40), max_size=6), data=st.binary(max_size=300),
       off=st.integers(0, 300))
def test_scatter_writes_exactly_its_range(sizes, data, off):
    arena = bytearray(b"\xa5" * (sum(sizes) + 8 * (len(sizes) + 1)))
    mv = memoryview(arena)
    spans, pos = [], 8
    for n in sizes:
        spans.append((pos, n))
        pos += n + 8
    views = [mv[p:p + n] for p, n in spans]
    total = sum(sizes)
    written = R.scatter(views, data, off)
    assert written == max(0, min(len(data), total - off))
    joined = b"".join(bytes(arena[p:p + n]) for p, n in spans)
    expect = bytearray(b"\xa5" * total)
    expect[off:off + written] = data[:written]
    assert joined == bytes(expect)
    guards = bytearray(arena)
    for p, n in spans:
        guards[p:p + n] = b"\xa5" * n
    assert guards == b"\xa5" * len(arena), "wrote outside the views"


@FAST
@given(lun=st.binary(min_size=8, max_size=8))
def test_decode_lun_range(lun):
    n = R.decode_lun(lun)
    assert n == R.LUN_BAD_TARGET or n == R.WLUN_REPORT_LUNS or 0 <= n <= 0x3FFF or n == 0xFFFF
    if lun[0] != 1 and lun[:2] != b"\xc1\x01":
        assert n == R.LUN_BAD_TARGET
    if lun[0] == 1 and lun[1] != 0:
        assert n == R.LUN_BAD_TARGET
    if n not in (R.LUN_BAD_TARGET, 0xFFFF, R.WLUN_REPORT_LUNS):
        assert lun[0] == 1 and lun[1] == 0 and not any(lun[4:])


@FAST
@given(lun=st.integers(0, 16383), target=st.integers(0, 255))
def test_decode_lun_inverts_the_driver_encoding(lun, target):
    from vscsid.bench.virtio_scsi import lun_bytes

    n = R.decode_lun(lun_bytes(lun, target))
    assert n == (lun if target == 0 else R.LUN_BAD_TARGET)


# =========================================================================== memory hardening

def test_sealable_memfd_gets_shrink_seal_when_mapped():
    import fcntl

    from vscsid.virtio.memory import GuestMemoryError

    fd = os.memfd_create("seal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    plain = os.memfd_create("plain", os.MFD_CLOEXEC)
    try:
        for f in (fd, plain):
            os.ftruncate(f, 1 << 16)
        mem = GuestMemory.map([RegionSpec(0, 1 << 16, 0x10000, 0),
                               RegionSpec(1 << 20, 1 << 16, 0x100000, 0)], [fd, plain])
        try:
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            os.ftruncate(fd, 1 << 17)          # growing stays allowed
        finally:
            mem.close()
        # a file shrunk before mapping is still refused
        os.ftruncate(plain, 4096)
        with pytest.raises(GuestMemoryError, match="only 4096"):
            GuestMemory.map([RegionSpec(0, 1 << 16, 0x10000, 0)], [plain])
    finally:
        os.close(fd)
        os.close(plain)


def test_empty_table_maps_and_refuses_every_access():
    from vscsid.virtio.memory import GuestMemoryError

    mem = GuestMemory.map([], [])
    with pytest.raises(GuestMemoryError):
        mem.gpa_view(0, 1)
    with pytest.raises(GuestMemoryError):
        mem.views(0, 16)
    with pytest.raises(GuestMemoryError):
        mem.uva_to_gpa(0x1000, 16)
    mem.close()
