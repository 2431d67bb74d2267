"""atheris harness: the device-side split virtqueue and the virtio-scsi framing.

Guest memory is three memfd regions (two adjacent, one behind a gap) mapped by
``GuestMemory``. Each input fills the descriptor table, four indirect tables and
the available ring, then pops and walks every head. Checked: ``pop_heads`` /
``walk`` raise nothing but ``RingError`` / ``ChainError``, every view of a chain
lies inside one region's mapping, the lengths add up, and the request framing
helpers (``gather``, ``split_views``, ``decode_lun``, ``scatter``) stay inside
the views.

Run: ``python tests/fuzz/fuzz_virtqueue.py -atheris_runs=200000``.
"""
from __future__ import annotations

import mmap
import os
import struct
import sys

import atheris

with atheris.instrument_imports():
    from vscsid.virtio.memory import GuestMemory, RegionSpec
    from vscsid.virtio import scsi_wire as R
    from vscsid.virtio import splitq as V

from vscsid.virtio._ring import ffi

REGIONS = ((0x0, 0x10000), (0x30000, 0x8000), (0x38000, 0x4000))
DESC, AVAIL, USED = 0x0, 0x2000, 0x3000
TABLES = (0x4000, 0x30000 + 0x1000, 0x38000 + 0x4000 - 64, 0x10000 - 32)
OFFSET = 4096


def _setup():
    fds, maps, specs = [], [], []
    for i, (gpa, size) in enumerate(REGIONS):
        fd = os.memfd_create(f"fuzz-{i}", os.MFD_CLOEXEC)
        os.ftruncate(fd, OFFSET + size)
        fds.append(fd)
        maps.append(mmap.mmap(fd, OFFSET + size))
        specs.append(RegionSpec(gpa, size, 0x7F00_0000_0000 + (i << 24), OFFSET))
    mem = GuestMemory.map(specs, fds)
    ranges = []
    for r in mem.regions:
        p = ffi.from_buffer(r.view)
        ranges.append((int(ffi.cast("uintptr_t", p)), r.size))
        ffi.release(p)
    return mem, maps, ranges


MEM, MAPS, RANGES = _setup()


def write(gpa, data):
    for (rg, size), m in zip(REGIONS, MAPS):
        if rg <= gpa < rg + size:
            data = data[:rg + size - gpa]
            m[OFFSET + gpa - rg:OFFSET + gpa - rg + len(data)] = data
            return


def addr_of(view):
    p = ffi.from_buffer(view)
    try:
        return int(ffi.cast("uintptr_t", p)), len(view)
    finally:
        ffi.release(p)


def inside(view):
    a, n = addr_of(view)
    return any(base <= a and a + n <= base + size for base, size in RANGES)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    size = 1 << fdp.ConsumeIntInRange(0, 6)
    for (_, sz), m in zip(REGIONS, MAPS):
        m[OFFSET:OFFSET + sz] = bytes(sz)
    write(DESC, fdp.ConsumeBytes(16 * size))
    for t in TABLES:
        write(t, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
    last = fdp.ConsumeIntInRange(0, 0xFFFF)
    idx = (last + fdp.ConsumeIntInRange(0, size + 2)) & 0xFFFF if fdp.ConsumeBool() \
        else fdp.ConsumeIntInRange(0, 0xFFFF)
    write(AVAIL, struct.pack("<HH", 0, idx) + fdp.ConsumeBytes(2 * size))
    q = V.SplitQueue(MEM, size, DESC, AVAIL, USED, event_idx=fdp.ConsumeBool(), last_avail=last)
    try:
        try:
            heads = q.pop_heads()
        except V.RingError:
            return
        for head in heads:
            assert 0 <= head < size
            try:
                chain = q.walk(head)
            except V.ChainError:
                q.push(head, 0)
                continue
            assert chain.out_len == sum(len(v) for v in chain.out)
            assert chain.in_len == sum(len(v) for v in chain.in_)
            for v in chain.out + chain.in_:
                assert inside(v), "a view outside guest memory"
            hdr = R.gather(chain.out, 51)
            assert len(hdr) == min(51, chain.out_len)
            if len(hdr) >= 8:
                R.decode_lun(hdr[:8])
            rest = R.split_views(chain.out, min(51, chain.out_len))
            assert sum(len(v) for v in rest) == chain.out_len - len(hdr)
            n = R.scatter(chain.in_, b"\x5a" * 20)
            assert n == min(20, chain.in_len)
            q.push(head, n)
        q.publish()
        q.should_notify()
        q.enable_kicks()
    finally:
        q.release()


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
