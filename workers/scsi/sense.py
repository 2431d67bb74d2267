"""Sense data: named sense key / additional sense code tuples and the two formats.

Fixed format (response code 70h, 18 bytes) is the default; descriptor format
(72h) is used when the control mode page D_SENSE bit is set (SPC-5 sense data).
"""
from __future__ import annotations

import struct
from enum import IntEnum
from typing import NamedTuple


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE
    COMPLETED = 0xF


class Sense(NamedTuple):
    """A sense key with its additional sense code and qualifier."""

    key: int
    asc: int
    ascq: int


NO_SENSE = Sense(SenseKey.NO_SENSE, 0x00, 0x00)
# NOT READY (a network LUN whose server cannot be reached: initiators retry it)
LOGICAL_UNIT_BECOMING_READY = Sense(SenseKey.NOT_READY, 0x04, 0x01)
# ILLEGAL REQUEST
PARAMETER_LIST_LENGTH_ERROR = Sense(SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)
INVALID_COMMAND_OPERATION_CODE = Sense(SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)
LBA_OUT_OF_RANGE = Sense(SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)
INVALID_FIELD_IN_CDB = Sense(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED = Sense(SenseKey.ILLEGAL_REQUEST, 0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = Sense(SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED = Sense(SenseKey.ILLEGAL_REQUEST, 0x39, 0x00)
# DATA PROTECT
WRITE_PROTECTED = Sense(SenseKey.DATA_PROTECT, 0x27, 0x00)
SPACE_ALLOCATION_FAILED_WRITE_PROTECT = Sense(SenseKey.DATA_PROTECT, 0x27, 0x07)
# MEDIUM ERROR
WRITE_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x0C, 0x00)
UNRECOVERED_READ_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x11, 0x00)
# HARDWARE ERROR
INTERNAL_TARGET_FAILURE = Sense(SenseKey.HARDWARE_ERROR, 0x44, 0x00)
# MISCOMPARE
MISCOMPARE_DURING_VERIFY = Sense(SenseKey.MISCOMPARE, 0x1D, 0x00)
# UNIT ATTENTION
POWER_ON_RESET = Sense(SenseKey.UNIT_ATTENTION, 0x29, 0x00)
MODE_PARAMETERS_CHANGED = Sense(SenseKey.UNIT_ATTENTION, 0x2A, 0x01)
CAPACITY_DATA_HAS_CHANGED = Sense(SenseKey.UNIT_ATTENTION, 0x2A, 0x09)
REPORTED_LUNS_DATA_HAS_CHANGED = Sense(SenseKey.UNIT_ATTENTION, 0x3F, 0x0E)


def describe_sense(key: int, asc: int, ascq: int) -> str:
    """``KEY ASC/ASCQ`` with the name of the condition when it is one vscsid reports,
    e.g. ``UNIT ATTENTION 29/00 POWER ON RESET``."""
    try:
        text = SenseKey(key).name.replace("_", " ")
    except ValueError:
        text = f"KEY {key:#x}"
    text += f" {asc:02X}/{ascq:02X}"
    name = _SENSE_NAMES.get((key, asc, ascq))
    return f"{text} {name}" if name else text

RESPONSE_FIXED_CURRENT = 0x70
RESPONSE_DESCRIPTOR_CURRENT = 0x72
FIXED_SENSE_LEN = 18
DESCRIPTOR_HEADER_LEN = 8

_FIXED = struct.Struct(">BBBIBIBBB3s")  # 18 bytes
_DESC_HEADER = struct.Struct(">BBBB3xB")  # 8 bytes
_DESC_INFORMATION = struct.Struct(">BBBxQ")  # 12 bytes, type 00h
_DESC_SKS = struct.Struct(">BB2x3sx")  # 8 bytes, type 02h

SKSV = 0x80
SKS_CD = 0x40  # field pointer refers to the CDB (1) or parameter data (0)
SKS_BPV = 0x08
NO_SKS = b"\x00\x00\x00"


def field_pointer(byte: int, bit: int | None = None, *, in_cdb: bool = True) -> bytes:
    """Sense-key-specific bytes for ILLEGAL REQUEST: SKSV, C/D, BPV + bit pointer, field pointer.

    ``byte`` is the offset of the field (its most significant byte); ``bit`` the most
    significant bit of the field in error, or None when the whole byte is meant.
    """
    b0 = SKSV | (SKS_CD if in_cdb else 0)
    if bit is not None:
        b0 |= SKS_BPV | (bit & 7)
    return bytes((b0, (byte >> 8) & 0xFF, byte & 0xFF))


def build_sense(
    sense: Sense,
    *,
    descriptor: bool = False,
    information: int | None = None,
    sks: bytes | None = None,
) -> bytes:
    """Build sense data in fixed (default) or descriptor format.

    ``information`` is e.g. the failing LBA (fixed format can carry only 32 bits:
    larger values leave VALID=0 there, descriptor format carries all 64 bits);
    ``sks`` the three sense-key-specific bytes (see :func:`field_pointer`).
    """
    key, asc, ascq = sense
    if not descriptor:
        b0 = RESPONSE_FIXED_CURRENT
        info = 0
        if information is not None and 0 <= information <= 0xFFFFFFFF:
            b0 |= 0x80  # VALID
            info = information
        return _FIXED.pack(b0, 0, key, info, FIXED_SENSE_LEN - 8, 0, asc, ascq, 0, sks or NO_SKS)
    parts = []
    if information is not None:
        parts.append(_DESC_INFORMATION.pack(0x00, 0x0A, 0x80, information & 0xFFFFFFFFFFFFFFFF))
    if sks is not None:
        parts.append(_DESC_SKS.pack(0x02, 0x06, sks))
    body = b"".join(parts)
    return _DESC_HEADER.pack(RESPONSE_DESCRIPTOR_CURRENT, key, asc, ascq, len(body)) + body


_SIMPLE: dict[tuple[Sense, bool], bytes] = {}


def simple_sense(sense: Sense, descriptor: bool = False) -> bytes:
    """Cached sense bytes without information or sense-key-specific data."""
    k = (sense, descriptor)
    data = _SIMPLE.get(k)
    if data is None:
        data = _SIMPLE[k] = build_sense(sense, descriptor=descriptor)
    return data


def parse_sense(data: bytes) -> tuple[int, int, int]:
    """(key, asc, ascq) of fixed or descriptor sense data (for tests and logs)."""
    if len(data) < 8:
        raise ValueError("sense data too short")
    code = data[0] & 0x7F
    if code in (0x70, 0x71):
        if len(data) < 14:
            raise ValueError("fixed sense data too short")
        return data[2] & 0x0F, data[12], data[13]
    if code in (0x72, 0x73):
        return data[1] & 0x0F, data[2], data[3]
    raise ValueError(f"unknown sense response code {data[0]:#x}")


_SENSE_NAMES = {tuple(v): k.replace("_", " ") for k, v in list(globals().items())
                if isinstance(v, Sense) and k != "NO_SENSE"}
