"""A backend that stores nothing: reads return zeros, writes are dropped (for benchmarks)."""
from __future__ import annotations

from typing import Sequence

from vscsid.config import parse_size

from .base import Backend, total_length, zero_fill


class NullBackend(Backend):
    """``NullBackend("null:1G")`` (or ``"1G"``, or a byte count)."""

    supports_discard = True
    discard_zeroes = True

    def __init__(self, spec: str | int, readonly: bool = False, delay_us: int = 0) -> None:
        if isinstance(spec, int):
            size = spec
        else:
            text = spec[5:] if spec.startswith("null:") else spec
            size = parse_size(text)
        if size < 0:
            raise ValueError("negative size")
        self.size = size
        self.readonly = bool(readonly)
        self.delay_us = int(delay_us)
        self.ident = f"null:{size}"

    def __repr__(self) -> str:
        return f"NullBackend(size={self.size}, readonly={self.readonly})"

    def readv(self, views: Sequence[memoryview], offset: int) -> int:
        if self.delay_us:
            self._delay()
        zero_fill(views)
        return total_length(views)

    def writev(self, views: Sequence[memoryview], offset: int, fua: bool = False) -> int:
        if self.delay_us:
            self._delay()
        return total_length(views)

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        pass

    def block_status(self, offset: int) -> tuple[bool, int]:
        return False, max(0, self.size - offset)
