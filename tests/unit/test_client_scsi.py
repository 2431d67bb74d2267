"""Driver-side virtio-scsi framing: byte-exact encodings, parsers, CDB helpers and the
request builder end to end against the independent reference device of test_driverq."""
from __future__ import annotations

import struct

import pytest

from tests.support import virtio_scsi as vs
from tests.unit.test_driverq import RefDevice
from vscsid.bench.driverq import DriverQueue
from vscsid.bench.guestmem import FrontendMemory

MiB = 1 << 20


# --------------------------------------------------------------------------- LUNs
def test_lun_bytes():
    assert vs.lun_bytes(0) == bytes.fromhex("0100400000000000")
    assert vs.lun_bytes(5) == bytes.fromhex("0100400500000000")
    assert vs.lun_bytes(300, target=2) == bytes.fromhex("0102412c00000000")
    assert vs.lun_bytes(16383, target=255) == bytes.fromhex("01ff7fff00000000")
    assert vs.lun_bytes(vs.WLUN_REPORT_LUNS) == bytes.fromhex("c101000000000000")
    assert vs.lun_bytes(b"\x02" * 8) == b"\x02" * 8
    for bad in (16384, -1):
        with pytest.raises(ValueError):
            vs.lun_bytes(bad)
    with pytest.raises(ValueError):
        vs.lun_bytes(1, target=256)
    with pytest.raises(ValueError):
        vs.lun_bytes(b"\x01")


def test_decode_lun():
    assert vs.decode_lun(vs.lun_bytes(300, target=2)) == (2, 300)
    assert vs.decode_lun(vs.WLUN_REPORT_LUNS_BYTES) == (0, 0xC101)
    with pytest.raises(ValueError):
        vs.decode_lun(bytes(8))
    assert vs.decode_sam_lun(bytes.fromhex("0000000000000000")) == 0
    assert vs.decode_sam_lun(bytes.fromhex("0007000000000000")) == 7
    assert vs.decode_sam_lun(bytes.fromhex("412c000000000000")) == 300
    assert vs.decode_sam_lun(bytes.fromhex("c101000000000000")) == 0xC101


# --------------------------------------------------------------------------- cmd req / resp
def test_encode_cmd_req_byte_exact():
    cdb = vs.read10(0x01020304, 8)
    req = vs.encode_cmd_req(5, 0x1122334455667788, cdb, task_attr=vs.VIRTIO_SCSI_S_ORDERED, prio=3, crn=9)
    expect = bytes.fromhex(
        "0100400500000000"            # lun
        "8877665544332211"            # id le64
        "01" "03" "09"                # task_attr prio crn
        "28000102030400000800"        # READ(10)
    ) + bytes(22)
    assert req == expect and len(req) == 51 == vs.CMD_REQ_HDR_SIZE + 32


def test_encode_cmd_req_sizes():
    r = vs.encode_cmd_req(vs.WLUN_REPORT_LUNS, 1, vs.report_luns(), cdb_size=16)
    assert len(r) == 35 and r[:8] == bytes.fromhex("c101000000000000") and r[19] == 0xA0
    with pytest.raises(ValueError):
        vs.encode_cmd_req(0, 1, bytes(17), cdb_size=16)
    buf = bytearray(b"\xff" * 60)
    n = vs.pack_cmd_req_into(buf, 4, vs.lun_bytes(5), 0x1122334455667788, vs.read10(0x01020304, 8),
                             task_attr=1, prio=3, crn=9)
    assert n == 51 and bytes(buf[4:55]) == vs.encode_cmd_req(5, 0x1122334455667788, vs.read10(0x01020304, 8),
                                                             task_attr=1, prio=3, crn=9)
    assert buf[:4] == b"\xff" * 4 and buf[55:] == b"\xff" * 5


def test_parse_cmd_resp_byte_exact():
    sense = bytes.fromhex("700005000000000a00000000240000") + bytes(3)   # 18 bytes fixed sense
    raw = (bytes.fromhex("12000000" "00020000" "3412" "02" "00") + sense + bytes(96 - 18))
    assert len(raw) == 108
    r = vs.parse_cmd_resp(raw)
    assert (r.sense_len, r.residual, r.status_qualifier, r.status, r.response) == (18, 512, 0x1234, 2, 0)
    assert r.sense == sense and not r.ok and r.response_name == "OK"
    assert r.sense_key() == vs.SenseInfo(5, 0x24, 0, False)
    assert vs.encode_cmd_resp(status=2, residual=512, status_qualifier=0x1234, sense=sense) == raw
    # sense_len larger than the buffer is clamped; shorter than 12 bytes is an error
    r2 = vs.parse_cmd_resp(struct.pack("<IIHBB", 500, 0, 0, 0, 9) + b"abc", sense_size=96)
    assert r2.sense == b"abc" and r2.response_name == "FAILURE"
    with pytest.raises(ValueError):
        vs.parse_cmd_resp(bytes(11))
    assert vs.parse_cmd_resp(vs.encode_cmd_resp()).ok


def test_parse_sense_formats():
    assert vs.parse_sense(b"") is None
    assert vs.parse_sense(bytes.fromhex("7200040500000000")) == vs.SenseInfo(0, 4, 5, True)
    assert vs.parse_sense(bytes.fromhex("730e1d00")) == vs.SenseInfo(0xE, 0x1D, 0, True)
    assert vs.parse_sense(bytes([0xF0, 0, 6]) + bytes(9) + b"\x29\x00") == vs.SenseInfo(6, 0x29, 0, False)
    assert vs.parse_sense(b"\x00\x00") is None


def test_response_constants():
    names = ["OK", "OVERRUN", "ABORTED", "BAD_TARGET", "RESET", "BUSY", "TRANSPORT_FAILURE",
             "TARGET_FAILURE", "NEXUS_FAILURE", "FAILURE", "FUNCTION_SUCCEEDED", "FUNCTION_REJECTED",
             "INCORRECT_LUN"]
    for code, name in enumerate(names):
        assert getattr(vs, f"VIRTIO_SCSI_S_{name}") == code and vs.RESPONSE_NAMES[code] == name
    subtypes = ["ABORT_TASK", "ABORT_TASK_SET", "CLEAR_ACA", "CLEAR_TASK_SET", "I_T_NEXUS_RESET",
                "LOGICAL_UNIT_RESET", "QUERY_TASK", "QUERY_TASK_SET"]
    for code, name in enumerate(subtypes):
        assert getattr(vs, f"VIRTIO_SCSI_T_TMF_{name}") == code


# --------------------------------------------------------------------------- control / events
def test_tmf_encoding():
    req = vs.encode_tmf_req(vs.VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, 7, 0xAABB, target=1)
    assert req == bytes.fromhex("00000000" "05000000" "0101400700000000" "bbaa000000000000")
    assert len(req) == vs.TMF_REQ_SIZE == 24
    assert vs.parse_tmf_resp(b"\x0a") == vs.VIRTIO_SCSI_S_FUNCTION_SUCCEEDED
    with pytest.raises(ValueError):
        vs.parse_tmf_resp(b"")


def test_an_encoding():
    req = vs.encode_an_req(vs.VIRTIO_SCSI_T_AN_SUBSCRIBE, 1,
                           vs.VIRTIO_SCSI_EVT_ASYNC_MEDIA_CHANGE | vs.VIRTIO_SCSI_EVT_ASYNC_OPERATIONAL_CHANGE)
    assert req == bytes.fromhex("02000000" "0100400100000000" "12000000")
    assert vs.encode_an_req(vs.VIRTIO_SCSI_T_AN_QUERY)[:4] == b"\x01\x00\x00\x00"
    with pytest.raises(ValueError):
        vs.encode_an_req(0)
    assert vs.parse_an_resp(bytes.fromhex("1000000000")) == (16, 0)


def test_event_and_config_parsing():
    raw = bytes.fromhex("01000080" "0100400300000000" "02000000")
    ev = vs.parse_event(raw)
    assert ev.missed and ev.kind == vs.VIRTIO_SCSI_T_TRANSPORT_RESET
    assert ev.reason == vs.VIRTIO_SCSI_EVT_RESET_REMOVED and vs.decode_lun(ev.lun) == (0, 3)
    assert vs.encode_event(0x80000001, 3, 2) == raw
    cfg = struct.pack("<IIIIIIIHHI", 4, 254, 0xFFFF, 128, 16, 96, 32, 0, 255, 16383)
    c = vs.parse_config(cfg)
    assert c.num_queues == 4 and c.sense_size == 96 and c.cdb_size == 32 and c.max_lun == 16383


# --------------------------------------------------------------------------- CDBs
def test_cdb_helpers_byte_exact():
    assert vs.test_unit_ready() == bytes(6)
    assert vs.inquiry() == bytes.fromhex("120000006000")
    assert vs.inquiry(evpd=True, page=0x83, alloc_len=0x1FF) == bytes.fromhex("12018301ff00")
    assert vs.read_capacity10() == bytes.fromhex("25000000000000000000")
    assert vs.read_capacity16() == bytes.fromhex("9e10" "0000000000000000" "00000020" "0000")
    assert vs.read10(0x01020304, 0x0506) == bytes.fromhex("28000102030400050600")
    assert vs.write10(1, 2, fua=True) == bytes.fromhex("2a080000000100000200")
    assert vs.read16(0x0102030405060708, 0x0A0B0C0D, dpo=True) == \
        bytes.fromhex("8810" "0102030405060708" "0a0b0c0d" "0000")
    assert vs.write16(2**40, 1) == bytes.fromhex("8a00" "0000010000000000" "00000001" "0000")
    assert vs.sync_cache() == vs.sync_cache10() == bytes.fromhex("35000000000000000000")
    assert vs.sync_cache10(5, 6, immed=True) == bytes.fromhex("35020000000500000600")
    assert vs.sync_cache16(7, 8) == bytes.fromhex("9100" "0000000000000007" "00000008" "0000")
    assert vs.report_luns() == bytes.fromhex("a00000000000" "00001000" "0000")
    assert vs.request_sense() == bytes.fromhex("0300" "0000fc00")
    assert vs.mode_sense6(0x3F) == bytes.fromhex("1a083f00ff00")
    assert vs.mode_sense10(0x08, pc=1, dbd=False) == bytes.fromhex("5a0048000000001000" "00")
    for bad in (lambda: vs.read10(2**32, 1), lambda: vs.read10(0, 2**16), lambda: vs.read16(2**64, 1),
                lambda: vs.write16(0, 2**32), lambda: vs.inquiry(alloc_len=2**16)):
        with pytest.raises(ValueError):
            bad()


def test_cdb_result_parsers():
    assert vs.parse_read_capacity16(bytes.fromhex("00000000000fffff" "00001000") + bytes(20)) == (0xFFFFF, 4096)
    assert vs.parse_read_capacity10(bytes.fromhex("0000ffff00000200")) == (0xFFFF, 512)
    data = bytes.fromhex("00000020" "00000000" "0000000000000000" "4100000000000000" "4001000000000000"
                         "c101000000000000")
    assert vs.parse_report_luns(data) == [0, 256, 1, 0xC101]
    assert vs.parse_report_luns(data[:24]) == [0, 256]          # truncated list


# --------------------------------------------------------------------------- builder end to end
class FakeScsi:
    """A tiny responder driven by RefDevice: enough SCSI to check framing."""

    BLOCK = 512

    def __init__(self, dev: RefDevice, sense_size=96, cdb_size=32):
        self.dev = dev
        self.sense_size = sense_size
        self.cdb_size = cdb_size
        self.disk = bytearray(64 * self.BLOCK)
        for i in range(64):
            self.disk[i * self.BLOCK:(i + 1) * self.BLOCK] = bytes([i]) * self.BLOCK
        self.seen = []

    def serve(self):
        n = 0
        for ch in self.dev.pop_all():
            stream = self.dev.gather(ch.readable)
            hsz = 19 + self.cdb_size
            lun, tag, attr, prio, crn = struct.unpack_from("<8sQBBB", stream)
            cdb = stream[19:hsz]
            data_out = stream[hsz:]
            self.seen.append(dict(lun=lun, tag=tag, attr=attr, prio=prio, crn=crn, cdb=cdb,
                                  data_out=data_out, nread=len(ch.readable), nwrite=len(ch.writable)))
            din_cap = sum(n for _, n in ch.writable) - 12 - self.sense_size
            resp, din = self.execute(cdb, data_out, din_cap)
            written = self.dev.scatter(ch.writable, resp + din)
            self.dev.push(ch.head, written)
            n += 1
        return n

    def execute(self, cdb, data_out, cap):
        op = cdb[0]
        if op == 0x12:                                  # INQUIRY
            alloc = int.from_bytes(cdb[3:5], "big")
            data = (bytes([0, 0, 5, 2, 31, 0, 0, 2]) + b"VSCSID  " + b"FAKE DISK       " + b"0001")[:alloc]
            return vs.encode_cmd_resp(residual=max(0, cap - len(data)), sense_size=self.sense_size), data
        if op == 0x28:                                  # READ(10)
            lba = int.from_bytes(cdb[2:6], "big")
            nb = int.from_bytes(cdb[7:9], "big")
            data = bytes(self.disk[lba * self.BLOCK:(lba + nb) * self.BLOCK])
            return vs.encode_cmd_resp(residual=cap - len(data), sense_size=self.sense_size), data
        if op == 0x2A:                                  # WRITE(10)
            lba = int.from_bytes(cdb[2:6], "big")
            self.disk[lba * self.BLOCK:lba * self.BLOCK + len(data_out)] = data_out
            return vs.encode_cmd_resp(sense_size=self.sense_size), b""
        sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0])
        return vs.encode_cmd_resp(status=2, sense=sense, sense_size=self.sense_size), b""


@pytest.fixture
def rig():
    mem = FrontendMemory(regions=[(0, 4 * MiB), (1 << 32, 4 * MiB, 8192)])
    q = DriverQueue(mem, 64)
    dev = RefDevice.for_queue(q)
    b = vs.ScsiRequestBuilder(q, mem)
    yield mem, q, dev, b, FakeScsi(dev)
    dev.close()
    q.close()
    mem.close()


LAYOUTS = [
    dict(),
    dict(header_split=[1, 7, 10]),                     # header over 4 descriptors
    dict(header_split=[8, 8, 3, 0]),                   # one zero-length piece
    dict(resp_split=[4, 4, 4]),
    dict(data_seg=100),
    dict(data_seg=[1, 511, 1000]),
    dict(merge=True),
    dict(out_split=[20, 40], in_split=[50, 70]),       # pieces straddle header/data, resp/data
    dict(gap=64, data_seg=300, header_split=[16]),
    dict(indirect=True, data_seg=64),
    dict(indirect=True, merge=True),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "linux")
def test_builder_write_then_read(rig, layout):
    mem, q, dev, b, scsi = rig
    base = mem.bytes_allocated
    _write_then_read(rig, layout)
    if layout.get("indirect"):
        base = mem.bytes_allocated          # indirect tables stay cached per head
        scsi.seen.clear()
        _write_then_read(rig, layout)
    assert q.num_free == 64 and mem.bytes_allocated == base         # every buffer freed


def _write_then_read(rig, layout):
    mem, q, dev, b, scsi = rig
    payload = bytes((i * 7) & 0xFF for i in range(3 * 512))
    w = b.command(vs.write10(4, 3), lun=2, data_out=payload, **layout)
    r = b.command(vs.read10(4, 3), lun=2, data_in_len=3 * 512, **layout)
    assert scsi.serve() == 2
    done = b.reap()
    assert done == [w, r] and w.done and r.done
    assert w.response.ok and r.response.ok and r.response.residual == 0
    assert r.data_in == payload and r.data_in_raw == payload
    assert scsi.seen[0]["data_out"] == payload and scsi.seen[0]["cdb"][:10] == vs.write10(4, 3)
    assert scsi.seen[0]["lun"] == vs.lun_bytes(2)
    assert scsi.seen[1]["tag"] == r.tag == w.tag + 1
    if layout.get("header_split") == [1, 7, 10]:
        assert scsi.seen[0]["nread"] == 4 + 1 and scsi.seen[1]["nread"] == 4
    if layout.get("merge"):
        assert scsi.seen[0]["nread"] == 1 and scsi.seen[1]["nwrite"] == 1
    if layout.get("out_split"):
        assert scsi.seen[0]["nread"] == 3 and scsi.seen[1]["nwrite"] == 3


def test_builder_gap_makes_buffers_discontiguous(rig):
    mem, q, dev, b, scsi = rig
    h = b.command(vs.write10(0, 1), data_out=bytes(512), header_split=[10], data_seg=256, gap=32, publish=False)
    segs = h.out_segs
    assert len(segs) == 4
    for (a, n), (a2, _) in zip(segs, segs[1:]):
        assert a2 == a + n + 32
        assert mem.read(a + n, 32) == b"\xee" * 32
    q.publish()
    scsi.serve()
    assert b.reap()[0].response.ok


def test_builder_residual_and_sense(rig):
    mem, q, dev, b, scsi = rig
    h = b.command(vs.inquiry(alloc_len=36), data_in_len=96, in_fill=0xCC)
    bad = b.command(bytes([0xFF]) + bytes(5))
    scsi.serve()
    b.reap()
    assert h.response.residual == 60 and len(h.data_in) == 36 and h.data_in[8:14] == b"VSCSID"
    assert h.data_in_raw[36:] == b"\xcc" * 60                 # the device never wrote there
    assert bad.response.status == vs.SAM_STAT_CHECK_CONDITION
    assert bad.response.sense_key() == vs.SenseInfo(5, 0x20, 0, False)
    assert h.written_len == 12 + 96 + 36


def test_builder_caller_owned_sg(rig):
    mem, q, dev, b, scsi = rig
    slab = mem.slab(512, 8, region=1)
    bufs = [slab.get() for _ in range(4)]
    for k, g in enumerate(bufs[:2]):
        mem.write(g, bytes([0x40 + k]) * 512)
    base = mem.bytes_allocated
    w = b.command(vs.write10(10, 2), data_out_sg=[(g, 512) for g in bufs[:2]])
    r = b.command(vs.read10(10, 2), data_in_sg=[(g, 512) for g in bufs[2:]], copy_data=False)
    scsi.serve()
    b.reap()
    assert w.response.ok and r.response.ok and r.data_in == b""
    assert mem.read(bufs[2], 512) == b"\x40" * 512 and mem.read(bufs[3], 512) == b"\x41" * 512
    assert mem.bytes_allocated == base
    with pytest.raises(ValueError):
        b.command(vs.read10(0, 1), data_in_len=512, data_in_sg=[(bufs[0], 512)])


def test_builder_wlun_and_attrs(rig):
    mem, q, dev, b, scsi = rig
    b.command(vs.report_luns(), lun=vs.WLUN_REPORT_LUNS, task_attr=vs.VIRTIO_SCSI_S_HEAD, prio=1, crn=2,
              tag=0xDEADBEEF, data_in_len=64)
    scsi.serve()
    (h,) = b.reap()
    s = scsi.seen[0]
    assert s["lun"] == vs.WLUN_REPORT_LUNS_BYTES and s["tag"] == 0xDEADBEEF
    assert (s["attr"], s["prio"], s["crn"]) == (2, 1, 2)
    assert h.response.status == vs.SAM_STAT_CHECK_CONDITION    # the fake does not know REPORT LUNS


def test_builder_control_and_events(rig):
    mem, q, dev, b, scsi = rig
    base = mem.bytes_allocated
    t = b.tmf(vs.VIRTIO_SCSI_T_TMF_ABORT_TASK, lun=3, tag=77, out_split=[4, 4])
    a = b.an(vs.VIRTIO_SCSI_T_AN_QUERY, vs.VIRTIO_SCSI_EVT_ASYNC_MEDIA_CHANGE, lun=3)
    evs = b.post_events(2)
    chains = dev.pop_all()
    assert len(chains) == 4
    assert [len(c.readable) for c in chains] == [3, 1, 0, 0]
    assert dev.gather(chains[0].readable) == vs.encode_tmf_req(0, 3, 77)
    assert dev.gather(chains[1].readable) == vs.encode_an_req(1, 3, 16)
    dev.scatter(chains[0].writable, bytes([vs.VIRTIO_SCSI_S_FUNCTION_COMPLETE]))
    dev.scatter(chains[1].writable, struct.pack("<IB", 16, 0))
    dev.scatter(chains[2].writable, vs.encode_event(vs.VIRTIO_SCSI_T_TRANSPORT_RESET, 3,
                                                    vs.VIRTIO_SCSI_EVT_RESET_RESCAN))
    dev.push_many([(chains[2].head, 16), (chains[0].head, 1), (chains[1].head, 5)])
    done = b.reap()
    assert done == [evs[0], t, a]
    assert t.response == 0 and (a.event_actual, a.response) == (16, 0)
    assert evs[0].event.kind == vs.VIRTIO_SCSI_T_TRANSPORT_RESET and vs.decode_lun(evs[0].event.lun) == (0, 3)
    assert not evs[1].done
    evs[1].release()
    assert mem.bytes_allocated == base


def test_builder_foreign_tokens_and_queue_full(rig):
    mem, q, dev, b, scsi = rig
    q.add([b"other"], [], token="mine", publish=True)
    base = mem.bytes_allocated
    small = DriverQueue(mem, 2)
    sb = vs.ScsiRequestBuilder(small, mem)
    h1 = sb.command(vs.test_unit_ready())
    with pytest.raises(Exception, match="queue full"):
        sb.command(vs.test_unit_ready())
    small.close()
    h1.release()                               # never completed: the builder's buffers are ours to free
    assert mem.bytes_allocated == base
    ch = dev.pop()
    dev.push(ch.head, 0)
    assert b.reap() == [] and b.foreign == [("mine", 0)]


def test_builder_custom_sizes():
    with FrontendMemory(2 * MiB) as mem:
        q = DriverQueue(mem, 8)
        dev = RefDevice.for_queue(q)
        b = vs.ScsiRequestBuilder(q, mem, cdb_size=16, sense_size=32, target=4)
        scsi = FakeScsi(dev, sense_size=32, cdb_size=16)
        h = b.command(vs.read10(1, 1), lun=9, data_in_len=512)
        scsi.serve()
        b.reap()
        assert scsi.seen[0]["lun"] == vs.lun_bytes(9, target=4)
        assert len(scsi.seen[0]["cdb"]) == 16 and h.data_in == bytes([1]) * 512
        assert b.req_size == 35 and b.resp_size == 44
        dev.close()
        q.close()
