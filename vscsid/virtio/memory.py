"""Guest memory: the regions the front end shares with us, mapped and bounds-checked.

Each region arrives as an fd plus ``(guest_phys_addr, memory_size,
userspace_addr, mmap_offset)``. We map the fd from file offset 0 for
``mmap_offset + memory_size`` bytes (the offset need not be page aligned) and
look at the window ``[mmap_offset, mmap_offset + memory_size)``. Before mapping,
the fd's real size (fstat, or BLKGETSIZE64 for a block device) must cover that
window: mapping past the end of a file gives SIGBUS on access, which would kill
the process. For the same reason a sealable file (a memfd) gets F_SEAL_SHRINK
before it is checked, so the front end cannot shrink it under the mapping later.

Two address spaces are translated:

* guest-physical addresses (GPA): what descriptors carry;
* front-end virtual addresses (UVA): what SET_VRING_ADDR carries.

Every translation is bounds-checked; an access that is not entirely inside the
regions raises :class:`GuestMemoryError`. A range may span adjacent regions
(``views()`` splits it); the single-view helpers require it to lie in one.

This module is used by the supervisor (control/event queues, ring address
validation) and by every worker (the data path).
"""
from __future__ import annotations

import fcntl
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

U64_MAX = (1 << 64) - 1

from ._ring import ffi as _ffi, lib as _lib


def install_fault_guard() -> bool:
    """Survive SIGBUS on guest memory (a front end truncating its memory file):
    faulting pages read as zeros, :func:`fault_count` rises, and the caller drops
    the front end. Call once per process, after faulthandler."""
    return _lib.vsd_sigbus_install() == 0


def fault_count() -> int:
    """How many guest-memory pages have faulted (SIGBUS) in this process so far."""
    return int(_lib.vsd_fault_count())
BLKGETSIZE64 = 0x80081272


class GuestMemoryError(Exception):
    """An address or length outside the guest memory we were given, or a bad table."""


@dataclass(frozen=True, slots=True)
class RegionSpec:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def as_dict(self) -> dict:
        return {"gpa": self.guest_phys_addr, "size": self.memory_size,
                "uva": self.userspace_addr, "offset": self.mmap_offset}

    @classmethod
    def from_dict(cls, d: dict) -> "RegionSpec":
        return cls(int(d["gpa"]), int(d["size"]), int(d["uva"]), int(d["offset"]))


def validate_table(specs: Sequence[RegionSpec], *, max_regions: int) -> None:
    """Check a memory table's shape without touching any fd."""
    # An empty table is legal: it is what REM_MEM_REG of the last region leaves (every
    # access then fails the bounds checks). SET_MEM_TABLE with no regions is refused
    # by the protocol codec.
    if len(specs) > max_regions:
        raise GuestMemoryError(f"memory table has {len(specs)} regions, maximum is {max_regions}")
    for i, s in enumerate(specs):
        if s.memory_size == 0:
            raise GuestMemoryError(f"region {i} has size 0")
        if s.guest_phys_addr + s.memory_size - 1 > U64_MAX:
            raise GuestMemoryError(f"region {i} GPA range overflows 64 bits")
        if s.userspace_addr + s.memory_size - 1 > U64_MAX:
            raise GuestMemoryError(f"region {i} user address range overflows 64 bits")
        if s.mmap_offset + s.memory_size - 1 > U64_MAX:
            raise GuestMemoryError(f"region {i} mmap offset + size overflows 64 bits")
    by_gpa = sorted(specs, key=lambda s: s.guest_phys_addr)
    for a, b in zip(by_gpa, by_gpa[1:]):
        if a.guest_phys_addr + a.memory_size > b.guest_phys_addr:
            raise GuestMemoryError(
                f"regions overlap in guest physical space at {b.guest_phys_addr:#x}")
    by_uva = sorted(specs, key=lambda s: s.userspace_addr)
    for a, b in zip(by_uva, by_uva[1:]):
        if a.userspace_addr + a.memory_size > b.userspace_addr:
            raise GuestMemoryError(
                f"regions overlap in front-end address space at {b.userspace_addr:#x}")


class Region:
    """One mapped region."""

    __slots__ = ("gpa", "size", "uva", "mmap_offset", "gpa_end", "uva_end", "_mm", "view", "fd",
                 "_guard")

    def __init__(self, spec: RegionSpec, fd: int):
        self.fd = fd   # not owned: whoever passed it keeps (and closes) it
        self.gpa = spec.guest_phys_addr
        self.size = spec.memory_size
        self.uva = spec.userspace_addr
        self.mmap_offset = spec.mmap_offset
        self.gpa_end = self.gpa + self.size
        self.uva_end = self.uva + self.size
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise GuestMemoryError(f"region fd is not a mappable file (mode {st.st_mode:#o})")
        need = self.mmap_offset + self.size
        if stat.S_ISREG(st.st_mode):
            # A front end that shrinks the file under our mapping would turn every
            # access into SIGBUS: forbid shrinking where the file allows sealing
            # (memfds; QEMU's memory-backend-memfd seals them itself by default).
            seal_against_shrink(fd)
            st = os.fstat(fd)
            size = st.st_size
        else:
            size = _blockdev_size(fd) if stat.S_ISBLK(st.st_mode) else None
        if size is not None and size < need:
            raise GuestMemoryError(
                f"region needs {need} bytes of its file but the file has only {size}")
        try:
            self._mm = mmap.mmap(fd, need, flags=mmap.MAP_SHARED,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as exc:
            raise GuestMemoryError(f"cannot map region: {exc}") from None
        try:
            self._mm.madvise(mmap.MADV_DONTDUMP)
        except (OSError, AttributeError):
            pass
        self.view = memoryview(self._mm)[self.mmap_offset:need]
        self._guard = guard_mapping(self._mm)

    def spec(self) -> RegionSpec:
        return RegionSpec(self.gpa, self.size, self.uva, self.mmap_offset)

    def close(self) -> None:
        """Unmap. Raises BufferError if views of this region are still alive."""
        if self._mm is None:
            return
        self.view.release()
        self._mm.close()          # raises BufferError (and keeps the guard) if views live on
        self._mm = None
        unguard_mapping(self._guard)
        self._guard = None


class FaultCounter:
    """A mapping's own count of faulted pages (:func:`guard_mapping` with it): faults
    there are survived the same way but are not guest memory faults (they do not
    raise :func:`fault_count`). C code reads it at :attr:`address`."""

    __slots__ = ("_c",)

    def __init__(self):
        self._c = _ffi.new("unsigned long[1]")

    @property
    def value(self) -> int:
        return int(self._c[0])

    @property
    def address(self) -> int:
        return int(_ffi.cast("uintptr_t", self._c))


def guard_mapping(mm: mmap.mmap, counter: FaultCounter | None = None):
    """Register a shared mapping with the SIGBUS guard (see :func:`install_fault_guard`):
    a front end's file, or (with its own ``counter``) another file that can shrink
    under us. Returns the handle for :func:`unguard_mapping`."""
    if _lib is None:
        return None
    pin = _ffi.from_buffer(mm)
    base = _ffi.cast("uint8_t *", int(_ffi.cast("uintptr_t", pin)))
    _ffi.release(pin)
    if counter is None:
        _lib.vsd_guard_add(base, len(mm))
    else:
        _lib.vsd_guard_add_counted(base, len(mm), counter._c)
    return base


def unguard_mapping(handle) -> None:
    """Call after the mapping is unmapped."""
    if handle is not None:
        _lib.vsd_guard_remove(handle)


def seal_against_shrink(fd: int) -> None:
    """Best effort: add F_SEAL_SHRINK to a sealable file (a memfd), so the front end
    that handed it over cannot truncate it under our mapping."""
    try:
        if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except (OSError, AttributeError):
        pass      # not sealable (tmpfs/hugetlbfs file, sealing not allowed, F_SEAL_SEAL set)


def _blockdev_size(fd: int) -> int | None:
    try:
        return struct.unpack("<Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
    except OSError:
        return None


class GuestMemory:
    """The guest memory table, mapped into this process."""

    __slots__ = ("regions", "generation", "_last")

    def __init__(self, regions: Sequence[Region] = (), generation: int = 0):
        self.regions: list[Region] = sorted(regions, key=lambda r: r.gpa)
        self.generation = generation
        self._last = self.regions[0] if self.regions else None

    @classmethod
    def map(cls, specs: Sequence[RegionSpec], fds: Sequence[int], *, max_regions: int = 8,
            generation: int = 0) -> "GuestMemory":
        """Validate and map a table. The fds are not closed (the caller owns them)."""
        if len(specs) != len(fds):
            raise GuestMemoryError(f"{len(specs)} regions but {len(fds)} fds")
        validate_table(specs, max_regions=max_regions)
        mapped: list[Region] = []
        try:
            for spec, fd in zip(specs, fds):
                mapped.append(Region(spec, fd))
        except BaseException:
            for r in mapped:
                r.close()
            raise
        return cls(mapped, generation)

    def specs(self) -> list[RegionSpec]:
        return [r.spec() for r in self.regions]

    def fds(self) -> list[int]:
        """The region fds, in the same order as :meth:`specs`."""
        return [r.fd for r in self.regions]

    def close(self) -> None:
        for r in self.regions:
            r.close()
        self.regions = []
        self._last = None

    # -- lookup
    def _find_gpa(self, gpa: int) -> Region:
        r = self._last
        if r is not None and r.gpa <= gpa < r.gpa_end:
            return r
        for r in self.regions:
            if r.gpa <= gpa < r.gpa_end:
                self._last = r
                return r
        raise GuestMemoryError(f"guest physical address {gpa:#x} is not in any region")

    def gpa_view(self, gpa: int, length: int) -> memoryview:
        """A view of ``[gpa, gpa+length)``, which must lie inside one region."""
        if length < 0 or gpa < 0 or gpa + length - 1 > U64_MAX:
            raise GuestMemoryError(f"bad range {gpa:#x}+{length:#x}")
        r = self._find_gpa(gpa)
        off = gpa - r.gpa
        if off + length > r.size:
            raise GuestMemoryError(
                f"range {gpa:#x}+{length:#x} crosses the end of its region")
        return r.view[off:off + length]

    def views(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering ``[gpa, gpa+length)``, split at region boundaries."""
        if length < 0 or gpa < 0 or gpa + length - 1 > U64_MAX:
            raise GuestMemoryError(f"bad range {gpa:#x}+{length:#x}")
        out = []
        while length > 0:
            r = self._find_gpa(gpa)
            off = gpa - r.gpa
            n = min(length, r.size - off)
            out.append(r.view[off:off + n])
            gpa += n
            length -= n
        return out

    def uva_to_gpa(self, uva: int, length: int = 1) -> int:
        """Translate a front-end virtual address range (inside one region) to a GPA."""
        if length < 0 or uva < 0 or uva + length - 1 > U64_MAX:
            raise GuestMemoryError(f"bad front-end address range {uva:#x}+{length:#x}")
        for r in self.regions:
            if r.uva <= uva and uva + length <= r.uva_end:
                return r.gpa + (uva - r.uva)
        raise GuestMemoryError(
            f"front-end address range {uva:#x}+{length:#x} is not inside one region")

    def region_info(self) -> Iterable[dict]:
        for r in self.regions:
            yield r.spec().as_dict()
