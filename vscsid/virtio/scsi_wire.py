"""virtio-scsi on the wire (virtio 1.x, 5.6): the one definition of its structures,
constants and LUN addressing, for the device (workers, control and event queues)
and the driver side (the benchmark, the tests); and the framing of a request
over a descriptor chain.

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

from ._ring import lib as _lib

# ----------------------------------------------------------------- sizes
VIRTIO_SCSI_CDB_DEFAULT_SIZE = _lib.VIRTIO_SCSI_CDB_DEFAULT_SIZE
VIRTIO_SCSI_SENSE_DEFAULT_SIZE = _lib.VIRTIO_SCSI_SENSE_DEFAULT_SIZE
#: the largest cdb_size / sense_size a driver may configure (config space)
MAX_CDB_SIZE = 252
MAX_SENSE_SIZE = 252

# ----------------------------------------------------------------- structures
REQ_HDR = struct.Struct("<8sQBBB")       # cmd req: lun, id, task_attr, prio, crn, then the CDB
RESP_HDR = struct.Struct("<IIHBB")       # cmd resp: sense_len, residual, status_qualifier,
                                         # status, response, then the sense
REQ_HDR_SIZE = REQ_HDR.size              # 19
RESP_HDR_SIZE = RESP_HDR.size            # 12
CTRL_TYPE = struct.Struct("<I")          # the first field of every control request
TMF_REQ = struct.Struct("<II8sQ")        # type, subtype, lun, id; response: u8
TMF_RESP_SIZE = 1
AN_REQ = struct.Struct("<I8sI")          # type, lun, event_requested
AN_RESP = struct.Struct("<IB")           # event_actual, response
EVENT = struct.Struct("<I8sI")           # event, lun, reason
EVENT_SIZE = EVENT.size                  # 16
CONFIG = struct.Struct("<IIIIIIIHHI")    # the virtio-scsi config space (virtio 1.x 5.6.4)
CONFIG_SIZE = CONFIG.size                # 36
assert (REQ_HDR_SIZE, RESP_HDR_SIZE) == (_lib.VIRTIO_SCSI_REQ_HDR, _lib.VIRTIO_SCSI_RESP_HDR)
assert [struct.calcsize(RESP_HDR.format[:n]) for n in (1, 2, 4, 5)] == [
    _lib.VIRTIO_SCSI_RESP_OFF_SENSE_LEN, _lib.VIRTIO_SCSI_RESP_OFF_RESIDUAL,
    _lib.VIRTIO_SCSI_RESP_OFF_STATUS, _lib.VIRTIO_SCSI_RESP_OFF_RESPONSE]

# ----------------------------------------------------------------- feature bits
VIRTIO_SCSI_F_INOUT = 0
VIRTIO_SCSI_F_HOTPLUG = 1
VIRTIO_SCSI_F_CHANGE = 2
VIRTIO_SCSI_F_T10_PI = 3

# ----------------------------------------------------------------- queues
CONTROL_QUEUE = 0
EVENT_QUEUE = 1
FIRST_REQUEST_QUEUE = 2

# ----------------------------------------------------------------- response codes
VIRTIO_SCSI_S_OK = _lib.VIRTIO_SCSI_S_OK
VIRTIO_SCSI_S_OVERRUN = 1
VIRTIO_SCSI_S_ABORTED = 2
VIRTIO_SCSI_S_BAD_TARGET = 3
VIRTIO_SCSI_S_RESET = 4
VIRTIO_SCSI_S_BUSY = 5
VIRTIO_SCSI_S_TRANSPORT_FAILURE = 6
VIRTIO_SCSI_S_TARGET_FAILURE = 7
VIRTIO_SCSI_S_NEXUS_FAILURE = 8
VIRTIO_SCSI_S_FAILURE = 9
VIRTIO_SCSI_S_FUNCTION_SUCCEEDED = 10
VIRTIO_SCSI_S_FUNCTION_REJECTED = 11
VIRTIO_SCSI_S_INCORRECT_LUN = 12
VIRTIO_SCSI_S_FUNCTION_COMPLETE = VIRTIO_SCSI_S_OK
RESPONSE_NAMES = {
    0: "OK", 1: "OVERRUN", 2: "ABORTED", 3: "BAD_TARGET", 4: "RESET", 5: "BUSY",
    6: "TRANSPORT_FAILURE", 7: "TARGET_FAILURE", 8: "NEXUS_FAILURE", 9: "FAILURE",
    10: "FUNCTION_SUCCEEDED", 11: "FUNCTION_REJECTED", 12: "INCORRECT_LUN",
}

# ----------------------------------------------------------------- task attributes
VIRTIO_SCSI_S_SIMPLE = 0
VIRTIO_SCSI_S_ORDERED = 1
VIRTIO_SCSI_S_HEAD = 2
VIRTIO_SCSI_S_ACA = 3

# ----------------------------------------------------------------- control queue
VIRTIO_SCSI_T_TMF = 0
VIRTIO_SCSI_T_AN_QUERY = 1
VIRTIO_SCSI_T_AN_SUBSCRIBE = 2
VIRTIO_SCSI_T_TMF_ABORT_TASK = 0
VIRTIO_SCSI_T_TMF_ABORT_TASK_SET = 1
VIRTIO_SCSI_T_TMF_CLEAR_ACA = 2
VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET = 3
VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET = 4
VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET = 5
VIRTIO_SCSI_T_TMF_QUERY_TASK = 6
VIRTIO_SCSI_T_TMF_QUERY_TASK_SET = 7
TMF_NAMES = {
    0: "abort_task", 1: "abort_task_set", 2: "clear_aca", 3: "clear_task_set",
    4: "i_t_nexus_reset", 5: "logical_unit_reset", 6: "query_task", 7: "query_task_set",
}
# asynchronous notification event classes (event_requested / event_actual bits)
VIRTIO_SCSI_EVT_ASYNC_OPERATIONAL_CHANGE = 2
VIRTIO_SCSI_EVT_ASYNC_POWER_MGMT = 4
VIRTIO_SCSI_EVT_ASYNC_EXTERNAL_REQUEST = 8
VIRTIO_SCSI_EVT_ASYNC_MEDIA_CHANGE = 16
VIRTIO_SCSI_EVT_ASYNC_MULTI_HOST = 32
VIRTIO_SCSI_EVT_ASYNC_DEVICE_BUSY = 64

# ----------------------------------------------------------------- event queue
VIRTIO_SCSI_T_NO_EVENT = 0
VIRTIO_SCSI_T_TRANSPORT_RESET = 1
VIRTIO_SCSI_T_ASYNC_NOTIFY = 2
VIRTIO_SCSI_T_PARAM_CHANGE = 3
VIRTIO_SCSI_T_EVENTS_MISSED = 0x80000000
VIRTIO_SCSI_EVT_RESET_HARD = 0
VIRTIO_SCSI_EVT_RESET_RESCAN = 1
VIRTIO_SCSI_EVT_RESET_REMOVED = 2

# ----------------------------------------------------------------- LUN field
#: decode_lun() results that are not a LUN number
LUN_BAD_TARGET = -1
#: decode_lun() for an addressing form no logical unit has
LUN_UNSERVED = 0xFFFF


#: The REPORT LUNS well-known LUN in the forms drivers send (SAM: 0xC101). The SCSI
#: target, which knows nothing of virtio, has the same SAM value
#: (workers/scsi/constants.py; tests/unit/test_layers.py checks they agree).
WLUN_REPORT_LUNS = 0xC101


def decode_address(lun: bytes) -> tuple[int, int]:
    """Map the 8-byte virtio-scsi LUN field to ``(target, LUN number)``.

    ``target`` is ``LUN_BAD_TARGET`` when the field addresses no target at all
    (an unknown first byte). The number is ``WLUN_REPORT_LUNS`` for the REPORT
    LUNS well-known LUN (target 0 when sent in its bare form), or the
    single-level LUN number; addressing forms we do not serve map to
    ``LUN_UNSERVED``, which no LU has (the target then answers LOGICAL UNIT
    NOT SUPPORTED).
    """
    b0 = lun[0]
    if b0 == 1:
        target = lun[1]
        b2 = lun[2]
        method = b2 >> 6
        if lun[4] | lun[5] | lun[6] | lun[7]:
            return target, LUN_UNSERVED      # multi-level LUN: not served
        if b2 == 0xC1 and lun[3] == 0x01:
            # Linux puts the REPORT LUNS well-known LUN (0xC101) in the
            # single-level slot: lun[2] = 0xC1, lun[3] = 0x01.
            return target, WLUN_REPORT_LUNS
        if method == 1:              # flat space addressing
            return target, ((b2 & 0x3F) << 8) | lun[3]
        if method == 0 and b2 == 0:  # peripheral device addressing, bus 0
            return target, lun[3]
        return target, LUN_UNSERVED
    if b0 == 0xC1 and lun[1] == 0x01 and not any(lun[2:]):
        return 0, WLUN_REPORT_LUNS
    return LUN_BAD_TARGET, LUN_UNSERVED


def decode_lun(lun: bytes, target_id: int = 0) -> int:
    """The LUN number of a request for target ``target_id`` (see decode_address), or
    ``LUN_BAD_TARGET`` when the request is for another target or none."""
    target, number = decode_address(lun)
    return number if target == target_id else LUN_BAD_TARGET


def encode_event_lun(target: int, lun: int) -> bytes:
    """The LUN field of an event (virtio 1.x 5.6.6.3): 1, the target, then the LUN in
    the encoding REPORT LUNS uses (peripheral addressing below 256, else flat), which
    is what drivers match (Linux takes lun[2] << 8 | lun[3])."""
    if lun < 256:
        return bytes((1, target, 0, lun, 0, 0, 0, 0))
    return bytes((1, target, 0x40 | (lun >> 8), lun & 0xFF, 0, 0, 0, 0))


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
