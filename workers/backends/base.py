"""The backend interface and helpers shared by the implementations."""
from __future__ import annotations

import errno
import os
import time
from typing import Sequence

try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):  # pragma: no cover
    IOV_MAX = 1024
if IOV_MAX <= 0:  # pragma: no cover
    IOV_MAX = 1024

class BackendUnavailable(OSError):
    """The shared library a LUN type needs is not installed (errno ENOSYS)."""


_ZEROS = bytes(1 << 16)
_ZEROS_VIEW = memoryview(_ZEROS)


def total_length(views: Sequence[memoryview]) -> int:
    n = 0
    for v in views:
        n += v.nbytes
    return n


def advance(views: Sequence[memoryview], n: int) -> list[memoryview]:
    """The views left after consuming ``n`` bytes from the front."""
    out = []
    it = iter(views)
    for v in it:
        k = v.nbytes
        if n >= k:
            n -= k
            continue
        out.append(v[n:] if n else v)
        n = 0
        break
    out.extend(it)
    return out


def zero_fill(views: Sequence[memoryview]) -> None:
    for v in views:
        k = v.nbytes
        pos = 0
        while pos < k:
            step = min(k - pos, len(_ZEROS))
            v[pos:pos + step] = _ZEROS_VIEW[:step]
            pos += step


class Backend:
    """A LUN's backing store.

    Attributes: ``size`` (bytes), ``readonly``, ``is_block_device``, ``supports_discard``,
    ``discard_zeroes`` (discarded ranges read back as zeros), ``ident`` (a stable string,
    e.g. the resolved path, used to derive default identifiers), ``logical_block_size``
    and ``physical_block_size`` hints (None when unknown), ``rotational`` hint,
    ``delay_us`` (sleep before each read/write, to emulate a slow device).

    All methods raise ``OSError`` on failure. ``readv``/``writev`` transfer the whole
    range (looping on short transfers) and return the number of bytes transferred.
    """

    size: int = 0
    readonly: bool = False
    is_block_device: bool = False
    supports_discard: bool = False
    discard_zeroes: bool = False
    ident: str = ""
    logical_block_size: int | None = None
    physical_block_size: int | None = None
    rotational: bool = False
    delay_us: int = 0

    def _delay(self) -> None:
        if self.delay_us:
            time.sleep(self.delay_us / 1e6)

    def readv(self, views: Sequence[memoryview], offset: int) -> int:
        raise NotImplementedError

    def writev(self, views: Sequence[memoryview], offset: int, fua: bool = False) -> int:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def discard(self, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "discard not supported")

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Make ``[offset, offset+length)`` read as zeros, deallocating it if ``unmap`` and possible."""
        self._write_zeroes_by_writing(offset, length, False)

    def block_status(self, offset: int) -> tuple[bool, int]:
        """``(mapped, length)`` of the extent starting at ``offset`` (clipped to ``size``)."""
        return True, max(0, self.size - offset)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_zeroes_by_writing(self, offset: int, length: int, fua: bool) -> None:
        chunk = len(_ZEROS)
        end = offset + length
        pos = offset
        while pos < end:
            step = min(chunk, end - pos)
            self.writev([_ZEROS_VIEW[:step]], pos, fua)
            pos += step
