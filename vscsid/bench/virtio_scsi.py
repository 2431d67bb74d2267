"""Driver side of virtio-scsi (virtio 1.x, 5.6): request encoding, response parsing,
CDB helpers and a request builder that lays requests out in guest memory.

The wire structures and constants (request/response headers, TMF, AN, events,
the config space, response codes, feature bits) are :mod:`vscsid.virtio.scsi_wire`'s,
the one definition the device uses too; they are importable from here as well.
What is only the driver's: encoding LUNs, building CDBs, parsing responses and
placing requests in guest memory.

LUN field: ``[1, target, 0x40 | (lun >> 8), lun & 0xff, 0, 0, 0, 0]``; the REPORT
LUNS well-known LUN (0xC101) is encoded as ``C1 01 00 00 00 00 00 00``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

from vscsid.virtio.scsi_wire import (  # noqa: F401  (re-exported: the driver's vocabulary)
    AN_REQ, AN_RESP, CONFIG, CONFIG_SIZE, EVENT, EVENT_SIZE, REQ_HDR, REQ_HDR_SIZE, RESP_HDR,
    RESP_HDR_SIZE, RESPONSE_NAMES, TMF_REQ, TMF_RESP_SIZE, VIRTIO_SCSI_CDB_DEFAULT_SIZE,
    VIRTIO_SCSI_EVT_ASYNC_DEVICE_BUSY, VIRTIO_SCSI_EVT_ASYNC_EXTERNAL_REQUEST,
    VIRTIO_SCSI_EVT_ASYNC_MEDIA_CHANGE, VIRTIO_SCSI_EVT_ASYNC_MULTI_HOST,
    VIRTIO_SCSI_EVT_ASYNC_OPERATIONAL_CHANGE, VIRTIO_SCSI_EVT_ASYNC_POWER_MGMT,
    VIRTIO_SCSI_EVT_RESET_HARD, VIRTIO_SCSI_EVT_RESET_REMOVED, VIRTIO_SCSI_EVT_RESET_RESCAN,
    VIRTIO_SCSI_F_CHANGE, VIRTIO_SCSI_F_HOTPLUG, VIRTIO_SCSI_F_INOUT, VIRTIO_SCSI_F_T10_PI,
    VIRTIO_SCSI_S_ABORTED, VIRTIO_SCSI_S_ACA, VIRTIO_SCSI_S_BAD_TARGET, VIRTIO_SCSI_S_BUSY,
    VIRTIO_SCSI_S_FAILURE, VIRTIO_SCSI_S_FUNCTION_COMPLETE, VIRTIO_SCSI_S_FUNCTION_REJECTED,
    VIRTIO_SCSI_S_FUNCTION_SUCCEEDED, VIRTIO_SCSI_S_HEAD, VIRTIO_SCSI_S_INCORRECT_LUN,
    VIRTIO_SCSI_S_NEXUS_FAILURE, VIRTIO_SCSI_S_OK, VIRTIO_SCSI_S_ORDERED, VIRTIO_SCSI_S_OVERRUN,
    VIRTIO_SCSI_S_RESET, VIRTIO_SCSI_S_SIMPLE, VIRTIO_SCSI_S_TARGET_FAILURE,
    VIRTIO_SCSI_S_TRANSPORT_FAILURE, VIRTIO_SCSI_SENSE_DEFAULT_SIZE, VIRTIO_SCSI_T_AN_QUERY,
    VIRTIO_SCSI_T_AN_SUBSCRIBE, VIRTIO_SCSI_T_ASYNC_NOTIFY, VIRTIO_SCSI_T_EVENTS_MISSED,
    VIRTIO_SCSI_T_NO_EVENT, VIRTIO_SCSI_T_PARAM_CHANGE, VIRTIO_SCSI_T_TMF,
    VIRTIO_SCSI_T_TMF_ABORT_TASK, VIRTIO_SCSI_T_TMF_ABORT_TASK_SET, VIRTIO_SCSI_T_TMF_CLEAR_ACA,
    VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET, VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, VIRTIO_SCSI_T_TMF_QUERY_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET, VIRTIO_SCSI_T_TRANSPORT_RESET, WLUN_REPORT_LUNS,
)

from .driverq import DriverQueue
from .guestmem import FrontendMemory

# The driver's names for scsi_wire's sizes.
CMD_REQ_HDR_SIZE = REQ_HDR_SIZE
CMD_RESP_HDR_SIZE = RESP_HDR_SIZE
TMF_REQ_SIZE = TMF_REQ.size
AN_REQ_SIZE = AN_REQ.size
AN_RESP_SIZE = AN_RESP.size

# SAM status (SAM-5; the SCSI target, workers/scsi, has its own table: the driver
# does not import the data plane)
SAM_STAT_GOOD = 0x00
SAM_STAT_CHECK_CONDITION = 0x02
SAM_STAT_CONDITION_MET = 0x04
SAM_STAT_BUSY = 0x08
SAM_STAT_RESERVATION_CONFLICT = 0x18
SAM_STAT_TASK_SET_FULL = 0x28
SAM_STAT_ACA_ACTIVE = 0x30
SAM_STAT_TASK_ABORTED = 0x40

#: how the driver sends the REPORT LUNS well-known LUN (one of the forms decode_lun accepts)
WLUN_REPORT_LUNS_BYTES = bytes.fromhex("c101000000000000")
#: the largest single-level LUN (flat space addressing, 14 bits)
MAX_LUN = 16383


# ---------------------------------------------------------------------- LUNs
def lun_bytes(lun: int | bytes = 0, target: int = 0) -> bytes:
    """The 8-byte virtio-scsi LUN field; ``lun`` may already be 8 raw bytes."""
    if isinstance(lun, (bytes, bytearray)):
        if len(lun) != 8:
            raise ValueError("a raw LUN field is 8 bytes")
        return bytes(lun)
    if lun == WLUN_REPORT_LUNS:
        return WLUN_REPORT_LUNS_BYTES
    if not 0 <= lun <= MAX_LUN:
        raise ValueError(f"LUN {lun} out of range 0..{MAX_LUN}")
    if not 0 <= target <= 255:
        raise ValueError(f"target {target} out of range 0..255")
    return bytes((1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0))


def decode_lun(field8: bytes) -> tuple[int, int]:
    """(target, lun) from a virtio-scsi LUN field; the REPORT LUNS W-LUN gives (0, 0xC101)."""
    b = bytes(field8)
    if b[:2] == b"\xc1\x01":
        return 0, WLUN_REPORT_LUNS
    if b[0] != 1:
        raise ValueError(f"not a virtio-scsi LUN field: {b.hex()}")
    return b[1], ((b[2] << 8) | b[3]) & 0x3FFF


def decode_sam_lun(entry: bytes) -> int:
    """A LUN from an 8-byte SAM LUN (REPORT LUNS data): peripheral, flat or well-known."""
    b0, b1 = entry[0], entry[1]
    method = b0 >> 6
    if method == 0:
        return b1 | ((b0 & 0x3F) << 8)
    if method == 1:
        return ((b0 & 0x3F) << 8) | b1
    return (b0 << 8) | b1   # well-known / extended: return the raw first two bytes (0xC101)


# ------------------------------------------------------------------- commands
def encode_cmd_req(lun: int | bytes, id: int, cdb: bytes, *, target: int = 0,  # noqa: A002
                   task_attr: int = VIRTIO_SCSI_S_SIMPLE, prio: int = 0, crn: int = 0,
                   cdb_size: int = VIRTIO_SCSI_CDB_DEFAULT_SIZE) -> bytes:
    """virtio_scsi_cmd_req (without T10 PI fields): REQ_HDR_SIZE + cdb_size bytes."""
    if len(cdb) > cdb_size:
        raise ValueError(f"CDB of {len(cdb)} bytes does not fit cdb_size {cdb_size}")
    return (REQ_HDR.pack(lun_bytes(lun, target), id & (2**64 - 1), task_attr, prio, crn)
            + bytes(cdb) + bytes(cdb_size - len(cdb)))


@dataclass(frozen=True)
class CmdResp:
    sense_len: int
    residual: int
    status_qualifier: int
    status: int
    response: int
    sense: bytes          # the first min(sense_len, sense_size) bytes

    @property
    def ok(self) -> bool:
        return self.response == VIRTIO_SCSI_S_OK and self.status == SAM_STAT_GOOD

    @property
    def response_name(self) -> str:
        return RESPONSE_NAMES.get(self.response, f"UNKNOWN({self.response})")

    def sense_key(self) -> "SenseInfo | None":
        return parse_sense(self.sense)


def parse_cmd_resp(buf, sense_size: int = VIRTIO_SCSI_SENSE_DEFAULT_SIZE) -> CmdResp:
    b = bytes(buf)
    if len(b) < CMD_RESP_HDR_SIZE:
        raise ValueError(f"response of {len(b)} bytes is shorter than the {CMD_RESP_HDR_SIZE}-byte header")
    sense_len, residual, squal, status, response = RESP_HDR.unpack_from(b, 0)
    n = min(sense_len, sense_size, len(b) - CMD_RESP_HDR_SIZE)
    return CmdResp(sense_len, residual, squal, status, response,
                   b[CMD_RESP_HDR_SIZE:CMD_RESP_HDR_SIZE + n])


class SenseInfo(NamedTuple):
    key: int
    asc: int
    ascq: int
    descriptor_format: bool


def parse_sense(sense: bytes) -> SenseInfo | None:
    """Key/ASC/ASCQ from fixed (0x70/0x71) or descriptor (0x72/0x73) sense data."""
    if len(sense) < 1:
        return None
    code = sense[0] & 0x7F
    if code in (0x70, 0x71):
        if len(sense) < 14:
            return SenseInfo(sense[2] & 0x0F if len(sense) > 2 else 0, 0, 0, False)
        return SenseInfo(sense[2] & 0x0F, sense[12], sense[13], False)
    if code in (0x72, 0x73):
        if len(sense) < 4:
            return None
        return SenseInfo(sense[1] & 0x0F, sense[2], sense[3], True)
    return None


# ------------------------------------------------------------------- control
def encode_tmf_req(subtype: int, lun: int | bytes = 0, id: int = 0, *, target: int = 0) -> bytes:  # noqa: A002
    return TMF_REQ.pack(VIRTIO_SCSI_T_TMF, subtype, lun_bytes(lun, target), id & (2**64 - 1))


def parse_tmf_resp(buf) -> int:
    if len(buf) < 1:
        raise ValueError("empty TMF response")
    return bytes(buf[:1])[0]


def encode_an_req(type: int, lun: int | bytes = 0, event_requested: int = 0, *, target: int = 0) -> bytes:  # noqa: A002
    if type not in (VIRTIO_SCSI_T_AN_QUERY, VIRTIO_SCSI_T_AN_SUBSCRIBE):
        raise ValueError("AN request type must be VIRTIO_SCSI_T_AN_QUERY or _SUBSCRIBE")
    return AN_REQ.pack(type, lun_bytes(lun, target), event_requested)


def parse_an_resp(buf) -> tuple[int, int]:
    """(event_actual, response)."""
    return AN_RESP.unpack_from(bytes(buf[:AN_RESP_SIZE]), 0)


class Event(NamedTuple):
    event: int
    lun: bytes
    reason: int

    @property
    def missed(self) -> bool:
        return bool(self.event & VIRTIO_SCSI_T_EVENTS_MISSED)

    @property
    def kind(self) -> int:
        return self.event & ~VIRTIO_SCSI_T_EVENTS_MISSED


def parse_event(buf) -> Event:
    ev, lun, reason = EVENT.unpack_from(bytes(buf[:EVENT_SIZE]), 0)
    return Event(ev, lun, reason)


class ScsiConfig(NamedTuple):
    num_queues: int
    seg_max: int
    max_sectors: int
    cmd_per_lun: int
    event_info_size: int
    sense_size: int
    cdb_size: int
    max_channel: int
    max_target: int
    max_lun: int


def parse_config(buf) -> ScsiConfig:
    """struct virtio_scsi_config (36 bytes)."""
    return ScsiConfig(*CONFIG.unpack_from(bytes(buf[:CONFIG_SIZE]), 0))


# ---------------------------------------------------------------------- CDBs
def _be(v: int, n: int, what: str) -> bytes:
    if not 0 <= v < 1 << (8 * n):
        raise ValueError(f"{what} {v} does not fit {n} bytes")
    return v.to_bytes(n, "big")


def test_unit_ready() -> bytes:
    return bytes(6)


test_unit_ready.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def request_sense(alloc_len: int = 252, desc: bool = False) -> bytes:
    return bytes((0x03, int(desc), 0, 0, alloc_len & 0xFF, 0))


def inquiry(evpd: bool = False, page: int = 0, alloc_len: int = 96) -> bytes:
    return bytes((0x12, 1 if evpd else 0, page)) + _be(alloc_len, 2, "alloc_len") + b"\x00"


def read_capacity10() -> bytes:
    return b"\x25" + bytes(9)


def read_capacity16(alloc_len: int = 32) -> bytes:
    return b"\x9e\x10" + bytes(8) + _be(alloc_len, 4, "alloc_len") + b"\x00\x00"


def _rw_flags(fua: bool, dpo: bool) -> int:
    return (0x08 if fua else 0) | (0x10 if dpo else 0)


def read10(lba: int, blocks: int, *, fua: bool = False, dpo: bool = False) -> bytes:
    return (bytes((0x28, _rw_flags(fua, dpo))) + _be(lba, 4, "lba") + b"\x00"
            + _be(blocks, 2, "blocks") + b"\x00")


def write10(lba: int, blocks: int, *, fua: bool = False, dpo: bool = False) -> bytes:
    return (bytes((0x2A, _rw_flags(fua, dpo))) + _be(lba, 4, "lba") + b"\x00"
            + _be(blocks, 2, "blocks") + b"\x00")


def read16(lba: int, blocks: int, *, fua: bool = False, dpo: bool = False) -> bytes:
    return (bytes((0x88, _rw_flags(fua, dpo))) + _be(lba, 8, "lba") + _be(blocks, 4, "blocks")
            + b"\x00\x00")


def write16(lba: int, blocks: int, *, fua: bool = False, dpo: bool = False) -> bytes:
    return (bytes((0x8A, _rw_flags(fua, dpo))) + _be(lba, 8, "lba") + _be(blocks, 4, "blocks")
            + b"\x00\x00")


def sync_cache10(lba: int = 0, blocks: int = 0, *, immed: bool = False) -> bytes:
    return (bytes((0x35, 0x02 if immed else 0)) + _be(lba, 4, "lba") + b"\x00"
            + _be(blocks, 2, "blocks") + b"\x00")


def sync_cache16(lba: int = 0, blocks: int = 0, *, immed: bool = False) -> bytes:
    return (bytes((0x91, 0x02 if immed else 0)) + _be(lba, 8, "lba") + _be(blocks, 4, "blocks")
            + b"\x00\x00")


sync_cache = sync_cache10


def report_luns(select: int = 0, alloc_len: int = 4096) -> bytes:
    return bytes((0xA0, 0, select, 0, 0, 0)) + _be(alloc_len, 4, "alloc_len") + b"\x00\x00"


def mode_sense6(page: int, subpage: int = 0, *, dbd: bool = True, pc: int = 0, alloc_len: int = 255) -> bytes:
    return bytes((0x1A, 0x08 if dbd else 0, (pc << 6) | page, subpage, alloc_len & 0xFF, 0))


def mode_sense10(page: int, subpage: int = 0, *, dbd: bool = True, pc: int = 0, alloc_len: int = 4096) -> bytes:
    return (bytes((0x5A, 0x08 if dbd else 0, (pc << 6) | page, subpage, 0, 0, 0))
            + _be(alloc_len, 2, "alloc_len") + b"\x00")


def parse_read_capacity10(data: bytes) -> tuple[int, int]:
    """(last_lba, block_size)."""
    return struct.unpack_from(">II", data, 0)


def parse_read_capacity16(data: bytes) -> tuple[int, int]:
    """(last_lba, block_size)."""
    return struct.unpack_from(">QI", data, 0)


def parse_report_luns(data: bytes) -> list[int]:
    n = struct.unpack_from(">I", data, 0)[0]
    n = min(n, len(data) - 8) // 8
    return [decode_sam_lun(data[8 + 8 * i:16 + 8 * i]) for i in range(n)]


# ------------------------------------------------------------------- builder
def _split(total: int, sizes: Sequence[int] | int | None) -> list[int]:
    """Descriptor sizes covering ``total`` bytes.

    None -> one piece (none if ``total`` is 0); int -> pieces of at most that
    size; a list -> those sizes, clipped once ``total`` is reached (explicit
    zeros are kept as zero-length descriptors), any remainder as a final piece.
    """
    if sizes is None:
        return [total] if total else []
    if isinstance(sizes, int):
        if sizes <= 0:
            raise ValueError("segment size must be positive")
        return [min(sizes, total - o) for o in range(0, total, sizes)]
    pieces = []
    left = total
    for p in sizes:
        if p < 0:
            raise ValueError(f"negative piece size in {list(sizes)}")
        if p == 0:
            pieces.append(0)
        elif left:
            take = min(p, left)
            pieces.append(take)
            left -= take
    if left:
        pieces.append(left)
    return pieces


@dataclass(eq=False)
class _Handle:
    builder: "ScsiRequestBuilder"
    head: int = -1
    done: bool = False
    written_len: int = 0
    out_segs: list = field(default_factory=list)   # [(gpa, len)] device-readable descriptors
    in_segs: list = field(default_factory=list)    # [(gpa, len)] device-writable descriptors
    _blocks: list = field(default_factory=list)    # GPAs to free

    def _gather(self, start: int, n: int) -> bytes:
        """Bytes [start, start+n) of the device-writable stream."""
        mem = self.builder.mem
        out = bytearray()
        pos = 0
        for gpa, ln in self.in_segs:
            if n <= 0:
                break
            if pos + ln > start:
                off = max(0, start - pos)
                take = min(ln - off, n)
                out += mem.read(gpa + off, take)
                start += take
                n -= take
            pos += ln
        return bytes(out)

    def _complete(self, written_len: int) -> None:
        self.done = True
        self.written_len = written_len
        try:
            self._parse()
        finally:
            self.release()

    def _parse(self) -> None:  # pragma: no cover - overridden
        pass

    def release(self) -> None:
        """Free the guest buffers this handle owns (done automatically on completion)."""
        mem = self.builder.mem
        if not mem.closed:
            for g in self._blocks:
                mem.free(g)
        self._blocks = []


@dataclass(eq=False)
class CmdHandle(_Handle):
    tag: int = 0
    data_in_len: int = 0
    copy_data: bool = True
    response: CmdResp | None = None
    data_in_raw: bytes = b""       # every data-in byte offered to the device
    data_in: bytes = b""           # data_in_raw[:data_in_len - residual]

    def _parse(self) -> None:
        b = self.builder
        self.response = parse_cmd_resp(self._gather(0, CMD_RESP_HDR_SIZE + b.sense_size), b.sense_size)
        if self.copy_data and self.data_in_len:
            self.data_in_raw = self._gather(CMD_RESP_HDR_SIZE + b.sense_size, self.data_in_len)
            keep = max(0, self.data_in_len - self.response.residual)
            self.data_in = self.data_in_raw[:keep]


@dataclass(eq=False)
class TmfHandle(_Handle):
    response: int | None = None

    def _parse(self) -> None:
        self.response = parse_tmf_resp(self._gather(0, TMF_RESP_SIZE))


@dataclass(eq=False)
class AnHandle(_Handle):
    event_actual: int | None = None
    response: int | None = None

    def _parse(self) -> None:
        self.event_actual, self.response = parse_an_resp(self._gather(0, AN_RESP_SIZE))


@dataclass(eq=False)
class EventHandle(_Handle):
    event: Event | None = None

    def _parse(self) -> None:
        self.event = parse_event(self._gather(0, EVENT_SIZE))


class ScsiRequestBuilder:
    """Places virtio-scsi requests in guest memory and queues them on a :class:`DriverQueue`.

    Layout knobs (for device robustness tests) -- the request is a
    device-readable byte stream ``header || data_out`` and a device-writable
    stream ``response || data_in``:

    * ``out_split`` / ``in_split``: explicit descriptor sizes over the whole stream
      (e.g. ``[1, 7, 11, 32]`` splits the header across 4 descriptors; a piece
      may straddle header and data; a 0 makes a zero-length descriptor);
    * otherwise ``header_split``/``resp_split`` split the header/response and
      ``data_seg`` (int: max segment size, or a list of sizes) splits the data;
    * ``merge=True``: header+data-out in one descriptor, response+data-in in one;
    * ``gap``: bytes of poison between consecutive buffers so no two
      descriptors are contiguous in guest memory;
    * ``data_out_sg`` / ``data_in_sg``: caller-owned ``(gpa, len)`` buffers used
      as the data descriptors as is (no copy).
    """

    def __init__(self, q: DriverQueue, mem: FrontendMemory, *, cdb_size: int = VIRTIO_SCSI_CDB_DEFAULT_SIZE,
                 sense_size: int = VIRTIO_SCSI_SENSE_DEFAULT_SIZE, target: int = 0, gap_fill: int = 0xEE) -> None:
        self.q = q
        self.mem = mem
        self.cdb_size = cdb_size
        self.sense_size = sense_size
        self.target = target
        self.gap_fill = gap_fill
        self.foreign: list[tuple[Any, int]] = []    # completions whose token is not one of our handles
        self._next_tag = 1

    @property
    def resp_size(self) -> int:
        return CMD_RESP_HDR_SIZE + self.sense_size

    @property
    def req_size(self) -> int:
        return CMD_REQ_HDR_SIZE + self.cdb_size

    # ---------------------------------------------------------- placement
    def _place(self, data: bytes | int, pieces: list[int], gap: int, handle: _Handle,
               fill: int = 0) -> list[tuple[int, int]]:
        """Allocate one block holding ``pieces`` (separated by ``gap``); write ``data`` (bytes)
        or fill with ``fill`` (int total length). Returns the descriptors."""
        if not pieces:
            return []
        total = sum(pieces) + gap * len(pieces)
        blk = self.mem.alloc(max(total, 1), 64)
        handle._blocks.append(blk)
        if gap:
            self.mem.fill(blk, total, self.gap_fill)
        segs = []
        pos = blk
        src = 0
        for p in pieces:
            if isinstance(data, int):
                if p:
                    self.mem.fill(pos, p, fill)
            elif p:
                self.mem.write(pos, data[src:src + p])
            segs.append((pos, p))
            src += p
            pos += p + gap
        return segs

    def _queue(self, handle: _Handle, indirect: bool, publish: bool) -> None:
        try:
            handle.head = self.q.add(handle.out_segs, handle.in_segs, indirect=indirect,
                                     token=handle, publish=publish)
        except BaseException:
            handle.release()
            raise

    # ------------------------------------------------------------ requests
    def command(self, cdb: bytes, *, lun: int | bytes = 0, target: int | None = None,
                data_out: bytes | None = None, data_in_len: int = 0,
                data_out_sg: Sequence[tuple[int, int]] | None = None,
                data_in_sg: Sequence[tuple[int, int]] | None = None,
                task_attr: int = VIRTIO_SCSI_S_SIMPLE, prio: int = 0, crn: int = 0, tag: int | None = None,
                header_split: Sequence[int] | None = None, resp_split: Sequence[int] | None = None,
                data_seg: int | Sequence[int] | None = None, merge: bool = False,
                out_split: Sequence[int] | None = None, in_split: Sequence[int] | None = None,
                gap: int = 0, in_fill: int = 0, indirect: bool = False, publish: bool = True,
                copy_data: bool = True) -> CmdHandle:
        if tag is None:
            tag = self._next_tag
            self._next_tag += 1
        hdr = encode_cmd_req(lun, tag, cdb, target=self.target if target is None else target,
                             task_attr=task_attr, prio=prio, crn=crn, cdb_size=self.cdb_size)
        h = CmdHandle(self, tag=tag, copy_data=copy_data)
        if data_out_sg is not None and data_out:
            raise ValueError("give data_out or data_out_sg, not both")
        if data_in_sg is not None and data_in_len:
            raise ValueError("give data_in_len or data_in_sg, not both")
        data_out = bytes(data_out or b"")
        out_stream = hdr + data_out
        rsz = self.resp_size
        in_total = rsz + data_in_len
        if out_split is not None:
            out_pieces = _split(len(out_stream), out_split)
        elif merge:
            out_pieces = [len(out_stream)]
        else:
            out_pieces = _split(len(hdr), header_split) + _split(len(data_out), data_seg)
        if in_split is not None:
            in_pieces = _split(in_total, in_split)
        elif merge:
            in_pieces = [in_total]
        else:
            in_pieces = _split(rsz, resp_split) + _split(data_in_len, data_seg)
        try:
            h.out_segs = self._place(out_stream, out_pieces, gap, h)
            h.in_segs = self._place(in_total, in_pieces, gap, h, fill=in_fill)
        except BaseException:
            h.release()
            raise
        if data_out_sg:
            h.out_segs += [tuple(s) for s in data_out_sg]
        if data_in_sg:
            h.in_segs += [tuple(s) for s in data_in_sg]
            h.data_in_len = sum(s[1] for s in data_in_sg)
        else:
            h.data_in_len = data_in_len
        self._queue(h, indirect, publish)
        return h

    def tmf(self, subtype: int, *, lun: int | bytes = 0, target: int | None = None, tag: int = 0,
            out_split: Sequence[int] | None = None, gap: int = 0, indirect: bool = False,
            publish: bool = True) -> TmfHandle:
        req = encode_tmf_req(subtype, lun, tag, target=self.target if target is None else target)
        return self._control(TmfHandle(self), req, TMF_RESP_SIZE, out_split, gap, indirect, publish)

    def an(self, type: int, event_requested: int, *, lun: int | bytes = 0, target: int | None = None,  # noqa: A002
           out_split: Sequence[int] | None = None, gap: int = 0, indirect: bool = False,
           publish: bool = True) -> AnHandle:
        req = encode_an_req(type, lun, event_requested, target=self.target if target is None else target)
        return self._control(AnHandle(self), req, AN_RESP_SIZE, out_split, gap, indirect, publish)

    def _control(self, h: _Handle, req: bytes, resp_len: int, out_split, gap: int,
                 indirect: bool, publish: bool):
        try:
            h.out_segs = self._place(req, _split(len(req), out_split), gap, h)
            h.in_segs = self._place(resp_len, [resp_len], gap, h)
        except BaseException:
            h.release()
            raise
        self._queue(h, indirect, publish)
        return h

    def post_events(self, n: int = 1, *, size: int = EVENT_SIZE, publish: bool = True) -> list[EventHandle]:
        """Offer ``n`` device-writable event buffers (event queue)."""
        hs = []
        for _ in range(n):
            h = EventHandle(self)
            h.in_segs = self._place(size, [size], 0, h)
            self._queue(h, False, False)
            hs.append(h)
        if publish:
            self.q.publish()
        return hs

    # ------------------------------------------------------------- reaping
    def reap(self, max_n: int | None = None) -> list[_Handle]:
        """Consume used entries, complete (parse + free) our handles and return them."""
        done = []
        for tok, ln in self.q.get_used(max_n):
            if isinstance(tok, _Handle) and tok.builder is self:
                tok._complete(ln)
                done.append(tok)
            else:
                self.foreign.append((tok, ln))
        return done
