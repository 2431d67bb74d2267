"""The vhost-user wire protocol as a sans-IO codec.

Bytes and file descriptors go in, typed messages come out; typed replies go in,
bytes come out. Nothing here touches a socket. Both roles are covered:

* :class:`BackendCodec` parses the front end's requests and encodes replies
  (used by the daemon);
* :class:`FrontendCodec` encodes requests and parses replies (used by the test
  front end and ``vscsid-bench``).

Every message is validated before it is handed out: header version, request
code, payload size (exact for each request, capped overall), number of
attached fds (exact for each request) and, for structured payloads, internal
consistency (region counts, config sizes). On any error the file descriptors
that arrived with the message are closed through the ``close_fd`` callable the
caller passed in, so no error path leaks them.

Reference: QEMU ``docs/interop/vhost-user.rst`` (message layout, request codes,
feature bits). All integers are in native byte order, which on every platform
vscsid supports (x86_64, aarch64) is little endian.
"""
from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from vscsid.virtio.defs import feature_mask  # noqa: F401  (re-exported: protocol features)

# --------------------------------------------------------------------------- constants

HEADER = struct.Struct("<III")  # request, flags, size
HEADER_SIZE = HEADER.size

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x1 << 2
FLAG_NEED_REPLY = 0x1 << 3
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

#: Largest payload any request we understand can carry. The biggest are
#: SET_MEM_TABLE (8 + 8 * 32 = 264 bytes) and GET/SET_CONFIG (12 + 256).
MAX_PAYLOAD = 4096
#: Most fds a single message may carry (SET_MEM_TABLE with 8 regions).
MAX_FDS = 8
MAX_MEM_REGIONS = 8          # VHOST_MEMORY_BASELINE_NREGIONS
MAX_CONFIG_SIZE = 256         # VHOST_USER_MAX_CONFIG_SIZE

VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x1 << 8

VHOST_USER_F_PROTOCOL_FEATURES = 30


class Request(enum.IntEnum):
    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


# --------------------------------------------------------------------------- payloads

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")              # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")           # index, flags, desc, used, avail, log
MEM_HEADER = struct.Struct("<II")               # nregions, padding
MEM_REGION = struct.Struct("<QQQQ")             # gpa, size, uva, mmap_offset
MEM_REG_MSG = struct.Struct("<Q")               # padding, then one MEM_REGION
CONFIG_HEADER = struct.Struct("<III")           # offset, size, flags
INFLIGHT = struct.Struct("<QQHH")               # mmap_size, mmap_offset, num_queues, queue_size
INFLIGHT_PADDED_SIZE = 24                       # sizeof() in C: padded to 8-byte alignment
LOG = struct.Struct("<QQ")                      # mmap_size, mmap_offset


@dataclass(frozen=True, slots=True)
class Empty:
    """A request without payload."""


@dataclass(frozen=True, slots=True)
class U64Payload:
    value: int


@dataclass(frozen=True, slots=True)
class VringState:
    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    #: VHOST_VRING_F_LOG: the used ring must be dirty-logged.
    F_LOG = 0x1


@dataclass(frozen=True, slots=True)
class VringFile:
    """SET_VRING_KICK / CALL / ERR: a ring index and an fd, or no fd (polling)."""
    index: int
    nofd: bool


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class MemoryTable:
    regions: tuple[MemoryRegion, ...]


@dataclass(frozen=True, slots=True)
class MemRegionMsg:
    region: MemoryRegion


@dataclass(frozen=True, slots=True)
class ConfigPayload:
    offset: int
    size: int
    flags: int
    data: bytes

    F_WRITABLE = 0x0
    F_MIGRATION = 0x1


@dataclass(frozen=True, slots=True)
class Inflight:
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


@dataclass(frozen=True, slots=True)
class LogPayload:
    mmap_size: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class RawPayload:
    """Payload of a request we know but do not interpret (kept for logging)."""
    data: bytes


Payload = (Empty | U64Payload | VringState | VringAddr | VringFile | MemoryTable | MemRegionMsg
           | ConfigPayload | Inflight | LogPayload | RawPayload)


@dataclass(slots=True)
class Message:
    """A request (or, on the front-end side, a reply) with its attached fds.

    The receiver owns ``fds``: it must close each one or hand it on.
    """
    request: int
    flags: int
    payload: Payload
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def name(self) -> str:
        return request_name(self.request)


def request_name(code: int) -> str:
    try:
        return Request(code).name
    except ValueError:
        return f"UNKNOWN({code})"


# --------------------------------------------------------------------------- errors

class ProtocolError(Exception):
    """The peer sent something that breaks the protocol.

    ``fatal`` errors mean the byte stream can no longer be trusted (bad header,
    oversized payload, wrong fd count for a request that carries fds): the
    connection must be dropped. A non-fatal error concerns one well-framed
    message (e.g. an unknown request code or a payload that fails validation):
    the caller may answer it with an error (if ``need_reply``) and go on.
    """

    def __init__(self, reason: str, *, fatal: bool, request: int | None = None,
                 flags: int = 0, detail: dict | None = None):
        super().__init__(reason)
        self.reason = reason
        self.fatal = fatal
        self.request = request
        self.flags = flags
        self.detail = detail or {}

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def request_name(self) -> str:
        return request_name(self.request) if self.request is not None else "-"


# --------------------------------------------------------------------------- request table

@dataclass(frozen=True, slots=True)
class _Spec:
    sizes: tuple[int, ...]        # allowed payload sizes; () means "checked by the parser"
    fds: str                      # "0", "1", "0or1", "regions", "vring" (1 unless NOFD)
    parse: Callable[[bytes], Payload]
    reply: str                    # "u64", "vring_state", "config", "inflight", "ack" (u64 0 = ok), "none"


def _p_empty(data: bytes) -> Payload:
    return Empty()


def _p_u64(data: bytes) -> Payload:
    return U64Payload(U64.unpack(data)[0])


def _p_vring_state(data: bytes) -> Payload:
    return VringState(*VRING_STATE.unpack(data))


def _p_vring_addr(data: bytes) -> Payload:
    return VringAddr(*VRING_ADDR.unpack(data))


def _p_vring_file(data: bytes) -> Payload:
    value = U64.unpack(data)[0]
    if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        raise ValueError(f"reserved bits set in vring file payload: {value:#x}")
    return VringFile(index=value & VRING_IDX_MASK, nofd=bool(value & VRING_NOFD_MASK))


def _p_mem_table(data: bytes) -> Payload:
    if len(data) < MEM_HEADER.size:
        raise ValueError("memory table shorter than its header")
    nregions, _padding = MEM_HEADER.unpack_from(data, 0)
    if nregions == 0:
        raise ValueError("memory table with no regions")
    if nregions > MAX_MEM_REGIONS:
        raise ValueError(f"memory table has {nregions} regions, maximum is {MAX_MEM_REGIONS}")
    # QEMU sends exactly the regions in use; some front ends send the full
    # fixed-size array (8 regions). Accept exactly those two sizes.
    exact = MEM_HEADER.size + nregions * MEM_REGION.size
    full = MEM_HEADER.size + MAX_MEM_REGIONS * MEM_REGION.size
    if len(data) not in (exact, full):
        raise ValueError(f"memory table payload is {len(data)} bytes, expected {exact} for {nregions} regions")
    regions = tuple(
        MemoryRegion(*MEM_REGION.unpack_from(data, MEM_HEADER.size + i * MEM_REGION.size))
        for i in range(nregions)
    )
    return MemoryTable(regions)


def _p_mem_reg(data: bytes) -> Payload:
    return MemRegionMsg(MemoryRegion(*MEM_REGION.unpack_from(data, MEM_REG_MSG.size)))


def _p_config(data: bytes) -> Payload:
    if len(data) < CONFIG_HEADER.size:
        raise ValueError("config payload shorter than its header")
    offset, size, flags = CONFIG_HEADER.unpack_from(data, 0)
    if size > MAX_CONFIG_SIZE:
        raise ValueError(f"config size {size} exceeds {MAX_CONFIG_SIZE}")
    if len(data) != CONFIG_HEADER.size + size:
        raise ValueError(f"config payload is {len(data)} bytes, header says {CONFIG_HEADER.size + size}")
    return ConfigPayload(offset, size, flags, bytes(data[CONFIG_HEADER.size:]))


def _p_inflight(data: bytes) -> Payload:
    return Inflight(*INFLIGHT.unpack_from(data, 0))


def _p_log(data: bytes) -> Payload:
    return LogPayload(*LOG.unpack(data))


def _p_raw(data: bytes) -> Payload:
    return RawPayload(bytes(data))


_INFLIGHT_SIZES = (INFLIGHT.size, INFLIGHT_PADDED_SIZE)
_R = Request
REQUESTS: dict[int, _Spec] = {
    _R.GET_FEATURES: _Spec((0,), "0", _p_empty, "u64"),
    _R.SET_FEATURES: _Spec((8,), "0", _p_u64, "none"),
    _R.SET_OWNER: _Spec((0,), "0", _p_empty, "none"),
    # RESET_OWNER historically carried a u64 that is ignored.
    _R.RESET_OWNER: _Spec((0, 8), "0", _p_empty, "none"),
    _R.SET_MEM_TABLE: _Spec((), "regions", _p_mem_table, "none"),
    _R.SET_LOG_BASE: _Spec((LOG.size,), "1", _p_log, "ack"),
    _R.SET_LOG_FD: _Spec((0,), "1", _p_empty, "none"),
    _R.SET_VRING_NUM: _Spec((8,), "0", _p_vring_state, "none"),
    _R.SET_VRING_ADDR: _Spec((VRING_ADDR.size,), "0", _p_vring_addr, "none"),
    _R.SET_VRING_BASE: _Spec((8,), "0", _p_vring_state, "none"),
    _R.GET_VRING_BASE: _Spec((8,), "0", _p_vring_state, "vring_state"),
    _R.SET_VRING_KICK: _Spec((8,), "vring", _p_vring_file, "none"),
    _R.SET_VRING_CALL: _Spec((8,), "vring", _p_vring_file, "none"),
    _R.SET_VRING_ERR: _Spec((8,), "vring", _p_vring_file, "none"),
    _R.GET_PROTOCOL_FEATURES: _Spec((0,), "0", _p_empty, "u64"),
    _R.SET_PROTOCOL_FEATURES: _Spec((8,), "0", _p_u64, "none"),
    _R.GET_QUEUE_NUM: _Spec((0,), "0", _p_empty, "u64"),
    _R.SET_VRING_ENABLE: _Spec((8,), "0", _p_vring_state, "none"),
    _R.SET_BACKEND_REQ_FD: _Spec((0,), "1", _p_empty, "none"),
    _R.SET_VRING_ENDIAN: _Spec((8,), "0", _p_vring_state, "none"),
    _R.GET_CONFIG: _Spec((), "0", _p_config, "config"),
    _R.SET_CONFIG: _Spec((), "0", _p_config, "none"),
    _R.GET_INFLIGHT_FD: _Spec(_INFLIGHT_SIZES, "0", _p_inflight, "inflight"),
    _R.SET_INFLIGHT_FD: _Spec(_INFLIGHT_SIZES, "1", _p_inflight, "none"),
    _R.RESET_DEVICE: _Spec((0,), "0", _p_empty, "none"),
    _R.GET_MAX_MEM_SLOTS: _Spec((0,), "0", _p_empty, "u64"),
    _R.ADD_MEM_REG: _Spec((MEM_REG_MSG.size + MEM_REGION.size,), "1", _p_mem_reg, "none"),
    # The spec says no fd SHOULD be sent with REM_MEM_REG but a back end must
    # accept (and close) one.
    _R.REM_MEM_REG: _Spec((MEM_REG_MSG.size + MEM_REGION.size,), "0or1", _p_mem_reg, "none"),
    _R.SET_STATUS: _Spec((8,), "0", _p_u64, "none"),
    _R.GET_STATUS: _Spec((0,), "0", _p_empty, "u64"),
}

#: Requests whose reply is part of the protocol (not REPLY_ACK).
REPLY_KINDS = {code: spec.reply for code, spec in REQUESTS.items()}


def error_reply(msg: Message) -> Payload | None:
    """The reply a refused request still owes the front end, carrying the
    protocol's failure marker: 0 for a u64 query, index/0 for GET_VRING_BASE,
    a zero-size config for GET_CONFIG, an empty region for GET_INFLIGHT_FD.
    None when the request has no reply of its own (answer with a REPLY_ACK or an
    "ack" failure instead)."""
    kind = REPLY_KINDS.get(msg.request, "none")
    p = msg.payload
    if kind == "u64":
        return U64Payload(0)
    if kind == "vring_state":
        return VringState(p.index, 0)
    if kind == "config":
        return ConfigPayload(p.offset, 0, p.flags, b"")
    if kind == "inflight":
        return Inflight(0, 0, 0, 0)
    return None


def _expected_fds(spec: _Spec, payload: Payload) -> tuple[int, ...]:
    if spec.fds == "0":
        return (0,)
    if spec.fds == "1":
        return (1,)
    if spec.fds == "0or1":
        return (0, 1)
    if spec.fds == "regions":
        assert isinstance(payload, MemoryTable)
        return (len(payload.regions),)
    if spec.fds == "vring":
        assert isinstance(payload, VringFile)
        return (0,) if payload.nofd else (1,)
    raise AssertionError(spec.fds)


# --------------------------------------------------------------------------- receive buffer

class _Chunks:
    """A byte buffer that remembers with which byte each batch of fds arrived.

    On a unix stream socket one ``recvmsg`` may return the bytes of several
    ``sendmsg`` calls, but the kernel stops right after a segment that carries
    fds: the fds of a read therefore belong to the message that contains the
    *last* byte of that read. (Reading exactly :meth:`BackendCodec.wanted`
    bytes at a time, as the daemon does, keeps every read inside one message.)
    """

    __slots__ = ("buf", "fd_marks")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.fd_marks: list[tuple[int, list[int]]] = []   # (offset in buf, fds)

    def feed(self, data: bytes, fds: Sequence[int]) -> None:
        if fds:
            self.fd_marks.append((len(self.buf) + max(len(data) - 1, 0), list(fds)))
        self.buf += data

    def take(self, n: int) -> tuple[bytes, list[int]]:
        """Remove ``n`` bytes and every fd that arrived with them."""
        data = bytes(self.buf[:n])
        del self.buf[:n]
        fds: list[int] = []
        rest: list[tuple[int, list[int]]] = []
        for off, batch in self.fd_marks:
            if off < n:
                fds.extend(batch)
            else:
                rest.append((off - n, batch))
        self.fd_marks = rest
        return data, fds

    def drain_fds(self) -> list[int]:
        fds = [fd for _, batch in self.fd_marks for fd in batch]
        self.fd_marks = []
        return fds


def _close_all(close_fd: Callable[[int], None], fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            close_fd(fd)
        except OSError:
            pass


# --------------------------------------------------------------------------- back-end role

class BackendCodec:
    """Parses front-end requests; encodes the back end's replies.

    Usage::

        codec.feed(data, fds)            # whatever recvmsg returned
        while (msg := codec.next_message()) is not None:
            ...                          # may raise ProtocolError

    A fatal :class:`ProtocolError` leaves the codec unusable (``broken``);
    after a non-fatal one the caller may continue with ``next_message()``.
    """

    def __init__(self, *, close_fd: Callable[[int], None] = os.close,
                 max_payload: int = MAX_PAYLOAD) -> None:
        self._in = _Chunks()
        self._close_fd = close_fd
        self._max_payload = max_payload
        self.broken: ProtocolError | None = None

    # -- input
    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if self.broken is not None:
            _close_all(self._close_fd, fds)
            return
        self._in.feed(data, fds)

    @property
    def pending_bytes(self) -> int:
        return len(self._in.buf)

    def wanted(self) -> int:
        """Bytes still missing from the message being received (at least 1).

        Reading no more than this keeps every read within one message, so fds
        are attributed exactly (as libvhost-user does by reading the header,
        then the payload)."""
        buf = self._in.buf
        if len(buf) < HEADER_SIZE:
            return HEADER_SIZE - len(buf)
        size = HEADER.unpack_from(buf, 0)[2]
        if size > self._max_payload:
            return 1
        return max(HEADER_SIZE + size - len(buf), 1)

    def close(self) -> None:
        """Close every fd still buffered (call when the connection ends)."""
        _close_all(self._close_fd, self._in.drain_fds())
        self._in.buf.clear()

    def _fail(self, err: ProtocolError, fds: list[int]) -> ProtocolError:
        _close_all(self._close_fd, fds)
        if err.fatal:
            self.broken = err
            _close_all(self._close_fd, self._in.drain_fds())
            self._in.buf.clear()
        return err

    def next_message(self) -> Message | None:
        if self.broken is not None:
            raise self.broken
        buf = self._in.buf
        if len(buf) < HEADER_SIZE:
            return None
        request, flags, size = HEADER.unpack_from(buf, 0)
        if flags & VERSION_MASK != VERSION:
            _, fds = self._in.take(len(buf))
            raise self._fail(ProtocolError(
                f"unsupported protocol version {flags & VERSION_MASK}", fatal=True,
                request=request, flags=flags), fds)
        if flags & ~KNOWN_FLAGS:
            _, fds = self._in.take(len(buf))
            raise self._fail(ProtocolError(
                f"unknown header flag bits {flags & ~KNOWN_FLAGS:#x}", fatal=True,
                request=request, flags=flags), fds)
        if flags & FLAG_REPLY:
            _, fds = self._in.take(len(buf))
            raise self._fail(ProtocolError(
                "front end sent a message flagged as a reply", fatal=True,
                request=request, flags=flags), fds)
        if size > self._max_payload:
            _, fds = self._in.take(len(buf))
            raise self._fail(ProtocolError(
                f"payload size {size} exceeds the limit of {self._max_payload}", fatal=True,
                request=request, flags=flags, detail={"size": size}), fds)
        if len(buf) < HEADER_SIZE + size:
            return None
        raw, fds = self._in.take(HEADER_SIZE + size)
        payload_bytes = raw[HEADER_SIZE:]
        if len(fds) > MAX_FDS:
            raise self._fail(ProtocolError(
                f"{len(fds)} fds attached, more than the maximum {MAX_FDS}", fatal=True,
                request=request, flags=flags), fds)

        spec = REQUESTS.get(request)
        if spec is None:
            # Well framed but unknown: the caller answers with an error if a
            # reply was requested; fds of an unknown message cannot be used.
            raise self._fail(ProtocolError(
                f"unknown or unsupported request {request_name(request)}", fatal=False,
                request=request, flags=flags, detail={"size": size, "nfds": len(fds)}), fds)
        if spec.sizes and size not in spec.sizes:
            raise self._fail(ProtocolError(
                f"{request_name(request)}: payload is {size} bytes, expected "
                f"{' or '.join(map(str, spec.sizes))}", fatal=True,
                request=request, flags=flags, detail={"size": size}), fds)
        try:
            payload = spec.parse(payload_bytes)
        except (ValueError, struct.error) as exc:
            raise self._fail(ProtocolError(
                f"{request_name(request)}: {exc}", fatal=True, request=request,
                flags=flags, detail={"size": size}), fds) from None
        allowed = _expected_fds(spec, payload)
        if len(fds) not in allowed:
            raise self._fail(ProtocolError(
                f"{request_name(request)}: {len(fds)} fds attached, expected "
                f"{' or '.join(map(str, allowed))}", fatal=True, request=request,
                flags=flags, detail={"nfds": len(fds)}), fds)
        return Message(request=request, flags=flags, payload=payload, fds=fds)

    # -- output
    @staticmethod
    def encode_reply(request: int, payload: Payload | bytes) -> bytes:
        body = encode_payload(payload)
        return HEADER.pack(int(request), VERSION | FLAG_REPLY, len(body)) + body

    @classmethod
    def encode_ack(cls, request: int, ok: bool = True, code: int = 1) -> bytes:
        """REPLY_ACK: u64 0 on success, non-zero on failure."""
        return cls.encode_reply(request, U64Payload(0 if ok else code))


def encode_payload(payload: Payload | bytes) -> bytes:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, Empty):
        return b""
    if isinstance(payload, U64Payload):
        return U64.pack(payload.value)
    if isinstance(payload, VringState):
        return VRING_STATE.pack(payload.index, payload.num)
    if isinstance(payload, VringAddr):
        return VRING_ADDR.pack(payload.index, payload.flags, payload.desc_user_addr,
                               payload.used_user_addr, payload.avail_user_addr,
                               payload.log_guest_addr)
    if isinstance(payload, VringFile):
        return U64.pack((payload.index & VRING_IDX_MASK) | (VRING_NOFD_MASK if payload.nofd else 0))
    if isinstance(payload, MemoryTable):
        out = MEM_HEADER.pack(len(payload.regions), 0)
        for r in payload.regions:
            out += MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        return out
    if isinstance(payload, MemRegionMsg):
        r = payload.region
        return MEM_REG_MSG.pack(0) + MEM_REGION.pack(r.guest_phys_addr, r.memory_size,
                                                     r.userspace_addr, r.mmap_offset)
    if isinstance(payload, ConfigPayload):
        return CONFIG_HEADER.pack(payload.offset, payload.size, payload.flags) + bytes(payload.data)
    if isinstance(payload, Inflight):
        return INFLIGHT.pack(payload.mmap_size, payload.mmap_offset, payload.num_queues,
                             payload.queue_size) + b"\0" * (INFLIGHT_PADDED_SIZE - INFLIGHT.size)
    if isinstance(payload, LogPayload):
        return LOG.pack(payload.mmap_size, payload.mmap_offset)
    if isinstance(payload, RawPayload):
        return payload.data
    raise TypeError(f"cannot encode {type(payload).__name__}")


# --------------------------------------------------------------------------- front-end role

def encode_request(request: int, payload: Payload | bytes = Empty(), *, need_reply: bool = False,
                   flags: int | None = None) -> bytes:
    """Encode a front-end request. ``flags`` overrides the header flags (for hostile tests)."""
    body = encode_payload(payload)
    if flags is None:
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(int(request), flags, len(body)) + body


_REPLY_PARSERS: dict[str, Callable[[bytes], Payload]] = {
    "u64": _p_u64,
    "vring_state": _p_vring_state,
    "config": _p_config,
    "inflight": _p_inflight,
}


class FrontendCodec:
    """Parses the back end's replies (front-end side, for tests and the bench tool)."""

    def __init__(self, *, close_fd: Callable[[int], None] = os.close) -> None:
        self._in = _Chunks()
        self._close_fd = close_fd

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        self._in.feed(data, fds)

    def next_reply(self, expect: int, kind: str | None = None) -> Message | None:
        """Return the next reply if complete. ``kind`` is the reply payload kind
        ("u64", "vring_state", "config", "inflight"); by default it comes from the
        request table, and REPLY_ACK replies are "u64"."""
        buf = self._in.buf
        if len(buf) < HEADER_SIZE:
            return None
        request, flags, size = HEADER.unpack_from(buf, 0)
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"reply payload size {size} too large", fatal=True, request=request)
        if len(buf) < HEADER_SIZE + size:
            return None
        raw, fds = self._in.take(HEADER_SIZE + size)
        if not flags & FLAG_REPLY or flags & VERSION_MASK != VERSION:
            _close_all(self._close_fd, fds)
            raise ProtocolError(f"bad reply flags {flags:#x}", fatal=True, request=request)
        if request != expect:
            _close_all(self._close_fd, fds)
            raise ProtocolError(f"reply to {request_name(request)} while waiting for "
                                f"{request_name(expect)}", fatal=True, request=request)
        kind = kind or REPLY_KINDS.get(request, "u64")
        if kind in ("none", "ack"):
            kind = "u64"
        parser = _REPLY_PARSERS.get(kind, _p_raw)
        try:
            payload = parser(raw[HEADER_SIZE:])
        except (ValueError, struct.error) as exc:
            _close_all(self._close_fd, fds)
            raise ProtocolError(f"bad reply payload: {exc}", fatal=True, request=request) from None
        return Message(request=request, flags=flags, payload=payload, fds=fds)
