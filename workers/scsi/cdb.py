"""The command table: one entry per (operation code, service action) the target implements.

Each entry carries the CDB usage data that REPORT SUPPORTED OPERATION CODES returns
(operation code, service action in place, then a bit map of the bits the device
server evaluates, the control byte last). The same map drives CDB validation:
a bit outside it is reserved and must be zero, so what the target accepts and what it
reports cannot drift apart. The control byte is the exception: only NACA is checked
(NACA=1 is not supported); vendor-specific and obsolete bits are ignored.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .constants import Op, ServiceAction

CONTROL_NACA = 0x04
SA_MASK = 0x1F  # service action bits of byte 1 (SERVICE ACTION IN(16), MAINTENANCE IN)

# Group code → CDB length (SPC-5 operation code groups); None: reserved / vendor specific.
GROUP_CDB_LENGTH = (6, 10, 10, None, 16, 12, None, None)


@dataclass(frozen=True)
class Command:
    opcode: int
    service_action: int | None
    name: str
    usage: bytes
    nominal_timeout: int = 0  # seconds, 0 = not specified
    recommended_timeout: int = 30
    needs_discard: bool = False  # only offered when the LU is thin provisioned
    cdb_len: int = field(init=False)
    reject_mask: int = field(init=False)  # reserved bits over the CDB, as a big-endian integer

    def __post_init__(self) -> None:
        n = len(self.usage)
        reject = bytearray(n)
        for i in range(1, n - 1):
            reject[i] = ~self.usage[i] & 0xFF
        if self.service_action is not None:
            reject[1] &= ~SA_MASK & 0xFF
        reject[n - 1] = CONTROL_NACA
        object.__setattr__(self, "cdb_len", n)
        object.__setattr__(self, "reject_mask", int.from_bytes(reject, "big"))

    def reserved_bit_error(self, cdb) -> tuple[int, int] | None:
        """(byte, bit) of the first (most significant) reserved bit set in ``cdb``, or None."""
        bad = int.from_bytes(cdb[: self.cdb_len], "big") & self.reject_mask
        if not bad:
            return None
        raw = bad.to_bytes(self.cdb_len, "big")
        for i, b in enumerate(raw):
            if b:
                return i, b.bit_length() - 1
        return None  # pragma: no cover


def _u(*b: int) -> bytes:
    return bytes(b)


F4 = (0xFF,) * 4
F8 = (0xFF,) * 8
C = CONTROL_NACA
GRP = 0x3F  # GROUP NUMBER (bits 5-0)

COMMANDS: tuple[Command, ...] = (
    Command(Op.TEST_UNIT_READY, None, "TEST UNIT READY", _u(0x00, 0, 0, 0, 0, C), recommended_timeout=10),
    Command(Op.REQUEST_SENSE, None, "REQUEST SENSE", _u(0x03, 0x01, 0, 0, 0xFF, C), recommended_timeout=10),
    Command(Op.READ_6, None, "READ(6)", _u(0x08, 0x1F, 0xFF, 0xFF, 0xFF, C)),
    Command(Op.WRITE_6, None, "WRITE(6)", _u(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, C)),
    Command(Op.INQUIRY, None, "INQUIRY", _u(0x12, 0x01, 0xFF, 0xFF, 0xFF, C), recommended_timeout=10),
    Command(Op.MODE_SELECT_6, None, "MODE SELECT(6)", _u(0x15, 0x11, 0, 0, 0xFF, C)),
    Command(Op.MODE_SENSE_6, None, "MODE SENSE(6)", _u(0x1A, 0x08, 0xFF, 0xFF, 0xFF, C), recommended_timeout=10),
    Command(Op.START_STOP_UNIT, None, "START STOP UNIT", _u(0x1B, 0x01, 0, 0x0F, 0xF7, C), recommended_timeout=60),
    Command(Op.PREVENT_ALLOW_MEDIUM_REMOVAL, None, "PREVENT ALLOW MEDIUM REMOVAL",
            _u(0x1E, 0, 0, 0, 0x03, C), recommended_timeout=10),
    Command(Op.READ_CAPACITY_10, None, "READ CAPACITY(10)", _u(0x25, 0, *F4, 0, 0, 0x01, C), recommended_timeout=10),
    Command(Op.READ_10, None, "READ(10)", _u(0x28, 0xFC, *F4, GRP, 0xFF, 0xFF, C)),
    Command(Op.WRITE_10, None, "WRITE(10)", _u(0x2A, 0xF8, *F4, GRP, 0xFF, 0xFF, C)),
    Command(Op.VERIFY_10, None, "VERIFY(10)", _u(0x2F, 0xF6, *F4, GRP, 0xFF, 0xFF, C)),
    Command(Op.SYNCHRONIZE_CACHE_10, None, "SYNCHRONIZE CACHE(10)", _u(0x35, 0x02, *F4, GRP, 0xFF, 0xFF, C),
            recommended_timeout=60),
    Command(Op.WRITE_SAME_10, None, "WRITE SAME(10)", _u(0x41, 0xFE, *F4, GRP, 0xFF, 0xFF, C),
            recommended_timeout=60),
    Command(Op.UNMAP, None, "UNMAP", _u(0x42, 0x01, 0, 0, 0, 0, GRP, 0xFF, 0xFF, C),
            recommended_timeout=60, needs_discard=True),
    Command(Op.MODE_SELECT_10, None, "MODE SELECT(10)", _u(0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, C)),
    Command(Op.MODE_SENSE_10, None, "MODE SENSE(10)", _u(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, C),
            recommended_timeout=10),
    Command(Op.READ_16, None, "READ(16)", _u(0x88, 0xFC, *F8, *F4, GRP, C)),
    Command(Op.WRITE_16, None, "WRITE(16)", _u(0x8A, 0xF8, *F8, *F4, GRP, C)),
    Command(Op.VERIFY_16, None, "VERIFY(16)", _u(0x8F, 0xF6, *F8, *F4, GRP, C)),
    Command(Op.SYNCHRONIZE_CACHE_16, None, "SYNCHRONIZE CACHE(16)", _u(0x91, 0x02, *F8, *F4, GRP, C),
            recommended_timeout=60),
    Command(Op.WRITE_SAME_16, None, "WRITE SAME(16)", _u(0x93, 0xFF, *F8, *F4, GRP, C), recommended_timeout=60),
    Command(Op.SERVICE_ACTION_IN_16, ServiceAction.READ_CAPACITY_16, "READ CAPACITY(16)",
            _u(0x9E, ServiceAction.READ_CAPACITY_16, *F8, *F4, 0x01, C), recommended_timeout=10),
    Command(Op.SERVICE_ACTION_IN_16, ServiceAction.GET_LBA_STATUS, "GET LBA STATUS",
            _u(0x9E, ServiceAction.GET_LBA_STATUS, *F8, *F4, 0, C)),
    Command(Op.REPORT_LUNS, None, "REPORT LUNS", _u(0xA0, 0, 0xFF, 0, 0, 0, *F4, 0, C), recommended_timeout=10),
    Command(Op.MAINTENANCE_IN, ServiceAction.REPORT_SUPPORTED_OPCODES, "REPORT SUPPORTED OPERATION CODES",
            _u(0xA3, ServiceAction.REPORT_SUPPORTED_OPCODES, 0x87, 0xFF, 0xFF, 0xFF, *F4, 0, C),
            recommended_timeout=10),
    Command(Op.READ_12, None, "READ(12)", _u(0xA8, 0xFC, *F4, *F4, GRP, C)),
    Command(Op.WRITE_12, None, "WRITE(12)", _u(0xAA, 0xF8, *F4, *F4, GRP, C)),
)

# Opcodes whose byte 1 carries a service action.
SA_OPCODES = frozenset(c.opcode for c in COMMANDS if c.service_action is not None)

for _c in COMMANDS:
    _g = GROUP_CDB_LENGTH[_c.opcode >> 5]
    assert _g is None or _g == _c.cdb_len, _c.name


# -- CDB field layouts (precompiled) ---------------------------------------------------------

# opcode+LBA(21 bits), transfer length, control
CDB6_RW = struct.Struct(">IBB")
# opcode, flags, LBA, group, length, control
CDB10 = struct.Struct(">BBIBHB")
# opcode, flags, LBA, length, group, control
CDB12 = struct.Struct(">BBIIBB")
# opcode, flags, LBA, length, group, control
CDB16 = struct.Struct(">BBQIBB")
# INQUIRY: opcode, EVPD, page code, allocation length, control
CDB_INQUIRY = struct.Struct(">BBBHB")
# READ CAPACITY(10): opcode, reserved, LBA, reserved(2), PMI, control
CDB_RC10 = struct.Struct(">BBI2xBB")
# MODE SENSE(10) / MODE SELECT(10): opcode, byte1, byte2, byte3, reserved(3), length, control
CDB_MODE10 = struct.Struct(">BBBB3xHB")
# REPORT LUNS: opcode, reserved, select report, reserved(3), allocation length, reserved, control
CDB_REPORT_LUNS = struct.Struct(">BxB3xIxB")
# REPORT SUPPORTED OPERATION CODES: opcode, SA, RCTD|options, requested opcode, requested SA, alloc, reserved, control
CDB_RSOC = struct.Struct(">BBBBHIxB")


# -- describing a CDB (statistics, the command trace) ----------------------------------------

_READS = frozenset((Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16))
_WRITES = frozenset((Op.WRITE_6, Op.WRITE_10, Op.WRITE_12, Op.WRITE_16))
_NAMES = {(c.opcode, c.service_action): c.name for c in COMMANDS}
# Commands with an LBA and a number of blocks, by CDB layout.
_RANGE6 = frozenset((Op.READ_6, Op.WRITE_6))
_RANGE10 = frozenset((Op.READ_10, Op.WRITE_10, Op.VERIFY_10, Op.SYNCHRONIZE_CACHE_10,
                      Op.WRITE_SAME_10))
_RANGE12 = frozenset((Op.READ_12, Op.WRITE_12))
_RANGE16 = frozenset((Op.READ_16, Op.WRITE_16, Op.VERIFY_16, Op.SYNCHRONIZE_CACHE_16,
                      Op.WRITE_SAME_16))


def op_class(opcode: int) -> int:
    """0 for the READ commands, 1 for the WRITE commands, 2 for everything else
    (the statistics' operation classes)."""
    if opcode in _READS:
        return 0
    if opcode in _WRITES:
        return 1
    return 2


def describe_cdb(cdb) -> tuple[str, int | None, int | None]:
    """(name, LBA, blocks) of a CDB; LBA and blocks are None for commands without them."""
    if not len(cdb):
        return "(empty CDB)", None, None
    op = cdb[0]
    sa = (cdb[1] & SA_MASK) if op in SA_OPCODES and len(cdb) > 1 else None
    name = _NAMES.get((op, sa)) or (f"OPCODE {op:#04x}" if sa is None
                                    else f"OPCODE {op:#04x}/{sa:#04x}")
    if op == Op.INQUIRY and len(cdb) > 2 and cdb[1] & 0x01:
        name += f" VPD {cdb[2]:02X}h"
    elif op in (Op.MODE_SENSE_6, Op.MODE_SENSE_10) and len(cdb) > 2:
        name += f" page {cdb[2] & 0x3F:02X}h"
    try:
        if op in _RANGE6:
            x, n, _ = CDB6_RW.unpack_from(cdb)
            return name, x & 0x1FFFFF, n or 256
        if op in _RANGE10:
            _, _, lba, _, n, _ = CDB10.unpack_from(cdb)
            return name, lba, n
        if op in _RANGE12:
            _, _, lba, n, _, _ = CDB12.unpack_from(cdb)
            return name, lba, n
        if op in _RANGE16 or (op == Op.SERVICE_ACTION_IN_16 and sa == ServiceAction.GET_LBA_STATUS):
            _, _, lba, n, _, _ = CDB16.unpack_from(cdb)
            return name, lba, (n if op in _RANGE16 else None)
    except struct.error:
        pass
    return name, None, None
