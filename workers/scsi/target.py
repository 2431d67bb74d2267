"""The SCSI target: CDB bytes and scatter-gather lists in, a ``ScsiResult`` out.

Pure: it knows nothing of virtio. ``ScsiTarget.plan`` validates a command and either
answers it (emulated commands, errors) or returns an ``IoPlan`` for the data path
(READ / WRITE / VERIFY / SYNCHRONIZE CACHE / WRITE SAME / UNMAP). A plan is
self-contained: ``run()`` does the backend I/O (on any thread), ``finish(result)``
maps the outcome — a byte count or the exception ``run`` raised — to a ``ScsiResult``.
``execute`` is ``plan`` → ``run`` → ``finish``.

``IoPlan.ios()`` is the same work as a generator of backend operations (:class:`Io`):
a data plane with an asynchronous backend submits each one, sends the result back
into the generator (or throws the OSError into it) and finishes the plan with the
generator's return value; ``run_ios`` drives one synchronously.
"""
from __future__ import annotations

import errno
import struct
from typing import Mapping

from .buffers import SGList
from .cdb import (
    CDB6_RW,
    CDB10,
    CDB12,
    CDB16,
    CDB_INQUIRY,
    CDB_MODE10,
    CDB_RC10,
    CDB_REPORT_LUNS,
    CDB_RSOC,
    COMMANDS,
    SA_MASK,
    SA_OPCODES,
    Command,
)
from .constants import (
    CHECK_CONDITION,
    GOOD,
    LBA_DEALLOCATED,
    LBA_MAPPED,
    MAX_LUN,
    MODE_DSP_DPOFUA,
    MODE_DSP_WP,
    PERIPHERAL_NONE,
    PERIPHERAL_WLUN,
    PQ_NOT_CAPABLE,
    WLUN_REPORT_LUNS,
    ModePage,
    Op,
    PageControl,
    ServiceAction,
    Vpd,
)
from vscsid.lunstate import UA_LUNS_CHANGED

from .disk import Disk, LunState, standard_inquiry, vpd_page
from .sense import (
    INTERNAL_TARGET_FAILURE,
    INVALID_COMMAND_OPERATION_CODE,
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    LBA_OUT_OF_RANGE,
    LOGICAL_UNIT_BECOMING_READY,
    LOGICAL_UNIT_NOT_SUPPORTED,
    MISCOMPARE_DURING_VERIFY,
    NO_SENSE,
    PARAMETER_LIST_LENGTH_ERROR,
    SAVING_PARAMETERS_NOT_SUPPORTED,
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
    UNRECOVERED_READ_ERROR,
    WRITE_ERROR,
    WRITE_PROTECTED,
    Sense,
    build_sense,
    field_pointer,
    simple_sense,
)

EMPTY = SGList.EMPTY

# The work of one command is bounded twice: by the Block Limits VPD (MAXIMUM
# TRANSFER LENGTH, MAXIMUM WRITE SAME LENGTH, the UNMAP limits, from DiskInfo:
# the same numbers are advertised and enforced), and, for the commands that loop
# over the medium (VERIFY, WRITE SAME, UNMAP), by slicing: IoPlan.steps() does at
# most one slice per step, so a data plane can interleave other requests (and
# its heartbeat) between the slices of a long command.
WRITE_SAME_CHUNK = 1 << 20      # bytes of pattern written per slice
VERIFY_CHUNK = 1 << 20          # bytes read back and compared per slice
ZERO_CHUNK = 32 << 20           # bytes zeroed or deallocated per slice
# GET LBA STATUS: at most this many descriptors per response.
MAX_LBA_STATUS_DESCRIPTORS = 256

_U32 = struct.Struct(">I")
_LIST_HEADER = struct.Struct(">I4x")  # REPORT LUNS / GET LBA STATUS: length, reserved
_LBA_STATUS = struct.Struct(">QIB3x")
_MODE6_HEADER = struct.Struct(">BBBB")
_MODE10_HEADER = struct.Struct(">HBBBxH")
_BLOCK_DESC_SHORT = struct.Struct(">II")  # blocks, reserved byte + 24-bit block length
_BLOCK_DESC_LONG = struct.Struct(">Q4xI")
_RSOC_ALL = struct.Struct(">BxHxBH")
_RSOC_ONE = struct.Struct(">xBH")
_RSOC_TIMEOUTS = struct.Struct(">HxBII")
_UNMAP_HEADER = struct.Struct(">HH4x")
_UNMAP_DESC = struct.Struct(">QI4x")

_EIO_READ_OPS = frozenset(("read", "verify"))
#: errnos of a backend whose server cannot be reached (network LUNs): NOT READY,
#: LOGICAL UNIT IS IN PROCESS OF BECOMING READY, which initiators retry.
_UNREACHABLE = frozenset((errno.ETIMEDOUT, errno.ENOTCONN, errno.ECONNRESET, errno.ECONNREFUSED,
                          errno.ESHUTDOWN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE))


class _NullLog:
    """structlog-shaped logger that drops everything."""

    def _drop(self, *args, **kw) -> None:
        return None

    debug = info = warning = error = exception = _drop


NULL_LOG = _NullLog()


class ScsiResult:
    """Outcome of one command. ``overrun``: the buffers are too small for the transfer the
    CDB asks for (a transport error; nothing was transferred)."""

    __slots__ = ("status", "sense", "data_in_len", "data_out_len", "overrun")

    def __init__(
        self,
        status: int = GOOD,
        sense: bytes = b"",
        data_in_len: int = 0,
        data_out_len: int = 0,
        overrun: bool = False,
    ) -> None:
        self.status = status
        self.sense = sense
        self.data_in_len = data_in_len
        self.data_out_len = data_out_len
        self.overrun = overrun

    def _key(self) -> tuple:
        return (self.status, self.sense, self.data_in_len, self.data_out_len, self.overrun)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ScsiResult):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return (
            f"ScsiResult(status={self.status:#04x}, sense={self.sense.hex()!r}, "
            f"data_in_len={self.data_in_len}, data_out_len={self.data_out_len}, overrun={self.overrun})"
        )


class Miscompare(Exception):
    """VERIFY with BYTCHK found different data; ``offset`` is the first differing byte."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"miscompare at byte {offset}")
        self.offset = offset


def _overrun() -> ScsiResult:
    return ScsiResult(GOOD, b"", 0, 0, True)


def _check(lu, sense: Sense, information: int | None = None, sks: bytes | None = None) -> ScsiResult:
    d = lu.state.d_sense
    if information is None and sks is None:
        data = simple_sense(sense, d)
    else:
        data = build_sense(sense, descriptor=d, information=information, sks=sks)
    return ScsiResult(CHECK_CONDITION, data)


def _bad_cdb(lu, byte: int, bit: int | None = None) -> ScsiResult:
    return _check(lu, INVALID_FIELD_IN_CDB, sks=field_pointer(byte, bit))


def _bad_param(lu, byte: int, bit: int | None = None) -> ScsiResult:
    return _check(lu, INVALID_FIELD_IN_PARAMETER_LIST, sks=field_pointer(byte, bit, in_cdb=False))


def _data_in(payload: bytes, alloc: int, din: SGList) -> ScsiResult:
    """Send emulated data, truncated to the allocation length and the buffer (SPC allocation length rules)."""
    n = len(payload)
    if alloc < n:
        n = alloc
    if n:
        n = din.copy_in(memoryview(payload)[:n])
    return ScsiResult(GOOD, b"", n, 0, False)


class Io:
    """One backend operation of a plan: ``kind`` is "read" or "write" (``views`` at
    ``offset``, ``length`` bytes, ``fua``), "flush", "zero" (``length`` bytes at
    ``offset`` read back as zeros; ``unmap``: may deallocate) or "discard"."""

    __slots__ = ("kind", "views", "offset", "length", "fua", "unmap")

    def __init__(self, kind: str, views=None, offset: int = 0, length: int = 0,
                 fua: bool = False, unmap: bool = False) -> None:
        self.kind = kind
        self.views = views
        self.offset = offset
        self.length = length
        self.fua = fua
        self.unmap = unmap

    def __repr__(self) -> str:
        return f"Io({self.kind}, {self.length}@{self.offset}, fua={self.fua}, unmap={self.unmap})"


def run_io(backend, io: Io) -> int:
    """Do one Io synchronously on ``backend``; bytes transferred (raises OSError)."""
    kind = io.kind
    if kind == "read":
        return backend.readv(io.views, io.offset)
    if kind == "write":
        return backend.writev(io.views, io.offset, io.fua)
    if kind == "flush":
        backend.flush()
        return 0
    if kind == "zero":
        backend.write_zeroes(io.offset, io.length, io.unmap)
        return io.length
    if kind == "discard":
        backend.discard(io.offset, io.length)
        return io.length
    raise AssertionError(f"unknown Io kind {kind!r}")


def run_ios(backend, gen, sliced: bool = False):
    """Drive an ``ios()`` generator synchronously; its return value (raises what it
    raises). With ``sliced`` this is itself a generator that yields between two
    operations (the slices of IoPlan.steps)."""
    if sliced:
        return _run_ios_sliced(backend, gen)
    try:
        io = next(gen)
        while True:
            try:
                r = run_io(backend, io)
            except Exception as exc:  # OSError: the generator may handle it
                io = gen.throw(exc)
            else:
                io = gen.send(r)
    except StopIteration as done:
        return done.value


def _run_ios_sliced(backend, gen):
    try:
        io = next(gen)
        while True:
            try:
                r = run_io(backend, io)
            except Exception as exc:
                io = gen.throw(exc)
            else:
                io = gen.send(r)
            yield
    except StopIteration as done:
        return done.value


class InjectedFault(Exception):
    """A fault injected by the data plane (vscsid.inject): ``sense`` with INFORMATION
    ``lba``, after ``done`` bytes of the command moved."""

    def __init__(self, sense: Sense, lba: int, done: int = 0) -> None:
        super().__init__(f"injected {sense} at LBA {lba}")
        self.sense = sense
        self.lba = lba
        self.done = done


class IoPlan:
    """A data-path command, validated and ready to run against the backend.

    ``op``: "read", "write", "flush", "verify", "write_same" or "unmap". For read/write,
    ``views`` are the guest buffers covering exactly ``length`` bytes at byte ``offset``
    of the backend and ``fua`` asks for a durable (RWF_DSYNC) write. ``run()`` does the
    I/O inline; an I/O engine may instead perform read/write/flush itself and pass the
    byte count (or the OSError) to ``finish``.
    """

    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    VERIFY = "verify"
    WRITE_SAME = "write_same"
    UNMAP = "unmap"
    #: ops whose work is cut into slices (see :meth:`steps`)
    SLICED = frozenset((VERIFY, WRITE_SAME, UNMAP))

    __slots__ = ("op", "disk", "backend", "log", "offset", "length", "views", "fua",
                 "lba", "nblocks", "data_in_len", "data_out_len", "args")

    def __init__(self, op, disk, log, offset, length, views, fua, lba, nblocks,
                 data_in_len=0, data_out_len=0, args=None) -> None:
        self.op = op
        self.disk = disk
        self.backend = disk.backend
        self.log = disk.log or log
        self.offset = offset
        self.length = length
        self.views = views
        self.fua = fua
        self.lba = lba
        self.nblocks = nblocks
        self.data_in_len = data_in_len
        self.data_out_len = data_out_len
        self.args = args

    def __repr__(self) -> str:
        return (f"IoPlan({self.op}, lba={self.lba}, blocks={self.nblocks}, offset={self.offset}, "
                f"length={self.length}, fua={self.fua})")

    @property
    def sliced(self) -> bool:
        return self.op in IoPlan.SLICED

    def run(self) -> int:
        """Do the backend I/O; returns bytes transferred, raises OSError (or Miscompare)."""
        op = self.op
        if op == "read":
            return self.backend.readv(self.views, self.offset)
        if op == "write":
            return self.backend.writev(self.views, self.offset, self.fua)
        if op == "flush":
            self.backend.flush()
            return 0
        if op in IoPlan.SLICED:
            return run_ios(self.backend, self.ios())
        raise AssertionError(f"unknown plan op {op!r}")

    def steps(self):
        """A sliced op as a generator: each ``next()`` does one bounded slice of the
        work (one backend operation); the generator's return value is what ``run``
        returns (it raises what ``run`` raises)."""
        if self.op not in IoPlan.SLICED:
            raise AssertionError(f"{self.op!r} is not a sliced op")
        return run_ios(self.backend, self.ios(), sliced=True)

    def ios(self):
        """The plan's backend operations, one :class:`Io` at a time: send each one's
        result (bytes) into the generator, or throw its exception; the return value
        is what ``run`` returns."""
        op = self.op
        if op == "read" or op == "write":
            return _rw_ios(self)
        if op == "flush":
            return _flush_ios()
        if op == "verify":
            return _verify_ios(self)
        if op == "write_same":
            return _write_same_ios(self)
        if op == "unmap":
            return _unmap_ios(self)
        raise AssertionError(f"unknown plan op {op!r}")

    def extents(self) -> list[tuple[int, int]]:
        """The blocks the command touches: [(lba, blocks)] (blocks 0: to the end)."""
        if self.op == "unmap":
            bs = self.disk.block_size
            return [(off // bs, n // bs) for off, n in self.args]
        return [(self.lba, self.nblocks)]

    def faulty_ios(self, sense: Sense, lba: int):
        """``ios()`` for a command with an injected fault at ``lba`` (inside the
        command): a READ or WRITE first moves the blocks before it; then the fault."""
        return _faulty_ios(self, sense, lba)

    def finish(self, result) -> ScsiResult:
        """Map ``run``'s result (bytes transferred, or the exception it raised) to a ScsiResult."""
        if isinstance(result, BaseException):
            if isinstance(result, InjectedFault):
                res = _check(self.disk, result.sense, information=result.lba)
                if self.op == "read":
                    res.data_in_len = result.done
                elif self.op == "write":
                    res.data_out_len = result.done
                return res
            return self._failed(result)
        op = self.op
        if (op == "read" or op == "write") and result is not None and result < self.length:
            short = OSError(errno.EIO, f"short {op}: {result} of {self.length} bytes")
            return self._failed(short, self.lba + max(0, result) // self.disk.block_size)
        return ScsiResult(GOOD, b"", self.data_in_len, self.data_out_len, False)

    def _failed(self, exc: BaseException, lba: int | None = None) -> ScsiResult:
        op = self.op
        disk = self.disk
        if lba is None:
            lba = self.lba
        info = None
        if isinstance(exc, Miscompare):
            sense = MISCOMPARE_DURING_VERIFY
            info = exc.offset
        elif isinstance(exc, OSError):
            code = exc.errno
            if code == errno.EIO:
                sense = UNRECOVERED_READ_ERROR if op in _EIO_READ_OPS else WRITE_ERROR
                if op != "flush":
                    info = lba
            elif code in (errno.ENOSPC, errno.EDQUOT):
                sense = SPACE_ALLOCATION_FAILED_WRITE_PROTECT
            elif code == errno.EROFS:
                sense = WRITE_PROTECTED
            elif code in _UNREACHABLE:
                sense = LOGICAL_UNIT_BECOMING_READY
            else:
                sense = INTERNAL_TARGET_FAILURE
        else:
            sense = INTERNAL_TARGET_FAILURE
        if not isinstance(exc, Miscompare):
            self.log.warning("scsi_io_error", op=op, lba=self.lba, blocks=self.nblocks,
                             errno=getattr(exc, "errno", None), error=repr(exc))
        return _check(disk, sense, information=info)


# -- plan runners for the composite operations ------------------------------------------------

def _first_difference(a, b) -> int:
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # invariant: the first difference lies in [lo, hi)
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return lo


def _rw_ios(plan: IoPlan):
    n = yield Io(plan.op, plan.views, plan.offset, plan.length, plan.fua)
    return n


def _flush_ios():
    yield Io("flush")
    return 0


def _prefix(views, n: int) -> list:
    out = []
    for v in views:
        if n <= 0:
            break
        k = v.nbytes if isinstance(v, memoryview) else len(v)
        out.append(v if k <= n else v[:n])
        n -= k
    return out


def _faulty_ios(plan: IoPlan, sense: Sense, lba: int):
    done = 0
    if (plan.op == "read" or plan.op == "write") and lba > plan.lba:
        k = (lba - plan.lba) * plan.disk.block_size
        n = yield Io(plan.op, _prefix(plan.views, k), plan.offset, k, plan.fua)
        if n < k:
            raise OSError(errno.EIO, f"short {plan.op}: {n} of {k} bytes")
        done = k
    raise InjectedFault(sense, lba, done)


def _verify_ios(plan: IoPlan):
    expected, single_block = plan.args
    bs = plan.disk.block_size
    total = plan.length
    chunk = min(total, max(bs, VERIFY_CHUNK // bs * bs))
    buf = bytearray(chunk)
    mv = memoryview(buf)
    pattern = expected * (chunk // bs) if single_block else None
    pos = 0
    while pos < total:
        k = min(chunk, total - pos)
        yield Io("read", [mv[:k]], plan.offset + pos, k)
        want = pattern[:k] if single_block else expected.copy_out(pos, k)
        got = bytes(mv[:k])
        if got != want:
            raise Miscompare(pos + _first_difference(got, want))
        pos += k
    return total


def _write_same_ios(plan: IoPlan):
    block, unmap, sync = plan.args
    total = plan.length
    pos = 0
    if block is None:
        while pos < total:
            k = min(ZERO_CHUNK, total - pos)
            yield Io("zero", None, plan.offset + pos, k, unmap=unmap)
            pos += k
    else:
        bs = len(block)
        reps = max(1, min(total, WRITE_SAME_CHUNK) // bs)
        mv = memoryview(block * reps)
        step = mv.nbytes
        while pos < total:
            k = min(step, total - pos)
            yield Io("write", [mv[:k]], plan.offset + pos, k)
            pos += k
    if sync:
        yield Io("flush")
    return total


def _unmap_ios(plan: IoPlan):
    for offset, length in plan.args:
        pos = 0
        while pos < length:
            k = min(ZERO_CHUNK, length - pos)
            yield Io("discard", None, offset + pos, k)
            pos += k
    return 0


# -- command handlers -------------------------------------------------------------------------
# Signature: handler(target, lu, cdb, data_out, data_in) -> ScsiResult | IoPlan. The CDB has
# already been checked for length and reserved bits against the command table.

def _test_unit_ready(t, lu, cdb, dout, din):
    return ScsiResult()


def _request_sense(t, lu, cdb, dout, din):
    payload = build_sense(lu.request_sense, descriptor=bool(cdb[1] & 0x01))
    return _data_in(payload, cdb[4], din)


def _inquiry(t, lu, cdb, dout, din):
    _, evpd, page, alloc, _ = CDB_INQUIRY.unpack_from(cdb)
    if not evpd & 0x01:
        if page:
            return _bad_cdb(lu, 2)
        return _data_in(lu.inquiry_std, alloc, din)
    payload = lu.vpd.get(page)
    if payload is None:
        if lu.request_sense is LOGICAL_UNIT_NOT_SUPPORTED:
            return _check(lu, LOGICAL_UNIT_NOT_SUPPORTED)
        return _bad_cdb(lu, 2)
    return _data_in(payload, alloc, din)


def _report_luns(t, lu, cdb, dout, din):
    _, select, alloc, _ = CDB_REPORT_LUNS.unpack_from(cdb)
    if alloc < 16:
        return _bad_cdb(lu, 6)
    if select == 0x00:
        luns = sorted(t._luns)
    elif select == 0x01:
        luns = [WLUN_REPORT_LUNS]
    elif select == 0x02:
        luns = sorted(t._luns) + [WLUN_REPORT_LUNS]
    else:
        return _bad_cdb(lu, 2)
    body = b"".join(encode_lun(n) for n in luns)
    return _data_in(_LIST_HEADER.pack(len(body)) + body, alloc, din)


def encode_lun(lun: int) -> bytes:
    """8-byte LUN: peripheral device addressing below 256, flat space up to 16383, W-LUNs as is."""
    if lun < 256:
        first = bytes((0, lun))
    elif lun <= MAX_LUN:
        first = bytes((0x40 | (lun >> 8), lun & 0xFF))
    else:  # well-known LUN (extended addressing, already encoded)
        first = lun.to_bytes(2, "big")
    return first + bytes(6)


def _start_stop_unit(t, disk, cdb, dout, din):
    b4 = cdb[4]
    # A stop (START=0, power condition START_VALID) writes the cache back unless NO_FLUSH.
    if not b4 & 0xF0 and not b4 & 0x01 and not b4 & 0x04:
        return IoPlan("flush", disk, t.log, 0, 0, None, False, 0, 0)
    return ScsiResult()


def _prevent_allow(t, disk, cdb, dout, din):
    return ScsiResult()


def _read_capacity_10(t, disk, cdb, dout, din):
    _, _, lba, pmi, _ = CDB_RC10.unpack_from(cdb)
    if not pmi & 0x01 and lba:
        return _bad_cdb(disk, 2)
    return _data_in(disk.read_capacity_10, 8, din)


def _read_capacity_16(t, disk, cdb, dout, din):
    _, _, lba, alloc, pmi, _ = CDB16.unpack_from(cdb)
    if not pmi & 0x01 and lba:
        return _bad_cdb(disk, 2)
    return _data_in(disk.read_capacity_16, alloc, din)


# READ / WRITE -----------------------------------------------------------------------------

def _plan_read(t, disk, lba, n, flags, din, len_off):
    if flags & 0xE0:  # RDPROTECT: no protection information
        return _bad_cdb(disk, 1, 7)
    if n > disk.max_transfer_blocks:
        return _bad_cdb(disk, len_off)
    if lba + n > disk.num_blocks:
        return _check(disk, LBA_OUT_OF_RANGE)
    if not n:
        return ScsiResult()
    nbytes = n * disk.block_size
    if din.length < nbytes:
        return _overrun()
    return IoPlan("read", disk, t.log, lba * disk.block_size, nbytes, din.views_for(0, nbytes),
                  False, lba, n, nbytes, 0)


def _plan_write(t, disk, lba, n, flags, dout, len_off):
    if disk.readonly:
        return _check(disk, WRITE_PROTECTED)
    if flags & 0xE0:  # WRPROTECT
        return _bad_cdb(disk, 1, 7)
    if n > disk.max_transfer_blocks:
        return _bad_cdb(disk, len_off)
    if lba + n > disk.num_blocks:
        return _check(disk, LBA_OUT_OF_RANGE)
    if not n:
        return ScsiResult()
    nbytes = n * disk.block_size
    if dout.length < nbytes:
        return _overrun()
    fua = bool(flags & 0x08) or not disk.state.wce
    return IoPlan("write", disk, t.log, lba * disk.block_size, nbytes, dout.views_for(0, nbytes),
                  fua, lba, n, 0, nbytes)


def _read6(t, disk, cdb, dout, din):
    x, n, _ = CDB6_RW.unpack_from(cdb)
    return _plan_read(t, disk, x & 0x1FFFFF, n or 256, 0, din, 4)


def _read10(t, disk, cdb, dout, din):
    _, flags, lba, _, n, _ = CDB10.unpack_from(cdb)
    return _plan_read(t, disk, lba, n, flags, din, 7)


def _read12(t, disk, cdb, dout, din):
    _, flags, lba, n, _, _ = CDB12.unpack_from(cdb)
    return _plan_read(t, disk, lba, n, flags, din, 6)


def _read16(t, disk, cdb, dout, din):
    _, flags, lba, n, _, _ = CDB16.unpack_from(cdb)
    return _plan_read(t, disk, lba, n, flags, din, 10)


def _write6(t, disk, cdb, dout, din):
    x, n, _ = CDB6_RW.unpack_from(cdb)
    return _plan_write(t, disk, x & 0x1FFFFF, n or 256, 0, dout, 4)


def _write10(t, disk, cdb, dout, din):
    _, flags, lba, _, n, _ = CDB10.unpack_from(cdb)
    return _plan_write(t, disk, lba, n, flags, dout, 7)


def _write12(t, disk, cdb, dout, din):
    _, flags, lba, n, _, _ = CDB12.unpack_from(cdb)
    return _plan_write(t, disk, lba, n, flags, dout, 6)


def _write16(t, disk, cdb, dout, din):
    _, flags, lba, n, _, _ = CDB16.unpack_from(cdb)
    return _plan_write(t, disk, lba, n, flags, dout, 10)


# VERIFY / SYNCHRONIZE CACHE ---------------------------------------------------------------

def _plan_verify(t, disk, lba, n, flags, dout, len_off):
    if flags & 0xE0:  # VRPROTECT
        return _bad_cdb(disk, 1, 7)
    bytchk = (flags >> 1) & 0x03
    if bytchk == 0b10:
        return _bad_cdb(disk, 1, 2)
    if lba + n > disk.num_blocks:
        return _check(disk, LBA_OUT_OF_RANGE)
    if not n or bytchk == 0:
        return ScsiResult()  # BYTCHK=0: a file has no media to check beyond the range
    bs = disk.block_size
    nbytes = n * bs
    if bytchk == 0b01:
        if n > disk.max_transfer_blocks:
            return _bad_cdb(disk, len_off)
        if dout.length < nbytes:
            return _overrun()
        return IoPlan("verify", disk, t.log, lba * bs, nbytes, None, False, lba, n, 0, nbytes,
                      (dout, False))
    # BYTCHK=11b: every block is compared with the single block in the data-out buffer.
    # The verification length is bounded like any other medium transfer (Block
    # Limits VPD, MAXIMUM TRANSFER LENGTH): one command never reads the whole LUN.
    if n > disk.max_transfer_blocks:
        return _bad_cdb(disk, len_off)
    if dout.length < bs:
        return _overrun()
    return IoPlan("verify", disk, t.log, lba * bs, nbytes, None, False, lba, n, 0, bs,
                  (dout.copy_out(0, bs), True))


def _verify10(t, disk, cdb, dout, din):
    _, flags, lba, _, n, _ = CDB10.unpack_from(cdb)
    return _plan_verify(t, disk, lba, n, flags, dout, 7)


def _verify16(t, disk, cdb, dout, din):
    _, flags, lba, n, _, _ = CDB16.unpack_from(cdb)
    return _plan_verify(t, disk, lba, n, flags, dout, 10)


def _plan_sync(t, disk, lba, n):
    if lba + n > disk.num_blocks:
        return _check(disk, LBA_OUT_OF_RANGE)
    return IoPlan("flush", disk, t.log, lba * disk.block_size, 0, None, False, lba, n)


def _sync10(t, disk, cdb, dout, din):
    _, _, lba, _, n, _ = CDB10.unpack_from(cdb)
    return _plan_sync(t, disk, lba, n)


def _sync16(t, disk, cdb, dout, din):
    _, _, lba, n, _, _ = CDB16.unpack_from(cdb)
    return _plan_sync(t, disk, lba, n)


# WRITE SAME / UNMAP / GET LBA STATUS --------------------------------------------------------

_ZERO_BLOCKS: dict[int, bytes] = {}


def _plan_write_same(t, disk, lba, n, flags, ndob, dout, len_off):
    if disk.readonly:
        return _check(disk, WRITE_PROTECTED)
    if flags & 0xE0:  # WRPROTECT
        return _bad_cdb(disk, 1, 7)
    if flags & 0x10:  # ANCHOR (ANC_SUP=0)
        return _bad_cdb(disk, 1, 4)
    if flags & 0x04:  # PBDATA
        return _bad_cdb(disk, 1, 2)
    if flags & 0x02:  # LBDATA
        return _bad_cdb(disk, 1, 1)
    if n == 0 or n > disk.max_write_same_blocks:  # WSNZ=1
        return _bad_cdb(disk, len_off)
    if lba + n > disk.num_blocks:
        return _check(disk, LBA_OUT_OF_RANGE)
    bs = disk.block_size
    unmap = bool(flags & 0x08) and disk.thin
    if ndob:
        block = None
        used = 0
    else:
        if dout.length < bs:
            return _overrun()
        block = dout.copy_out(0, bs)
        used = bs
        zero = _ZERO_BLOCKS.get(bs)
        if zero is None:
            zero = _ZERO_BLOCKS[bs] = bytes(bs)
        if block == zero:
            block = None
    return IoPlan("write_same", disk, t.log, lba * bs, n * bs, None, False, lba, n, 0, used,
                  (block, unmap, not disk.state.wce))


def _write_same10(t, disk, cdb, dout, din):
    _, flags, lba, _, n, _ = CDB10.unpack_from(cdb)
    return _plan_write_same(t, disk, lba, n, flags, False, dout, 7)


def _write_same16(t, disk, cdb, dout, din):
    _, flags, lba, n, _, _ = CDB16.unpack_from(cdb)
    return _plan_write_same(t, disk, lba, n, flags, bool(flags & 0x01), dout, 10)


def _unmap(t, disk, cdb, dout, din):
    if disk.readonly:
        return _check(disk, WRITE_PROTECTED)
    _, flags, _, _, plen, _ = CDB10.unpack_from(cdb)
    if flags & 0x01:  # ANCHOR
        return _bad_cdb(disk, 1, 0)
    if plen == 0:
        return ScsiResult()
    if plen < 8:
        return _check(disk, PARAMETER_LIST_LENGTH_ERROR)
    if dout.length < plen:
        return _overrun()
    data = dout.copy_out(0, plen)
    data_len, desc_len = _UNMAP_HEADER.unpack_from(data)
    if data_len + 2 > plen or desc_len + 8 > plen:
        return _check(disk, PARAMETER_LIST_LENGTH_ERROR)
    count = desc_len // 16  # an incomplete trailing descriptor is ignored (SBC UNMAP parameter list)
    if count > disk.max_unmap_descriptors:
        return _bad_param(disk, 2)
    bs = disk.block_size
    nblocks = disk.num_blocks
    total = 0
    ranges = []
    for i in range(count):
        off = 8 + 16 * i
        lba, n = _UNMAP_DESC.unpack_from(data, off)
        if lba + n > nblocks:
            return _check(disk, LBA_OUT_OF_RANGE)
        total += n
        if total > disk.max_unmap_blocks:
            return _bad_param(disk, off + 8)
        if n:
            ranges.append((lba * bs, n * bs))
    if not ranges:
        return ScsiResult(GOOD, b"", 0, plen)
    first = ranges[0][0] // bs
    return IoPlan("unmap", disk, t.log, ranges[0][0], sum(r[1] for r in ranges), None, False,
                  first, total, 0, plen, ranges)


def _get_lba_status(t, disk, cdb, dout, din):
    _, _, lba, alloc, _, _ = CDB16.unpack_from(cdb)
    nblocks = disk.num_blocks
    if lba >= nblocks:
        return _check(disk, LBA_OUT_OF_RANGE)
    if alloc == 0:
        return ScsiResult()
    room = min(alloc, din.length)
    max_desc = max(1, min(MAX_LBA_STATUS_DESCRIPTORS, (room - 8) // 16))
    bs = disk.block_size
    backend = disk.backend
    descs: list[list[int]] = []  # [lba, count, status]
    pos = lba
    # Each lookup is a system call: bounded per command (the list may end early;
    # the initiator asks again from where it ends).
    lookups = 4 * max_desc + 16
    try:
        while pos < nblocks and lookups > 0:
            lookups -= 1
            mapped, length = backend.block_status(pos * bs)
            if length <= 0:
                mapped, length = True, (nblocks - pos) * bs
            if mapped:
                count = -(-length // bs)  # a partly mapped block counts as mapped
            else:
                count = length // bs
                if count == 0:  # a hole smaller than a block: the block holds data
                    mapped, count = True, 1
            count = min(count, nblocks - pos)
            status = LBA_MAPPED if mapped else LBA_DEALLOCATED
            if descs and descs[-1][2] == status:
                add = min(count, 0xFFFFFFFF - descs[-1][1])
                descs[-1][1] += add
                pos += add
                count -= add
                if not count:
                    continue
            if len(descs) == max_desc:
                break
            add = min(count, 0xFFFFFFFF)
            descs.append([pos, add, status])
            pos += add
    except OSError as e:
        (disk.log or t.log).warning("scsi_lba_status_error", lba=pos, errno=e.errno, error=repr(e))
        return _check(disk, INTERNAL_TARGET_FAILURE)
    body = b"".join(_LBA_STATUS.pack(d[0], d[1], d[2]) for d in descs)
    return _data_in(_LIST_HEADER.pack(4 + len(body)) + body, alloc, din)


# MODE SENSE / MODE SELECT -------------------------------------------------------------------

def _mode_sense(t, disk, cdb, din, ten: bool):
    if ten:
        _, b1, b2, subpage, alloc, _ = CDB_MODE10.unpack_from(cdb)
        llbaa = bool(b1 & 0x10)
    else:
        b1, b2, subpage, alloc = cdb[1], cdb[2], cdb[3], cdb[4]
        llbaa = False
    dbd = b1 & 0x08
    pc = b2 >> 6
    page = b2 & 0x3F
    if pc == PageControl.SAVED:
        return _check(disk, SAVING_PARAMETERS_NOT_SUPPORTED)
    if subpage not in (0x00, 0xFF):
        return _bad_cdb(disk, 3)
    if page == ModePage.ALL:
        body = b"".join(disk.mode_page(p, pc) for p in disk.MODE_PAGES)
    else:
        body = disk.mode_page(page, pc)
        if body is None:
            return _bad_cdb(disk, 2, 5)
    if dbd:
        bd = b""
    elif llbaa:
        bd = _BLOCK_DESC_LONG.pack(disk.num_blocks, disk.block_size)
    else:
        bd = _BLOCK_DESC_SHORT.pack(min(disk.num_blocks, 0xFFFFFFFF), disk.block_size)
    dsp = (MODE_DSP_DPOFUA if disk.info.fua else 0) | (MODE_DSP_WP if disk.readonly else 0)
    if ten:
        total = 8 + len(bd) + len(body)
        header = _MODE10_HEADER.pack(total - 2, 0, dsp, 0x01 if len(bd) == 16 else 0, len(bd))
    else:
        total = 4 + len(bd) + len(body)
        header = _MODE6_HEADER.pack(total - 1, 0, dsp, len(bd))
    return _data_in(header + bd + body, alloc, din)


def _mode_sense6(t, disk, cdb, dout, din):
    return _mode_sense(t, disk, cdb, din, False)


def _mode_sense10(t, disk, cdb, dout, din):
    return _mode_sense(t, disk, cdb, din, True)


def _mode_select(t, disk, cdb, dout, ten: bool):
    b1 = cdb[1]
    plen = CDB_MODE10.unpack_from(cdb)[4] if ten else cdb[4]
    if not b1 & 0x10:  # PF: only SPC page format is supported
        return _bad_cdb(disk, 1, 4)
    if b1 & 0x01:  # SP: parameters cannot be saved
        return _bad_cdb(disk, 1, 0)
    if plen == 0:
        return ScsiResult()
    hlen = 8 if ten else 4
    if plen < hlen:
        return _check(disk, PARAMETER_LIST_LENGTH_ERROR)
    if dout.length < plen:
        return _overrun()
    data = dout.copy_out(0, plen)
    if ten:
        if data[2]:
            return _bad_param(disk, 2)
        longlba = data[4] & 0x01
        bdl = (data[6] << 8) | data[7]
        bdl_off = 6
    else:
        if data[1]:
            return _bad_param(disk, 1)
        longlba = 0
        bdl = data[3]
        bdl_off = 3
    if bdl not in (0, 16 if longlba else 8):
        return _bad_param(disk, bdl_off)
    if hlen + bdl > plen:
        return _check(disk, PARAMETER_LIST_LENGTH_ERROR)
    if bdl:
        if longlba:
            blocks, blen = _BLOCK_DESC_LONG.unpack_from(data, hlen)
            current = disk.num_blocks
            blen_off = hlen + 12
        else:
            blocks, blen = _BLOCK_DESC_SHORT.unpack_from(data, hlen)
            if blen >> 24:
                return _bad_param(disk, hlen + 4)
            current = min(disk.num_blocks, 0xFFFFFFFF)
            blen_off = hlen + 5
        if blocks not in (0, current):
            return _bad_param(disk, hlen)
        if blen != disk.block_size:
            return _bad_param(disk, blen_off)
    pos = hlen + bdl
    new_wce = None
    new_dsense = None
    while pos < plen:
        if plen - pos < 2:
            return _check(disk, PARAMETER_LIST_LENGTH_ERROR)
        b0 = data[pos]
        if b0 & 0x40:  # SPF: no subpages here
            return _bad_param(disk, pos, 6)
        code = b0 & 0x3F
        current = disk.mode_page(code, PageControl.CURRENT)
        if current is None:
            return _bad_param(disk, pos, 5)
        length = data[pos + 1]
        if length != len(current) - 2:
            return _bad_param(disk, pos + 1)
        if pos + 2 + length > plen:
            return _check(disk, PARAMETER_LIST_LENGTH_ERROR)
        changeable = disk.mode_page(code, PageControl.CHANGEABLE)
        for i in range(2, len(current)):
            diff = (data[pos + i] ^ current[i]) & ~changeable[i] & 0xFF
            if diff:
                return _bad_param(disk, pos + i, diff.bit_length() - 1)
        if code == ModePage.CACHING:
            new_wce = bool(data[pos + 2] & 0x04)
        elif code == ModePage.CONTROL:
            new_dsense = bool(data[pos + 2] & 0x04)
        pos += 2 + length
    if new_wce is not None:
        disk.state.wce = new_wce
    if new_dsense is not None:
        disk.state.d_sense = new_dsense
    return ScsiResult(GOOD, b"", 0, plen)


def _mode_select6(t, disk, cdb, dout, din):
    return _mode_select(t, disk, cdb, dout, False)


def _mode_select10(t, disk, cdb, dout, din):
    return _mode_select(t, disk, cdb, dout, True)


# REPORT SUPPORTED OPERATION CODES -----------------------------------------------------------

def _timeouts(cmd: Command) -> bytes:
    return _RSOC_TIMEOUTS.pack(0x0A, 0, cmd.nominal_timeout, cmd.recommended_timeout)


def _report_opcodes(t, disk, cdb, dout, din):
    _, _, b2, req_op, req_sa, alloc, _ = CDB_RSOC.unpack_from(cdb)
    rctd = bool(b2 & 0x80)
    options = b2 & 0x07
    commands = [c for c in COMMANDS if not c.needs_discard or disk.thin]
    if options == 0:
        parts = []
        for c in commands:
            flags = (0x02 if rctd else 0) | (0x01 if c.service_action is not None else 0)
            parts.append(_RSOC_ALL.pack(c.opcode, c.service_action or 0, flags, c.cdb_len))
            if rctd:
                parts.append(_timeouts(c))
        body = b"".join(parts)
        return _data_in(_U32.pack(len(body)) + body, alloc, din)
    if options > 3:
        return _bad_cdb(disk, 2, 2)
    has_sa = req_op in SA_OPCODES
    if options == 1 and has_sa:
        return _bad_cdb(disk, 2, 2)
    if options == 2 and not has_sa:
        return _bad_cdb(disk, 2, 2)
    match = None
    for c in commands:
        if c.opcode == req_op and (not has_sa or c.service_action == req_sa):
            match = c
            break
    if match is None:
        payload = _RSOC_ONE.pack(0x01, 0)  # SUPPORT 001b: not supported
    else:
        payload = _RSOC_ONE.pack((0x80 if rctd else 0) | 0x03, match.cdb_len) + match.usage
        if rctd:
            payload += _timeouts(match)
    return _data_in(payload, alloc, din)


# -- dispatch -----------------------------------------------------------------------------------

_HANDLERS = {
    (Op.TEST_UNIT_READY, None): _test_unit_ready,
    (Op.REQUEST_SENSE, None): _request_sense,
    (Op.READ_6, None): _read6,
    (Op.WRITE_6, None): _write6,
    (Op.INQUIRY, None): _inquiry,
    (Op.MODE_SELECT_6, None): _mode_select6,
    (Op.MODE_SENSE_6, None): _mode_sense6,
    (Op.START_STOP_UNIT, None): _start_stop_unit,
    (Op.PREVENT_ALLOW_MEDIUM_REMOVAL, None): _prevent_allow,
    (Op.READ_CAPACITY_10, None): _read_capacity_10,
    (Op.READ_10, None): _read10,
    (Op.WRITE_10, None): _write10,
    (Op.VERIFY_10, None): _verify10,
    (Op.SYNCHRONIZE_CACHE_10, None): _sync10,
    (Op.WRITE_SAME_10, None): _write_same10,
    (Op.UNMAP, None): _unmap,
    (Op.MODE_SELECT_10, None): _mode_select10,
    (Op.MODE_SENSE_10, None): _mode_sense10,
    (Op.READ_16, None): _read16,
    (Op.WRITE_16, None): _write16,
    (Op.VERIFY_16, None): _verify16,
    (Op.SYNCHRONIZE_CACHE_16, None): _sync16,
    (Op.WRITE_SAME_16, None): _write_same16,
    (Op.SERVICE_ACTION_IN_16, ServiceAction.READ_CAPACITY_16): _read_capacity_16,
    (Op.SERVICE_ACTION_IN_16, ServiceAction.GET_LBA_STATUS): _get_lba_status,
    (Op.REPORT_LUNS, None): _report_luns,
    (Op.MAINTENANCE_IN, ServiceAction.REPORT_SUPPORTED_OPCODES): _report_opcodes,
    (Op.READ_12, None): _read12,
    (Op.WRITE_12, None): _write12,
}


def _build_dispatch():
    """A list of 256 by opcode: None, (Command, handler), or a list of 32 by service action."""
    table: list = [None] * 256
    for cmd in COMMANDS:
        handler = _HANDLERS[(cmd.opcode, cmd.service_action)]
        if cmd.service_action is None:
            table[cmd.opcode] = (cmd, handler)
        else:
            sub = table[cmd.opcode]
            if sub is None:
                sub = table[cmd.opcode] = [None] * 32
            sub[cmd.service_action] = (cmd, handler)
    assert len(_HANDLERS) == len(COMMANDS)
    return table


_DISPATCH = _build_dispatch()

# Commands the pseudo logical units answer (SPC-5 lists these for the REPORT LUNS W-LUN).
_WLUN_OPS = frozenset((Op.INQUIRY, Op.REPORT_LUNS, Op.REQUEST_SENSE, Op.TEST_UNIT_READY))
_ABSENT_OPS = frozenset((Op.INQUIRY, Op.REQUEST_SENSE))
_ABSENT_LUN0_OPS = _ABSENT_OPS | {Op.REPORT_LUNS}  # SPC: LUN 0 answers REPORT LUNS even when empty


class _PseudoLU:
    """The REPORT LUNS well-known LU, or the stand-in for a LUN with no logical unit."""

    def __init__(self, peripheral: int, request_sense: Sense, vendor: str, product: str, revision: str,
                 vpd_pages: tuple[int, ...]) -> None:
        self.inquiry_std = standard_inquiry(peripheral, vendor, product, revision)
        self.request_sense = request_sense
        self.state = LunState()
        self.vpd = {}
        if vpd_pages:
            self.vpd[Vpd.SUPPORTED_PAGES] = vpd_page(peripheral, Vpd.SUPPORTED_PAGES, bytes(vpd_pages))


class ScsiTarget:
    """A SCSI target device with a table of logical units (single-level LUN → Disk)."""

    def __init__(self, luns: Mapping[int, Disk] | None = None, log=None, *,
                 vendor: str = "VSCSID", product: str = "vscsid disk", revision: str = "0001") -> None:
        self._luns: dict[int, Disk] = {}
        for lun, disk in (luns or {}).items():
            self.set_lun(lun, disk)
        self.log = log if log is not None else NULL_LOG
        self._wlun = _PseudoLU(PERIPHERAL_WLUN, NO_SENSE, vendor, "REPORT LUNS WLUN", revision,
                               (Vpd.SUPPORTED_PAGES,))
        self._absent = _PseudoLU(PQ_NOT_CAPABLE | PERIPHERAL_NONE, LOGICAL_UNIT_NOT_SUPPORTED,
                                 vendor, product, revision, ())

    @property
    def luns(self) -> Mapping[int, Disk]:
        return dict(self._luns)

    def set_lun(self, lun: int, disk: Disk) -> None:
        if not 0 <= lun <= MAX_LUN:
            raise ValueError(f"LUN {lun} outside 0..{MAX_LUN}")
        self._luns[lun] = disk

    def remove_lun(self, lun: int) -> Disk | None:
        return self._luns.pop(lun, None)

    def internal_failure(self, lun: int) -> ScsiResult:
        """CHECK CONDITION, HARDWARE ERROR / INTERNAL TARGET FAILURE for a command
        the target cannot complete (e.g. one that killed its data plane)."""
        lu = self._luns.get(lun)
        return _check(lu if lu is not None else self._absent, INTERNAL_TARGET_FAILURE)

    def execute(self, lun: int, cdb, data_out: SGList = EMPTY, data_in: SGList = EMPTY,
                task_tag: int = 0) -> ScsiResult:
        """Run a command to completion, inline."""
        r = self.plan(lun, cdb, data_out, data_in, task_tag)
        if r.__class__ is ScsiResult:
            return r
        try:
            n = r.run()
        except Exception as e:  # mapped to sense by finish()
            return r.finish(e)
        return r.finish(n)

    def plan(self, lun: int, cdb, data_out: SGList = EMPTY, data_in: SGList = EMPTY,
             task_tag: int = 0) -> ScsiResult | IoPlan:
        """Validate a command; answer it, or return the IoPlan for its data transfer."""
        disk = self._luns.get(lun)
        try:
            if disk is None:
                return self._plan_pseudo(lun, cdb, data_out, data_in)
            if not len(cdb):
                return _check(disk, INVALID_COMMAND_OPERATION_CODE)
            if disk.ua.any():
                r = _unit_attention(disk, cdb, data_in)
                if r is not None:
                    return r
            entry = _DISPATCH[cdb[0]]
            if entry is None:
                return _check(disk, INVALID_COMMAND_OPERATION_CODE)
            if entry.__class__ is not tuple:
                if len(cdb) < 2:
                    return _bad_cdb(disk, 0)
                entry = entry[cdb[1] & SA_MASK]
                if entry is None:
                    return _bad_cdb(disk, 1, 4)
            cmd, handler = entry
            if cmd.needs_discard and not disk.thin:
                return _check(disk, INVALID_COMMAND_OPERATION_CODE)
            err = _validate(disk, cmd, cdb)
            if err is not None:
                return err
            return handler(self, disk, cdb, data_out, data_in)
        except Exception as e:  # a bug: never let it reach the transport
            self.log.error("scsi_target_exception", lun=lun, cdb=bytes(cdb[:16]).hex(), task_tag=task_tag,
                           error=repr(e))
            lu = disk if disk is not None else self._absent
            return _check(lu, INTERNAL_TARGET_FAILURE)

    def _plan_pseudo(self, lun, cdb, data_out, data_in):
        if lun == WLUN_REPORT_LUNS:
            lu = self._wlun
            allowed = _WLUN_OPS
        else:
            lu = self._absent
            allowed = _ABSENT_LUN0_OPS if lun == 0 else _ABSENT_OPS
        if not len(cdb) or cdb[0] not in allowed:
            if lu is self._absent:
                return _check(lu, LOGICAL_UNIT_NOT_SUPPORTED)
            return _check(lu, INVALID_COMMAND_OPERATION_CODE)
        cmd, handler = _DISPATCH[cdb[0]]
        err = _validate(lu, cmd, cdb)
        if err is not None:
            return err
        return handler(self, lu, cdb, data_out, data_in)


def _unit_attention(disk, cdb, data_in) -> ScsiResult | None:
    """A unit attention is pending (SPC-5 5.14): INQUIRY neither reports nor clears
    it; REPORT LUNS clears REPORTED LUNS DATA HAS CHANGED and runs; REQUEST SENSE
    returns it as its sense data; any other command is terminated with it. Each
    condition is reported once (``take`` clears it; another queue may have
    taken it first, and then the command runs)."""
    op = cdb[0]
    if op == Op.INQUIRY:
        return None
    if op == Op.REPORT_LUNS:
        disk.ua.take_kind(UA_LUNS_CHANGED)
        return None
    sense = disk.ua.take()
    if sense is None:
        return None
    if op == Op.REQUEST_SENSE:
        if len(cdb) < 6:
            return None
        payload = build_sense(sense, descriptor=bool(cdb[1] & 0x01))
        return _data_in(payload, cdb[4], data_in)
    return _check(disk, sense)


def _validate(lu, cmd: Command, cdb) -> ScsiResult | None:
    if len(cdb) < cmd.cdb_len:
        return _bad_cdb(lu, 0)
    if int.from_bytes(cdb[: cmd.cdb_len], "big") & cmd.reject_mask:
        byte, bit = cmd.reserved_bit_error(cdb)
        return _bad_cdb(lu, byte, bit)
    return None
