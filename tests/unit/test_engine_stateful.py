"""The C engine against the Python reference under a stateful adversary.

A generated sequence of guest actions — rewrite memory (descriptors, available
entries, anything), offer heads (repeats, heads still held, out of range, index
jumps), let the device run passes of a chosen budget, complete heads now or
later — is played against the C engine (``vsd_run``, every request punted so that
both sides only pop and validate) and against the worker's reference engine
(``PyEngine`` over ``SplitQueue``) on two identical guests. After every step both must agree: the heads popped, whether and
why the ring broke, the indices, and every byte of guest memory (the used ring).

The reference walker reads each descriptor from guest memory once: rewriting a
descriptor right after it was read changes nothing in the walk.
(The C engine's own read-once property and its rewrites during pops are held by
tests/c/engine_selftest.c and the fuzzer, tests/c/fuzz_engine.c.)
"""
from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vscsid.virtio import splitq as V
from vscsid.workers._fast import ffi, lib
from vscsid.workers.engine import PyEngine as ReferenceEngine

from .test_engine_differential import c_queue

from .test_properties_hostile import (  # noqa: F401  (guest is a fixture)
    AVAIL_GPA, DESC_GPA, USED_GPA, Guest, guest, load_tables, ref_walk, ring_case,
)

STATEFUL = settings(max_examples=1500, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class CEngine:
    """A struct vsd_queue over a guest, with no LUNs: every head is punted."""

    def __init__(self, g: Guest, size: int, last_avail: int):
        self.q, _ = c_queue(g, size)
        q = self.q
        q.used = ffi.cast("uint8_t *", g.ranges[0][0] + USED_GPA)
        q.last_avail = last_avail
        q.used_idx = struct.unpack("<H", g.read(USED_GPA + 2, 2))[0]
        q.event_idx = 1
        q.call_fd = -1
        q.cdb_size, q.sense_size = 32, 96
        self.completed = ffi.new("uint16_t[]", size)
        self.hstate = ffi.new("uint8_t[]", size)
        q.completed, q.hstate = self.completed, self.hstate
        self.stats = ffi.new("struct vsd_stats *")       # the engine's counters
        q.st = self.stats
        self.slow = ffi.new("uint16_t[]", size)
        self.size = size

    def run(self, budget: int) -> tuple[list[int], str | None]:
        n = lib.vsd_run(self.q, self.slow, self.size, budget)
        heads = list(self.slow[0:n]) if n > 0 else []
        why = {0: None, lib.VSD_BROKEN_AVAIL_JUMP: "jump", lib.VSD_BROKEN_HEAD_RANGE: "range",
               lib.VSD_BROKEN_HEAD_BUSY: "busy"}[self.q.broken]
        return heads, why

    def push(self, head: int, written: int) -> bool:
        return lib.vsd_push(self.q, head, written) == 0

    def flush(self) -> None:
        lib.vsd_flush(self.q)


class PyEngine:
    """The worker's reference engine (workers/engine.py) over a SplitQueue."""

    def __init__(self, g: Guest, size: int, last_avail: int):
        q = V.SplitQueue(g.mem, size, DESC_GPA, AVAIL_GPA, USED_GPA, event_idx=True,
                         last_avail=last_avail)
        self.engine = ReferenceEngine(q, None, -1)
        self.q = q

    def run(self, budget: int) -> tuple[list[int], str | None]:
        heads = self.engine.run(budget)
        r = self.engine.broken
        why = None if r is None else ("jump" if "jumped" in r else
                                      "busy" if "offered twice" in r else "range")
        return heads, why

    def push(self, head: int, written: int) -> bool:
        return self.engine.push(head, written)

    def flush(self) -> None:
        self.engine.flush()


def _memory(g: Guest) -> bytes:
    return b"".join(g.read(gpa, n) for gpa, n in ((DESC_GPA, 0x2000), (AVAIL_GPA, 0x1000),
                                                  (USED_GPA, 0x1000)))


@st.composite
def step(draw):
    kind = draw(st.sampled_from(["offer"] * 5 + ["run"] * 5 + ["complete"] * 4
                                + ["write", "bogus_push", "jump"]))
    if kind == "offer":
        return kind, draw(st.lists(st.integers(0, 40), min_size=1, max_size=6))
    if kind == "run":
        return kind, draw(st.integers(1, 12))
    if kind == "complete":
        return kind, draw(st.integers(0, 8)), draw(st.booleans())
    if kind == "write":
        return kind, draw(st.integers(0, 0x3FFF)), draw(st.binary(min_size=1, max_size=16))
    if kind == "bogus_push":
        return kind, draw(st.integers(0, 40))
    return kind, draw(st.sampled_from([17, 33, 0x8000, 0xFFFF]))


def test_c_engine_matches_the_reference_under_a_stateful_adversary():
    gc, gp = Guest(), Guest()
    seen = {"busy": 0, "range": 0, "jump": 0, "popped": 0}
    try:
        @STATEFUL
        @given(ring_case(), st.lists(step(), min_size=4, max_size=40))
        def prop(case, steps):
            size, descs, tables, last_avail, _delta, _entries = case
            size = max(size, 4)
            descs = (descs * 4)[:size]
            for g in (gc, gp):
                load_tables(g, descs, tables)
                g.write(AVAIL_GPA, struct.pack("<HH", 0, last_avail))
                g.write(USED_GPA, struct.pack("<HH", 0, last_avail))
            c, p = CEngine(gc, size, last_avail), PyEngine(gp, size, last_avail)
            idx = last_avail
            held_c: list[int] = []
            held_p: list[int] = []
            broke = False
            for s in steps:
                kind = s[0]
                if kind == "offer":
                    # mostly heads of the ring (the same one again, one still held),
                    # now and then one out of range
                    for h in (v % size if v < 38 else v for v in s[1]):
                        for g in (gc, gp):
                            g.write(AVAIL_GPA + 4 + 2 * (idx % size), struct.pack("<H", h))
                        idx = (idx + 1) & 0xFFFF
                    for g in (gc, gp):
                        g.write(AVAIL_GPA + 2, struct.pack("<H", idx))
                elif kind == "jump":
                    idx = (idx + s[1]) & 0xFFFF
                    for g in (gc, gp):
                        g.write(AVAIL_GPA + 2, struct.pack("<H", idx))
                elif kind == "write":
                    gpa, data = s[1], s[2]
                    gpa = DESC_GPA + gpa if gpa < 0x2000 else AVAIL_GPA + (gpa - 0x2000) % 0x1000
                    for g in (gc, gp):
                        g.write(gpa, data)
                elif kind == "run":
                    hc, bc = c.run(s[1])
                    hp, bp = p.run(s[1])
                    assert (hc, bc) == (hp, bp), (hc, bc, hp, bp)
                    assert c.q.last_avail == p.q.last_avail
                    held_c += hc
                    held_p += hp
                    seen["popped"] += len(hc)
                    if bc and not broke:
                        seen[bc] += 1
                        broke = True
                elif kind == "complete":
                    n, publish = s[1], s[2]
                    for _ in range(min(n, len(held_c))):
                        h = held_c.pop(0)
                        assert held_p.pop(0) == h
                        assert c.push(h, 7 + h) and p.push(h, 7 + h)
                    if publish:
                        c.flush()
                        p.flush()
                elif kind == "bogus_push":
                    # A head nobody is serving (or served already) is never completed.
                    h = s[1]
                    want = h in held_c
                    assert c.push(h, 1) is want and p.push(h, 1) is want
                    if want:
                        held_c.remove(h)
                        held_p.remove(h)
                assert len(held_c) <= size
                assert _memory(gc) == _memory(gp), f"guest memory differs after {s}"
            c.flush()
            p.flush()
            assert _memory(gc) == _memory(gp)

        prop()
    finally:
        gc.close()
        gp.close()
    assert seen["popped"] > 1000 and seen["busy"] > 20 and seen["range"] > 5, seen


class RewritingDesc:
    """Stands in for virtqueue.DESC: after each descriptor is read, the guest
    scribbles over it (zeroes it). A walker that read a field of it again would
    see the change within one visit; a later visit (a loop) rightly sees it."""

    def __init__(self):
        self._s = struct.Struct("<QIHH")
        self.size = 16

    def unpack_from(self, buf, off=0):
        value = self._s.unpack_from(buf, off)
        buf[off:off + 16] = bytes(16)
        return value


def test_reference_walker_reads_each_descriptor_once(guest, monkeypatch):
    checked = {"ok": 0, "bad": 0}

    @STATEFUL
    @given(ring_case())
    def prop(case):
        size, descs, tables, _last_avail, _delta, _entries = case
        for head in range(size):
            # The spec walker under the same adversary: each descriptor is zeroed
            # in guest memory right after it is read.
            load_tables(guest, descs, tables)
            expect = ref_walk(guest, size, head,
                              after_read=lambda gpa: guest.write(gpa, bytes(16)))
            load_tables(guest, descs, tables)
            q = V.SplitQueue(guest.mem, size, DESC_GPA, AVAIL_GPA, USED_GPA, event_idx=True,
                             last_avail=0)
            monkeypatch.setattr(V, "DESC", RewritingDesc())
            try:
                chain = q.walk(head)
            except V.ChainError:
                chain = None
            finally:
                monkeypatch.undo()
                q.release()
            if expect is None:
                assert chain is None
                checked["bad"] += 1
            else:
                assert chain is not None, "a valid chain was refused after a rewrite"
                assert chain.out_len == sum(n for _, n, w in expect if not w)
                assert chain.in_len == sum(n for _, n, w in expect if w)
                checked["ok"] += 1

    prop()
    assert checked["ok"] > 100 and checked["bad"] > 100, checked
