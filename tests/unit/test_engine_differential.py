"""The C fast path's descriptor-chain walker against the spec-derived reference,
on arbitrary rings over real mmapped guest memory (same generator as the Python
walker's property test): the C code must accept exactly the chains the spec
allows (or hand over-long ones to the reference path) and see the same lengths."""
from __future__ import annotations

from hypothesis import given

from vscsid.workers._fast import ffi, lib

from .test_properties_hostile import (  # noqa: F401  (guest is a fixture)
    AVAIL_GPA, DESC_GPA, WALK, guest, load_tables, ref_walk, ring_case,
)


def c_queue(g, size):
    q = ffi.new("struct vsd_queue *")
    pins = []
    for i, (base, rsize, gpa) in enumerate(g.ranges):
        q.regions[i].gpa = gpa
        q.regions[i].size = rsize
        q.regions[i].host = ffi.cast("uint8_t *", base)
    q.nregions = len(g.ranges)
    a_base = g.ranges[0][0]
    q.desc = ffi.cast("uint8_t *", a_base + DESC_GPA)
    q.avail = ffi.cast("uint8_t *", a_base + AVAIL_GPA)
    q.size = size
    q.mask = size - 1
    return q, pins


def test_c_walker_matches_the_reference(guest):
    out_len = ffi.new("uint64_t *")
    in_len = ffi.new("uint64_t *")
    nout = ffi.new("int *")
    nin = ffi.new("int *")
    seen = {"ok": 0, "bad": 0, "long": 0}

    @WALK
    @given(ring_case())
    def prop(case):
        size, descs, tables, _last_avail, _delta, _entries = case
        g = guest
        load_tables(g, descs, tables)
        q, _ = c_queue(g, size)
        for head in range(size):
            expect = ref_walk(g, size, head)
            r = lib.vsd_walk_info(q, head, out_len, in_len, nout, nin)
            if expect is None:
                assert r == -1, f"C accepted a chain the spec forbids (head {head})"
                seen["bad"] += 1
            elif r == -2:
                seen["long"] += 1      # too many segments for the fast path: punted
            else:
                assert r == 0, f"C refused a valid chain (head {head})"
                assert out_len[0] == sum(n for _, n, w in expect if not w)
                assert in_len[0] == sum(n for _, n, w in expect if w)
                seen["ok"] += 1

    prop()
    assert seen["ok"] > 100 and seen["bad"] > 100, seen
