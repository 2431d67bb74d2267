"""Scatter-gather lists of byte memoryviews (guest memory slices, or bytearrays in tests)."""
from __future__ import annotations

from bisect import bisect_right
from typing import Iterable


def _as_bytes_view(v) -> memoryview:
    mv = v if isinstance(v, memoryview) else memoryview(v)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class SGList:
    """An ordered list of byte views, addressed as one contiguous range.

    ``views_for`` hands out sub-views (no copy) so backends can ``preadv``/``pwritev``
    straight into guest memory. Empty views are dropped.
    """

    __slots__ = ("_views", "_starts", "length")

    def __init__(self, views: Iterable = ()) -> None:
        vs = []
        starts = []
        total = 0
        for v in views:
            mv = _as_bytes_view(v)
            n = mv.nbytes
            if n:
                vs.append(mv)
                starts.append(total)
                total += n
        self._views: list[memoryview] = vs
        self._starts: list[int] = starts
        self.length: int = total

    EMPTY: "SGList"

    @property
    def views(self) -> list[memoryview]:
        return list(self._views)

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"SGList({[len(v) for v in self._views]})"

    def views_for(self, offset: int, length: int) -> list[memoryview]:
        """Views covering exactly ``[offset, offset + length)``; raises ValueError if out of bounds."""
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"range {offset}+{length} outside SGList of {self.length} bytes")
        if length == 0:
            return []
        vs = self._views
        if len(vs) == 1:
            v = vs[0]
            if offset == 0 and length == v.nbytes:
                return [v]
            return [v[offset:offset + length]]
        if offset == 0 and length == self.length:
            return list(vs)
        starts = self._starts
        i = bisect_right(starts, offset) - 1
        out = []
        pos = offset - starts[i]
        remaining = length
        while remaining:
            v = vs[i]
            take = v.nbytes - pos
            if take > remaining:
                take = remaining
            out.append(v[pos:pos + take] if (pos or take != v.nbytes) else v)
            remaining -= take
            pos = 0
            i += 1
        return out

    def copy_in(self, data, offset: int = 0) -> int:
        """Copy ``data`` into the list starting at ``offset``; truncates at the end. Returns bytes copied."""
        if offset < 0:
            raise ValueError("negative offset")
        src = data if isinstance(data, memoryview) else memoryview(data)
        if src.format != "B" or src.ndim != 1:
            src = src.cast("B")
        n = min(src.nbytes, self.length - offset)
        if n <= 0:
            return 0
        done = 0
        for v in self.views_for(offset, n):
            k = v.nbytes
            v[:] = src[done:done + k]
            done += k
        return n

    def copy_out(self, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[offset, offset + length)`` (to the end when length is None), clipped to the list."""
        if offset < 0:
            raise ValueError("negative offset")
        avail = max(0, self.length - offset)
        n = avail if length is None else max(0, min(length, avail))
        if n == 0:
            return b""
        vs = self.views_for(offset, n)
        if len(vs) == 1:
            return vs[0].tobytes()
        return b"".join(vs)


SGList.EMPTY = SGList()
