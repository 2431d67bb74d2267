"""SGList: a list of byte views addressed as one range."""
from __future__ import annotations

import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vscsid.workers.scsi import SGList


def _bufs(*sizes):
    return [bytearray(n) for n in sizes]


def test_length_and_empty_views_dropped():
    bufs = _bufs(3, 0, 5)
    sg = SGList([memoryview(b) for b in bufs])
    assert sg.length == 8 == len(sg)
    assert len(sg.views) == 2
    assert SGList().length == 0
    assert SGList.EMPTY.views_for(0, 0) == []


def test_copy_in_spans_segments_and_truncates():
    bufs = _bufs(3, 2, 4)
    sg = SGList([memoryview(b) for b in bufs])
    assert sg.copy_in(b"abcdefghijk") == 9
    assert bufs == [bytearray(b"abc"), bytearray(b"de"), bytearray(b"fghi")]
    assert sg.copy_in(b"XY", offset=4) == 2
    assert bufs == [bytearray(b"abc"), bytearray(b"dX"), bytearray(b"Yghi")]
    assert sg.copy_in(b"Z", offset=9) == 0
    assert sg.copy_in(b"Z", offset=100) == 0
    with pytest.raises(ValueError):
        sg.copy_in(b"Z", offset=-1)


def test_copy_out():
    bufs = [bytearray(b"abc"), bytearray(b"de"), bytearray(b"fghi")]
    sg = SGList(bufs)  # plain bytearrays are accepted too
    assert sg.copy_out() == b"abcdefghi"
    assert sg.copy_out(2, 4) == b"cdef"
    assert sg.copy_out(7) == b"hi"
    assert sg.copy_out(8, 100) == b"i"
    assert sg.copy_out(9) == b""
    assert sg.copy_out(50, 2) == b""


def test_views_for_exact_and_zero_copy():
    bufs = [bytearray(b"abc"), bytearray(b"de"), bytearray(b"fghi")]
    sg = SGList([memoryview(b) for b in bufs])
    views = sg.views_for(1, 6)
    assert [bytes(v) for v in views] == [b"bc", b"de", b"fg"]
    views[0][0] = ord("B")  # writes land in the original buffer
    assert bufs[0] == bytearray(b"aBc")
    assert [bytes(v) for v in sg.views_for(3, 2)] == [b"de"]
    assert [bytes(v) for v in sg.views_for(0, 9)] == [b"aBc", b"de", b"fghi"]
    assert sg.views_for(4, 0) == []
    for off, n in ((0, 10), (-1, 1), (9, 1), (5, -1)):
        with pytest.raises(ValueError):
            sg.views_for(off, n)


def test_mmap_slices():
    m = mmap.mmap(-1, 8192)
    try:
        mv = memoryview(m)
        sg = SGList([mv[100:200], mv[4096:4196]])
        assert sg.copy_in(bytes(range(200))) == 200
        assert m[100:200] == bytes(range(100))
        assert m[4096:4196] == bytes(range(100, 200))
        assert sg.copy_out(50, 100) == bytes(range(50, 150))
        del sg, mv
    finally:
        m.close()


def test_non_byte_format_views_are_cast():
    import array

    a = array.array("I", [0, 0])
    sg = SGList([memoryview(a)])
    assert sg.length == 8
    sg.copy_in(b"\x01\x00\x00\x00\x02\x00\x00\x00")
    assert list(a) == [1, 2]


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=0, max_size=8),
    data=st.data(),
)
def test_views_for_matches_flat_model(sizes, data):
    bufs = [bytearray(n) for n in sizes]
    sg = SGList([memoryview(b) for b in bufs])
    total = sum(sizes)
    assert sg.length == total
    payload = bytes((i * 7 + 3) & 0xFF for i in range(total))
    assert sg.copy_in(payload) == total
    assert b"".join(bufs) == payload
    off = data.draw(st.integers(0, total))
    n = data.draw(st.integers(0, total - off))
    views = sg.views_for(off, n)
    assert sum(len(v) for v in views) == n
    assert all(len(v) for v in views)
    assert b"".join(bytes(v) for v in views) == payload[off:off + n]
    assert sg.copy_out(off, n) == payload[off:off + n]
