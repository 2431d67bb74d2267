"""The data path: READ/WRITE/VERIFY/SYNCHRONIZE CACHE/UNMAP/WRITE SAME/GET LBA STATUS,
IoPlans, and backend error → sense mapping, against real files."""
from __future__ import annotations

import errno
import os
import random
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest

from vscsid.workers.backends import FileBackend, NullBackend, open_backend
from vscsid.workers.scsi import Disk, DiskInfo, IoPlan, ScsiResult, ScsiTarget, SGList

from .scsi_support import make_disk as _make_disk

GOOD, CHECK = 0x00, 0x02
BS = 512
BLOCKS = 2048


def make_disk(tmp_path, blocks=BLOCKS, bs=BS, name="disk.img", backend_cls=FileBackend, **kw):
    return _make_disk(tmp_path, blocks, bs, name, backend_cls=backend_cls, **kw)


def split(data: bytes, cuts) -> SGList:
    """An SGList over a copy of ``data`` with segment boundaries at ``cuts``."""
    bufs = []
    prev = 0
    for c in list(cuts) + [len(data)]:
        bufs.append(bytearray(data[prev:c]))
        prev = c
    return SGList([memoryview(b) for b in bufs])


def segs(*sizes):
    bufs = [bytearray(n) for n in sizes]
    return SGList([memoryview(b) for b in bufs]), bufs


def fixed(key, asc, ascq, sks=b"\x00\x00\x00", info=None):
    b0 = 0x70 if info is None else 0xF0
    return bytes([b0, 0, key]) + (info or 0).to_bytes(4, "big") + bytes([10, 0, 0, 0, 0, asc, ascq, 0]) + sks


def rw10(op, lba, n, flags=0):
    return bytes([op, flags]) + lba.to_bytes(4, "big") + bytes([0]) + n.to_bytes(2, "big") + bytes([0])


def rw12(op, lba, n, flags=0):
    return bytes([op, flags]) + lba.to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(2)


def rw16(op, lba, n, flags=0):
    return bytes([op, flags]) + lba.to_bytes(8, "big") + n.to_bytes(4, "big") + bytes(2)


def rw6(op, lba, n):
    return bytes([op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, n, 0])


def file_bytes(disk, offset, n):
    return os.pread(disk.backend.fd, n, offset)


# ----------------------------------------------------------------------------- READ / WRITE

def test_write_read_multi_segment_odd_boundaries(target, disk):
    data = os.urandom(8 * BS)
    res = target.execute(0, rw10(0x2A, 10, 8), split(data, [1, 512, 1513, 1600]), SGList())
    assert res == ScsiResult(GOOD, b"", 0, 8 * BS, False)
    assert file_bytes(disk, 10 * BS, 8 * BS) == data
    out, bufs = segs(7, 3000, 1089, 100)  # 96 bytes more than needed
    res = target.execute(0, rw16(0x88, 10, 8), SGList(), out)
    assert res == ScsiResult(GOOD, b"", 8 * BS, 0, False)
    got = b"".join(bufs)
    assert got[:8 * BS] == data and got[8 * BS:] == bytes(100)


@pytest.mark.parametrize("wop,rop,cdb", [(0x0A, 0x08, rw6), (0x2A, 0x28, rw10), (0xAA, 0xA8, rw12), (0x8A, 0x88, rw16)])
def test_all_read_write_sizes(target, disk, wop, rop, cdb):
    data = os.urandom(3 * BS)
    assert target.execute(0, cdb(wop, 1000, 3), split(data, [700]), SGList()).status == GOOD
    assert file_bytes(disk, 1000 * BS, 3 * BS) == data
    out, bufs = segs(3 * BS)
    assert target.execute(0, cdb(rop, 1000, 3), SGList(), out).data_in_len == 3 * BS
    assert bytes(bufs[0]) == data


def test_rw6_length_zero_means_256(target, disk):
    data = os.urandom(256 * BS)
    res = target.execute(0, rw6(0x0A, 0x1FF00 % BLOCKS, 0), split(data, [BS * 3 + 1]), SGList())
    assert res.status == GOOD and res.data_out_len == 256 * BS
    out, bufs = segs(256 * BS)
    res = target.execute(0, rw6(0x08, 0x1FF00 % BLOCKS, 0), SGList(), out)
    assert res.data_in_len == 256 * BS and bytes(bufs[0]) == data


def test_transfer_length_zero_is_a_no_op(target):
    out, bufs = segs(BS)
    for cdb in (rw10(0x28, 5, 0), rw16(0x88, BLOCKS, 0), rw12(0xAA, 0, 0), rw10(0x2A, BLOCKS, 0)):
        assert target.execute(0, cdb, SGList(), out) == ScsiResult()
    res = target.execute(0, rw10(0x28, BLOCKS + 1, 0), SGList(), out)
    assert res.sense == fixed(5, 0x21, 0)


def test_read_beyond_capacity_and_overflow(target):
    out, _ = segs(4 * BS)
    for cdb in (rw10(0x28, BLOCKS - 1, 2), rw16(0x88, (1 << 64) - 1, 2), rw16(0x88, (1 << 64) - 1, 1),
                rw12(0xA8, 0xFFFFFFFF, 1), rw6(0x08, BLOCKS, 1), rw16(0x8A, BLOCKS, 1)):
        res = target.execute(0, cdb, SGList([bytearray(4 * BS)]), out)
        assert res.sense == fixed(5, 0x21, 0), cdb.hex()


def test_max_transfer_length(target):
    n = 65537
    res = target.execute(0, rw16(0x88, 0, n), SGList(), SGList([bytearray(n * BS)]))
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("c0 000a"))
    res = target.execute(0, rw12(0xAA, 0, n), SGList([bytearray(n * BS)]), SGList())
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("c0 0006"))


def test_overrun_no_io(target, disk):
    os.pwrite(disk.backend.fd, b"\xaa" * 8 * BS, 0)
    out, bufs = segs(100, 8 * BS - 101)
    res = target.execute(0, rw10(0x28, 0, 8), SGList(), out)
    assert res == ScsiResult(GOOD, b"", 0, 0, True)
    assert bufs[0] == bytes(100)
    res = target.execute(0, rw10(0x2A, 0, 8), split(b"\x55" * (8 * BS - 1), [10]), SGList())
    assert res.overrun and file_bytes(disk, 0, 8 * BS) == b"\xaa" * 8 * BS


def test_protect_fields_rejected(target):
    for cdb in (rw10(0x28, 0, 1, 0x20), rw16(0x88, 0, 1, 0x80), rw10(0x2A, 0, 1, 0x40), rw12(0xAA, 0, 1, 0xE0)):
        res = target.execute(0, cdb, SGList([bytearray(BS)]), SGList([bytearray(BS)]))
        assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("cf 0001")), cdb.hex()


def test_dpo_fua_rarc_accepted(target, disk):
    plan = target.plan(0, rw10(0x2A, 0, 1, 0x18), SGList([bytearray(b"z" * BS)]))
    assert isinstance(plan, IoPlan) and plan.op == "write" and plan.fua
    assert plan.finish(plan.run()) == ScsiResult(GOOD, b"", 0, BS, False)
    plan = target.plan(0, rw10(0x2A, 0, 1, 0x10), SGList([bytearray(b"z" * BS)]))
    assert not plan.fua
    res = target.execute(0, rw10(0x28, 0, 1, 0x1C), SGList(), SGList([bytearray(BS)]))
    assert res.status == GOOD


def test_readonly_lun(tmp_path):
    d = make_disk(tmp_path, readonly=True)
    t = ScsiTarget({0: d})
    wp = fixed(7, 0x27, 0)
    dout = SGList([bytearray(16 * BS)])
    unmap_list = struct.pack(">HH4xQI4x", 22, 16, 0, 1)
    for cdb, out in ((rw10(0x2A, 0, 1), dout), (rw6(0x0A, 0, 1), dout), (rw16(0x8A, 0, 1), dout),
                     (rw12(0xAA, 0, 1), dout), (rw10(0x41, 0, 1), dout), (rw16(0x93, 0, 1, 0x09), SGList()),
                     (bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), SGList([bytearray(unmap_list)]))):
        assert t.execute(0, cdb, out, SGList()).sense == wp, cdb.hex()
    assert t.execute(0, rw10(0x28, 0, 1), SGList(), SGList([bytearray(BS)])).status == GOOD


def test_readonly_backend_makes_readonly_disk(tmp_path):
    path = tmp_path / "ro.img"
    with open(path, "wb") as f:
        f.truncate(BLOCKS * BS)
    b = open_backend(str(path), readonly=True)
    d = Disk(DiskInfo.for_backend(b, serial="x", readonly=False), b)
    res = ScsiTarget({0: d}).execute(0, rw10(0x2A, 0, 1), SGList([bytearray(BS)]))
    assert res.sense == fixed(7, 0x27, 0)


def test_write_cache_disabled_forces_fua(target, disk):
    disk.state.wce = False
    plan = target.plan(0, rw10(0x2A, 0, 1), SGList([bytearray(BS)]))
    assert plan.fua


def test_4k_blocks(tmp_path):
    d = make_disk(tmp_path, blocks=64, bs=4096)
    t = ScsiTarget({0: d})
    data = os.urandom(2 * 4096)
    assert t.execute(0, rw10(0x2A, 62, 2), split(data, [4095]), SGList()).status == GOOD
    assert file_bytes(d, 62 * 4096, 8192) == data
    res = t.execute(0, rw10(0x28, 63, 2), SGList(), SGList([bytearray(8192)]))
    assert res.sense == fixed(5, 0x21, 0)


# ----------------------------------------------------------------------------- VERIFY / SYNC CACHE

def _verify(op, lba, n, bytchk):
    return (rw10 if op == 0x2F else rw16)(op, lba, n, bytchk << 1)


def test_verify(target, disk):
    data = os.urandom(4 * BS)
    target.execute(0, rw10(0x2A, 100, 4), SGList([bytearray(data)]))
    assert target.execute(0, _verify(0x2F, 100, 4, 0)) == ScsiResult()
    res = target.execute(0, _verify(0x2F, 100, 4, 1), split(data, [3, 1000]))
    assert res == ScsiResult(GOOD, b"", 0, 4 * BS, False)
    bad = bytearray(data)
    bad[1234] ^= 1
    res = target.execute(0, _verify(0x8F, 100, 4, 1), SGList([bad]))
    assert res.status == CHECK and res.sense == fixed(0x0E, 0x1D, 0, info=1234)
    assert target.execute(0, _verify(0x8F, 100, 4, 1), SGList([bytearray(4 * BS - 1)])).overrun
    assert target.execute(0, _verify(0x2F, BLOCKS - 1, 2, 0)).sense == fixed(5, 0x21, 0)
    assert target.execute(0, _verify(0x2F, 0, 1, 2)).sense == fixed(5, 0x24, 0, bytes.fromhex("ca 0001"))
    assert target.execute(0, rw10(0x2F, 0, 1, 0x20)).sense == fixed(5, 0x24, 0, bytes.fromhex("cf 0001"))


def test_verify_single_block_compare(target):
    block = os.urandom(BS)
    target.execute(0, rw10(0x2A, 8, 3), SGList([bytearray(block * 3)]))
    res = target.execute(0, _verify(0x2F, 8, 3, 3), SGList([bytearray(block)]))
    assert res == ScsiResult(GOOD, b"", 0, BS, False)
    res = target.execute(0, _verify(0x2F, 8, 4, 3), SGList([bytearray(block)]))
    assert res.sense == fixed(0x0E, 0x1D, 0, info=3 * BS + next(i for i in range(BS) if block[i]))


def test_verify_large_chunked(tmp_path):
    d = make_disk(tmp_path, blocks=8192)
    t = ScsiTarget({0: d})
    data = os.urandom(5000 * BS)  # > VERIFY_CHUNK
    assert t.execute(0, rw16(0x8A, 0, 5000), SGList([bytearray(data)])).status == GOOD
    assert t.execute(0, _verify(0x8F, 0, 5000, 1), SGList([bytearray(data)])).status == GOOD
    bad = bytearray(data)
    bad[-1] ^= 0xFF
    assert t.execute(0, _verify(0x8F, 0, 5000, 1), SGList([bad])).sense == fixed(0x0E, 0x1D, 0, info=len(data) - 1)


def test_synchronize_cache(target):
    for cdb in (bytes([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]), bytes([0x35, 2, 0, 0, 0, 10, 0, 0, 5, 0]),
                rw16(0x91, 0, 0), rw16(0x91, 0, BLOCKS, 0x02)):
        plan = target.plan(0, cdb)
        assert isinstance(plan, IoPlan) and plan.op == "flush"
        assert target.execute(0, cdb) == ScsiResult()
    assert target.execute(0, rw16(0x91, BLOCKS - 1, 2)).sense == fixed(5, 0x21, 0)
    assert target.execute(0, rw16(0x91, BLOCKS + 1, 0)).sense == fixed(5, 0x21, 0)


# ----------------------------------------------------------------------------- UNMAP / WRITE SAME / GET LBA STATUS

def unmap_cdb(plen, anchor=False):
    return bytes([0x42, 1 if anchor else 0, 0, 0, 0, 0, 0]) + plen.to_bytes(2, "big") + bytes([0])


def unmap_list(*ranges):
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", len(body) + 6, len(body)) + body


def lba_status(target, lba, alloc=4096):
    buf = bytearray(alloc)
    cdb = bytes([0x9E, 0x12]) + lba.to_bytes(8, "big") + alloc.to_bytes(4, "big") + bytes(2)
    res = target.execute(0, cdb, SGList(), SGList([buf]))
    assert res.status == GOOD, res
    data = bytes(buf[:res.data_in_len])
    (plen,) = struct.unpack_from(">I", data)
    descs = [struct.unpack_from(">QIB", data, 8 + 16 * i) for i in range((len(data) - 8) // 16)]
    return plen, descs


def _fill(target, lba, n):
    data = os.urandom(n * BS)
    assert target.execute(0, rw16(0x8A, lba, n), SGList([bytearray(data)])).status == GOOD
    return data


def test_unmap_punches_holes_and_lba_status(target, disk):
    _fill(target, 0, 64)
    disk.backend.flush()
    blocks_before = os.fstat(disk.backend.fd).st_blocks
    plist = unmap_list((8, 16), (40, 0))
    res = target.execute(0, unmap_cdb(len(plist)), SGList([bytearray(plist)]))
    assert res == ScsiResult(GOOD, b"", 0, len(plist), False)
    fd = disk.backend.fd
    assert os.lseek(fd, 8 * BS, os.SEEK_HOLE) == 8 * BS
    assert os.lseek(fd, 8 * BS, os.SEEK_DATA) == 24 * BS
    assert os.fstat(fd).st_blocks <= blocks_before - 16
    out = bytearray(b"\xff" * 16 * BS)
    target.execute(0, rw10(0x28, 8, 16), SGList(), SGList([out]))
    assert out == bytes(16 * BS)  # LBPRZ
    plen, descs = lba_status(target, 0)
    assert descs == [(0, 8, 0), (8, 16, 1), (24, 40, 0), (64, BLOCKS - 64, 1)]
    assert plen == 4 + 16 * 4
    _, descs = lba_status(target, 10)
    assert descs[0] == (10, 14, 1)
    _, descs = lba_status(target, 0, alloc=24)  # room for one descriptor
    assert descs == [(0, 8, 0)]
    plen, descs = lba_status(target, 0, alloc=16)
    assert plen == 4 + 16 and descs == []  # truncated: the length field still says one descriptor


def test_get_lba_status_errors(target):
    cdb = bytes([0x9E, 0x12]) + BLOCKS.to_bytes(8, "big") + (64).to_bytes(4, "big") + bytes(2)
    assert target.execute(0, cdb, SGList(), SGList([bytearray(64)])).sense == fixed(5, 0x21, 0)
    cdb = bytes([0x9E, 0x12]) + bytes(8) + bytes(4) + bytes(2)
    assert target.execute(0, cdb, SGList(), SGList([bytearray(64)])) == ScsiResult()


def test_get_lba_status_null_and_thick(tmp_path):
    b = NullBackend("1M")
    t = ScsiTarget({0: Disk(DiskInfo.for_backend(b, serial="n"), b)})
    assert lba_status(t, 5)[1] == [(5, 2048 - 5, 1)]
    thick = make_disk(tmp_path, name="thick.img", discard=False)
    t = ScsiTarget({0: thick})
    assert lba_status(t, 0)[1] == [(0, BLOCKS, 1)]  # holes in the file are still reported


def test_unmap_parameter_checks(tmp_path):
    d = make_disk(tmp_path, max_unmap_descriptors=2, max_unmap_bytes=100 * BS)
    t = ScsiTarget({0: d})

    def unmap(plist, plen=None, anchor=False, buf=None):
        plen = len(plist) if plen is None else plen
        return t.execute(0, unmap_cdb(plen, anchor), SGList([bytearray(plist if buf is None else buf)]))

    assert unmap(b"", 0) == ScsiResult()
    assert unmap(unmap_list((0, 1)), anchor=True).sense == fixed(5, 0x24, 0, bytes.fromhex("c8 0001"))
    assert unmap(bytes(6)).sense == fixed(5, 0x1A, 0)
    good = unmap_list((0, 1), (5, 5))
    assert unmap(good, buf=good[:-1]).overrun
    partial = bytearray(good[:-1])
    partial[0:4] = struct.pack(">HH", 37, 31)
    assert unmap(bytes(partial)) == ScsiResult(GOOD, b"", 0, 39)  # an incomplete descriptor is ignored
    bad_len = bytearray(good)
    bad_len[2:4] = (48).to_bytes(2, "big")
    assert unmap(bytes(bad_len)).sense == fixed(5, 0x1A, 0)
    bad_len = bytearray(good)
    bad_len[0:2] = (100).to_bytes(2, "big")
    assert unmap(bytes(bad_len)).sense == fixed(5, 0x1A, 0)
    assert unmap(unmap_list((0, 1), (2, 1), (4, 1))).sense == fixed(5, 0x26, 0, bytes.fromhex("80 0002"))
    assert unmap(unmap_list((BLOCKS - 1, 2))).sense == fixed(5, 0x21, 0)
    assert unmap(unmap_list(((1 << 64) - 1, 2))).sense == fixed(5, 0x21, 0)
    assert unmap(unmap_list((0, 60), (100, 41))).sense == fixed(5, 0x26, 0, bytes.fromhex("80 0020"))
    assert unmap(unmap_list((0, 60), (100, 40))).status == GOOD
    # what the block limits page promises
    buf = bytearray(64)
    t.execute(0, bytes([0x12, 1, 0xB0, 0, 64, 0]), SGList(), SGList([buf]))
    assert struct.unpack_from(">II", buf, 20) == (100, 2)


def test_write_same_pattern(tmp_path):
    d = make_disk(tmp_path, blocks=8192)
    t = ScsiTarget({0: d})
    block = os.urandom(BS)
    res = t.execute(0, rw10(0x41, 10, 4000), SGList([bytearray(block)]))  # > WRITE_SAME_CHUNK
    assert res == ScsiResult(GOOD, b"", 0, BS, False)
    assert file_bytes(d, 10 * BS, 4000 * BS) == block * 4000
    assert file_bytes(d, 9 * BS, BS) == bytes(BS) and file_bytes(d, 4010 * BS, BS) == bytes(BS)
    # UNMAP bit with non-zero data: the data is written (LBPRZ=1 forbids deallocating it)
    res = t.execute(0, rw16(0x93, 5000, 8, 0x08), SGList([bytearray(block)]))
    assert res.status == GOOD and file_bytes(d, 5000 * BS, 8 * BS) == block * 8
    assert lba_status(t, 5000)[1][0][2] == 0


def test_write_same_unmap_zero_block(target, disk):
    _fill(target, 0, 64)
    res = target.execute(0, rw16(0x93, 16, 16, 0x08), SGList([bytearray(BS)]))
    assert res == ScsiResult(GOOD, b"", 0, BS, False)
    assert os.lseek(disk.backend.fd, 16 * BS, os.SEEK_HOLE) == 16 * BS
    assert lba_status(target, 0)[1][:3] == [(0, 16, 0), (16, 16, 1), (32, 32, 0)]
    # NDOB: no data-out buffer, zeros
    res = target.execute(0, rw16(0x93, 40, 8, 0x09), SGList(), SGList())
    assert res == ScsiResult(GOOD, b"", 0, 0, False)
    assert file_bytes(disk, 40 * BS, 8 * BS) == bytes(8 * BS)
    assert lba_status(target, 40)[1][0] == (40, 8, 1)
    # WRITE SAME(10) UNMAP
    res = target.execute(0, rw10(0x41, 48, 8, 0x08), SGList([bytearray(BS)]))
    assert res.status == GOOD and file_bytes(disk, 48 * BS, 8 * BS) == bytes(8 * BS)


def test_write_same_zero_without_unmap(target, disk):
    _fill(target, 0, 16)
    res = target.execute(0, rw10(0x41, 0, 16), SGList([bytearray(BS)]))
    assert res.status == GOOD and file_bytes(disk, 0, 16 * BS) == bytes(16 * BS)
    res = target.execute(0, rw16(0x93, 0, 16, 0x01), SGList())  # NDOB without UNMAP
    assert res == ScsiResult(GOOD, b"", 0, 0, False)


def test_write_same_errors(tmp_path):
    d = make_disk(tmp_path, max_write_same_bytes=64 * BS)
    t = ScsiTarget({0: d})
    one = SGList([bytearray(b"\x01" * BS)])
    cases = [
        (rw10(0x41, 0, 0), fixed(5, 0x24, 0, bytes.fromhex("c0 0007"))),  # WSNZ=1
        (rw16(0x93, 0, 0), fixed(5, 0x24, 0, bytes.fromhex("c0 000a"))),
        (rw10(0x41, 0, 65), fixed(5, 0x24, 0, bytes.fromhex("c0 0007"))),  # > max write same length
        (rw10(0x41, 0, 1, 0x10), fixed(5, 0x24, 0, bytes.fromhex("cc 0001"))),  # ANCHOR
        (rw16(0x93, 0, 1, 0x04), fixed(5, 0x24, 0, bytes.fromhex("ca 0001"))),  # PBDATA
        (rw10(0x41, 0, 1, 0x02), fixed(5, 0x24, 0, bytes.fromhex("c9 0001"))),  # LBDATA
        (rw10(0x41, 0, 1, 0x20), fixed(5, 0x24, 0, bytes.fromhex("cf 0001"))),  # WRPROTECT
        (rw16(0x93, BLOCKS - 1, 2), fixed(5, 0x21, 0)),
        (rw16(0x93, (1 << 64) - 1, 2), fixed(5, 0x21, 0)),
        (rw10(0x41, 0, 1, 0x01), fixed(5, 0x24, 0, bytes.fromhex("c8 0001"))),  # reserved in (10)
    ]
    for cdb, expect in cases:
        assert t.execute(0, cdb, one).sense == expect, cdb.hex()
    assert t.execute(0, rw10(0x41, 0, 1), SGList([bytearray(BS - 1)])).overrun


def test_write_same_without_discard_writes_zeros(tmp_path):
    d = make_disk(tmp_path, discard=False)
    t = ScsiTarget({0: d})
    t.execute(0, rw10(0x2A, 0, 4), SGList([bytearray(b"\x07" * 4 * BS)]))
    plan = t.plan(0, rw16(0x93, 0, 4, 0x08), SGList([bytearray(BS)]))
    assert plan.op == "write_same" and plan.args == (None, False, False)
    assert plan.finish(plan.run()).status == GOOD
    assert file_bytes(d, 0, 4 * BS) == bytes(4 * BS)


# ----------------------------------------------------------------------------- plans

def test_plan_run_finish_equals_execute(tmp_path):
    d1 = make_disk(tmp_path, name="a.img")
    d2 = make_disk(tmp_path, name="b.img")
    t1, t2 = ScsiTarget({0: d1}), ScsiTarget({0: d2})
    rnd = random.Random(7)
    payload = bytes(rnd.getrandbits(8) for _ in range(16 * BS))
    unmap = unmap_list((2, 3))
    commands = [
        (rw10(0x2A, 0, 16), payload, 0),
        (rw16(0x88, 0, 16), b"", 16 * BS),
        (rw16(0x88, 0, 16, 0x08), b"", 16 * BS),
        (rw10(0x2F, 0, 16, 0x02), payload, 0),
        (rw10(0x2F, 0, 16, 0x02), payload[::-1], 0),
        (rw10(0x35, 0, 0), b"", 0),
        (rw10(0x41, 20, 9), payload[:BS], 0),
        (unmap_cdb(len(unmap)), unmap, 0),
        (rw16(0x93, 40, 4, 0x09), b"", 0),
        (rw10(0x28, BLOCKS, 1), b"", BS),
        (bytes([0x12, 0, 0, 0, 96, 0]), b"", 96),
    ]
    for cdb, out, inlen in commands:
        in1, in2 = bytearray(inlen + 3), bytearray(inlen + 3)
        r1 = t1.execute(0, cdb, SGList([bytearray(out)]) if out else SGList(), SGList([in1]))
        p = t2.plan(0, cdb, SGList([bytearray(out)]) if out else SGList(), SGList([in2]))
        if isinstance(p, IoPlan):
            try:
                r2 = p.finish(p.run())
            except Exception as e:  # noqa: BLE001 - mirrors execute()
                r2 = p.finish(e)
        else:
            r2 = p
        assert r1 == r2, cdb.hex()
        assert in1 == in2
    assert file_bytes(d1, 0, 64 * BS) == file_bytes(d2, 0, 64 * BS)


def test_plans_out_of_order_on_a_thread_pool(tmp_path):
    d = make_disk(tmp_path)
    t = ScsiTarget({0: d})
    blocks = {lba: os.urandom(4 * BS) for lba in range(0, 400, 4)}
    plans = [t.plan(0, rw10(0x2A, lba, 4), split(data, [lba % 7 + 1])) for lba, data in blocks.items()]
    assert all(isinstance(p, IoPlan) for p in plans)
    with ThreadPoolExecutor(8) as pool:
        futures = [(p, pool.submit(p.run)) for p in plans]
        results = [p.finish(f.result()) for p, f in reversed(futures)]
    assert all(r == ScsiResult(GOOD, b"", 0, 4 * BS) for r in results)
    bufs = {lba: bytearray(4 * BS) for lba in blocks}
    plans = [t.plan(0, rw10(0x28, lba, 4), SGList(), SGList([bufs[lba]])) for lba in blocks]
    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda p: p.finish(p.run()), plans[::-1]))
    assert all(r.data_in_len == 4 * BS for r in done)
    assert all(bytes(bufs[lba]) == data for lba, data in blocks.items())


def test_plan_attributes(target):
    out = SGList([bytearray(2 * BS)])
    p = target.plan(0, rw16(0x8A, 7, 2, 0x08), out)
    assert (p.op, p.offset, p.length, p.lba, p.nblocks, p.fua) == ("write", 7 * BS, 2 * BS, 7, 2, True)
    assert sum(len(v) for v in p.views) == 2 * BS
    assert (p.data_in_len, p.data_out_len) == (0, 2 * BS)
    p = target.plan(0, rw10(0x28, 3, 1), SGList(), SGList([bytearray(BS)]))
    assert (p.op, p.offset, p.data_in_len, p.fua) == ("read", 3 * BS, BS, False)
    assert "read" in repr(p)


def test_finish_short_transfer_is_a_medium_error(target):
    p = target.plan(0, rw10(0x28, 9, 4), SGList(), SGList([bytearray(4 * BS)]))
    assert p.finish(2 * BS + 10).sense == fixed(3, 0x11, 0, info=11)


# ----------------------------------------------------------------------------- backend errors

class FaultyBackend(FileBackend):
    """A real file backend that fails on demand (the one place a fake is fine)."""

    fail_errno: int | None = None

    def _maybe_fail(self):
        if self.fail_errno is not None:
            raise OSError(self.fail_errno, os.strerror(self.fail_errno))

    def readv(self, views, offset):
        self._maybe_fail()
        return super().readv(views, offset)

    def writev(self, views, offset, fua=False):
        self._maybe_fail()
        return super().writev(views, offset, fua)

    def flush(self):
        self._maybe_fail()
        super().flush()

    def discard(self, offset, length):
        self._maybe_fail()
        super().discard(offset, length)

    def write_zeroes(self, offset, length, unmap=False):
        self._maybe_fail()
        super().write_zeroes(offset, length, unmap)

    def block_status(self, offset):
        self._maybe_fail()
        return super().block_status(offset)


class ListLog:
    def __init__(self):
        self.events = []

    def warning(self, event, **kw):
        self.events.append((event, kw))

    error = warning


@pytest.fixture
def faulty(tmp_path):
    d = make_disk(tmp_path, backend_cls=FaultyBackend)
    log = ListLog()
    return d, ScsiTarget({0: d}, log=log), log


def test_eio_on_read_and_write(faulty):
    d, t, log = faulty
    d.backend.fail_errno = errno.EIO
    res = t.execute(0, rw10(0x28, 0x123, 2), SGList(), SGList([bytearray(2 * BS)]))
    assert res.status == CHECK and res.sense == fixed(3, 0x11, 0, info=0x123)
    assert res.data_in_len == 0
    res = t.execute(0, rw16(0x8A, 0x77, 1), SGList([bytearray(BS)]))
    assert res.sense == fixed(3, 0x0C, 0, info=0x77)
    res = t.execute(0, rw10(0x35, 0, 0))
    assert res.sense == fixed(3, 0x0C, 0)
    res = t.execute(0, rw10(0x2F, 5, 1, 0x02), SGList([bytearray(BS)]))
    assert res.sense == fixed(3, 0x11, 0, info=5)
    assert log.events[0][0] == "scsi_io_error" and log.events[0][1]["errno"] == errno.EIO
    assert log.events[0][1]["op"] == "read" and log.events[0][1]["lba"] == 0x123


def test_eio_descriptor_format_carries_64bit_lba(tmp_path):
    d = make_disk(tmp_path, backend_cls=FaultyBackend)
    d.state.d_sense = True
    d.backend.fail_errno = errno.EIO
    plan = ScsiTarget({0: d}).plan(0, rw10(0x28, 3, 1), SGList(), SGList([bytearray(BS)]))
    plan.lba = 1 << 33  # as if the disk were huge
    res = plan.finish(OSError(errno.EIO, "boom"))
    assert res.sense == bytes.fromhex("72 03 11 00 000000 0c 00 0a 80 00 0000000200000000")


def test_enospc_and_other_errors(faulty):
    d, t, log = faulty
    d.backend.fail_errno = errno.ENOSPC
    res = t.execute(0, rw10(0x2A, 0, 1), SGList([bytearray(BS)]))
    assert res.sense == fixed(7, 0x27, 0x07)
    res = t.execute(0, rw10(0x41, 0, 4), SGList([bytearray(b"\x01" * BS)]))
    assert res.sense == fixed(7, 0x27, 0x07)
    d.backend.fail_errno = errno.EPERM
    res = t.execute(0, rw10(0x28, 0, 1), SGList(), SGList([bytearray(BS)]))
    assert res.sense == fixed(4, 0x44, 0)
    plist = unmap_list((0, 8))
    res = t.execute(0, unmap_cdb(len(plist)), SGList([bytearray(plist)]))
    assert res.sense == fixed(4, 0x44, 0)
    d.backend.fail_errno = errno.EIO
    cdb = bytes([0x9E, 0x12]) + bytes(8) + (64).to_bytes(4, "big") + bytes(2)
    assert t.execute(0, cdb, SGList(), SGList([bytearray(64)])).sense == fixed(4, 0x44, 0)
    assert {e for e, _ in log.events} == {"scsi_io_error", "scsi_lba_status_error"}


def test_non_oserror_from_run_is_internal_failure(target):
    p = target.plan(0, rw10(0x28, 0, 1), SGList(), SGList([bytearray(BS)]))
    assert p.finish(RuntimeError("bug")).sense == fixed(4, 0x44, 0)


def test_disk_logger_preferred(tmp_path):
    log = ListLog()
    path = tmp_path / "d.img"
    with open(path, "wb") as f:
        f.truncate(BLOCKS * BS)
    b = FaultyBackend(str(path))
    d = Disk(DiskInfo.for_backend(b, serial="x"), b, log=log)
    b.fail_errno = errno.EIO
    ScsiTarget({0: d}).execute(0, rw10(0x28, 0, 1), SGList(), SGList([bytearray(BS)]))
    assert log.events and log.events[0][0] == "scsi_io_error"
