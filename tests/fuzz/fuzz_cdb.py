"""atheris harness: the SCSI target (CDB parsing, emulated commands, planned I/O).

Three LUNs (512-byte, 4096-byte and read-only) backed by sparse files in a
temporary directory. Each input picks a LUN, a CDB of up to 32 bytes, a
data-out pattern and the shapes of the data-out / data-in scatter-gather lists
(with guard bytes between segments). Checked: ``execute`` never raises, returns
GOOD or CHECK CONDITION with well-formed sense, never claims more data than the
buffers hold, never writes outside the data-in segments, never modifies the
data-out buffer, and transfers nothing on an overrun.

Run: ``python tests/fuzz/fuzz_cdb.py -atheris_runs=200000``.
"""
from __future__ import annotations

import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from vscsid.workers.backends import open_backend
    from vscsid.workers.scsi import WLUN_REPORT_LUNS, Disk, DiskInfo, ScsiResult, ScsiTarget, SGList

GUARD = 0xA5
BLOCKS = 256
_tmp = tempfile.TemporaryDirectory(prefix="fuzz-cdb-")


def _target():
    disks = {}
    for lun, (bs, ro) in {0: (512, False), 1: (4096, False), 2: (512, True)}.items():
        path = f"{_tmp.name}/lun{lun}.img"
        with open(path, "wb") as f:
            f.truncate(BLOCKS * bs)
        backend = open_backend(path)
        info = DiskInfo.for_backend(backend, block_size=bs, serial=f"F{lun}", readonly=ro,
                                    max_unmap_descriptors=4, max_write_same_bytes=BLOCKS * bs)
        disks[lun] = Disk(info, backend)
    return ScsiTarget(disks)


TARGET = _target()
LUNS = [0, 1, 2, 5, WLUN_REPORT_LUNS]


class Buffers:
    def __init__(self, sizes, fill=b""):
        self.arena = bytearray([GUARD]) * (sum(sizes) + 8 * (len(sizes) + 1))
        mv = memoryview(self.arena)
        self.spans = []
        pos = 8
        for n in sizes:
            self.spans.append((pos, n))
            pos += n + 8
        k = 0
        for off, n in self.spans:
            chunk = (fill * (n // max(1, len(fill)) + 1))[:n] if fill else bytes(n)
            self.arena[off:off + n] = chunk
            k += n
        self.sg = SGList([mv[off:off + n] for off, n in self.spans])
        self.snapshot = bytes(self.arena)

    def guards_intact(self):
        prev = 0
        for off, n in self.spans + [(len(self.arena), 0)]:
            if any(b != GUARD for b in self.arena[prev:off]):
                return False
            prev = off + n
        return True


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    lun = LUNS[fdp.ConsumeIntInRange(0, len(LUNS) - 1)]
    cdb = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32))
    in_sizes = [fdp.ConsumeIntInRange(0, 9000) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    out_sizes = [fdp.ConsumeIntInRange(0, 9000) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    fill = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    din = Buffers(in_sizes)
    dout = Buffers(out_sizes, fill)
    res = TARGET.execute(lun, cdb, dout.sg, din.sg)
    assert isinstance(res, ScsiResult)
    assert res.status in (0x00, 0x02), res
    assert 0 <= res.data_in_len <= din.sg.length
    assert 0 <= res.data_out_len <= dout.sg.length
    if res.status == 0x02:
        assert 8 <= len(res.sense) <= 252 and res.sense[0] & 0x7F in (0x70, 0x72)
        assert not res.overrun and res.data_in_len == 0
    if res.overrun:
        assert bytes(din.arena) == din.snapshot
    assert din.guards_intact()
    assert bytes(dout.arena) == dout.snapshot


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
