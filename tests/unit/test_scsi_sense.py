"""Sense data builders: fixed (70h) and descriptor (72h) formats, byte-exact."""
from __future__ import annotations

import pytest

from vscsid.workers.scsi import sense as S


def test_named_tuples():
    assert S.INVALID_FIELD_IN_CDB == (S.SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
    assert S.LBA_OUT_OF_RANGE == (0x05, 0x21, 0x00)
    assert S.WRITE_PROTECTED == (0x07, 0x27, 0x00)
    assert S.SPACE_ALLOCATION_FAILED_WRITE_PROTECT == (0x07, 0x27, 0x07)
    assert S.UNRECOVERED_READ_ERROR == (0x03, 0x11, 0x00)
    assert S.WRITE_ERROR == (0x03, 0x0C, 0x00)
    assert S.INTERNAL_TARGET_FAILURE == (0x04, 0x44, 0x00)
    assert S.MISCOMPARE_DURING_VERIFY == (0x0E, 0x1D, 0x00)
    assert S.INVALID_COMMAND_OPERATION_CODE == (0x05, 0x20, 0x00)
    assert S.LOGICAL_UNIT_NOT_SUPPORTED == (0x05, 0x25, 0x00)


def test_fixed_plain():
    assert S.build_sense(S.LBA_OUT_OF_RANGE) == bytes.fromhex("70 00 05 00000000 0a 00000000 21 00 00 000000")


def test_fixed_with_information_and_sks():
    data = S.build_sense(S.UNRECOVERED_READ_ERROR, information=0x01020304)
    assert data == bytes.fromhex("f0 00 03 01020304 0a 00000000 11 00 00 000000")
    sks = S.field_pointer(7)
    assert sks == bytes.fromhex("c0 00 07")
    data = S.build_sense(S.INVALID_FIELD_IN_CDB, sks=S.field_pointer(1, 4))
    assert data == bytes.fromhex("70 00 05 00000000 0a 00000000 24 00 00 cc 0001")
    data = S.build_sense(S.INVALID_FIELD_IN_PARAMETER_LIST, sks=S.field_pointer(0x123, 0, in_cdb=False))
    assert data == bytes.fromhex("70 00 05 00000000 0a 00000000 26 00 00 88 0123")


def test_fixed_information_too_large_clears_valid():
    data = S.build_sense(S.WRITE_ERROR, information=1 << 40)
    assert data[0] == 0x70 and data[3:7] == bytes(4)


def test_descriptor_format():
    assert S.build_sense(S.LBA_OUT_OF_RANGE, descriptor=True) == bytes.fromhex("72 05 21 00 000000 00")
    data = S.build_sense(S.UNRECOVERED_READ_ERROR, descriptor=True, information=1 << 40)
    assert data == bytes.fromhex("72 03 11 00 000000 0c" "00 0a 80 00 0000010000000000")
    data = S.build_sense(S.INVALID_FIELD_IN_CDB, descriptor=True, sks=S.field_pointer(2, 5))
    assert data == bytes.fromhex("72 05 24 00 000000 08" "02 06 0000 cd0002 00")


def test_simple_sense_cache_and_parse():
    a = S.simple_sense(S.INVALID_COMMAND_OPERATION_CODE)
    assert a is S.simple_sense(S.INVALID_COMMAND_OPERATION_CODE)
    assert S.parse_sense(a) == (5, 0x20, 0)
    assert S.parse_sense(S.simple_sense(S.WRITE_PROTECTED, True)) == (7, 0x27, 0)
    with pytest.raises(ValueError):
        S.parse_sense(b"\x00" * 18)
    with pytest.raises(ValueError):
        S.parse_sense(b"\x70")
