"""Shared helper for the SCSI target tests: a Disk on a temp image (the ``disk`` and
``target`` fixtures built from it are in conftest.py)."""
from __future__ import annotations

from vscsid.workers.backends import open_backend
from vscsid.workers.scsi import Disk, DiskInfo


def make_disk(tmp_path, blocks=2048, bs=512, name="disk.img", *, state=None, backend_cls=None,
              backend_readonly=False, reuse=False, **kw):
    """A Disk on ``tmp_path/name`` (``blocks`` x ``bs``, zero-filled; kept as it is when
    ``reuse`` and it exists). ``kw`` go to DiskInfo; serial defaults to SN0001."""
    path = tmp_path / name
    if not (reuse and path.exists()):
        with open(path, "wb") as f:
            f.truncate(blocks * bs)
    backend = (backend_cls(str(path)) if backend_cls is not None
               else open_backend(str(path), readonly=backend_readonly))
    kw.setdefault("serial", "SN0001")
    return Disk(DiskInfo.for_backend(backend, block_size=bs, **kw), backend, state=state)
