"""Guest memory table: real memfds, mmap from offset 0, bounds checks."""
from __future__ import annotations

import os

import pytest

from vscsid.virtio.memory import GuestMemory, GuestMemoryError, RegionSpec


def memfd(size: int, fill: bytes = b"") -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill:
        os.pwrite(fd, fill, 0)
    return fd


@pytest.fixture
def fds():
    opened = []

    def make(size, fill=b""):
        fd = memfd(size, fill)
        opened.append(fd)
        return fd

    yield make
    for fd in opened:
        os.close(fd)


def test_mmap_offset_window_and_translation(fds):
    fd = fds(0x30000)
    os.pwrite(fd, b"HELLO", 0x10000)
    mem = GuestMemory.map([RegionSpec(0x100000, 0x20000, 0x7F0000000000, 0x10000)], [fd])
    try:
        assert bytes(mem.gpa_view(0x100000, 5)) == b"HELLO"
        assert mem.uva_to_gpa(0x7F0000000000 + 8, 16) == 0x100008
        mem.gpa_view(0x100000 + 0x20000 - 4, 4)[:] = b"TAIL"
        assert os.pread(fd, 4, 0x10000 + 0x20000 - 4) == b"TAIL"
    finally:
        mem.close()


def test_region_beyond_file_size_is_refused(fds):
    fd = fds(0x10000)
    with pytest.raises(GuestMemoryError, match="only 65536"):
        GuestMemory.map([RegionSpec(0, 0x10000, 0x1000, 0x1000)], [fd])


@pytest.mark.parametrize("specs,match", [
    ([RegionSpec(0, 0x2000, 0x10000, 0), RegionSpec(0x1000, 0x1000, 0x20000, 0)], "overlap in guest"),
    ([RegionSpec(0, 0x1000, 0x10000, 0), RegionSpec(0x1000, 0x1000, 0x10800, 0)], "overlap in front-end"),
    ([RegionSpec(0, 0, 0x10000, 0)], "size 0"),
    ([RegionSpec((1 << 64) - 0x1000, 0x2000, 0x10000, 0)], "overflows"),
])
def test_bad_tables(fds, specs, match):
    with pytest.raises(GuestMemoryError, match=match):
        GuestMemory.map(specs, [fds(0x4000) for _ in specs])


def test_too_many_regions(fds):
    specs = [RegionSpec(i * 0x1000, 0x1000, 0x100000 + i * 0x1000, 0) for i in range(9)]
    with pytest.raises(GuestMemoryError, match="maximum is 8"):
        GuestMemory.map(specs, [fds(0x1000) for _ in specs], max_regions=8)


def test_bounds_and_spanning(fds):
    a, b = fds(0x2000), fds(0x2000)
    mem = GuestMemory.map([RegionSpec(0, 0x2000, 0x10000, 0), RegionSpec(0x2000, 0x2000, 0x40000, 0)],
                          [a, b])
    try:
        views = mem.views(0x1FF0, 0x20)
        assert [len(v) for v in views] == [0x10, 0x10]
        del views  # views pin the mapping: close() refuses while any is alive
        with pytest.raises(GuestMemoryError, match="crosses"):
            mem.gpa_view(0x1FF0, 0x20)
        with pytest.raises(GuestMemoryError, match="not in any region"):
            mem.views(0x3FF0, 0x20)
        with pytest.raises(GuestMemoryError):
            mem.views((1 << 64) - 8, 16)
        with pytest.raises(GuestMemoryError, match="not inside one region"):
            mem.uva_to_gpa(0x11FF0, 0x20)
    finally:
        mem.close()


def test_gap_between_regions(fds):
    a, b = fds(0x1000), fds(0x1000)
    mem = GuestMemory.map([RegionSpec(0, 0x1000, 0x10000, 0),
                           RegionSpec(0x100000000, 0x1000, 0x20000, 0)], [a, b])
    try:
        assert len(mem.gpa_view(0x100000000, 0x1000)) == 0x1000
        with pytest.raises(GuestMemoryError):
            mem.views(0x800, 0x1000)
    finally:
        mem.close()


def test_non_mappable_fd_refused():
    r, w = os.pipe()
    try:
        with pytest.raises(GuestMemoryError, match="not a mappable"):
            GuestMemory.map([RegionSpec(0, 0x1000, 0x1000, 0)], [r])
    finally:
        os.close(r)
        os.close(w)
