"""The LUN table: what the supervisor opened once and hands to every worker.

Network LUNs (NBD, RBD) have no fd here: each worker connects to the server itself.
Their size and capabilities come from the server, so the first worker to
configure reports the LUN's identity (:meth:`LunTable.learn`) and every later
worker gets that same identity.
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import stat
import struct

from vscsid import inject as _inject
from vscsid import log as vlog
from vscsid import messages as M
from vscsid.config import LunSpec

from .osops import OsOps

BLKGETSIZE64 = 0x80081272


class LunTable:
    """The LUNs the supervisor opened once; fds are handed to every worker."""

    def __init__(self, specs: tuple[LunSpec, ...], ops: OsOps):
        self.specs = specs
        self.fds: list[int] = []
        self.sizes: list[int] = []
        self.ops = ops
        self.learned: dict[int, dict] = {}       # network LUN -> {"info", "facts"}
        for spec in specs:
            if spec.is_network:
                self.fds.append(-1)
                self.sizes.append(0)             # unknown until a worker reports it
                continue
            if spec.is_null:
                self.fds.append(-1)
                self.sizes.append(spec.null_size)
                continue
            fd = ops.open_lun(spec.path, spec.readonly, spec.direct)
            self.fds.append(fd)
            self.sizes.append(_fd_size(fd))
        # One byte of shared per-LUN state (write cache enable) for all workers.
        self.state_fd = ops.memfd("vscsid-lun-state", 4096)
        self.state_mm = ops.map_shared(self.state_fd, 4096)
        for i, spec in enumerate(specs):
            self.state_mm[i] = 0 if spec.writethrough else 1

    def configure_message(self, **settings) -> M.Configure:
        """What a worker is told of the LUNs (the fds stay ours)."""
        entries = []
        for i, spec in enumerate(self.specs):
            got = self.learned.get(i)
            entries.append({"lun": i, "spec": spec.as_dict(),
                            "info": got["info"] if got else disk_info(spec, i, self.sizes[i]),
                            "facts": got["facts"] if got else None})
        return M.Configure(luns=entries, lun_fds=[fd if fd >= 0 else None for fd in self.fds],
                           state_page=self.state_fd, **settings)

    def learn(self, result: M.ConfigureResult, queue: int, queues: int = 1) -> None:
        """A worker's report of its network LUNs: the first one is kept; a later one
        that differs in size is logged (the guest keeps the first)."""
        log = vlog.get()
        for rep in result.luns:
            i = int(rep["lun"])
            if not 0 <= i < len(self.specs) or not self.specs[i].is_network:
                continue
            info = rep["info"]
            size = int(info["num_blocks"]) * int(info["block_size"])
            known = self.learned.get(i)
            if known is None:
                self.learned[i] = {"info": info, "facts": rep.get("facts")}
                self.sizes[i] = size
                log.info("network_lun_identity", lun=i, spec=self.specs[i].path, bytes=size,
                         readonly=info.get("readonly"), write_cache=info.get("volatile_cache"),
                         fua=info.get("fua"), discard=info.get("discard"), queue=queue)
                facts = rep.get("facts") or {}
                if queues > 1 and facts.get("exclusive_lock") and not info.get("readonly"):
                    log.warning("rbd_exclusive_lock_with_several_queues", lun=i,
                                spec=self.specs[i].path, queues=queues,
                                reason="each queue's librados client takes the image's exclusive "
                                       "lock in turn for writes: correct but slow; use an image "
                                       "without exclusive-lock, or one queue")
            elif size != self.sizes[i]:
                log.warning("network_lun_size_differs", lun=i, spec=self.specs[i].path,
                            bytes=size, known=self.sizes[i], queue=queue)

    def set_injections(self, lun: int, text: str) -> str:
        """Record LUN ``lun``'s new injection rules (so restarted workers get them);
        returns the canonical text. Raises ValueError for a bad LUN or text."""
        if not self.exists(lun):
            raise ValueError(f"no LUN {lun}")
        canon = _inject.canonical(text)
        specs = list(self.specs)
        specs[lun] = dataclasses.replace(specs[lun], inject=canon)
        self.specs = tuple(specs)
        return canon

    def exists(self, lun: int) -> bool:
        return 0 <= lun < len(self.specs)

    def close(self) -> None:
        for fd in self.fds:
            if fd >= 0:
                self.ops.close(fd)
        self.state_mm.close()
        self.ops.close(self.state_fd)


def _fd_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("<Q", buf)[0]
    return st.st_size


def disk_info(spec: LunSpec, index: int, size: int) -> dict:
    """The static identity of a LUN (what the SCSI target reports), as plain data.
    The NAA designator (VPD 83) is derived from the serial by the target itself."""
    serial = spec.effective_serial(index)
    return {
        "block_size": spec.block_size,
        "num_blocks": size // spec.block_size,
        "readonly": spec.readonly,
        "serial": serial,
        "rotational": spec.rotational,
        "vendor": spec.vendor,
        "product": spec.product,
        "write_cache": not spec.writethrough,
        "discard": spec.discard,
    }


