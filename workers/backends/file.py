"""Regular file and block device backend: preadv/pwritev straight into the caller's views."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from typing import Sequence

from vscsid.virtio._ring import ffi as _ffi

from .base import IOV_MAX, Backend, advance, total_length, zero_fill

# <linux/fs.h>
BLKROGET = 0x125E  # _IO(0x12, 94)
BLKSSZGET = 0x1268  # _IO(0x12, 104)
BLKDISCARD = 0x1277  # _IO(0x12, 119)
BLKPBSZGET = 0x127B  # _IO(0x12, 123)
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_RANGE = struct.Struct("=QQ")
_U64 = struct.Struct("=Q")
_INT = struct.Struct("=i")
_UINT = struct.Struct("=I")

_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENOTTY)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate_fn = _libc.fallocate
_fallocate_fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate_fn.restype = ctypes.c_int

RWF_DSYNC = getattr(os, "RWF_DSYNC", 0x2)

# statx(2): the alignment O_DIRECT needs (STATX_DIOALIGN, Linux 6.1)
_SYS_STATX = 332
_AT_EMPTY_PATH = 0x1000
_STATX_DIOALIGN = 0x2000
_statx_fn = _libc.syscall
_statx_fn.restype = ctypes.c_long


TMPFS_MAGIC = 0x01021994
_fstatfs_fn = _libc.fstatfs


def fs_type(fd: int) -> int | None:
    """The file system type of ``fd`` (statfs(2) f_type), or None."""
    buf = ctypes.create_string_buffer(128)
    if _fstatfs_fn(ctypes.c_int(fd), buf) != 0:
        return None
    return struct.unpack_from("=q", buf, 0)[0]


def dio_alignment(fd: int) -> tuple[int, int] | None:
    """(file offset/length alignment, memory alignment) O_DIRECT needs on ``fd``, or
    None when the kernel or file system does not say."""
    buf = ctypes.create_string_buffer(256)
    r = _statx_fn(ctypes.c_long(_SYS_STATX), ctypes.c_int(fd), ctypes.c_char_p(b""),
                  ctypes.c_int(_AT_EMPTY_PATH), ctypes.c_uint(_STATX_DIOALIGN), buf)
    if r != 0:
        return None
    mask, = struct.unpack_from("=I", buf, 0)
    mem, off = struct.unpack_from("=II", buf, 152)
    if not mask & _STATX_DIOALIGN or not off or not mem:
        return None
    return off, mem


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (``os.posix_fallocate`` has none); raises OSError."""
    while True:
        if _fallocate_fn(fd, mode, offset, length) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))


def _address(view: memoryview) -> int:
    """The address of a buffer's first byte."""
    p = _ffi.from_buffer(view)
    try:
        return int(_ffi.cast("uintptr_t", p))
    finally:
        _ffi.release(p)


def _ioctl_int(fd: int, req: int, fmt: struct.Struct) -> int:
    buf = bytearray(fmt.size)
    fcntl.ioctl(fd, req, buf, True)
    return fmt.unpack(buf)[0]


def _sysfs_queue(st: os.stat_result, name: str) -> str | None:
    base = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    for path in (f"{base}/queue/{name}", f"{base}/../queue/{name}"):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            continue
    return None


class FileBackend(Backend):
    """A regular file (sparse-aware: holes, SEEK_DATA) or a block device.

    ``path_or_fd`` may be a path or an already open descriptor (which the backend then
    owns and closes); a descriptor opened read-only makes the backend read-only.
    """

    def __init__(
        self,
        path_or_fd: str | os.PathLike | int,
        readonly: bool = False,
        direct: bool = False,
        delay_us: int = 0,
        *,
        path: str | os.PathLike | None = None,
    ) -> None:
        self.fd = -1
        if isinstance(path_or_fd, int):
            fd = path_or_fd
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if flags & os.O_ACCMODE == os.O_RDONLY:
                readonly = True
            if direct and not flags & os.O_DIRECT:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
            if path is not None:
                self.ident = os.path.realpath(os.fspath(path))
            else:
                self.ident = os.path.realpath(f"/proc/self/fd/{fd}")
        else:
            path = os.fspath(path_or_fd)
            flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
            if direct:
                flags |= os.O_DIRECT
            fd = os.open(path, flags)
            self.ident = os.path.realpath(path)
        self.fd = fd
        self.direct = direct
        self.delay_us = int(delay_us)
        self._dsync_flag = RWF_DSYNC
        self._buffered_fd = -1
        self._map = None
        self._map_guard = None
        self._map_faults = None
        self.map_writable = False
        try:
            st = os.fstat(fd)
            if stat.S_ISBLK(st.st_mode):
                self.is_block_device = True
                self.size = _ioctl_int(fd, BLKGETSIZE64, _U64)
                self.logical_block_size = _ioctl_int(fd, BLKSSZGET, _INT)
                self.physical_block_size = _ioctl_int(fd, BLKPBSZGET, _UINT)
                if _ioctl_int(fd, BLKROGET, _INT):
                    readonly = True
                self.rotational = _sysfs_queue(st, "rotational") == "1"
                dmax = _sysfs_queue(st, "discard_max_bytes")
                self.supports_discard = bool(dmax and dmax != "0")
                self.discard_zeroes = False  # BLKDISCARD does not promise zeros
            elif stat.S_ISREG(st.st_mode):
                self.size = st.st_size
                self.supports_discard = True  # punch hole; falls back to writing zeros
                self.discard_zeroes = True
            else:
                raise OSError(errno.EINVAL, "backend must be a regular file or a block device")
        except BaseException:
            os.close(fd)
            self.fd = -1
            raise
        self.readonly = bool(readonly)
        # O_DIRECT: what it needs aligned; a request that is not (a 512-byte LUN on a
        # 4 KiB device, an odd guest buffer) takes the same file through the page cache.
        self.dio_align, self.mem_align = 1, 1
        if direct:
            align = dio_alignment(fd)
            lbs = self.logical_block_size or 512
            self.dio_align, self.mem_align = align if align else (max(lbs, 512), max(lbs, 512))

    def memory_map(self):
        """A shared mapping of the whole file when it lives in memory (tmpfs: its page
        cache is the storage, so reading or writing it by a copy never waits for a
        disk), else None. Writable (:attr:`map_writable`) unless the LUN is read-only.

        The mapping is guarded like guest memory, with its own fault counter
        (:attr:`map_faults`): a page that faults (the file truncated under it, or a
        hole when the tmpfs is full) is survived, the engine stops using the mapping
        and serves the request by a system call, which gives the right answer (and
        its error). Once the mapping has faulted this returns None."""
        if self._map_faults is not None and self._map_faults.value:
            return None
        if self._map is None and not self.is_block_device and not self.direct and self.size:
            if fs_type(self.fd) == TMPFS_MAGIC:
                import mmap as _mmap

                from vscsid.virtio.memory import FaultCounter, guard_mapping

                prot = _mmap.PROT_READ if self.readonly else _mmap.PROT_READ | _mmap.PROT_WRITE
                try:
                    self._map = _mmap.mmap(self.fd, self.size, _mmap.MAP_SHARED, prot)
                except PermissionError:      # an inherited fd opened read-only
                    self._map = _mmap.mmap(self.fd, self.size, _mmap.MAP_SHARED,
                                           _mmap.PROT_READ)
                    prot = _mmap.PROT_READ
                self.map_writable = bool(prot & _mmap.PROT_WRITE)
                self._map_faults = FaultCounter()
                self._map_guard = guard_mapping(self._map, self._map_faults)
        return self._map

    @property
    def map_faults(self):
        """The mapping's fault counter (vscsid.virtio.memory.FaultCounter), or None."""
        return self._map_faults

    @property
    def buffered_fd(self) -> int:
        """O_DIRECT backends: the same file opened without O_DIRECT (for unaligned I/O)."""
        if self._buffered_fd < 0 and self.fd >= 0:
            flags = (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC
            self._buffered_fd = os.open(f"/proc/self/fd/{self.fd}", flags)
        return self._buffered_fd

    def _aligned(self, views: Sequence[memoryview], offset: int, length: int) -> bool:
        if (offset | length) & (self.dio_align - 1):
            return False
        ma = self.mem_align - 1
        for v in views:
            if v.nbytes & ma:
                return False
            if ma and _address(v) & ma:
                return False
        return True

    def _fd_for(self, views: Sequence[memoryview], offset: int, length: int) -> int:
        if self.direct and not self._aligned(views, offset, length):
            return self.buffered_fd
        return self.fd

    @classmethod
    def from_fd(
        cls,
        fd: int,
        readonly: bool = False,
        path: str | os.PathLike | None = None,
        direct: bool = False,
        delay_us: int = 0,
    ) -> "FileBackend":
        """Wrap an open descriptor (e.g. received over SCM_RIGHTS); the backend owns it.
        ``path`` only names it (identity for derived serials, logs)."""
        return cls(fd, readonly=readonly, direct=direct, delay_us=delay_us, path=path)

    def __repr__(self) -> str:
        kind = "blockdev" if self.is_block_device else "file"
        return f"FileBackend({self.ident!r}, {kind}, size={self.size}, readonly={self.readonly})"

    # -- data path -----------------------------------------------------------------------

    def readv(self, views: Sequence[memoryview], offset: int) -> int:
        if self.delay_us:
            self._delay()
        if not views:
            return 0
        want = total_length(views)
        fd = self._fd_for(views, offset, want)
        if len(views) <= IOV_MAX:
            done = os.preadv(fd, views, offset)
            if done == want:
                return done
        else:
            done = 0
        rest = advance(views, done)
        while rest:
            n = os.preadv(fd, rest[:IOV_MAX], offset + done)
            if n == 0:  # end of file: the rest reads as zeros
                zero_fill(rest)
                return want
            done += n
            rest = advance(rest, n)
        return done

    def writev(self, views: Sequence[memoryview], offset: int, fua: bool = False) -> int:
        if self.delay_us:
            self._delay()
        if not views:
            if fua:
                self.flush()
            return 0
        flags = self._dsync_flag if fua else 0
        sync_after = fua and not flags
        want = total_length(views)
        fd = self._fd_for(views, offset, want)
        done = 0
        rest = views
        while rest:
            batch = rest if len(rest) <= IOV_MAX else rest[:IOV_MAX]
            try:
                n = os.pwritev(fd, batch, offset + done, flags)
            except OSError as e:
                if flags and e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    # RWF_DSYNC not supported here: write, then fdatasync.
                    self._dsync_flag = flags = 0
                    sync_after = True
                    continue
                raise
            if n == 0:
                raise OSError(errno.EIO, "short write: no progress")
            done += n
            if done == want:
                break
            rest = advance(rest, n)
        if sync_after:
            os.fdatasync(fd)
        return done

    def flush(self) -> None:
        os.fdatasync(self.fd)

    # -- provisioning --------------------------------------------------------------------

    def _block_aligned(self, offset: int, length: int) -> tuple[int, int]:
        """Shrink a range inwards to the device's logical block size."""
        bs = self.logical_block_size or 512
        start = -(-offset // bs) * bs
        end = (offset + length) // bs * bs
        return start, max(0, end - start)

    def discard(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if self.is_block_device:
            start, n = self._block_aligned(offset, length)
            if n:
                fcntl.ioctl(self.fd, BLKDISCARD, _RANGE.pack(start, n))
            return
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in _NOT_SUPPORTED:
                raise
            self._write_zeroes_by_writing(offset, length, False)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        if length <= 0:
            return
        if self.is_block_device:
            bs = self.logical_block_size or 512
            if offset % bs or length % bs:
                self._write_zeroes_by_writing(offset, length, False)
                return
        modes = []
        if unmap:
            modes.append(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError as e:
                if e.errno not in _NOT_SUPPORTED:
                    raise
        if self.is_block_device:
            try:
                fcntl.ioctl(self.fd, BLKZEROOUT, _RANGE.pack(offset, length))
                return
            except OSError as e:
                if e.errno not in _NOT_SUPPORTED:
                    raise
        self._write_zeroes_by_writing(offset, length, False)

    def block_status(self, offset: int) -> tuple[bool, int]:
        size = self.size
        if offset >= size:
            return True, 0
        if self.is_block_device:
            return True, size - offset
        fd = self.fd
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole (or EOF) from here on
                return False, size - offset
            if e.errno in (errno.EINVAL, *_NOT_SUPPORTED):
                return True, size - offset
            raise
        if data > offset:
            return False, min(data, size) - offset
        hole = os.lseek(fd, offset, os.SEEK_HOLE)
        return True, min(hole, size) - offset

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
        bfd, self._buffered_fd = self._buffered_fd, -1
        if bfd >= 0:
            os.close(bfd)
        if self._map is not None:
            from vscsid.virtio.memory import unguard_mapping

            unguard_mapping(self._map_guard)
            try:
                self._map.close()
            except BufferError:
                pass             # still pinned by an engine: released with it
            self._map = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
