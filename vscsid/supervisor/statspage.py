"""Reading the workers' statistics pages (struct vsd_stats of workers/_engine.h).

The supervisor creates one memfd per request queue and hands it to the queue's
worker (and to each replacement: the counters outlive a worker). The worker
maps it, writes its counters there, and describes the layout in its Configure
reply (workers/stats.py ``layout``): field names, offsets and shapes of little-
endian uint64 values, and the histogram buckets' lower bounds in microseconds.
Reading is a memory copy: no message to the worker, however busy or stuck it is.
"""
from __future__ import annotations

import mmap
import struct


def _reader(fields: list) -> list[tuple[str, struct.Struct, int, list]]:
    out = []
    for name, offset, shape in fields:
        n = 1
        for d in shape:
            n *= d
        out.append((name, struct.Struct(f"<{n}Q"), offset, list(shape)))
    return out


def _shape(values: tuple, shape: list):
    if not shape:
        return values[0]
    if len(shape) == 1:
        return list(values)
    step = len(values) // shape[0]
    return [_shape(values[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


class StatsReader:
    """One worker's page, mapped read-only with the layout the worker described."""

    def __init__(self, fd: int, layout: dict):
        self.layout = layout
        self.size = int(layout["size"])
        self.mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
        self._q = _reader(layout["queue"])
        self._lun = _reader(layout["lun"])
        self.q_off = int(layout["queue_offset"])
        self.luns_off = int(layout["luns_offset"])
        self.stride = int(layout["lun_stride"])
        self.slots = int(layout["lun_slots"])
        self.ops = list(layout["ops"])
        self.bounds_us = list(layout["hist_lower_us"])

    def _read(self, base: int, fields) -> dict:
        mm = self.mm
        return {name: _shape(st.unpack_from(mm, base + off), shape)
                for name, st, off, shape in fields}

    def queue(self) -> dict:
        return self._read(self.q_off, self._q)

    def lun(self, slot: int) -> dict:
        if not 0 <= slot < self.slots:
            raise IndexError(slot)
        return self._read(self.luns_off + slot * self.stride, self._lun)

    def close(self) -> None:
        self.mm.close()


def percentile(hist: list[int], bounds_us: list[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram, in microseconds: the upper bound of
    the bucket it falls in (for the last, open bucket: its lower bound)."""
    total = sum(hist)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank and n:
            return float(bounds_us[i + 1] if i + 1 < len(bounds_us) else bounds_us[i])
    return float(bounds_us[-1])


def merge(into: dict | None, d: dict) -> dict:
    """Add the counters of ``d`` into ``into`` (same layout; nested lists added)."""
    if into is None:
        return {k: (list(map(list, v)) if v and isinstance(v[0], list) else list(v))
                if isinstance(v, list) else v for k, v in d.items()}
    for k, v in d.items():
        if isinstance(v, list):
            if v and isinstance(v[0], list):
                for row, add in zip(into[k], v):
                    for i, x in enumerate(add):
                        row[i] += x
            else:
                for i, x in enumerate(v):
                    into[k][i] += x
        else:
            into[k] += v
    return into
