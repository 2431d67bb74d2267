"""virtio-scsi request/response framing on top of a descriptor chain.

Command request (device-readable, then device-writable; virtio spec 5.6.6)::

    readable:  lun[8] id le64 task_attr u8 prio u8 crn u8 cdb[cdb_size]  | data-out ...
    writable:  sense_len le32 residual le32 status_qualifier le16 status u8 response u8
               sense[sense_size]                                         | data-in ...

With VIRTIO_F_VERSION_1 (ANY_LAYOUT) the header, response and data may be split
across descriptors at any byte, so the framing works on byte offsets over the
chain's lists of views, never on descriptor boundaries.

The SCSI target behind this knows nothing of virtio: it gets the LUN number,
the CDB and two scatter-gather lists of guest memory views.
"""
from __future__ import annotations

import struct

from .scsi.constants import WLUN_REPORT_LUNS  # noqa: F401  (re-exported for the control plane)

REQ_HDR = struct.Struct("<8sQBBB")       # lun, id, task_attr, prio, crn  (19 bytes)
RESP_HDR = struct.Struct("<IIHBB")       # sense_len, residual, status_qualifier, status, response
REQ_HDR_SIZE = REQ_HDR.size              # 19
RESP_HDR_SIZE = RESP_HDR.size            # 12

DEFAULT_CDB_SIZE = 32
DEFAULT_SENSE_SIZE = 96

# virtio-scsi response codes
S_OK = 0
S_OVERRUN = 1
S_ABORTED = 2
S_BAD_TARGET = 3
S_RESET = 4
S_BUSY = 5
S_TRANSPORT_FAILURE = 6
S_TARGET_FAILURE = 7
S_NEXUS_FAILURE = 8
S_FAILURE = 9
S_FUNCTION_SUCCEEDED = 10
S_FUNCTION_REJECTED = 11
S_INCORRECT_LUN = 12


#: decode_lun() results that are not a LUN number
LUN_BAD_TARGET = -1


def decode_lun(lun: bytes, target_id: int = 0) -> int:
    """Map the 8-byte virtio-scsi LUN field to a single-level LUN number.

    Returns ``LUN_BAD_TARGET`` when the request is not for our target (only
    target ``target_id`` exists), ``WLUN_REPORT_LUNS`` for the REPORT LUNS
    well-known LUN, or the LUN number. Addressing forms we do not serve map to
    a number no LU has (the target then answers LOGICAL UNIT NOT SUPPORTED).
    """
    b0 = lun[0]
    if b0 == 1:
        if lun[1] != target_id:
            return LUN_BAD_TARGET
        b2 = lun[2]
        method = b2 >> 6
        if lun[4] | lun[5] | lun[6] | lun[7]:
            return 0xFFFF            # multi-level LUN: not served
        if b2 == 0xC1 and lun[3] == 0x01:
            # Linux puts the REPORT LUNS well-known LUN (0xC101) in the
            # single-level slot: lun[2] = 0xC1, lun[3] = 0x01.
            return WLUN_REPORT_LUNS
        if method == 1:              # flat space addressing
            return ((b2 & 0x3F) << 8) | lun[3]
        if method == 0 and b2 == 0:  # peripheral device addressing, bus 0
            return lun[3]
        return 0xFFFF
    if b0 == 0xC1 and lun[1] == 0x01 and not any(lun[2:]):
        return WLUN_REPORT_LUNS
    return LUN_BAD_TARGET


def split_views(views: list, offset: int) -> list:
    """The views that cover everything from byte ``offset`` on."""
    out = []
    for v in views:
        n = len(v)
        if offset >= n:
            offset -= n
            continue
        out.append(v[offset:] if offset else v)
        offset = 0
    return out


def gather(views: list, length: int) -> bytes:
    """Copy the first ``length`` bytes of a list of views (short if they are shorter)."""
    first = views[0] if views else b""
    if len(first) >= length:
        return bytes(first[:length])
    parts = []
    need = length
    for v in views:
        if need <= 0:
            break
        part = v[:need]
        parts.append(bytes(part))
        need -= len(part)
    return b"".join(parts)


def scatter(views: list, data: bytes, offset: int = 0) -> int:
    """Copy ``data`` into the views starting at byte ``offset``; returns bytes copied."""
    pos = 0
    total = len(data)
    for v in views:
        n = len(v)
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, total - pos)
        v[offset:offset + take] = data[pos:pos + take]
        pos += take
        offset = 0
        if pos >= total:
            break
    return pos
