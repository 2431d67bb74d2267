"""A direct-access logical unit: its static description, shared settings and precomputed data.

``DiskInfo`` describes the LU (geometry, identity, limits); ``LunState`` holds the few
settings MODE SELECT can change, which must agree across worker processes;
``Disk`` binds both to a backend and precomputes INQUIRY / VPD / READ CAPACITY data.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from .constants import (
    ASSOCIATION_LU,
    CODE_SET_ASCII,
    CODE_SET_BINARY,
    DESIGNATOR_NAA,
    DESIGNATOR_T10_VENDOR_ID,
    INQUIRY_VERSION_SPC5,
    PERIPHERAL_DISK,
    VERSION_DESCRIPTORS,
    ModePage,
    PageControl,
    Vpd,
)
from vscsid import lunstate

from .sense import (
    CAPACITY_DATA_HAS_CHANGED, MODE_PARAMETERS_CHANGED, NO_SENSE, POWER_ON_RESET,
    REPORTED_LUNS_DATA_HAS_CHANGED,
)

#: the sense data of each unit attention kind (vscsid.lunstate.UA_*)
UA_SENSE = {
    lunstate.UA_POWER_ON: POWER_ON_RESET,
    lunstate.UA_CAPACITY: CAPACITY_DATA_HAS_CHANGED,
    lunstate.UA_MODE: MODE_PARAMETERS_CHANGED,
    lunstate.UA_LUNS_CHANGED: REPORTED_LUNS_DATA_HAS_CHANGED,
}

MiB = 1 << 20
GiB = 1 << 30

# NAA 6 (IEEE Registered Extended) designators carry a 24-bit company id. vscsid derives
# the rest of the designator from a hash; 0x5AC51D is a CID-format value (X bit set,
# xxxx1010b in the first octet), i.e. a locally administered, unregistered id.
NAA_COMPANY_ID = 0x5AC51D


def _ascii(text: str, size: int | None = None) -> bytes:
    raw = "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text).encode("ascii")
    if size is None:
        return raw
    return raw[:size].ljust(size, b" ")


@dataclass
class DiskInfo:
    """Static description of a disk LU. Byte-valued limits are converted to blocks by ``Disk``."""

    block_size: int = 512
    num_blocks: int = 0
    readonly: bool = False
    serial: str = ""  # "" → derived from the backend identity (path)
    rotational: bool = False
    vendor: str = "VSCSID"
    product: str = "vscsid disk"
    revision: str = "0001"
    device_id: bytes | str | None = None  # NAA designator (bytes or hex); None → NAA 6 from the serial
    write_cache: bool = True  # initial WCE
    physical_block_size: int | None = None  # None → block_size
    max_transfer_bytes: int = 32 * MiB
    optimal_transfer_bytes: int = 0  # 0 → not reported
    max_unmap_bytes: int = 1 * GiB
    max_unmap_descriptors: int = 256
    max_write_same_bytes: int = 1 * GiB
    unmap_granularity_bytes: int = 4096
    discard: bool = True  # offer thin provisioning (UNMAP, WRITE SAME UNMAP) if the backend can discard
    fua: bool = True  # MODE SENSE DPOFUA: the backend honours FUA (or flushes after the write)
    volatile_cache: bool = True  # a write cache the backend can flush: WCE reported and changeable

    @classmethod
    def for_backend(cls, backend, block_size: int = 512, **kw) -> "DiskInfo":
        """A DiskInfo covering the whole backend (size rounded down to whole blocks)."""
        kw.setdefault("readonly", backend.readonly)
        kw.setdefault("rotational", getattr(backend, "rotational", False))
        return cls(block_size=block_size, num_blocks=backend.size // block_size, **kw)


class LunState:
    """Per-LU settings changed by MODE SELECT, kept in one byte so worker processes can share it.

    Bit 0 = WCE (write cache enable), bit 1 = D_SENSE (descriptor-format sense). The default
    instance owns a private byte; ``LunState.from_buffer`` wraps a byte of a shared page
    (e.g. ``memoryview(shared_mmap)[i:i + 1]``) whose owner initialised it (``1`` = WCE on).
    Updates are single-byte stores; MODE SELECT is rare enough that two workers changing
    different bits at the same instant is not a practical concern.
    """

    SIZE = 1
    WCE = 0x01
    D_SENSE = 0x02
    __slots__ = ("_buf",)

    def __init__(self, wce: bool = True, d_sense: bool = False) -> None:
        self._buf = memoryview(bytearray(1))
        self._buf[0] = (self.WCE if wce else 0) | (self.D_SENSE if d_sense else 0)

    @classmethod
    def from_buffer(cls, buf, *, wce: bool | None = None, d_sense: bool | None = None) -> "LunState":
        """Wrap the first byte of ``buf`` (writable). Its current value is kept unless
        ``wce`` / ``d_sense`` are given, which are then stored."""
        mv = buf if isinstance(buf, memoryview) else memoryview(buf)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        if mv.readonly or mv.nbytes < cls.SIZE:
            raise ValueError("LunState needs a writable buffer of at least one byte")
        self = cls.__new__(cls)
        self._buf = mv[: cls.SIZE]
        if wce is not None:
            self.wce = wce
        if d_sense is not None:
            self.d_sense = d_sense
        return self

    def _set(self, bit: int, on: bool) -> None:
        v = self._buf[0]
        self._buf[0] = (v | bit) if on else (v & ~bit & 0xFF)

    @property
    def wce(self) -> bool:
        return bool(self._buf[0] & self.WCE)

    @wce.setter
    def wce(self, value: bool) -> None:
        self._set(self.WCE, bool(value))

    @property
    def d_sense(self) -> bool:
        return bool(self._buf[0] & self.D_SENSE)

    @d_sense.setter
    def d_sense(self, value: bool) -> None:
        self._set(self.D_SENSE, bool(value))

    def __repr__(self) -> str:
        return f"LunState(wce={self.wce}, d_sense={self.d_sense})"


class UnitAttentions:
    """The unit attention conditions pending on a LU, one byte per kind
    (vscsid.lunstate: 1 = pending), reported once each.

    ``buf`` is the LU's four bytes of the shared state page when several worker
    processes serve it; ``exchange(kind)`` must then swap that byte to 0
    atomically and return its old value, so that exactly one of them reports
    each condition. The default instance owns private bytes (one process).
    """

    KINDS = lunstate.UA_KINDS
    __slots__ = ("_buf", "_exchange")

    def __init__(self, buf=None, exchange=None) -> None:
        self._buf = memoryview(buf if buf is not None else bytearray(self.KINDS)).cast("B")
        if self._buf.nbytes < self.KINDS or self._buf.readonly:
            raise ValueError("UnitAttentions needs a writable buffer of 4 bytes")
        self._buf = self._buf[:self.KINDS]
        self._exchange = exchange if exchange is not None else self._plain_exchange

    def _plain_exchange(self, kind: int) -> int:
        old = self._buf[kind]
        self._buf[kind] = 0
        return old

    def any(self) -> bool:
        b = self._buf
        return bool(b[0] | b[1] | b[2] | b[3])

    def establish(self, kind: int) -> None:
        self._buf[kind] = 1

    def take(self):
        """The highest-priority pending condition's sense (now cleared), or None."""
        b = self._buf
        for kind in range(self.KINDS):
            if b[kind] and self._exchange(kind):
                return UA_SENSE[kind]
        return None

    def take_kind(self, kind: int) -> bool:
        return bool(self._buf[kind]) and bool(self._exchange(kind))

    def pending(self) -> list[int]:
        return [k for k in range(self.KINDS) if self._buf[k]]


# -- precomputed response layouts ----------------------------------------------------------

_INQUIRY_STD = struct.Struct(">BBBBBBBB8s16s4s20sBx16s22x")  # 96 bytes
INQUIRY_STD_LEN = _INQUIRY_STD.size
_VPD_HEADER = struct.Struct(">BBH")
_DESIGNATOR_HEADER = struct.Struct(">BBxB")
_VPD_B0 = struct.Struct(">BBHBBHIIIIIIIQ20x")  # 64 bytes, page length 0x3C
_VPD_B1 = struct.Struct(">BBHHBBB55x")  # 64 bytes, page length 0x3C
_VPD_B2 = struct.Struct(">BBHBBBB")  # 8 bytes, page length 4
_RC10 = struct.Struct(">II")
_RC16 = struct.Struct(">QIBBH16x")  # 32 bytes

# B2: LBPU, LBPWS, LBPWS10, LBPRZ=001b (bits 4-2); provisioning type: thin
B2_LBPU = 0x80
B2_LBPWS = 0x40
B2_LBPWS10 = 0x20
B2_LBPRZ = 0x04
PROVISIONING_THIN = 0x02
RC16_LBPME = 0x80
RC16_LBPRZ = 0x40


def standard_inquiry(peripheral: int, vendor: str, product: str, revision: str) -> bytes:
    versions = b"".join(v.to_bytes(2, "big") for v in VERSION_DESCRIPTORS)
    return _INQUIRY_STD.pack(
        peripheral,
        0x00,  # RMB=0
        INQUIRY_VERSION_SPC5,
        0x12,  # HISUP=1, RESPONSE DATA FORMAT=2
        INQUIRY_STD_LEN - 5,  # ADDITIONAL LENGTH
        0x00,  # SCCS ACC TPGS 3PC PROTECT
        0x00,  # ENCSERV MULTIP
        0x02,  # CMDQUE=1
        _ascii(vendor, 8),
        _ascii(product, 16),
        _ascii(revision, 4),
        b"",
        0x00,
        versions,
    )


def vpd_page(peripheral: int, page: int, body: bytes) -> bytes:
    return _VPD_HEADER.pack(peripheral, page, len(body)) + body


def designator(code_set: int, dtype: int, value: bytes, association: int = ASSOCIATION_LU) -> bytes:
    return _DESIGNATOR_HEADER.pack(code_set, (association << 4) | dtype, len(value)) + value


def naa6_from_key(key: str) -> bytes:
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest(), "big")
    value = (0x6 << 124) | (NAA_COMPANY_ID << 100) | (h >> (256 - 100))
    return value.to_bytes(16, "big")


class Disk:
    """A disk LU: ``DiskInfo`` + backend + ``LunState``, with precomputed response data."""

    request_sense = NO_SENSE  # REQUEST SENSE data (sense is delivered with each command)

    def __init__(self, info: DiskInfo, backend, state: LunState | None = None, log=None,
                 ua: UnitAttentions | None = None) -> None:
        bs = info.block_size
        if bs < 512 or bs > 65536 or bs & (bs - 1):
            raise ValueError(f"unsupported block size {bs}")
        if info.num_blocks <= 0:
            raise ValueError("a disk needs at least one block")
        if info.num_blocks * bs > backend.size:
            raise ValueError(
                f"{info.num_blocks} blocks of {bs} bytes exceed the backend's {backend.size} bytes"
            )
        pbs = info.physical_block_size or bs
        if pbs < bs or pbs & (pbs - 1):
            raise ValueError(f"invalid physical block size {pbs}")
        self.info = info
        self.backend = backend
        self.state = state if state is not None else LunState(wce=info.write_cache)
        self.ua = ua if ua is not None else UnitAttentions()
        self.block_size = bs
        self.num_blocks = info.num_blocks
        self.readonly = bool(info.readonly or backend.readonly)
        self.log = log  # structlog-style; None → the target's logger
        self.thin = bool(info.discard and backend.supports_discard)
        self.lbprz = self.thin and bool(getattr(backend, "discard_zeroes", False))
        self.lbppbe = (pbs // bs).bit_length() - 1  # logical blocks per physical block exponent
        self.max_transfer_blocks = max(1, min(info.max_transfer_bytes // bs, 0xFFFFFFFF))
        self.optimal_transfer_blocks = min(info.optimal_transfer_bytes // bs, 0xFFFFFFFF)
        self.max_unmap_blocks = max(1, min(info.max_unmap_bytes // bs, 0xFFFFFFFF))
        self.max_unmap_descriptors = max(1, min(info.max_unmap_descriptors, 0xFFFFFFFF))
        self.max_write_same_blocks = max(1, min(info.max_write_same_bytes // bs, 0xFFFFFFFF))
        self.unmap_granularity_blocks = max(1, info.unmap_granularity_bytes // bs)

        ident = getattr(backend, "ident", "") or ""
        serial = info.serial or hashlib.sha256(f"vscsid:{ident}".encode("utf-8", "surrogateescape")).hexdigest()[:20]
        self.serial = serial
        dev_id = info.device_id
        if isinstance(dev_id, str):
            dev_id = bytes.fromhex(dev_id)
        if dev_id and len(dev_id) not in (8, 16):
            raise ValueError("device_id must be an 8- or 16-byte NAA designator")
        self.device_id = bytes(dev_id) if dev_id else naa6_from_key(serial)
        self._build_static()

    def __repr__(self) -> str:
        return f"Disk({self.num_blocks}x{self.block_size}, {self.backend!r})"

    def resize(self, num_blocks: int) -> None:
        """The medium grew or shrank to ``num_blocks`` (READ CAPACITY follows)."""
        if num_blocks <= 0:
            raise ValueError("a disk needs at least one block")
        if num_blocks * self.block_size > self.backend.size:
            raise ValueError(f"{num_blocks} blocks of {self.block_size} bytes exceed the "
                             f"backend's {self.backend.size} bytes")
        self.num_blocks = num_blocks
        self.info.num_blocks = num_blocks
        self._build_static()

    # -- static data ---------------------------------------------------------------------

    def _build_static(self) -> None:
        info = self.info
        pdt = PERIPHERAL_DISK
        self.peripheral = pdt
        self.inquiry_std = standard_inquiry(pdt, info.vendor, info.product, info.revision)

        pages = [Vpd.SUPPORTED_PAGES, Vpd.UNIT_SERIAL_NUMBER, Vpd.DEVICE_IDENTIFICATION,
                 Vpd.BLOCK_LIMITS, Vpd.BLOCK_DEVICE_CHARACTERISTICS, Vpd.LOGICAL_BLOCK_PROVISIONING]
        vpd: dict[int, bytes] = {}
        vpd[Vpd.SUPPORTED_PAGES] = vpd_page(pdt, Vpd.SUPPORTED_PAGES, bytes(pages))
        vpd[Vpd.UNIT_SERIAL_NUMBER] = vpd_page(pdt, Vpd.UNIT_SERIAL_NUMBER, _ascii(self.serial)[:252])
        t10 = _ascii(info.vendor, 8) + _ascii(self.serial)[:200]
        vpd[Vpd.DEVICE_IDENTIFICATION] = vpd_page(
            pdt,
            Vpd.DEVICE_IDENTIFICATION,
            designator(CODE_SET_BINARY, DESIGNATOR_NAA, self.device_id)
            + designator(CODE_SET_ASCII, DESIGNATOR_T10_VENDOR_ID, t10),
        )
        thin = self.thin
        vpd[Vpd.BLOCK_LIMITS] = _VPD_B0.pack(
            pdt, Vpd.BLOCK_LIMITS, 0x3C,
            0x01,  # WSNZ: a WRITE SAME number of blocks of zero is rejected
            0,  # MAXIMUM COMPARE AND WRITE LENGTH (not supported)
            min(1 << self.lbppbe, 0xFFFF),  # OPTIMAL TRANSFER LENGTH GRANULARITY
            self.max_transfer_blocks,
            self.optimal_transfer_blocks,
            0,  # MAXIMUM PREFETCH LENGTH
            self.max_unmap_blocks if thin else 0,
            self.max_unmap_descriptors if thin else 0,
            self.unmap_granularity_blocks if thin else 0,
            0,  # UGAVALID=0
            self.max_write_same_blocks,
        )
        vpd[Vpd.BLOCK_DEVICE_CHARACTERISTICS] = _VPD_B1.pack(
            pdt, Vpd.BLOCK_DEVICE_CHARACTERISTICS, 0x3C,
            0 if info.rotational else 1,  # MEDIUM ROTATION RATE: 1 = non-rotating, 0 = not reported
            0, 0, 0,
        )
        lbp = (B2_LBPU | B2_LBPWS | B2_LBPWS10) if thin else 0
        if self.lbprz:
            lbp |= B2_LBPRZ
        vpd[Vpd.LOGICAL_BLOCK_PROVISIONING] = _VPD_B2.pack(
            pdt, Vpd.LOGICAL_BLOCK_PROVISIONING, 4, 0, lbp, PROVISIONING_THIN if thin else 0, 0
        )
        self.vpd = vpd

        last = self.num_blocks - 1
        self.read_capacity_10 = _RC10.pack(min(last, 0xFFFFFFFF), self.block_size)
        b14 = (RC16_LBPME if thin else 0) | (RC16_LBPRZ if self.lbprz else 0)
        self.read_capacity_16 = _RC16.pack(last, self.block_size, 0, self.lbppbe & 0x0F, b14 << 8)

    # -- mode pages ----------------------------------------------------------------------

    MODE_PAGES = (ModePage.READ_WRITE_ERROR_RECOVERY, ModePage.CACHING, ModePage.CONTROL)

    def mode_page(self, page: int, pc: int) -> bytes | None:
        """Mode page ``page`` for page control ``pc`` (current / changeable / default), or None."""
        if page == ModePage.READ_WRITE_ERROR_RECOVERY:
            b = bytearray(12)
            b[0], b[1] = page, 10
            if pc != PageControl.CHANGEABLE:
                b[2] = 0x80  # AWRE
            return bytes(b)
        if page == ModePage.CACHING:
            b = bytearray(20)
            b[0], b[1] = page, 18
            # Without a volatile cache (a backend that cannot flush) WCE is 0 and fixed.
            cache = self.info.volatile_cache
            if pc == PageControl.CHANGEABLE:
                b[2] = 0x04 if cache else 0  # WCE is changeable
            elif pc == PageControl.DEFAULT:
                b[2] = 0x04 if self.info.write_cache and cache else 0
            else:
                b[2] = 0x04 if self.state.wce and cache else 0
            return bytes(b)
        if page == ModePage.CONTROL:
            b = bytearray(12)
            b[0], b[1] = page, 10
            if pc == PageControl.CHANGEABLE:
                b[2] = 0x04  # D_SENSE is changeable
            else:
                if pc == PageControl.CURRENT and self.state.d_sense:
                    b[2] = 0x04
                b[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
            return bytes(b)
        return None
