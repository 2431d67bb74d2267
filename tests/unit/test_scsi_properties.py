"""Property tests: whatever the CDB and buffers, the target answers with a well-formed
ScsiResult, never raises, and never touches memory outside the data-in buffer."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vscsid.workers.backends import open_backend
from vscsid.workers.scsi import WLUN_REPORT_LUNS, Disk, DiskInfo, ScsiResult, ScsiTarget, SGList
from vscsid.workers.scsi.cdb import COMMANDS

BLOCKS = 64
GUARD = 0xA5
SETTINGS = settings(max_examples=2000, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

KNOWN = [(c.opcode, c.service_action, c.usage) for c in COMMANDS]
LUNS = [0, 1, 2, 7, WLUN_REPORT_LUNS]


def make_target(tmp_path):
    disks = {}
    for lun, (bs, ro) in {0: (512, False), 1: (4096, False), 2: (512, True)}.items():
        path = tmp_path / f"lun{lun}.img"
        with open(path, "wb") as f:
            f.truncate(BLOCKS * bs)
        backend = open_backend(str(path))
        info = DiskInfo.for_backend(backend, block_size=bs, serial=f"P{lun}", readonly=ro,
                                    max_unmap_descriptors=4, max_write_same_bytes=BLOCKS * bs)
        disks[lun] = Disk(info, backend)
    return ScsiTarget(disks)


class Buffers:
    """Segments carved out of one arena with guard bytes around and between them."""

    def __init__(self, sizes, fill=None):
        self.arena = bytearray([GUARD]) * (sum(sizes) + 16 * (len(sizes) + 1))
        mv = memoryview(self.arena)
        self.spans = []
        pos = 16
        for n in sizes:
            self.spans.append((pos, n))
            pos += n + 16
        if fill is not None:
            k = 0
            for off, n in self.spans:
                self.arena[off:off + n] = fill[k:k + n]
                k += n
        self.sg = SGList([mv[off:off + n] for off, n in self.spans])
        self.snapshot = bytes(self.arena)

    def guards_intact(self) -> bool:
        prev = 0
        for off, n in self.spans + [(len(self.arena), 0)]:
            if self.arena[prev:off] != bytes([GUARD]) * (off - prev):
                return False
            prev = off + n
        return True

    def unchanged(self) -> bool:
        return bytes(self.arena) == self.snapshot


def check_sense(sense: bytes, cdb: bytes) -> None:
    assert 8 <= len(sense) <= 96
    if sense[0] & 0x7F == 0x70:
        assert len(sense) == 18 and sense[7] == 10
        key, asc = sense[2] & 0x0F, sense[12]
        sks = sense[15:18]
    else:
        assert sense[0] == 0x72 and len(sense) == 8 + sense[7]
        key, asc = sense[1] & 0x0F, sense[2]
        sks = None
        pos = 8
        while pos < len(sense):
            dtype, dlen = sense[pos], sense[pos + 1]
            assert pos + 2 + dlen <= len(sense)
            if dtype == 0x02:
                assert dlen == 6
                sks = sense[pos + 4:pos + 7]
            pos += 2 + dlen
    assert key in (0x3, 0x4, 0x5, 0x7, 0xE)
    if asc == 0x24:  # INVALID FIELD IN CDB always carries a field pointer into the CDB
        assert sks is not None and sks[0] & 0xC0 == 0xC0
        assert int.from_bytes(sks[1:], "big") < max(1, len(cdb))
    if sks is not None and sks[0] & 0x80 and not sks[0] & 0x40:
        assert asc == 0x26


def check(target, lun, cdb, in_sizes, out_data, out_sizes):
    din = Buffers(in_sizes)
    total_out = sum(out_sizes)
    out_data = out_data or b"\x00"
    dout = Buffers(out_sizes, fill=(out_data * (total_out // len(out_data) + 1))[:total_out])
    res = target.execute(lun, cdb, dout.sg, din.sg)
    assert isinstance(res, ScsiResult)
    assert res.status in (0x00, 0x02)
    assert 0 <= res.data_in_len <= din.sg.length
    assert 0 <= res.data_out_len <= dout.sg.length
    if res.status == 0x02:
        assert not res.overrun and res.data_in_len == 0
        check_sense(res.sense, cdb)
    else:
        assert res.sense == b""
    if res.overrun:
        assert res.data_in_len == 0 and res.data_out_len == 0 and din.unchanged()
    assert din.guards_intact()
    assert dout.unchanged()  # the target never writes into the data-out buffer


sizes = st.lists(st.integers(0, 5000), min_size=0, max_size=4)


def test_arbitrary_cdbs(tmp_path):
    target = make_target(tmp_path)

    @SETTINGS
    @given(lun=st.sampled_from(LUNS), cdb=st.binary(min_size=0, max_size=32), in_sizes=sizes,
           out_sizes=sizes, out_data=st.binary(min_size=0, max_size=64))
    def prop(lun, cdb, in_sizes, out_data, out_sizes):
        check(target, lun, cdb, in_sizes, out_data, out_sizes)

    prop()


field_byte = st.one_of(st.just(0), st.integers(0, 255), st.sampled_from([1, 2, 4, 8, 0x10, 0x20, 0x40, 0x80, 0xFF]))
small = st.integers(0, BLOCKS + 2)
alloc8 = st.integers(0, 255)
rw_flags = st.sampled_from([0, 0x08, 0x10, 0x18, 0x02, 0x06, 0x09, 0x01, 0x04, 0x20])
OPS = sorted({c.opcode for c in COMMANDS})

# Plausible values for the fields of the emulated commands (offset → strategy).
FIELDS = {
    0x03: {1: st.sampled_from([0, 1]), 4: alloc8},
    0x12: {1: st.sampled_from([0, 1]), 2: st.sampled_from([0, 0x80, 0x83, 0xB0, 0xB1, 0xB2, 0x86]), 4: alloc8},
    0x15: {1: st.sampled_from([0x10, 0x11, 0x00]), 4: st.integers(0, 40)},
    0x55: {1: st.sampled_from([0x10, 0x11, 0x00]), 8: st.integers(0, 40)},
    0x1A: {1: st.sampled_from([0, 8]), 2: st.sampled_from([0x08, 0x48, 0x88, 0xC8, 0x3F, 0x0A, 0x01, 0x1C]),
           3: st.sampled_from([0, 0xFF, 1]), 4: alloc8},
    0x5A: {1: st.sampled_from([0, 8, 0x10, 0x18]), 2: st.sampled_from([0x08, 0x48, 0x3F, 0x7F, 0x0A, 0x01]),
           3: st.sampled_from([0, 0xFF]), 8: alloc8},
    0x1B: {1: st.sampled_from([0, 1]), 4: st.sampled_from([0, 1, 2, 4, 0x10])},
    0x1E: {4: st.integers(0, 3)},
    0x25: {5: st.sampled_from([0, 1]), 8: st.sampled_from([0, 1])},
    0x42: {1: st.sampled_from([0, 0, 1]), 8: st.integers(0, 60)},
    0xA0: {2: st.sampled_from([0, 1, 2, 3]), 8: st.integers(0, 1), 9: alloc8},
    0xA3: {2: st.sampled_from([0, 1, 2, 3, 0x80, 0x81, 0x82, 5]), 3: st.sampled_from(OPS + [0xFF]),
           5: st.sampled_from([0, 0x10, 0x12, 0x0C]), 8: st.integers(0, 2), 9: alloc8},
}

CACHING = bytes([0x08, 0x12, 0x04]) + bytes(17)
CONTROL = bytes([0x0A, 0x0A, 0x04, 0x10]) + bytes(8)
PARAM_LISTS = [
    bytes(4) + CACHING, bytes(4) + CACHING[:2] + b"\x00" + CACHING[3:], bytes(4) + CONTROL,
    bytes(4) + CONTROL[:2] + b"\x00" + CONTROL[3:], bytes(8) + CACHING, bytes(8) + CONTROL,
    bytes([0, 0, 0, 8]) + bytes.fromhex("00000040 00000200") + CACHING,
    bytes.fromhex("0016 0010 00000000") + bytes.fromhex("0000000000000004 00000008 00000000"),
    bytes.fromhex("0026 0020 00000000") + bytes.fromhex("0000000000000000 00000001 00000000") * 2,
    bytes(512), bytes(range(256)) * 2,
]
out_payload = st.one_of(st.binary(min_size=0, max_size=600), st.sampled_from(PARAM_LISTS))


@st.composite
def known_cdb(draw):
    opcode, sa, usage = draw(st.sampled_from(KNOWN))
    n = len(usage)
    cdb = bytearray(n)
    cdb[0] = opcode
    style = draw(st.integers(0, 3))  # 0: random bytes, 1: random within the usage map, 2-3: plausible
    if style < 2:
        for i in range(1, n - 1):
            b = draw(field_byte)
            cdb[i] = b & usage[i] if style else b
        if draw(st.integers(0, 9)) == 0:
            cdb[n - 1] = draw(field_byte)
    elif opcode in FIELDS:
        for off, strategy in FIELDS[opcode].items():
            cdb[off] = draw(strategy)
    else:  # the LBA-addressed commands
        cdb[1] = draw(rw_flags) & usage[1]
        if n == 6:
            cdb[3] = draw(small)
            cdb[4] = draw(st.integers(0, 20))
        elif n == 10:
            cdb[2:6] = draw(small).to_bytes(4, "big")
            cdb[7:9] = draw(st.integers(0, 20)).to_bytes(2, "big")
        elif n == 12:
            cdb[2:6] = draw(small).to_bytes(4, "big")
            cdb[6:10] = draw(st.integers(0, 20)).to_bytes(4, "big")
        else:
            cdb[2:10] = draw(st.one_of(small, st.just((1 << 64) - 1))).to_bytes(8, "big")
            cdb[10:14] = draw(st.one_of(st.integers(0, 20), st.integers(0, (1 << 32) - 1))).to_bytes(4, "big")
    if sa is not None:
        cdb[1] = (cdb[1] & 0xE0) | sa if draw(st.integers(0, 9)) else cdb[1]
    cut = draw(st.integers(0, 19))
    if cut == 7:
        return bytes(cdb[:draw(st.integers(0, n))])  # truncated
    if cut == 8:
        return bytes(cdb) + draw(st.binary(max_size=32 - n))  # a padded 32-byte CDB field
    return bytes(cdb)


def test_known_opcodes_with_random_fields(tmp_path):
    target = make_target(tmp_path)

    @SETTINGS
    @given(lun=st.sampled_from(LUNS[:3] * 3 + LUNS[3:]), cdb=known_cdb(), in_sizes=sizes,
           out_sizes=sizes, out_data=out_payload)
    def prop(lun, cdb, in_sizes, out_data, out_sizes):
        check(target, lun, cdb, in_sizes, out_data, out_sizes)

    prop()


def test_plan_then_finish_never_raises(tmp_path):
    target = make_target(tmp_path)

    @SETTINGS
    @given(lun=st.sampled_from(LUNS), cdb=known_cdb(), in_size=st.integers(0, 70000), out_data=out_payload)
    def prop(lun, cdb, in_size, out_data):
        din = SGList([bytearray(in_size)]) if in_size else SGList()
        dout = SGList([bytearray(out_data)])
        p = target.plan(lun, cdb, dout, din)
        if not isinstance(p, ScsiResult):
            try:
                n = p.run()
            except Exception as e:  # noqa: BLE001
                n = e
            p = p.finish(n)
            assert p.status in (0, 2)
        assert p.data_in_len <= din.length

    prop()
