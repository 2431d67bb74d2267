"""Asynchronous NBD client on libnbd (libnbd0 ≥ 1.14), through cffi in ABI mode.

libnbd.so.0 is opened at run time (``ffi.dlopen``), so installing vscsid needs no
libnbd headers, and a machine without libnbd only loses NBD LUNs: creating an
:class:`NbdClient` then raises :class:`BackendUnavailable` saying what to install.

One :class:`NbdClient` is one NBD connection driven by the caller's event loop::

    c = NbdClient("nbd+unix:///disk?socket=/run/nbd.sock")      # connects (timeout)
    ep.register(c.fileno(), c.events())
    t = c.submit_read([view1, view2], offset)                   # -> token
    ...on an epoll event for c.fileno():
    c.handle_events(revents)
    for token, err in c.poll():                                 # err 0 or an errno
        ...
    if c.events() != registered: ep.modify(c.fileno(), c.events())

Design (see docs/network-storage.md, "Bindings"):

* No Python callbacks: commands are issued with a null completion closure and
  retired with ``nbd_aio_peek_command_completed`` / ``nbd_aio_command_completed``
  from :meth:`poll`, in the caller's thread. Completions come in whatever order
  the server replies.
* Data moves straight between the socket and the caller's buffers
  (``ffi.from_buffer``; libnbd's pre-read zeroing is turned off). A request whose
  buffers are several separate segments becomes one NBD command per segment
  (adjacent segments are merged) while it has at most ``MAX_SEGMENTS`` of them and
  enough free slots; otherwise it goes through one bounce buffer.
* Bounded: at most ``max_in_flight`` NBD commands at once (libnbd(3) suggests 64
  per connection); a submit past that raises ``BlockingIOError`` (EAGAIN), and a
  request larger than :attr:`max_request` raises EINVAL.
* A dead connection (server gone, protocol error) fails every outstanding command
  with an errno in the next :meth:`poll`; :meth:`reconnect` (blocking, with a
  timeout) or :meth:`start_reconnect` (driven by the event loop) makes a new
  connection to the same URI. The socket, and so :meth:`fileno`, changes then.

All failures of calls are ``OSError`` with an errno; libnbd's message is in the text.
"""
from __future__ import annotations

import errno
import os
import select
import time
from typing import Iterable, Sequence

from .base import BackendUnavailable

__all__ = ["BackendUnavailable", "NbdClient", "load_libnbd", "MAX_SEGMENTS"]

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
_EPOLL_BAD = select.EPOLLHUP | select.EPOLLERR

# <libnbd.h>, as documented in libnbd(3) and the nbd_* man pages of libnbd 1.14.
CDEF = """
struct nbd_handle;
typedef struct {
  int (*callback) (void *user_data, int *error);
  void *user_data;
  void (*free) (void *user_data);
} nbd_completion_callback;

struct nbd_handle *nbd_create (void);
void nbd_close (struct nbd_handle *h);
const char *nbd_get_error (void);
int nbd_get_errno (void);
const char *nbd_get_version (struct nbd_handle *h);

int nbd_set_pread_initialize (struct nbd_handle *h, bool request);
int nbd_aio_connect_uri (struct nbd_handle *h, const char *uri);
int nbd_aio_disconnect (struct nbd_handle *h, uint32_t flags);

int64_t nbd_get_size (struct nbd_handle *h);
int64_t nbd_get_block_size (struct nbd_handle *h, int size_type);
int nbd_is_read_only (struct nbd_handle *h);
int nbd_can_flush (struct nbd_handle *h);
int nbd_can_fua (struct nbd_handle *h);
int nbd_can_trim (struct nbd_handle *h);
int nbd_can_zero (struct nbd_handle *h);
int nbd_can_fast_zero (struct nbd_handle *h);
int nbd_can_multi_conn (struct nbd_handle *h);

int64_t nbd_aio_pread (struct nbd_handle *h, void *buf, size_t count, uint64_t offset,
                       nbd_completion_callback completion_callback, uint32_t flags);
int64_t nbd_aio_pwrite (struct nbd_handle *h, const void *buf, size_t count, uint64_t offset,
                        nbd_completion_callback completion_callback, uint32_t flags);
int64_t nbd_aio_flush (struct nbd_handle *h, nbd_completion_callback completion_callback,
                       uint32_t flags);
int64_t nbd_aio_trim (struct nbd_handle *h, uint64_t count, uint64_t offset,
                      nbd_completion_callback completion_callback, uint32_t flags);
int64_t nbd_aio_zero (struct nbd_handle *h, uint64_t count, uint64_t offset,
                      nbd_completion_callback completion_callback, uint32_t flags);

int nbd_aio_get_fd (struct nbd_handle *h);
unsigned nbd_aio_get_direction (struct nbd_handle *h);
int nbd_aio_notify_read (struct nbd_handle *h);
int nbd_aio_notify_write (struct nbd_handle *h);
int nbd_aio_is_connecting (struct nbd_handle *h);
int nbd_aio_is_negotiating (struct nbd_handle *h);
int nbd_aio_is_ready (struct nbd_handle *h);
int nbd_aio_is_processing (struct nbd_handle *h);
int nbd_aio_is_dead (struct nbd_handle *h);
int nbd_aio_is_closed (struct nbd_handle *h);
int nbd_aio_command_completed (struct nbd_handle *h, uint64_t cookie);
int64_t nbd_aio_peek_command_completed (struct nbd_handle *h);
int nbd_aio_in_flight (struct nbd_handle *h);
"""

LIBNBD_SONAME = "libnbd.so.0"
CMD_FLAG_FUA = 0x01
CMD_FLAG_NO_HOLE = 0x02
CMD_FLAG_FAST_ZERO = 0x10
AIO_DIRECTION_READ = 1
AIO_DIRECTION_WRITE = 2
SIZE_MINIMUM, SIZE_PREFERRED, SIZE_MAXIMUM = 0, 1, 2

#: libnbd refuses reads and writes over 64 MiB; servers that advertise no maximum may drop
#: a client that sends more than 32 MiB (nbd_get_block_size(3)).
LIBNBD_MAX_IO = 64 << 20
DEFAULT_MAX_IO = 32 << 20
#: NBD trim/zero lengths are 32-bit; keep them 1 MiB aligned below 4 GiB.
MAX_ZERO_REQUEST = (0xFFFFFFFF >> 20) << 20
#: Up to this many separate segments go out as one NBD command each; more use a bounce buffer.
MAX_SEGMENTS = 8
DEFAULT_MAX_IN_FLIGHT = 64
DEFAULT_CONNECT_TIMEOUT = 10.0


_lib_cache: tuple | None = None


def load_libnbd():
    """``(ffi, lib)`` for libnbd.so.0, loaded once; BackendUnavailable if it is missing."""
    global _lib_cache
    if _lib_cache is None:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(CDEF)
        try:
            lib = ffi.dlopen(LIBNBD_SONAME)
        except OSError as e:
            raise BackendUnavailable(
                errno.ENOSYS, f"NBD LUNs need libnbd ({LIBNBD_SONAME}: {e}); "
                "on Debian: apt-get install libnbd0") from None
        _lib_cache = (ffi, lib)
    return _lib_cache


class _Request:
    """A submitted request: its token, the NBD commands still out, the first error, buffers."""

    __slots__ = ("token", "parts", "err", "keep", "scatter")

    def __init__(self, token, parts, keep, scatter=None):
        self.token = token
        self.parts = parts
        self.err = 0
        self.keep = keep          # cdata/bytearrays that must live until the server replied
        self.scatter = scatter    # (bounce, views) for a bounced read


class NbdClient:
    """One libnbd connection to ``uri`` (``nbd://HOST[:PORT]/EXPORT`` or
    ``nbd+unix:///EXPORT?socket=PATH``), with at most ``max_in_flight`` commands out.

    ``connect=True`` connects at once (blocking, up to ``connect_timeout`` seconds); with
    False, call :meth:`reconnect` or :meth:`start_reconnect`.
    """

    def __init__(self, uri: str, *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 connect: bool = True, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT):
        if not 1 <= max_in_flight <= 1024:
            raise ValueError("max_in_flight must be 1..1024")
        self._ffi, self._lib = load_libnbd()
        self.uri = uri
        self.max_in_flight = max_in_flight
        self._nocb = self._ffi.new("nbd_completion_callback *")[0]
        self._h = None
        self._probe = select.poll()            # handle_replies: is there more to read?
        self._probe_fd = -1
        self._cmds: dict[int, _Request] = {}   # NBD cookie -> request
        self._failed: list[tuple[int, int]] = []
        self._next_token = 1
        self._connecting = False
        self._live = False                     # connected, not dead: commands may be issued
        self.dead_errno = 0                    # why the last connection died (0: alive)
        self.size = 0
        self.read_only = self.can_flush = self.can_fua = False
        self.can_trim = self.can_zero = self.can_fast_zero = self.can_multi_conn = False
        self.block_size_min = self.block_size_preferred = self.block_size_max = 0
        self.max_request = DEFAULT_MAX_IO
        if connect:
            self.reconnect(connect_timeout)

    # ------------------------------------------------------------------ errors
    def _error(self, what: str, default: int = errno.EIO) -> OSError:
        lib, ffi = self._lib, self._ffi
        code = lib.nbd_get_errno() or default
        msg = lib.nbd_get_error()
        text = ffi.string(msg).decode(errors="replace") if msg != ffi.NULL else os.strerror(code)
        cls = BlockingIOError if code == errno.EAGAIN else OSError
        return cls(code, f"{what}: {text}")

    # ------------------------------------------------------------------ connection
    def start_reconnect(self) -> None:
        """Begin a new connection to the URI without blocking.

        Outstanding commands of the old connection are failed (ENOTCONN, or the errno the
        connection died with) and come out of the next :meth:`poll`. The caller then waits
        on :meth:`fileno` for :meth:`events` and calls :meth:`handle_events` until
        :attr:`connected` is true, or :attr:`dead` (the attempt failed: ``dead_errno``).
        Raises OSError if the attempt fails at once (e.g. ECONNREFUSED on a Unix socket).
        """
        self._drop_handle(self.dead_errno or errno.ENOTCONN)
        lib, ffi = self._lib, self._ffi
        h = lib.nbd_create()
        if h == ffi.NULL:
            raise self._error("nbd_create", errno.ENOMEM)
        self._h = h
        self.dead_errno = 0
        # The buffers are guest memory the command fills anyway: no pre-read memset.
        lib.nbd_set_pread_initialize(h, False)
        if lib.nbd_aio_connect_uri(h, self.uri.encode()) == -1:
            err = self._error(f"connect {self.uri}", errno.ECONNREFUSED)
            self.dead_errno = err.errno
            self._drop_handle(err.errno)
            raise err
        self._connecting = True
        self._check_connect()

    def reconnect(self, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        """Connect (again) to the URI, blocking for at most ``timeout`` seconds."""
        self.start_reconnect()
        deadline = time.monotonic() + timeout
        p = select.poll()
        while self._connecting:
            left = deadline - time.monotonic()
            if left <= 0:
                self._drop_handle(errno.ETIMEDOUT)
                self.dead_errno = errno.ETIMEDOUT
                raise TimeoutError(errno.ETIMEDOUT, f"connect {self.uri}: no handshake within {timeout}s")
            fd = self._lib.nbd_aio_get_fd(self._h)
            ev = self.events()
            if fd < 0 or not ev:
                raise self._error(f"connect {self.uri}", errno.ENOTCONN)
            p.register(fd, ev)
            ready = p.poll(left * 1000)
            p.unregister(fd)
            for _, rev in ready:
                self.handle_events(rev)
        if self.dead_errno:
            raise OSError(self.dead_errno, f"connect {self.uri}: {os.strerror(self.dead_errno)}")

    def _check_connect(self) -> None:
        lib, h = self._lib, self._h
        if lib.nbd_aio_is_ready(h):
            self._connecting = False
            self._read_info()
            self._live = True
        elif lib.nbd_aio_is_dead(h) or lib.nbd_aio_is_closed(h):
            self._connecting = False
            self._mark_dead(errno.ECONNREFUSED)

    def _read_info(self) -> None:
        lib, h = self._lib, self._h
        size = lib.nbd_get_size(h)
        if size < 0:
            raise self._error("nbd_get_size")
        self.size = size
        self.read_only = lib.nbd_is_read_only(h) == 1
        self.can_flush = lib.nbd_can_flush(h) == 1
        self.can_fua = lib.nbd_can_fua(h) == 1
        self.can_trim = lib.nbd_can_trim(h) == 1
        self.can_zero = lib.nbd_can_zero(h) == 1
        self.can_fast_zero = lib.nbd_can_fast_zero(h) == 1
        self.can_multi_conn = lib.nbd_can_multi_conn(h) == 1
        self.block_size_min = max(lib.nbd_get_block_size(h, SIZE_MINIMUM), 0)
        self.block_size_preferred = max(lib.nbd_get_block_size(h, SIZE_PREFERRED), 0)
        self.block_size_max = max(lib.nbd_get_block_size(h, SIZE_MAXIMUM), 0)
        self.max_request = min(self.block_size_max or DEFAULT_MAX_IO, LIBNBD_MAX_IO)

    @property
    def connected(self) -> bool:
        """The handshake is done and commands can be issued."""
        return (self._h is not None and not self._connecting and not self.dead_errno
                and self._lib.nbd_aio_is_ready(self._h) + self._lib.nbd_aio_is_processing(self._h) > 0)

    @property
    def connecting(self) -> bool:
        return self._connecting

    @property
    def dead(self) -> bool:
        """The connection is gone (or never came up): only :meth:`reconnect` or close help."""
        return self.dead_errno != 0 or self._h is None

    def _mark_dead(self, default: int) -> None:
        self._live = False
        if not self.dead_errno:
            self.dead_errno = default

    def _drop_handle(self, err: int) -> None:
        """Close the handle; every command still out fails with ``err``."""
        if self._h is not None:
            self._collect(self._failed)     # what did complete keeps its own result
            self._lib.nbd_close(self._h)
            self._h = None
        self._connecting = False
        self._live = False
        if self._cmds:
            seen = set()
            for req in self._cmds.values():
                if req.token not in seen:
                    seen.add(req.token)
                    self._failed.append((req.token, req.err or err))
            self._cmds.clear()

    def close(self) -> list[tuple[int, int]]:
        """Disconnect; returns ``[(token, errno)]`` for the requests that were still out."""
        if self._h is not None and self.connected and not self._cmds:
            self._lib.nbd_aio_disconnect(self._h, 0)    # a polite NBD_CMD_DISC if idle
        self._drop_handle(errno.ESHUTDOWN)
        out, self._failed = self._failed, []
        return out

    def __enter__(self) -> "NbdClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            if self._h is not None:
                self._lib.nbd_close(self._h)
        except Exception:
            pass

    # ------------------------------------------------------------------ event loop
    def fileno(self) -> int:
        """The connection's socket (changes on reconnect); -1 when there is none."""
        if self._h is None:
            return -1
        return self._lib.nbd_aio_get_fd(self._h)

    def events(self) -> int:
        """The epoll events libnbd waits for now (EPOLLIN and/or EPOLLOUT; 0 when dead)."""
        if self._h is None or self.dead_errno:
            return 0
        d = self._lib.nbd_aio_get_direction(self._h)
        return (EPOLLIN if d & AIO_DIRECTION_READ else 0) | (EPOLLOUT if d & AIO_DIRECTION_WRITE else 0)

    def handle_events(self, revents: int) -> None:
        """Tell libnbd what epoll reported for :meth:`fileno`; completions then come from
        :meth:`poll`. A connection that died here is :attr:`dead` afterwards.

        One call processes about one server reply (libnbd's state machine stops when it is
        ready for the next event), so register the socket level-triggered (no EPOLLET):
        epoll reports it again while replies are waiting."""
        lib, h = self._lib, self._h
        if h is None or self.dead_errno:
            return
        d = lib.nbd_aio_get_direction(h)
        r = 0
        # Prefer reading when both are possible (nbd_aio_get_direction(3)).
        if d & AIO_DIRECTION_READ and revents & (EPOLLIN | _EPOLL_BAD):
            r = lib.nbd_aio_notify_read(h)
        elif d & AIO_DIRECTION_WRITE and revents & (EPOLLOUT | _EPOLL_BAD):
            r = lib.nbd_aio_notify_write(h)
        if r == -1:
            self._mark_dead(lib.nbd_get_errno() or errno.ECONNRESET)
        elif lib.nbd_aio_get_direction(h) == 0 and (lib.nbd_aio_is_dead(h) or lib.nbd_aio_is_closed(h)):
            # No direction means libnbd waits for nothing: the connection is over. (A server
            # that closes an idle connection leaves the handle closed, not dead.)
            self._mark_dead(errno.ECONNRESET)
        if self._connecting:
            self._check_connect()

    def handle_replies(self, revents: int, limit: int = 16) -> None:
        """:meth:`handle_events`, repeated (up to ``limit`` times) while replies keep
        coming and the socket still has data: one epoll wake-up then takes in the
        replies that arrived together, instead of one per loop iteration. (libnbd must
        not be told to read when nothing is there: it would then wait for a reply
        before it sends the next command.)"""
        lib = self._lib
        self.handle_events(revents)
        for _ in range(limit - 1):
            h = self._h
            if h is None or self.dead_errno or lib.nbd_aio_in_flight(h) <= 0:
                return
            if not lib.nbd_aio_get_direction(h) & AIO_DIRECTION_READ:
                return
            fd = lib.nbd_aio_get_fd(h)
            if fd < 0:
                return
            if self._probe_fd != fd:
                if self._probe_fd >= 0:
                    self._probe.unregister(self._probe_fd)
                self._probe.register(fd, select.POLLIN)
                self._probe_fd = fd
            if not self._probe.poll(0):
                return
            self.handle_events(EPOLLIN)

    def refresh_state(self) -> bool:
        """Whether the connection is dead, looking at libnbd's own state (a send in a
        submit call may have found it gone before any event did)."""
        if self.dead:
            return True
        lib, h = self._lib, self._h
        if lib.nbd_aio_is_dead(h) or lib.nbd_aio_is_closed(h):
            self._mark_dead(lib.nbd_get_errno() or errno.ECONNRESET)
            return True
        return False

    def poll(self) -> list[tuple[int, int]]:
        """Retire finished commands: ``[(token, err)]`` with err 0 for success or an errno,
        in completion order. After the connection died, every request still out is here."""
        out = self._failed
        self._failed = []
        if self._h is not None:
            self._collect(out)
            if self.dead_errno and self._cmds:
                # libnbd fails in-flight commands when the connection dies; anything it did
                # not hand back is failed here so no token is left hanging.
                self._drop_handle(self.dead_errno)
                out.extend(self._failed)
                self._failed = []
        return out

    def _collect(self, out: list) -> None:
        lib, h, cmds = self._lib, self._h, self._cmds
        while cmds:
            cookie = lib.nbd_aio_peek_command_completed(h)
            if cookie <= 0:
                break
            r = lib.nbd_aio_command_completed(h, cookie)
            req = cmds.pop(cookie, None)
            if req is None:     # not ours (cannot happen: every command is ours)
                continue
            if r != 1 and not req.err:
                req.err = lib.nbd_get_errno() or errno.EIO
            req.parts -= 1
            if req.parts == 0:
                if req.scatter is not None and not req.err:
                    _scatter(*req.scatter)
                out.append((req.token, req.err))

    # ------------------------------------------------------------------ state
    @property
    def in_flight(self) -> int:
        """NBD commands out now (a multi-segment request counts each segment)."""
        return len(self._cmds)

    @property
    def free_slots(self) -> int:
        return self.max_in_flight - len(self._cmds)

    def _token(self) -> int:
        t = self._next_token
        self._next_token = t + 1
        return t

    def _ready_for(self, what: str, parts: int = 1) -> None:
        if self._h is None or self.dead_errno or self._connecting:
            raise OSError(self.dead_errno or errno.ENOTCONN, f"{what}: not connected to {self.uri}")
        if len(self._cmds) + parts > self.max_in_flight:
            raise BlockingIOError(errno.EAGAIN, f"{what}: {self.max_in_flight} commands already in flight")

    # ------------------------------------------------------------------ commands
    def _segments(self, views: Sequence, writable: bool):
        """cdata for each view, adjacent ones merged: ``(keep, [(ptr, length)])``."""
        ffi = self._ffi
        keep = []
        segs: list[list] = []
        for v in views:
            n = _nbytes(v)
            if not n:
                continue
            c = ffi.from_buffer(v, require_writable=writable)
            keep.append(c)
            if segs:
                last = segs[-1]
                if int(ffi.cast("uintptr_t", last[0])) + last[1] == int(ffi.cast("uintptr_t", c)):
                    last[1] += n
                    continue
            segs.append([c, n])
        return keep, segs

    def _io(self, what: str, views: Sequence, offset: int, write: bool, flags: int) -> int:
        if len(views) == 1:
            # The common case, kept short: one buffer, one NBD command.
            v = views[0]
            n = _nbytes(v)
            if 0 < n <= self.max_request and self._live and len(self._cmds) < self.max_in_flight:
                c = self._ffi.from_buffer(v, require_writable=not write)
                fn = self._lib.nbd_aio_pwrite if write else self._lib.nbd_aio_pread
                cookie = fn(self._h, c, n, offset, self._nocb, flags)
                if cookie == -1:
                    raise self._error(f"{what} {n}@{offset}")
                token = self._next_token
                self._next_token = token + 1
                self._cmds[cookie] = _Request(token, 1, c)
                return token
        keep, segs = self._segments(views, writable=not write)
        total = sum(s[1] for s in segs)
        if total == 0:
            raise OSError(errno.EINVAL, f"{what}: no data")
        if total > self.max_request:
            raise OSError(errno.EINVAL, f"{what}: {total} bytes is over the {self.max_request}-byte limit")
        scatter = None
        if len(segs) > 1 and (len(segs) > MAX_SEGMENTS or len(segs) > self.free_slots):
            bounce = bytearray(total)
            if write:
                pos = 0
                for v in views:
                    src = memoryview(v).cast("B")
                    bounce[pos:pos + src.nbytes] = src
                    pos += src.nbytes
            else:
                scatter = (bounce, list(views))
            bc = self._ffi.from_buffer(bounce)
            keep = [bc, bounce]
            segs = [[bc, total]]
        self._ready_for(what, len(segs))
        token = self._token()
        req = _Request(token, 0, keep, scatter)
        fn = self._lib.nbd_aio_pwrite if write else self._lib.nbd_aio_pread
        h, nocb, cmds = self._h, self._nocb, self._cmds
        pos = offset
        for ptr, n in segs:
            cookie = fn(h, ptr, n, pos, nocb, flags)
            if cookie == -1:
                err = self._error(f"{what} {n}@{pos}")
                if req.parts == 0:
                    raise err
                # Some segments are already out: the request fails when they are back.
                req.err = err.errno
                break
            cmds[cookie] = req
            req.parts += 1
            pos += n
        return token

    def submit_read(self, views: Sequence, offset: int) -> int:
        """Read into ``views`` (writable buffers, e.g. memoryviews of guest memory) from
        ``offset``; returns a token that :meth:`poll` hands back with the result."""
        return self._io("read", views, offset, False, 0)

    def submit_write(self, views: Sequence, offset: int, fua: bool = False) -> int:
        """Write ``views`` at ``offset``; ``fua`` needs :attr:`can_fua` (EINVAL otherwise)."""
        return self._io("write", views, offset, True, self._fua(fua))

    def _fua(self, fua: bool) -> int:
        if not fua:
            return 0
        if not self.can_fua:
            raise OSError(errno.EINVAL, f"FUA: the server of {self.uri} does not support it")
        return CMD_FLAG_FUA

    def _single(self, what: str, cookie: int) -> int:
        if cookie == -1:
            raise self._error(what)
        token = self._token()
        self._cmds[cookie] = _Request(token, 1, None)
        return token

    def submit_flush(self) -> int:
        """Flush the server's write cache (needs :attr:`can_flush`)."""
        self._ready_for("flush")
        return self._single("flush", self._lib.nbd_aio_flush(self._h, self._nocb, 0))

    def _check_range(self, what: str, offset: int, length: int) -> None:
        if length <= 0 or length > MAX_ZERO_REQUEST:
            raise OSError(errno.EINVAL, f"{what}: length {length} not in 1..{MAX_ZERO_REQUEST}")

    def submit_trim(self, offset: int, length: int, fua: bool = False) -> int:
        """Discard a range (needs :attr:`can_trim`); what it then reads is up to the server."""
        self._check_range("trim", offset, length)
        flags = self._fua(fua)
        self._ready_for("trim")
        return self._single("trim", self._lib.nbd_aio_trim(self._h, length, offset, self._nocb, flags))

    def submit_zero(self, offset: int, length: int, *, may_trim: bool = True, fua: bool = False,
                    fast: bool = False) -> int:
        """Write zeros (needs :attr:`can_zero`); ``may_trim=False`` keeps the range allocated
        (NBD_CMD_FLAG_NO_HOLE); ``fast`` fails (ENOTSUP) unless the server can do it quickly."""
        self._check_range("zero", offset, length)
        flags = self._fua(fua) | (0 if may_trim else CMD_FLAG_NO_HOLE)
        if fast:
            if not self.can_fast_zero:
                raise OSError(errno.ENOTSUP, f"fast zero: the server of {self.uri} does not support it")
            flags |= CMD_FLAG_FAST_ZERO
        self._ready_for("zero")
        return self._single("zero", self._lib.nbd_aio_zero(self._h, length, offset, self._nocb, flags))

    def describe(self) -> dict:
        """What the server advertised (for logs and tests)."""
        return dict(uri=self.uri, size=self.size, read_only=self.read_only, can_flush=self.can_flush,
                    can_fua=self.can_fua, can_trim=self.can_trim, can_zero=self.can_zero,
                    can_fast_zero=self.can_fast_zero, can_multi_conn=self.can_multi_conn,
                    block_size_min=self.block_size_min, block_size_preferred=self.block_size_preferred,
                    block_size_max=self.block_size_max, max_request=self.max_request)


def _nbytes(v) -> int:
    return v.nbytes if isinstance(v, memoryview) else len(v)


def _scatter(bounce: bytearray, views: Iterable) -> None:
    src = memoryview(bounce)
    pos = 0
    for v in views:
        dst = memoryview(v).cast("B")
        n = dst.nbytes
        dst[:] = src[pos:pos + n]
        pos += n
