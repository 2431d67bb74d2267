"""The LUN table: what the supervisor opened once and hands to every worker."""
from __future__ import annotations

import fcntl
import os
import stat
import struct

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
        for spec in specs:
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
        entries = [{"lun": i, "spec": spec.as_dict(), "info": disk_info(spec, i, self.sizes[i])}
                   for i, spec in enumerate(self.specs)]
        return M.Configure(luns=entries, lun_fds=[fd if fd >= 0 else None for fd in self.fds],
                           state_page=self.state_fd, **settings)

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


