"""Hostile CDBs through the full stack (front end → worker → SCSI target → backend):
allocation lengths, transfer lengths that do not fit the buffers, LBA overflow, reserved
bits, data direction mismatches and bidirectional buffers."""
from __future__ import annotations

import os

import pytest

from vscsid.bench import virtio_scsi as vs

from .harness import Guest

pytestmark = pytest.mark.timeout(60)

FILL = 0x77
BLOCKS = (16 << 20) // 512
U64 = (1 << 64) - 1


@pytest.fixture
def guest(daemon, baseline):
    g = Guest(daemon)
    yield g
    g.close_and_wait()


def image_bytes(daemon, lba: int, n: int) -> bytes:
    with open(daemon.image, "rb") as f:
        f.seek(lba * 512)
        return f.read(n * 512)


def sense_of(h) -> tuple[int, int, int]:
    s = vs.parse_sense(h.response.sense)
    return s.key, s.asc, s.ascq


def field_pointer(h) -> tuple[int, int | None]:
    """(byte, bit) of the sense-key-specific field pointer, which must point into the CDB."""
    sense = h.response.sense
    assert sense[0] & 0x7F == 0x70, "fixed format expected"
    sks = sense[15:18]
    assert sks[0] & 0x80, "SKSV not set"
    assert sks[0] & 0x40, "C/D: the pointer must refer to the CDB"
    bit = sks[0] & 0x07 if sks[0] & 0x08 else None
    return (sks[1] << 8) | sks[2], bit


# =========================================================================== allocation length

ALLOC_CASES = {
    "inquiry": lambda a: vs.inquiry(alloc_len=a),
    "inquiry_vpd83": lambda a: vs.inquiry(evpd=True, page=0x83, alloc_len=a),
    "inquiry_vpd00": lambda a: vs.inquiry(evpd=True, page=0x00, alloc_len=a),
    "report_luns": lambda a: vs.report_luns(alloc_len=max(a, 16)),
    "mode_sense6": lambda a: vs.mode_sense6(0x3F, alloc_len=min(a, 255)),
    "mode_sense10": lambda a: vs.mode_sense10(0x3F, alloc_len=a),
    "request_sense": lambda a: vs.request_sense(alloc_len=min(a, 255)),
    "read_capacity16": lambda a: vs.read_capacity16(alloc_len=a),
    "rsoc": lambda a: bytes([0xA3, 0x0C, 0, 0, 0, 0]) + a.to_bytes(4, "big") + bytes(2),
}


@pytest.mark.parametrize("name", sorted(ALLOC_CASES))
@pytest.mark.parametrize("alloc,buf", [(1, 200), (5, 200), (16, 17), (200, 5), (200, 16),
                                       (0xFFFF, 100)])
def test_allocation_length_truncates(guest, name, alloc, buf):
    """SPC: the device transfers min(allocation length, data available) bytes, and never
    more than the buffer holds; the rest of the buffer is left alone."""
    make = ALLOC_CASES[name]
    full = guest.command(make(0xFFFF), data_in_len=70000)
    assert full.response.ok, full.response
    natural = 70000 - full.response.residual
    h = guest.command(make(alloc), data_in_len=buf, in_fill=FILL)
    assert h.response.response == vs.VIRTIO_SCSI_S_OK
    if h.response.status:        # e.g. REPORT LUNS with an allocation length under 16
        assert sense_of(h)[:2] == (5, 0x24)
        return
    expect = min(natural, buf)
    got = buf - h.response.residual
    assert got <= expect
    assert h.data_in_raw[:got] == full.data_in[:got]
    assert h.data_in_raw[got:] == bytes([FILL]) * (buf - got), "bytes past the transfer written"


@pytest.mark.parametrize("alloc", [0, 1, 3, 7])
def test_inquiry_allocation_length_exact(guest, alloc):
    h = guest.command(vs.inquiry(alloc_len=alloc), data_in_len=96, in_fill=FILL)
    assert h.response.ok
    assert h.response.residual == 96 - alloc
    assert h.data_in_raw[alloc:] == bytes([FILL]) * (96 - alloc)


# =========================================================================== transfer length

@pytest.mark.parametrize("cdb,buf", [
    (vs.read10(0, 8), 4095), (vs.read10(0, 1), 511), (vs.read16(0, 8), 512),
    (bytes([0x08, 0, 0, 0, 0, 0]), 512),                    # READ(6) length 0 means 256 blocks
    (bytes([0xA8, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0]), 1000),  # READ(12)
])
def test_read_longer_than_the_buffers_is_an_overrun(guest, cdb, buf):
    h = guest.command(cdb, data_in_len=buf, in_fill=FILL, data_seg=[100, 200])
    assert h.response.response == vs.VIRTIO_SCSI_S_OVERRUN
    assert h.data_in_raw == bytes([FILL]) * buf, "an overrun must transfer nothing"
    assert guest.command(vs.test_unit_ready()).response.ok


@pytest.mark.parametrize("cdb,buf", [
    (vs.write10(100, 8), 4095), (vs.write10(100, 1), 511), (vs.write16(100, 8), 512),
    (bytes([0x0A, 0, 0, 100, 0, 0]), 512),                   # WRITE(6) length 0: 256 blocks
    (bytes([0xAA, 0, 0, 0, 0, 100, 0, 0, 0, 2, 0, 0]), 1000),
    (bytes([0x2F, 0x02, 0, 0, 0, 100, 0, 0, 8, 0]), 512),    # VERIFY(10) BYTCHK=1
    (bytes([0x41, 0, 0, 0, 0, 100, 0, 0, 8, 0]), 100),       # WRITE SAME(10) needs a block
    (bytes([0x15, 0x10, 0, 0, 24, 0]), 20),                  # MODE SELECT(6) list of 24
    (bytes([0x55, 0x10, 0, 0, 0, 0, 0, 0, 40, 0]), 12),      # MODE SELECT(10)
])
def test_write_longer_than_the_buffers_is_an_overrun_and_writes_nothing(daemon, guest, cdb, buf):
    before = image_bytes(daemon, 100, 300)
    h = guest.command(cdb, data_out=b"\xee" * buf, data_seg=[300])
    assert h.response.response == vs.VIRTIO_SCSI_S_OVERRUN, h.response
    assert image_bytes(daemon, 100, 300) == before
    assert guest.command(vs.test_unit_ready()).response.ok


def test_transfer_over_the_maximum_is_an_invalid_field(guest):
    h = guest.command(vs.read16(0, 0x1_0001), data_in_len=512)   # 32 MiB is the maximum
    assert sense_of(h) == (5, 0x24, 0) and field_pointer(h) == (10, None)


# =========================================================================== LBA overflow

@pytest.mark.parametrize("cdb", [
    vs.read16(U64, 1), vs.read16(U64 - 7, 16), vs.read16(BLOCKS, 1), vs.read16(BLOCKS - 1, 2),
    vs.write16(U64, 1), vs.write16(U64 - 1, 2), vs.write16(1 << 63, 1),
    vs.read10(0xFFFF_FFFF, 1), vs.write10(0xFFFF_FFFF, 0xFFFF),
    bytes([0x8F, 0, *U64.to_bytes(8, "big"), 0, 0, 0, 1, 0, 0]),           # VERIFY(16)
    vs.sync_cache16(U64, 2), vs.sync_cache10(0xFFFF_FFFF, 0xFFFF),
    bytes([0x93, 0, *(U64 - 1).to_bytes(8, "big"), 0, 0, 0, 4, 0, 0]),     # WRITE SAME(16)
    bytes([0x9E, 0x12, *U64.to_bytes(8, "big"), 0, 0, 0, 32, 0, 0]),      # GET LBA STATUS
], ids=lambda c: c.hex()[:6])
def test_lba_plus_length_past_the_end(daemon, guest, cdb):
    before = image_bytes(daemon, BLOCKS - 8, 8)
    op = cdb[0]
    kw = {}
    if op in (0x8A, 0x2A, 0x93):
        kw["data_out"] = b"\xee" * 1024
    elif op in (0x88, 0x28, 0x9E):
        kw["data_in_len"] = 1024
    h = guest.command(cdb, **kw)
    assert h.response.response == vs.VIRTIO_SCSI_S_OK
    assert sense_of(h) == (5, 0x21, 0), h.response
    assert image_bytes(daemon, BLOCKS - 8, 8) == before


# =========================================================================== reserved bits

@pytest.mark.parametrize("cdb,byte,bit", [
    (vs.read10(0, 1)[:1] + b"\x01" + vs.read10(0, 1)[2:], 1, 0),
    (vs.read10(0, 1)[:9] + b"\x04", 9, 2),                     # NACA in the control byte
    (vs.write16(0, 1)[:15] + b"\x04", 15, 2),
    (vs.test_unit_ready()[:1] + b"\x80" + bytes(4), 1, 7),
    (vs.test_unit_ready()[:5] + b"\x04", 5, 2),
    (vs.inquiry(alloc_len=36)[:1] + b"\x02" + vs.inquiry(alloc_len=36)[2:], 1, 1),
    (vs.inquiry(alloc_len=36)[:5] + b"\x04", 5, 2),
    (bytes([0xA0, 0x01]) + bytes(4) + (64).to_bytes(4, "big") + bytes(2), 1, 0),
    (bytes([0x25, 0, 0, 0, 0, 0, 0, 0, 0x02, 0]), 8, 1),      # READ CAPACITY(10)
    (bytes([0x35, 0x04, 0, 0, 0, 0, 0, 0, 0, 0]), 1, 2),      # SYNCHRONIZE CACHE(10)
])
def test_reserved_bits_are_an_invalid_field_with_a_pointer(guest, cdb, byte, bit):
    h = guest.command(cdb, data_in_len=512 if cdb[0] in (0x28, 0x12, 0xA0, 0x25) else 0,
                      data_out=b"\0" * 512 if cdb[0] == 0x8A else None)
    assert h.response.response == vs.VIRTIO_SCSI_S_OK and h.response.status == 2
    assert sense_of(h) == (5, 0x24, 0)
    assert field_pointer(h) == (byte, bit)


def test_unknown_opcodes(guest):
    for op in (0x02, 0x0C, 0x3F, 0x7F, 0xC0, 0xFF):
        h = guest.command(bytes([op]) + bytes(15), data_in_len=64)
        assert sense_of(h) == (5, 0x20, 0), hex(op)


# =========================================================================== data direction

def test_data_out_on_a_read_is_an_overrun(daemon, guest):
    before = image_bytes(daemon, 0, 8)
    h = guest.command(vs.read10(0, 8), data_out=b"\xee" * 4096)
    assert h.response.response == vs.VIRTIO_SCSI_S_OVERRUN
    assert image_bytes(daemon, 0, 8) == before


def test_data_in_on_a_write_is_an_overrun_and_writes_nothing(daemon, guest):
    before = image_bytes(daemon, 200, 8)
    h = guest.command(vs.write10(200, 8), data_in_len=4096, in_fill=FILL)
    assert h.response.response == vs.VIRTIO_SCSI_S_OVERRUN
    assert h.data_in_raw == bytes([FILL]) * 4096
    assert image_bytes(daemon, 200, 8) == before


@pytest.mark.parametrize("cdb", [vs.read10(300, 1), vs.write10(300, 1), vs.test_unit_ready(),
                                 vs.inquiry(alloc_len=64)], ids=lambda c: c.hex()[:2])
def test_bidirectional_buffers_fail(daemon, guest, cdb):
    before = image_bytes(daemon, 300, 1)
    mark = daemon.mark()
    h = guest.command(cdb, data_out=b"\xee" * 512, data_in_len=512, in_fill=FILL)
    assert h.response.response == vs.VIRTIO_SCSI_S_FAILURE
    assert h.data_in_raw == bytes([FILL]) * 512
    assert image_bytes(daemon, 300, 1) == before
    daemon.wait_since(mark, "bidirectional_request")


# =========================================================================== addressing

def test_bad_target_and_lun_forms(guest):
    assert guest.command(vs.test_unit_ready(), target=1).response.response == vs.VIRTIO_SCSI_S_BAD_TARGET
    h = guest.command(vs.test_unit_ready(), lun=7)
    assert sense_of(h) == (5, 0x25, 0)               # LOGICAL UNIT NOT SUPPORTED
    for raw in (bytes(8), b"\xff" * 8, bytes([1, 0, 0x80, 0, 0, 0, 0, 0]),
                bytes([1, 0, 0x40, 0, 1, 0, 0, 0]), bytes([2, 0, 0, 0, 0, 0, 0, 0])):
        h = guest.command(vs.test_unit_ready(), lun=raw)
        assert h.response.response in (vs.VIRTIO_SCSI_S_BAD_TARGET, vs.VIRTIO_SCSI_S_OK), raw.hex()
        if h.response.response == vs.VIRTIO_SCSI_S_OK:
            assert h.response.status == 2
    assert guest.command(vs.test_unit_ready()).response.ok


WRITING = {0x0A, 0x2A, 0x2E, 0x41, 0x42, 0x8A, 0x8E, 0x93, 0xAA, 0xAE, 0x04, 0x15, 0x55}


def test_random_cdbs_never_break_the_queue(daemon, guest):
    """Random 32-byte CDBs with random buffer shapes: every one is answered with a valid
    response, the image outside the written range is untouched, and the queue survives."""
    import random

    rng = random.Random(1234)
    before = image_bytes(daemon, 1000, 64)
    for _ in range(150):
        op = rng.choice([0x00, 0x03, 0x08, 0x12, 0x1A, 0x25, 0x28, 0x2F, 0x35, 0x5A, 0x88, 0x8F,
                         0x91, 0x9E, 0xA0, 0xA3, 0xA8, rng.randrange(256)])
        if op in WRITING:
            op = 0x00
        cdb = bytes([op]) + os.urandom(rng.randrange(0, 31))
        kw = {}
        shape = rng.randrange(3)
        if shape == 1:
            kw["data_in_len"] = rng.randrange(1, 9000)
            kw["data_seg"] = rng.choice([None, 512, 333])
        h = guest.command(cdb, **kw)
        assert h.response.response in (vs.VIRTIO_SCSI_S_OK, vs.VIRTIO_SCSI_S_OVERRUN)
        if h.response.status:
            assert h.response.status == 2 and 0 < len(h.response.sense) <= 96
    assert image_bytes(daemon, 1000, 64) == before
    assert guest.command(vs.test_unit_ready()).response.ok
