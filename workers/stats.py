"""A worker's statistics page: ``struct vsd_stats`` of _engine.h (per queue, and per
LUN slot: requests, bytes, errors by sense key, in flight, latency histograms) in
shared memory that the supervisor maps and reads whenever it wants (a scrape, a
``vscsid-ctl stats``): no message per request and none per read.

The worker is the page's only writer. The C fast path counts the requests it
completes; the reference path counts the rest here, through the same cffi
struct. The supervisor cannot import the data plane, so the worker describes the
page to it (:func:`layout`, sent in the Configure reply): every field's offset
and shape (all are little-endian uint64), and the histogram bucket bounds.

The page outlives a worker: a replacement maps the same memfd and keeps
counting (the gauges, such as in flight, are reset), so counters only restart
when the daemon does.
"""
from __future__ import annotations

import mmap
import os

from ._fast import ffi, lib

OPS = ("read", "write", "other")


def _fields(ctype) -> list:
    """[name, offset, shape] for each uint64 field of a struct (arrays flattened)."""
    out = []
    for name, f in ctype.fields:
        t, shape = f.type, []
        while t.kind == "array":
            shape.append(t.length)
            t = t.item
        if t.kind != "primitive" or ffi.sizeof(t) != 8:
            raise TypeError(f"stats field {name}: only uint64 fields are described")
        out.append([name, f.offset, shape])
    return out


def layout() -> dict:
    """How to read a page (what the supervisor needs, from the one definition)."""
    st = ffi.typeof("struct vsd_stats")
    offsets = dict((name, f.offset) for name, f in st.fields)
    return {
        "size": ffi.sizeof(st),
        "queue_offset": offsets["q"],
        "queue": _fields(ffi.typeof("struct vsd_qstats")),
        "luns_offset": offsets["luns"],
        "lun_stride": ffi.sizeof("struct vsd_lunstats"),
        "lun_slots": lib.VSD_MAX_LUNS,
        "lun": _fields(ffi.typeof("struct vsd_lunstats")),
        "ops": list(OPS),
        "hist_lower_us": [lib.vsd_hist_lower_us(i) for i in range(lib.VSD_HIST_BUCKETS)],
    }


class StatsPage:
    """The mapped page (``fd``: the supervisor's memfd, taken over and closed), or a
    private struct when there is none (tests)."""

    def __init__(self, fd: int | None = None):
        size = ffi.sizeof("struct vsd_stats")
        self.mm = None
        if fd is not None:
            try:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
                self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
            self._buf = ffi.from_buffer("uint8_t[]", self.mm, require_writable=True)
            self.st = ffi.cast("struct vsd_stats *", self._buf)
        else:
            self._buf = None
            self.st = ffi.new("struct vsd_stats *")
        for i in range(lib.VSD_MAX_LUNS):      # gauges describe this process only
            self.st.luns[i].in_flight = 0

    def clear_slot(self, slot: int) -> None:
        """A new LUN takes the slot: its counters start at zero."""
        ffi.memmove(ffi.addressof(self.st.luns[slot]), bytes(ffi.sizeof("struct vsd_lunstats")),
                    ffi.sizeof("struct vsd_lunstats"))

    def lun(self, slot: int):
        return self.st.luns[slot]

    def count(self, slot: int, op: int, data_in: int, data_out: int, sense_key: int | None,
              failed: bool, latency_ns: int | None) -> None:
        """One request the reference path completed."""
        ls = self.st.luns[slot]
        ls.ops[op] += 1
        if data_in:
            ls.bytes_in += data_in
            self.st.q.bytes_in += data_in
        if data_out:
            ls.bytes_out += data_out
            self.st.q.bytes_out += data_out
        if sense_key is not None:
            ls.errors[sense_key & 0x0F] += 1
        if failed:
            ls.failures += 1
        if latency_ns is not None:
            ls.lat_count[op] += 1
            ls.lat_sum_ns[op] += latency_ns
            ls.lat[op][lib.vsd_hist_bucket(latency_ns)] += 1

    def close(self) -> None:
        if self.mm is not None:
            self.st = None
            ffi.release(self._buf)
            self._buf = None
            self.mm.close()
            self.mm = None
