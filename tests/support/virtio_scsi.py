"""The driver-side virtio-scsi of the bench (:mod:`vscsid.bench.virtio_scsi`, all of
it re-exported) plus what only tests use: the device's half of the framing for
fake devices (:func:`encode_cmd_resp`, :func:`encode_event`) and a header writer
into an existing buffer (:func:`pack_cmd_req_into`). Structures from
:mod:`vscsid.virtio.scsi_wire`."""
from __future__ import annotations

from vscsid.bench.virtio_scsi import *  # noqa: F401,F403
from vscsid.bench.virtio_scsi import lun_bytes
from vscsid.virtio.scsi_wire import (
    EVENT, REQ_HDR, REQ_HDR_SIZE, RESP_HDR, VIRTIO_SCSI_CDB_DEFAULT_SIZE, VIRTIO_SCSI_SENSE_DEFAULT_SIZE,
)


def pack_cmd_req_into(buf, offset: int, lun8: bytes, id: int, cdb: bytes, *,  # noqa: A002
                      task_attr: int = 0, prio: int = 0, crn: int = 0,
                      cdb_size: int = VIRTIO_SCSI_CDB_DEFAULT_SIZE) -> int:
    """Write a request header straight into ``buf`` (e.g. a guest view). Returns its size."""
    REQ_HDR.pack_into(buf, offset, lun8, id, task_attr, prio, crn)
    o = offset + REQ_HDR_SIZE
    n = len(cdb)
    buf[o:o + n] = cdb
    if n < cdb_size:
        buf[o + n:o + cdb_size] = bytes(cdb_size - n)
    return REQ_HDR_SIZE + cdb_size


def encode_cmd_resp(*, response: int = 0, status: int = 0, residual: int = 0, sense: bytes = b"",
                    status_qualifier: int = 0, sense_len: int | None = None,
                    sense_size: int = VIRTIO_SCSI_SENSE_DEFAULT_SIZE) -> bytes:
    """The device's response bytes (for fakes and reference devices in tests)."""
    if len(sense) > sense_size:
        raise ValueError("sense larger than sense_size")
    return (RESP_HDR.pack(len(sense) if sense_len is None else sense_len, residual,
                          status_qualifier, status, response)
            + sense + bytes(sense_size - len(sense)))


def encode_event(event: int, lun: int | bytes = bytes(8), reason: int = 0, *, target: int = 0) -> bytes:
    """The device's event bytes (for fakes in tests)."""
    return EVENT.pack(event, lun_bytes(lun, target), reason)
