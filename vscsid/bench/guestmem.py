"""Front-end ("guest") memory: memfd-backed regions shared with the device.

This is the driver-side counterpart of :mod:`vscsid.virtio.memory`.  It plays the role
QEMU plays for a vhost-user back end: it owns guest RAM as one memfd per region,
maps it ``MAP_SHARED`` and hands the fds to the device in ``SET_MEM_TABLE``.

Addresses
---------
* ``gpa``  -- guest physical address.  Regions may leave gaps in the GPA space
  (e.g. ``[(0, 3 << 30), (4 << 30, 1 << 30)]``); a buffer never spans regions.
* ``user_addr`` -- the front end's virtual address of the region's first guest
  byte, as carried by ``SET_MEM_TABLE`` and ``SET_VRING_ADDR``.  We use the
  **real** address of our own mapping (obtained with ``ffi.from_buffer``), like
  QEMU does, so values are distinct, page aligned and realistic.  The device
  must treat them as opaque numbers (it never dereferences them).
* ``mmap_offset`` -- where the region starts inside its fd.  It is normally 0;
  a non-zero value makes the fd ``mmap_offset + size`` bytes long with the
  first ``mmap_offset`` bytes filled with :data:`POISON`, so a device that
  forgets to add the offset reads garbage instead of guest data.

Allocation
----------
``alloc``/``free`` is a first-fit allocator over per-region free extents with
coalescing (good for tests: any size, any power-of-two alignment).
:class:`SlabPool` hands out fixed-size buffers in O(1) and :class:`BumpArena`
carves buffers sequentially and is reset wholesale (vscsid-bench itself lays its
slots out once, with ``alloc``).
"""
from __future__ import annotations

import bisect
import mmap
import os
import warnings
from typing import Iterable, NamedTuple, Sequence

from vscsid.virtio._ring import ffi

__all__ = [
    "POISON",
    "PAGE_SIZE",
    "HUGE_PAGE_SIZE",
    "GuestMemoryError",
    "OutOfGuestMemory",
    "Region",
    "MemTableEntry",
    "FrontendMemory",
    "SlabPool",
    "BumpArena",
]

PAGE_SIZE = mmap.PAGESIZE
HUGE_PAGE_SIZE = 2 << 20
POISON = 0xA5


class GuestMemoryError(ValueError):
    """A guest-physical range is not (entirely) backed by one region."""


class OutOfGuestMemory(MemoryError):
    """The allocator has no free extent large enough."""


class MemTableEntry(NamedTuple):
    """One region as ``VHOST_USER_SET_MEM_TABLE`` describes it (fd goes in SCM_RIGHTS)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    fd: int


class Region:
    """One memfd-backed region of guest memory."""

    __slots__ = ("index", "gpa", "size", "fd", "mmap_offset", "user_addr", "view", "_mm", "_free")

    def __init__(self, index: int, gpa: int, size: int, fd: int, mmap_offset: int,
                 user_addr: int, view: memoryview, mm: mmap.mmap) -> None:
        self.index = index
        self.gpa = gpa
        self.size = size
        self.fd = fd
        self.mmap_offset = mmap_offset
        self.user_addr = user_addr
        self.view = view          # guest bytes gpa .. gpa+size (excludes the mmap_offset prefix)
        self._mm = mm
        # free extents [start, end) as absolute GPAs, sorted, non-adjacent
        self._free: list[list[int]] = [[gpa, gpa + size]]

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end

    def __repr__(self) -> str:
        return (f"Region(#{self.index} gpa=0x{self.gpa:x} size=0x{self.size:x} fd={self.fd} "
                f"uva=0x{self.user_addr:x} mmap_offset=0x{self.mmap_offset:x})")


def _align_up(v: int, a: int) -> int:
    return (v + a - 1) & ~(a - 1)


class FrontendMemory:
    """Guest RAM for a driver-side test client / load generator.

    ``FrontendMemory(size, regions=1)`` splits ``size`` into ``regions`` equal,
    GPA-contiguous regions starting at GPA 0.  ``regions`` may instead be a list
    of ``(gpa, size)`` or ``(gpa, size, mmap_offset)`` tuples (``size`` is then
    ignored and may be ``None``).  ``mmap_offset`` applies to every region that
    does not give its own.
    """

    def __init__(self, size: int | None = None, regions: int | Sequence[tuple[int, ...]] = 1, *,
                 hugepages: bool = False, allow_sealing: bool = False, mmap_offset: int = 0,
                 name: str = "vscsid-guest") -> None:
        self._regions: list[Region] = []
        self._starts: list[int] = []
        self._allocs: dict[int, tuple[Region, int]] = {}   # gpa -> (region, size)
        self._closed = False
        self.hugepages = bool(hugepages)
        page = HUGE_PAGE_SIZE if hugepages else PAGE_SIZE
        self.page_size = page
        if mmap_offset < 0:
            raise ValueError("mmap_offset must be >= 0")

        specs: list[tuple[int, int, int]] = []
        if isinstance(regions, int):
            if size is None or size <= 0:
                raise ValueError("size must be positive")
            if regions < 1:
                raise ValueError("regions must be >= 1")
            rsize = _align_up(-(-size // regions), page)
            specs = [(i * rsize, rsize, mmap_offset) for i in range(regions)]
        else:
            for spec in regions:
                if len(spec) == 2:
                    specs.append((spec[0], spec[1], mmap_offset))
                elif len(spec) == 3:
                    specs.append((spec[0], spec[1], spec[2]))
                else:
                    raise ValueError(f"bad region spec {spec!r}")
            if not specs:
                raise ValueError("at least one region is required")
        specs.sort()
        prev_end = -1
        for gpa, rsize, off in specs:
            if rsize <= 0 or rsize % page or gpa % page or gpa < 0:
                raise ValueError(f"region gpa=0x{gpa:x} size=0x{rsize:x} must be positive and "
                                 f"{page}-byte aligned")
            if off < 0 or (hugepages and off % page):
                raise ValueError(f"bad mmap_offset 0x{off:x}")
            if gpa < prev_end:
                raise ValueError(f"region at gpa 0x{gpa:x} overlaps the previous one")
            prev_end = gpa + rsize

        flags = os.MFD_CLOEXEC
        if allow_sealing:
            flags |= os.MFD_ALLOW_SEALING
        if hugepages:
            flags |= os.MFD_HUGETLB | getattr(os, "MFD_HUGE_2MB", 21 << 26)
        try:
            for i, (gpa, rsize, off) in enumerate(specs):
                self._regions.append(self._make_region(i, gpa, rsize, off, flags, f"{name}-{i}"))
        except BaseException:
            self.close()
            raise
        self._starts = [r.gpa for r in self._regions]

    # ------------------------------------------------------------------ setup
    def _make_region(self, index: int, gpa: int, size: int, off: int, flags: int, name: str) -> Region:
        try:
            fd = os.memfd_create(name, flags)
        except OSError as e:
            if self.hugepages:
                raise OSError(e.errno, f"memfd_create(MFD_HUGETLB) failed: {e.strerror}; "
                                       "are hugepages available (vm.nr_hugepages)?") from e
            raise
        try:
            total = off + size
            os.ftruncate(fd, total)
            try:
                mm = mmap.mmap(fd, total, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as e:
                if self.hugepages:
                    raise OSError(e.errno, f"mmap of hugetlb memfd failed ({e.strerror}); "
                                           "reserve hugepages with vm.nr_hugepages") from e
                raise
            whole = memoryview(mm)
            if off:
                whole[:off] = bytes([POISON]) * off
            p = ffi.from_buffer("uint8_t[]", mm)
            base = int(ffi.cast("uintptr_t", p))
            ffi.release(p)
            view = whole[off:off + size]
            whole.release()
            return Region(index, gpa, size, fd, off, base + off, view, mm)
        except BaseException:
            os.close(fd)
            raise

    # ------------------------------------------------------------------ info
    @property
    def regions(self) -> list[Region]:
        return list(self._regions)

    @property
    def size(self) -> int:
        return sum(r.size for r in self._regions)

    @property
    def fds(self) -> list[int]:
        return [r.fd for r in self._regions]

    @property
    def closed(self) -> bool:
        return self._closed

    def regions_for_mem_table(self) -> list[MemTableEntry]:
        """``(guest_phys_addr, memory_size, userspace_addr, mmap_offset, fd)`` per region."""
        self._check_open()
        return [MemTableEntry(r.gpa, r.size, r.user_addr, r.mmap_offset, r.fd) for r in self._regions]

    # ------------------------------------------------------------ translation
    def region_of(self, gpa: int, length: int = 1) -> Region:
        """The region holding ``[gpa, gpa+length)``; :class:`GuestMemoryError` otherwise."""
        if self._closed:
            raise GuestMemoryError("guest memory is closed")
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"negative address/length 0x{gpa:x}+{length}")
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self._regions[i]
            if gpa + length <= r.gpa + r.size and (length or gpa <= r.gpa + r.size):
                return r
        raise GuestMemoryError(f"guest range 0x{gpa:x}+0x{length:x} is not inside one memory region")

    def gpa_view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of ``length`` guest bytes at ``gpa`` (bounds-checked)."""
        r = self.region_of(gpa, length)
        off = gpa - r.gpa
        return r.view[off:off + length]

    def read(self, gpa: int, n: int) -> bytes:
        r = self.region_of(gpa, n)
        off = gpa - r.gpa
        return bytes(r.view[off:off + n])

    def write(self, gpa: int, data) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        r = self.region_of(gpa, n)
        off = gpa - r.gpa
        r.view[off:off + n] = data

    def fill(self, gpa: int, n: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * n)

    def uva(self, gpa: int) -> int:
        """Front-end virtual address of ``gpa`` (what SET_VRING_ADDR carries)."""
        r = self.region_of(gpa, 0)
        return r.user_addr + (gpa - r.gpa)

    def gpa_of_uva(self, uva: int) -> int:
        for r in self._regions:
            if r.user_addr <= uva <= r.user_addr + r.size:
                return r.gpa + (uva - r.user_addr)
        raise GuestMemoryError(f"front-end address 0x{uva:x} is not in guest memory")

    def unmapped_gpa(self) -> int:
        """A GPA not backed by any region (inside a gap if there is one, else past the end)."""
        for a, b in zip(self._regions, self._regions[1:]):
            if a.end < b.gpa:
                return a.end
        return self._regions[-1].end

    # -------------------------------------------------------------- allocator
    def alloc(self, size: int, align: int = 16, *, region: int | None = None) -> int:
        """First-fit allocation of ``size`` bytes aligned to ``align`` (a power of two)."""
        if size <= 0:
            raise ValueError("allocation size must be positive")
        if align <= 0 or align & (align - 1):
            raise ValueError("align must be a power of two")
        self._check_open()
        mask = align - 1
        cands = self._regions if region is None else [self._regions[region]]
        for r in cands:
            free = r._free
            for k, ext in enumerate(free):
                s, e = ext
                a = (s + mask) & ~mask
                if a + size > e:
                    continue
                tail = a + size
                if a == s:
                    if tail == e:
                        del free[k]
                    else:
                        ext[0] = tail
                else:
                    ext[1] = a
                    if tail != e:
                        free.insert(k + 1, [tail, e])
                self._allocs[a] = (r, size)
                return a
        raise OutOfGuestMemory(f"no free guest memory for {size} bytes aligned to {align}")

    def free(self, gpa: int) -> None:
        try:
            r, size = self._allocs.pop(gpa)
        except KeyError:
            raise ValueError(f"free of 0x{gpa:x}: not an allocated block") from None
        free = r._free
        end = gpa + size
        k = bisect.bisect_left(free, [gpa])
        merged_prev = k > 0 and free[k - 1][1] == gpa
        merged_next = k < len(free) and free[k][0] == end
        if merged_prev and merged_next:
            free[k - 1][1] = free[k][1]
            del free[k]
        elif merged_prev:
            free[k - 1][1] = end
        elif merged_next:
            free[k][0] = gpa
        else:
            free.insert(k, [gpa, end])

    def allocated(self, gpa: int) -> int | None:
        """Size of the allocated block starting at ``gpa`` (None if not allocated)."""
        ent = self._allocs.get(gpa)
        return None if ent is None else ent[1]

    @property
    def bytes_allocated(self) -> int:
        return sum(s for _, s in self._allocs.values())

    @property
    def bytes_free(self) -> int:
        return sum(e - s for r in self._regions for s, e in r._free)

    def slab(self, buf_size: int, count: int, align: int = 64, *, region: int | None = None) -> "SlabPool":
        return SlabPool(self, buf_size, count, align, region=region)

    def arena(self, size: int, align: int = 4096, *, region: int | None = None) -> "BumpArena":
        return BumpArena(self, size, align, region=region)

    # ---------------------------------------------------------------- cleanup
    def _check_open(self) -> None:
        if self._closed:
            raise GuestMemoryError("guest memory is closed")

    def close(self) -> None:
        """Release our views, unmap and close the fds.  Idempotent.

        If a caller still holds a view from :meth:`gpa_view`, the mapping cannot
        be unmapped now; it is then left to the garbage collector (with a
        ``ResourceWarning``) while the fd is closed regardless.
        """
        if self._closed:
            return
        self._closed = True
        for r in self._regions:
            try:
                r.view.release()
            except BufferError:   # pragma: no cover - slices of r.view are independent exports
                pass
            try:
                r._mm.close()
            except BufferError:
                warnings.warn(f"guest memory region {r.index} still has exported views; "
                              "unmapping deferred to garbage collection", ResourceWarning, stacklevel=2)
            try:
                os.close(r.fd)
            except OSError:
                pass
        self._allocs.clear()

    def __enter__(self) -> "FrontendMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FrontendMemory({self._regions!r})"


class SlabPool:
    """Fixed-size buffers carved from one allocation; O(1) ``get``/``put``."""

    __slots__ = ("mem", "buf_size", "stride", "count", "base", "_free", "_set")

    def __init__(self, mem: FrontendMemory, buf_size: int, count: int, align: int = 64, *,
                 region: int | None = None) -> None:
        if buf_size <= 0 or count <= 0:
            raise ValueError("buf_size and count must be positive")
        self.mem = mem
        self.buf_size = buf_size
        self.stride = _align_up(buf_size, align)
        self.count = count
        self.base = mem.alloc(self.stride * count, align, region=region)
        # lowest addresses first out
        self._free = [self.base + i * self.stride for i in range(count - 1, -1, -1)]
        self._set: set[int] | None = None

    def get(self) -> int:
        try:
            return self._free.pop()
        except IndexError:
            raise OutOfGuestMemory(f"slab of {self.count} x {self.buf_size} B exhausted") from None

    def put(self, gpa: int) -> None:
        off = gpa - self.base
        if off < 0 or off % self.stride or off >= self.stride * self.count:
            raise ValueError(f"0x{gpa:x} is not a buffer of this slab")
        self._free.append(gpa)

    def buffers(self) -> Iterable[int]:
        return (self.base + i * self.stride for i in range(self.count))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def close(self) -> None:
        if self.base is not None:
            self.mem.free(self.base)
            self.base = None  # type: ignore[assignment]
            self._free.clear()


class BumpArena:
    """Sequential allocation from one block; freed all at once with :meth:`reset`."""

    __slots__ = ("mem", "base", "size", "_pos")

    def __init__(self, mem: FrontendMemory, size: int, align: int = 4096, *, region: int | None = None) -> None:
        self.mem = mem
        self.base = mem.alloc(size, align, region=region)
        self.size = size
        self._pos = 0

    def take(self, n: int, align: int = 16) -> int:
        a = _align_up(self.base + self._pos, align)
        if n <= 0 or a + n > self.base + self.size:
            raise OutOfGuestMemory(f"arena exhausted ({n} bytes requested)")
        self._pos = a + n - self.base
        return a

    def reset(self) -> None:
        self._pos = 0

    @property
    def used(self) -> int:
        return self._pos

    def close(self) -> None:
        if self.base is not None:
            self.mem.free(self.base)
            self.base = None  # type: ignore[assignment]
