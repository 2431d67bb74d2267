"""MODE SENSE / MODE SELECT and the shared LunState."""
from __future__ import annotations

import mmap
import struct

import pytest

from vscsid.workers.backends import open_backend
from vscsid.workers.scsi import Disk, DiskInfo, LunState, ScsiResult, ScsiTarget, SGList

from .scsi_support import make_disk as _make_disk

GOOD, CHECK = 0x00, 0x02

RW_ERR = bytes([0x01, 0x0A, 0x80]) + bytes(9)
CACHING_WCE = bytes([0x08, 0x12, 0x04]) + bytes(17)
CACHING_NOWCE = bytes([0x08, 0x12, 0x00]) + bytes(17)
CONTROL = bytes([0x0A, 0x0A, 0x00, 0x10]) + bytes(8)


def make_disk(tmp_path, blocks=2048, bs=512, name="disk.img", state=None, **kw):
    # Two Disks may share one image here (LunState tests): do not truncate it again.
    return _make_disk(tmp_path, blocks, bs, name, state=state, reuse=True, **kw)


def run(target, cdb, n=4096, data_out=b"", lun=0):
    buf = bytearray(n)
    out = SGList([memoryview(bytearray(data_out))]) if data_out else SGList()
    res = target.execute(lun, bytes(cdb), out, SGList([memoryview(buf)]))
    return res, bytes(buf[:res.data_in_len])


def fixed(key, asc, ascq, sks=b"\x00\x00\x00"):
    return bytes([0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0]) + sks


def sense6(page, pc=0, dbd=True, alloc=255, subpage=0):
    return [0x1A, 0x08 if dbd else 0, (pc << 6) | page, subpage, alloc, 0]


def sense10(page, pc=0, dbd=True, llbaa=False, alloc=4096, subpage=0):
    b1 = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return [0x5A, b1, (pc << 6) | page, subpage, 0, 0, 0, alloc >> 8, alloc & 0xFF, 0]


def select6(plen, pf=True, sp=False):
    return [0x15, (0x10 if pf else 0) | (0x01 if sp else 0), 0, 0, plen, 0]


def select10(plen, pf=True, sp=False):
    return [0x55, (0x10 if pf else 0) | (0x01 if sp else 0), 0, 0, 0, 0, 0, plen >> 8, plen & 0xFF, 0]


@pytest.fixture
def disk(tmp_path):
    return make_disk(tmp_path)


# ----------------------------------------------------------------------------- MODE SENSE

def test_mode_sense6_caching_page(target):
    res, data = run(target, sense6(0x08))
    assert res == ScsiResult(GOOD, b"", 24, 0, False)
    assert data == bytes([23, 0, 0x10, 0]) + CACHING_WCE


def test_mode_sense6_all_pages_with_block_descriptor(target):
    res, data = run(target, sense6(0x3F, dbd=False))
    body = RW_ERR + CACHING_WCE + CONTROL
    assert data == bytes([4 + 8 + len(body) - 1, 0, 0x10, 8]) + bytes.fromhex("00000800 00000200") + body
    res, data2 = run(target, sense6(0x3F, dbd=False, subpage=0xFF))
    assert data2 == data


def test_mode_sense10_long_block_descriptor(target):
    res, data = run(target, sense10(0x0A, dbd=False, llbaa=True))
    assert data == (bytes.fromhex("0022 00 10 01 00 0010")
                    + bytes.fromhex("0000000000000800 00000000 00000200") + CONTROL)
    res, data = run(target, sense10(0x0A, dbd=False))
    assert data == bytes.fromhex("001a 00 10 00 00 0008") + bytes.fromhex("00000800 00000200") + CONTROL
    res, data = run(target, sense10(0x01))
    assert data == bytes.fromhex("0012 00 10 00 00 0000") + RW_ERR


def test_mode_sense_changeable_and_default(target, disk):
    _, data = run(target, sense6(0x08, pc=1))
    assert data[4:] == bytes([0x08, 0x12, 0x04]) + bytes(17)
    _, data = run(target, sense6(0x0A, pc=1))
    assert data[4:] == bytes([0x0A, 0x0A, 0x04]) + bytes(9)
    _, data = run(target, sense6(0x01, pc=1))
    assert data[4:] == bytes([0x01, 0x0A]) + bytes(10)
    disk.state.wce = False
    _, data = run(target, sense6(0x08, pc=2))
    assert data[4:] == CACHING_WCE  # default: the configured write cache
    _, data = run(target, sense6(0x08, pc=0))
    assert data[4:] == CACHING_NOWCE


def test_mode_sense_errors(target):
    res, _ = run(target, sense6(0x08, pc=3))
    assert res.sense == fixed(5, 0x39, 0)
    res, _ = run(target, sense6(0x1C))
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("cd 0002"))
    res, _ = run(target, sense6(0x08, subpage=1))
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("c0 0003"))
    res, _ = run(target, sense10(0x3F, subpage=2))
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("c0 0003"))


def test_mode_sense_truncation(target):
    res, data = run(target, sense6(0x3F, dbd=False, alloc=10))
    assert res.status == GOOD and res.data_in_len == 10 and data[0] == 55
    res, data = run(target, sense10(0x3F, alloc=3))
    assert res.data_in_len == 3 and data == bytes.fromhex("003200")  # 8 + 44 - 2


def test_mode_sense_write_protect(tmp_path):
    d = make_disk(tmp_path, readonly=True)
    _, data = run(ScsiTarget({0: d}), sense6(0x08))
    assert data[2] == 0x90  # WP | DPOFUA
    _, data = run(ScsiTarget({0: d}), sense10(0x08))
    assert data[3] == 0x90


def test_mode_sense_capacity_clamp():
    from vscsid.workers.backends import NullBackend

    b = NullBackend("4T")
    t = ScsiTarget({0: Disk(DiskInfo.for_backend(b, serial="n"), b)})
    _, data = run(t, sense6(0x08, dbd=False))
    assert data[4:12] == bytes.fromhex("ffffffff 00000200")


# ----------------------------------------------------------------------------- MODE SELECT

def _caching_page(target):
    _, data = run(target, sense6(0x08))
    return bytearray(data[4:])


def test_mode_select_changes_wce(target, disk):
    page = _caching_page(target)
    page[2] &= ~0x04
    plist = bytes(4) + bytes(page)
    res, _ = run(target, select6(len(plist)), data_out=plist)
    assert res == ScsiResult(GOOD, b"", 0, len(plist), False)
    assert disk.state.wce is False
    _, data = run(target, sense6(0x08))
    assert data[4:] == CACHING_NOWCE
    # writes are now write-through
    plan = target.plan(0, bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), SGList([bytearray(512)]))
    assert plan.fua is True
    # and back on, through MODE SELECT(10) with a block descriptor
    page[2] |= 0x04
    plist = bytes.fromhex("0000 00 00 00 00 0008") + bytes.fromhex("00000800 00000200") + bytes(page)
    res, _ = run(target, select10(len(plist)), data_out=plist)
    assert res.status == GOOD and disk.state.wce is True


def test_mode_select_ps_bit_and_header_bytes_ignored(target, disk):
    page = _caching_page(target)
    page[0] |= 0x80  # PS echoed back from MODE SENSE
    page[2] = 0
    plist = bytes([0x17, 0, 0x10, 0]) + bytes(page)  # mode data length / DPOFUA echoed
    res, _ = run(target, select6(len(plist)), data_out=plist)
    assert res.status == GOOD and not disk.state.wce


def test_mode_select_d_sense_switches_sense_format(target, disk):
    plist = bytes(4) + bytes([0x0A, 0x0A, 0x04, 0x10]) + bytes(8)
    res, _ = run(target, select6(len(plist)), data_out=plist)
    assert res.status == GOOD and disk.state.d_sense
    res, _ = run(target, [0x28, 0xE0] + [0] * 8)
    assert res.sense == bytes.fromhex("72 05 24 00 000000 08 02 06 0000 cf0001 00")
    res, _ = run(target, [0x28, 0, 0, 0, 0x10, 0, 0, 0, 1, 0])
    assert res.sense == bytes.fromhex("72 05 21 00 000000 00")
    _, data = run(target, sense6(0x0A))
    assert data[4:] == bytes([0x0A, 0x0A, 0x04, 0x10]) + bytes(8)


def test_mode_select_rejects_unchangeable(target):
    page = _caching_page(target)
    page[12] |= 0x80  # FSW is not changeable
    plist = bytes(4) + bytes(page)
    res, _ = run(target, select6(len(plist)), data_out=plist)
    assert res.sense == fixed(5, 0x26, 0, bytes.fromhex("8f 0010"))
    plist = bytes(4) + RW_ERR[:2] + bytes([0xC0]) + RW_ERR[3:]  # ARRE
    res, _ = run(target, select6(len(plist)), data_out=plist)
    assert res.sense == fixed(5, 0x26, 0, bytes.fromhex("8e 0006"))


def test_mode_select_parameter_errors(target):
    cases = [
        (bytes(4) + bytes([0x1C, 0x0A]) + bytes(10), fixed(5, 0x26, 0, bytes.fromhex("8d 0004"))),  # unknown page
        (bytes(4) + bytes([0x48, 0x12]) + bytes(18), fixed(5, 0x26, 0, bytes.fromhex("8e 0004"))),  # SPF
        (bytes(4) + bytes([0x08, 0x10]) + bytes(16), fixed(5, 0x26, 0, bytes.fromhex("80 0005"))),  # page length
        (bytes(4) + CACHING_WCE[:10], fixed(5, 0x1A, 0)),  # truncated page
        (bytes(4) + CACHING_WCE + b"\x08", fixed(5, 0x1A, 0)),  # a dangling byte
        (bytes([0, 0, 0, 4]) + bytes(4), fixed(5, 0x26, 0, bytes.fromhex("80 0003"))),  # bad BD length
        (bytes([0, 0, 0, 8]) + bytes(4), fixed(5, 0x1A, 0)),  # BD cut short
        (bytes([0, 0, 0, 8]) + bytes.fromhex("00000001 00000200"), fixed(5, 0x26, 0, bytes.fromhex("80 0004"))),
        (bytes([0, 0, 0, 8]) + bytes.fromhex("00000800 00001000"), fixed(5, 0x26, 0, bytes.fromhex("80 0009"))),
        (bytes([0, 0, 0, 8]) + bytes.fromhex("00000800 01000200"), fixed(5, 0x26, 0, bytes.fromhex("80 0008"))),
        (bytes([0, 5, 0, 0]), fixed(5, 0x26, 0, bytes.fromhex("80 0001"))),  # medium type
        (bytes(3), fixed(5, 0x1A, 0)),  # header cut short
    ]
    for plist, expect in cases:
        res, _ = run(target, select6(len(plist)), data_out=plist)
        assert res.sense == expect, plist.hex()


def test_mode_select10_long_block_descriptor(target):
    plist = bytes.fromhex("0000 00 00 01 00 0010") + bytes.fromhex("0000000000000800 00000000 00000200")
    res, _ = run(target, select10(len(plist)), data_out=plist)
    assert res == ScsiResult(GOOD, b"", 0, len(plist), False)
    plist = bytes.fromhex("0000 00 00 00 00 0010") + bytes(16)  # 16 without LONGLBA
    res, _ = run(target, select10(len(plist)), data_out=plist)
    assert res.sense == fixed(5, 0x26, 0, bytes.fromhex("80 0006"))
    res, _ = run(target, select10(7), data_out=bytes(7))
    assert res.sense == fixed(5, 0x1A, 0)


def test_mode_select_cdb_errors(target):
    plist = bytes(4) + CACHING_WCE
    res, _ = run(target, select6(len(plist), pf=False), data_out=plist)
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("cc 0001"))
    res, _ = run(target, select6(len(plist), sp=True), data_out=plist)
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("c8 0001"))
    res, _ = run(target, select10(len(plist), sp=True), data_out=plist)
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("c8 0001"))
    res, _ = run(target, select6(0))
    assert res == ScsiResult()
    res, _ = run(target, select6(len(plist)), data_out=plist[:-1])
    assert res == ScsiResult(GOOD, b"", 0, 0, True)  # overrun: the data-out buffer is short


def test_mode_select_on_readonly_lun_is_allowed(tmp_path):
    d = make_disk(tmp_path, readonly=True)
    plist = bytes(4) + CACHING_NOWCE
    res, _ = run(ScsiTarget({0: d}), select6(len(plist)), data_out=plist)
    assert res.status == GOOD and not d.state.wce


# ----------------------------------------------------------------------------- LunState

def test_lun_state_defaults_and_properties():
    s = LunState()
    assert s.wce and not s.d_sense
    s.d_sense = True
    s.wce = False
    assert (s.wce, s.d_sense) == (False, True)
    assert not LunState(wce=False).wce
    assert repr(s) == "LunState(wce=False, d_sense=True)"


def test_lun_state_from_buffer_uses_owner_initialised_byte():
    page = bytearray(4)
    page[1] = 1  # the supervisor's initial value: WCE on
    a = LunState.from_buffer(memoryview(page)[1:2])
    assert a.wce and not a.d_sense
    a.d_sense = True
    assert page == bytearray([0, 3, 0, 0])
    a.wce = False
    assert page == bytearray([0, 2, 0, 0])
    b = LunState.from_buffer(memoryview(page)[2:3], wce=True, d_sense=False)
    assert page == bytearray([0, 2, 1, 0])
    assert b.wce
    with pytest.raises(ValueError):
        LunState.from_buffer(bytes(1))
    with pytest.raises(ValueError):
        LunState.from_buffer(bytearray(0))


def test_mode_select_visible_through_shared_state(tmp_path):
    """Two Disk objects (as in two worker processes) over one shared page agree on WCE."""
    shm = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        shm[0] = 1
        view = memoryview(shm)
        d1 = make_disk(tmp_path, state=LunState.from_buffer(view[0:1]))
        d2 = make_disk(tmp_path, state=LunState.from_buffer(view[0:1]))
        t1, t2 = ScsiTarget({0: d1}), ScsiTarget({0: d2})
        _, data = run(t2, sense6(0x08))
        assert data[4:] == CACHING_WCE
        plist = bytes(4) + CACHING_NOWCE
        assert run(t1, select6(len(plist)), data_out=plist)[0].status == GOOD
        _, data = run(t2, sense6(0x08))
        assert data[4:] == CACHING_NOWCE
        assert shm[0] == 0
        w = target_plan_fua(t2)
        assert w is True
        plist = bytes(4) + CACHING_WCE
        assert run(t2, select6(len(plist)), data_out=plist)[0].status == GOOD
        assert d1.state.wce and target_plan_fua(t1) is False
        del d1, d2, t1, t2, view
    finally:
        shm.close()


def target_plan_fua(t):
    return t.plan(0, bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), SGList([bytearray(512)])).fua


def test_disk_rejects_bad_geometry(tmp_path):
    path = tmp_path / "x.img"
    with open(path, "wb") as f:
        f.truncate(4096)
    b = open_backend(str(path))
    for kw in ({"block_size": 1000, "num_blocks": 1}, {"block_size": 512, "num_blocks": 9},
               {"block_size": 512, "num_blocks": 0}, {"block_size": 512, "num_blocks": 8, "physical_block_size": 256},
               {"block_size": 512, "num_blocks": 8, "device_id": b"\x60" * 5}):
        with pytest.raises(ValueError):
            Disk(DiskInfo(**kw), b)
    assert struct.unpack(">I", Disk(DiskInfo(num_blocks=8), b).read_capacity_10[:4])[0] == 7
