"""LUN backing stores: regular files, block devices, and a null device."""
from __future__ import annotations

import os

from vscsid.config import parse_size

from .base import Backend
from .file import FileBackend
from .null import NullBackend

__all__ = ["Backend", "FileBackend", "NullBackend", "open_backend", "parse_size"]


def open_backend(
    path_or_spec: str | os.PathLike | int,
    readonly: bool = False,
    direct: bool = False,
    delay_us: int = 0,
) -> Backend:
    """Open a backend: ``"null:SIZE"``, a path (regular file or block device), or an open fd."""
    if isinstance(path_or_spec, str) and path_or_spec.startswith("null:"):
        return NullBackend(path_or_spec, readonly=readonly, delay_us=delay_us)
    return FileBackend(path_or_spec, readonly=readonly, direct=direct, delay_us=delay_us)
