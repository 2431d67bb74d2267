"""ScsiTarget emulated commands, byte-exact: INQUIRY/VPD, READ CAPACITY, REPORT LUNS,
REQUEST SENSE, REPORT SUPPORTED OPERATION CODES, LUN addressing, CDB validation."""
from __future__ import annotations

import hashlib
import struct

import pytest

from vscsid.workers.backends import NullBackend
from vscsid.workers.scsi import (
    WLUN_REPORT_LUNS,
    Disk,
    DiskInfo,
    ScsiResult,
    ScsiTarget,
    SGList,
    parse_sense,
)
from vscsid.workers.scsi.cdb import COMMANDS, CONTROL_NACA

from .scsi_support import make_disk

GOOD, CHECK = 0x00, 0x02


def din(n=4096):
    buf = bytearray(n)
    return SGList([memoryview(buf)]), buf


def run(target, cdb, lun=0, n=4096, data_out=b""):
    sg, buf = din(n)
    out = SGList([memoryview(bytearray(data_out))]) if data_out else SGList()
    res = target.execute(lun, bytes(cdb), out, sg)
    return res, bytes(buf[:res.data_in_len])


def fixed(key, asc, ascq, sks=b"\x00\x00\x00", info=None):
    b0 = 0x70 if info is None else 0xF0
    return bytes([b0, 0, key]) + (info or 0).to_bytes(4, "big") + bytes([10, 0, 0, 0, 0, asc, ascq, 0]) + sks


# ----------------------------------------------------------------------------- INQUIRY

def test_inquiry_standard_byte_exact(target):
    res, data = run(target, [0x12, 0, 0, 0, 0xFF, 0])
    assert res == ScsiResult(GOOD, b"", 96, 0, False)
    expect = (
        bytes([0x00, 0x00, 0x07, 0x12, 91, 0x00, 0x00, 0x02])
        + b"VSCSID  " + b"vscsid disk     " + b"0001"
        + bytes(20) + bytes(2)
        + bytes.fromhex("00a0 05c0 0600") + bytes(10)
        + bytes(22)
    )
    assert len(expect) == 96
    assert data == expect


def test_inquiry_allocation_length_truncates(target):
    res, data = run(target, [0x12, 0, 0, 0, 36, 0])
    assert res.status == GOOD and res.data_in_len == 36 and not res.overrun
    assert data[4] == 91  # the ADDITIONAL LENGTH still describes the full data
    res, data = run(target, [0x12, 0, 0, 0, 0xFF, 0], n=5)  # buffer smaller than allocation length
    assert res.status == GOOD and res.data_in_len == 5 and not res.overrun
    res, _ = run(target, [0x12, 0, 0, 0, 0, 0])
    assert res == ScsiResult(GOOD, b"", 0, 0, False)


def test_inquiry_custom_identity(tmp_path):
    d = make_disk(tmp_path, vendor="ACME", product="Widget", revision="9")
    res, data = run(ScsiTarget({0: d}), [0x12, 0, 0, 0, 96, 0])
    assert data[8:36] == b"ACME    Widget          9   "


def test_inquiry_evpd0_page_nonzero_invalid(target):
    res, _ = run(target, [0x12, 0, 0x80, 0, 0xFF, 0])
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("c0 0002"))


def test_inquiry_unknown_vpd_page(target):
    res, _ = run(target, [0x12, 1, 0x87, 0, 0xFF, 0])
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("c0 0002"))


def test_inquiry_cmddt_is_reserved(target):
    res, _ = run(target, [0x12, 0x02, 0, 0, 0xFF, 0])
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("c9 0001"))


def test_vpd_supported_pages(target):
    res, data = run(target, [0x12, 1, 0x00, 0, 0xFF, 0])
    assert data == bytes([0, 0, 0, 6, 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])


def test_vpd_unit_serial(target):
    _, data = run(target, [0x12, 1, 0x80, 0, 0xFF, 0])
    assert data == bytes([0, 0x80, 0, 6]) + b"SN0001"


def test_vpd_device_identification(target, tmp_path):
    _, data = run(target, [0x12, 1, 0x83, 0, 0xFF, 0])
    assert data[:4] == bytes([0, 0x83, 0, 20 + 18])
    naa = data[4:24]
    assert naa[:4] == bytes([0x01, 0x03, 0x00, 16])  # binary, LU, NAA, 16 bytes
    assert naa[4] >> 4 == 6
    assert (int.from_bytes(naa[4:8], "big") >> 4) & 0xFFFFFF == 0x5AC51D
    h = int.from_bytes(hashlib.sha256(b"SN0001").digest(), "big") >> 156
    assert int.from_bytes(naa[4:20], "big") & ((1 << 100) - 1) == h
    t10 = data[24:]
    assert t10 == bytes([0x02, 0x01, 0x00, 14]) + b"VSCSID  " + b"SN0001"
    # stable for the same serial, different for another one
    other = make_disk(tmp_path, name="b.img", serial="SN0002")
    _, data2 = run(ScsiTarget({0: other}), [0x12, 1, 0x83, 0, 0xFF, 0])
    same = make_disk(tmp_path, name="c.img", serial="SN0001")
    _, data3 = run(ScsiTarget({0: same}), [0x12, 1, 0x83, 0, 0xFF, 0])
    assert data2[8:24] != naa[4:] and data3 == data


def test_vpd_device_id_given_as_hex(tmp_path):
    d = make_disk(tmp_path, device_id="6" + "0" * 30 + "1")
    _, data = run(ScsiTarget({0: d}), [0x12, 1, 0x83, 0, 0xFF, 0])
    assert data[8:24] == bytes.fromhex("6" + "0" * 30 + "1")


def test_serial_derived_from_path_when_empty(tmp_path):
    a = make_disk(tmp_path, name="a.img", serial="")
    b = make_disk(tmp_path, name="b.img", serial="")
    assert a.serial != b.serial and len(a.serial) == 20
    assert a.serial == make_disk(tmp_path, name="a.img", serial="").serial


def test_vpd_block_limits(target):
    _, data = run(target, [0x12, 1, 0xB0, 0, 0xFF, 0])
    assert len(data) == 64 and data[:4] == bytes([0, 0xB0, 0, 0x3C])
    (wsnz, mcaw, otlg, mtl, otl, mpl, mulc, mubdc, oug, uga, mwsl) = struct.unpack_from(">BBHIIIIIIIQ", data, 4)
    assert wsnz == 1 and mcaw == 0 and otlg == 1
    assert mtl == 65536 and otl == 0 and mpl == 0  # 32 MiB of 512-byte blocks
    assert mulc == 2097152 and mubdc == 256 and oug == 8 and uga == 0
    assert mwsl == 2097152
    assert data[44:] == bytes(20)


def test_vpd_block_device_characteristics(tmp_path, target):
    _, data = run(target, [0x12, 1, 0xB1, 0, 0xFF, 0])
    assert data == bytes([0, 0xB1, 0, 0x3C, 0, 1]) + bytes(58)
    rot = make_disk(tmp_path, name="r.img", rotational=True)
    _, data = run(ScsiTarget({0: rot}), [0x12, 1, 0xB1, 0, 0xFF, 0])
    assert data[4:6] == b"\x00\x00"


def test_vpd_logical_block_provisioning(tmp_path, target):
    _, data = run(target, [0x12, 1, 0xB2, 0, 0xFF, 0])
    assert data == bytes([0, 0xB2, 0, 4, 0, 0xE4, 0x02, 0])
    thick = make_disk(tmp_path, name="t.img", discard=False)
    _, data = run(ScsiTarget({0: thick}), [0x12, 1, 0xB2, 0, 0xFF, 0])
    assert data == bytes([0, 0xB2, 0, 4, 0, 0, 0, 0])
    _, data = run(ScsiTarget({0: thick}), [0x12, 1, 0xB0, 0, 0xFF, 0])
    assert data[20:32] == bytes(12)  # no unmap limits


# ----------------------------------------------------------------------------- READ CAPACITY

def test_read_capacity_10(target):
    res, data = run(target, [0x25] + [0] * 9)
    assert res == ScsiResult(GOOD, b"", 8, 0, False)
    assert data == bytes.fromhex("000007ff 00000200")


def test_read_capacity_10_pmi_lba(target):
    res, _ = run(target, [0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0])
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("c0 0002"))
    res, data = run(target, [0x25, 0, 0, 0, 0, 1, 0, 0, 1, 0])
    assert res.status == GOOD and data == bytes.fromhex("000007ff 00000200")


def test_read_capacity_clamps_and_16(tmp_path):
    big = NullBackend("4T")
    d = Disk(DiskInfo.for_backend(big, block_size=512, serial="x"), big)
    t = ScsiTarget({0: d})
    _, data = run(t, [0x25] + [0] * 9)
    assert data == bytes.fromhex("ffffffff 00000200")
    res, data = run(t, [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0])
    assert res == ScsiResult(GOOD, b"", 32, 0, False)
    assert data == struct.pack(">QI", (4 << 40) // 512 - 1, 512) + bytes([0, 0, 0xC0, 0]) + bytes(16)


def test_read_capacity_16_byte_exact(tmp_path):
    d = make_disk(tmp_path, bs=512, physical_block_size=4096)
    t = ScsiTarget({0: d})
    res, data = run(t, [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 12, 0, 0])
    assert res.data_in_len == 12  # allocation length
    res, data = run(t, [0x9E, 0x10] + [0] * 8 + [0, 0, 1, 0, 0, 0])
    assert res.data_in_len == 32
    assert data == bytes.fromhex("00000000000007ff 00000200 00 03 c0 00") + bytes(16)
    _, b0 = run(t, [0x12, 1, 0xB0, 0, 0xFF, 0])
    assert struct.unpack_from(">H", b0, 6)[0] == 8  # optimal transfer length granularity
    thick = make_disk(tmp_path, name="t.img", discard=False)
    _, data = run(ScsiTarget({0: thick}), [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0])
    assert data[12:16] == bytes(4)


def test_read_capacity_4k(tmp_path):
    d = make_disk(tmp_path, blocks=256, bs=4096)
    _, data = run(ScsiTarget({0: d}), [0x25] + [0] * 9)
    assert data == bytes.fromhex("000000ff 00001000")


# ----------------------------------------------------------------------------- REPORT LUNS

def _report_luns(select=0, alloc=4096):
    return [0xA0, 0, select, 0, 0, 0] + list(alloc.to_bytes(4, "big")) + [0, 0]


def test_report_luns_encoding(tmp_path):
    d0 = make_disk(tmp_path, name="0.img")
    d1 = make_disk(tmp_path, name="1.img")
    t = ScsiTarget({300: d1, 0: d0, 1: d1, 16383: d0})
    res, data = run(t, _report_luns(0))
    assert res.status == GOOD
    assert data == (bytes.fromhex("00000020 00000000")
                    + bytes.fromhex("0000000000000000")
                    + bytes.fromhex("0001000000000000")
                    + bytes.fromhex("412c000000000000")
                    + bytes.fromhex("7fff000000000000"))
    _, data = run(t, _report_luns(1))
    assert data == bytes.fromhex("00000008 00000000 c101000000000000")
    _, data = run(t, _report_luns(2))
    assert data[:4] == b"\x00\x00\x00\x28" and data[-8:] == bytes.fromhex("c101000000000000")


def test_report_luns_errors(target):
    res, _ = run(target, _report_luns(0, alloc=15))
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("c0 0006"))
    res, _ = run(target, _report_luns(3))
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("c0 0002"))
    res, data = run(target, _report_luns(0, alloc=16))
    assert res.data_in_len == 16 and data == bytes.fromhex("00000008 00000000") + bytes(8)


def test_report_luns_truncated_by_buffer(target):
    res, data = run(target, _report_luns(0), n=12)
    assert res.status == GOOD and res.data_in_len == 12 and not res.overrun


def test_wlun(target):
    res, data = run(target, _report_luns(0), lun=WLUN_REPORT_LUNS)
    assert data == bytes.fromhex("00000008 00000000 0000000000000000")
    res, data = run(target, [0x12, 0, 0, 0, 96, 0], lun=WLUN_REPORT_LUNS)
    assert data[0] == 0x1E and data[8:16] == b"VSCSID  "
    res, data = run(target, [0x12, 1, 0, 0, 96, 0], lun=WLUN_REPORT_LUNS)
    assert data == bytes([0x1E, 0, 0, 1, 0])
    res, _ = run(target, [0x00] * 6, lun=WLUN_REPORT_LUNS)
    assert res == ScsiResult()
    res, data = run(target, [0x03, 0, 0, 0, 18, 0], lun=WLUN_REPORT_LUNS)
    assert data == fixed(0, 0, 0)
    for cdb in ([0x28] + [0] * 9, [0x25] + [0] * 9, [0x1A, 0, 0x3F, 0, 0xFF, 0]):
        res, _ = run(target, cdb, lun=WLUN_REPORT_LUNS)
        assert res.sense == fixed(5, 0x20, 0)


def test_absent_lun(target):
    res, data = run(target, [0x12, 0, 0, 0, 96, 0], lun=7)
    assert res.status == GOOD and data[0] == 0x7F and len(data) == 96
    res, data = run(target, [0x03, 0, 0, 0, 252, 0], lun=7)
    assert res.status == GOOD and data == fixed(5, 0x25, 0)
    res, data = run(target, [0x03, 1, 0, 0, 252, 0], lun=7)
    assert res.status == GOOD and data == bytes.fromhex("72 05 25 00 000000 00")
    for cdb in ([0x00] * 6, [0x28] + [0] * 9, [0x25] + [0] * 9, _report_luns(0), [0xFF] * 10, []):
        res, _ = run(target, cdb, lun=7)
        assert res.sense == fixed(5, 0x25, 0)
    res, _ = run(target, [0x12, 1, 0x80, 0, 96, 0], lun=7)
    assert res.sense == fixed(5, 0x25, 0)


def test_absent_lun0_still_reports_luns(disk):
    t = ScsiTarget({2: disk})
    res, data = run(t, _report_luns(0), lun=0)
    assert data == bytes.fromhex("00000008 00000000 0002000000000000")
    res, _ = run(t, [0] * 6, lun=0)
    assert res.sense == fixed(5, 0x25, 0)


def test_set_remove_lun(disk):
    t = ScsiTarget()
    with pytest.raises(ValueError):
        t.set_lun(16384, disk)
    t.set_lun(3, disk)
    assert dict(t.luns) == {3: disk}
    assert run(t, [0] * 6, lun=3)[0] == ScsiResult()
    assert t.remove_lun(3) is disk and t.remove_lun(3) is None
    assert run(t, [0] * 6, lun=3)[0].status == CHECK


# ----------------------------------------------------------------------------- misc commands

def test_test_unit_ready(target):
    assert run(target, [0] * 6)[0] == ScsiResult(GOOD, b"", 0, 0, False)


def test_request_sense(target):
    res, data = run(target, [0x03, 0, 0, 0, 252, 0])
    assert res.status == GOOD and data == fixed(0, 0, 0)
    res, data = run(target, [0x03, 1, 0, 0, 252, 0])
    assert data == bytes.fromhex("72 00 00 00 000000 00")
    res, data = run(target, [0x03, 0, 0, 0, 4, 0])
    assert res.data_in_len == 4


def test_start_stop_and_prevent_allow(target):
    for cdb in ([0x1B, 0, 0, 0, 1, 0], [0x1B, 1, 0, 0, 0, 0], [0x1B, 0, 0, 0, 4, 0], [0x1B, 0, 0, 0, 0x30, 0],
                [0x1E, 0, 0, 0, 1, 0], [0x1E, 0, 0, 0, 0, 0]):
        assert run(target, cdb)[0] == ScsiResult(), cdb
    plan = target.plan(0, bytes([0x1B, 0, 0, 0, 0, 0]))  # stop: writes the cache back
    assert plan.op == "flush"


def test_invalid_opcode(target):
    for op in (0x01, 0x04, 0x85, 0xA1, 0xFF, 0x7F):
        res, _ = run(target, [op] + [0] * 15)
        assert res.sense == fixed(5, 0x20, 0), hex(op)
    res, _ = run(target, [])
    assert res.sense == fixed(5, 0x20, 0)


def test_unknown_service_action(target):
    res, _ = run(target, [0x9E, 0x13] + [0] * 14)
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("cc 0001"))
    res, _ = run(target, [0xA3, 0x0A] + [0] * 10)
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("cc 0001"))
    res, _ = run(target, [0x9E])
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("c0 0000"))


def test_short_cdb(target):
    res, _ = run(target, [0x28, 0, 0, 0])
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("c0 0000"))


def test_longer_cdb_buffer_is_fine(target):
    res, data = run(target, [0x25] + [0] * 9 + [0xEE] * 22)  # virtio passes 32-byte CDB fields
    assert res.status == GOOD and len(data) == 8


def test_naca_rejected_with_pointer(target):
    res, _ = run(target, [0x00, 0, 0, 0, 0, 0x04])
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("ca 0005"))
    res, _ = run(target, [0x28] + [0] * 8 + [0x04])
    assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("ca 0009"))
    res, _ = run(target, [0x00, 0, 0, 0, 0, 0xC3])  # vendor-specific / obsolete bits ignored
    assert res.status == GOOD


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.name)
def test_every_reserved_bit_is_rejected_with_its_pointer(disk, cmd):
    """The CDB usage map (what RSOC reports) is exactly what validation accepts."""
    t = ScsiTarget({0: disk})
    for byte in range(1, cmd.cdb_len):
        allowed = cmd.usage[byte] if byte < cmd.cdb_len - 1 else 0xFF & ~CONTROL_NACA
        if byte == 1 and cmd.service_action is not None:
            allowed |= 0x1F
        for bit in range(8):
            if allowed & (1 << bit):
                continue
            cdb = bytearray(cmd.usage)
            cdb[1:] = bytes(cmd.cdb_len - 1)
            if cmd.service_action is not None:
                cdb[1] = cmd.service_action
            cdb[byte] |= 1 << bit
            res, _ = run(t, cdb)
            sks = bytes([0xC8 | bit, 0, byte])
            assert res.sense == fixed(5, 0x24, 0, sks), (cmd.name, byte, bit)


# ----------------------------------------------------------------------------- RSOC

def _rsoc(options, op=0, sa=0, rctd=False, alloc=8192):
    return [0xA3, 0x0C, (0x80 if rctd else 0) | options, op, sa >> 8, sa & 0xFF] + list(alloc.to_bytes(4, "big")) + [0, 0]


def test_rsoc_all(target):
    res, data = run(target, _rsoc(0))
    assert res.status == GOOD
    n = len(COMMANDS)
    assert struct.unpack_from(">I", data)[0] == 8 * n and len(data) == 4 + 8 * n
    seen = []
    for i in range(n):
        op, sa, flags, cdblen = struct.unpack_from(">BxHxBH", data, 4 + 8 * i)
        c = COMMANDS[i]
        assert (op, cdblen) == (c.opcode, c.cdb_len)
        assert flags == (1 if c.service_action is not None else 0)
        assert sa == (c.service_action or 0)
        seen.append((op, sa))
    assert seen == sorted(seen)
    assert (0x42, 0) in seen and (0x9E, 0x10) in seen and (0x9E, 0x12) in seen and (0xA3, 0x0C) in seen


def test_rsoc_all_with_timeouts(target):
    res, data = run(target, _rsoc(0, rctd=True))
    n = len(COMMANDS)
    assert struct.unpack_from(">I", data)[0] == 20 * n
    first = data[4:24]
    assert first == bytes.fromhex("00 00 0000 00 02 0006") + bytes.fromhex("000a 00 00 00000000 0000000a")


def test_rsoc_one_command(target):
    res, data = run(target, _rsoc(1, 0x28))
    assert data == bytes.fromhex("00 03 000a") + bytes.fromhex("28 fc ffffffff 3f ffff 04")
    res, data = run(target, _rsoc(1, 0x28, rctd=True))
    assert data[:4] == bytes.fromhex("00 83 000a") and data[14:] == bytes.fromhex("000a 00 00 00000000 0000001e")
    res, data = run(target, _rsoc(2, 0x9E, 0x10))
    assert data == bytes.fromhex("00 03 0010") + bytes.fromhex("9e 10 ffffffffffffffff ffffffff 01 04")
    res, data = run(target, _rsoc(3, 0x9E, 0x12))
    assert data[:6] == bytes.fromhex("00 03 0010 9e 12")
    res, data = run(target, _rsoc(3, 0x12, 0x77))  # no service actions: SA ignored
    assert data[:6] == bytes.fromhex("00 03 0006 12 01")
    res, data = run(target, _rsoc(1, 0xFF))
    assert data == bytes.fromhex("00 01 0000")
    res, data = run(target, _rsoc(2, 0x9E, 0x13))
    assert data == bytes.fromhex("00 01 0000")


def test_rsoc_errors(target):
    for cdb in (_rsoc(1, 0x9E), _rsoc(2, 0x28), _rsoc(4, 0x28)):
        res, _ = run(target, cdb)
        assert res.sense == fixed(5, 0x24, 0, bytes.fromhex("ca 0002")), cdb


def test_rsoc_hides_unmap_without_discard(tmp_path):
    thick = make_disk(tmp_path, name="t.img", discard=False)
    t = ScsiTarget({0: thick})
    _, data = run(t, _rsoc(0))
    ops = [data[4 + 8 * i] for i in range((len(data) - 4) // 8)]
    assert 0x42 not in ops and 0x93 in ops
    _, data = run(t, _rsoc(1, 0x42))
    assert data == bytes.fromhex("00 01 0000")
    res, _ = run(t, [0x42] + [0] * 9)
    assert res.sense == fixed(5, 0x20, 0)


# ----------------------------------------------------------------------------- robustness

def test_handler_exception_becomes_internal_target_failure(disk):
    logged = []

    class Log:
        def error(self, event, **kw):
            logged.append((event, kw))

        warning = error

    t = ScsiTarget({0: disk}, log=Log())
    disk.vpd = None  # a bug in a handler's input
    res, _ = run(t, [0x12, 1, 0, 0, 96, 0])
    assert res.status == CHECK and parse_sense(res.sense) == (4, 0x44, 0)
    assert logged and logged[0][0] == "scsi_target_exception"
