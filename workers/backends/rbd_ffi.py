"""Asynchronous Ceph RBD image access on librbd/librados (16.2 "pacific"), through cffi ABI mode.

librbd.so.1 and librados.so.2 are opened at run time (``ffi.dlopen``), so installing
vscsid needs no Ceph headers, and a machine without them only loses RBD LUNs:
opening an :class:`RbdImage` then raises :class:`BackendUnavailable`.

One :class:`RbdImage` is one librados client (its own threads, its own sessions
with the monitors and OSDs) with one open image, driven by the caller's event loop::

    img = RbdImage("rbd", "disk1", conf="/etc/ceph/ceph.conf", client_id="vscsid")
    ep.register(img.fileno(), img.events())        # an eventfd: EPOLLIN
    t = img.submit_read([view1, view2], offset)     # -> token (one rbd_aio_readv)
    ...on EPOLLIN for img.fileno():
    for token, err in img.poll():                   # err 0 or an errno
        ...

Design (see docs/network-storage.md, "Bindings"):

* No Python code runs on librbd's threads: completions are created without a
  callback, and the image is told to signal an eventfd (``rbd_set_image_notification``
  with EVENT_TYPE_EVENTFD); :meth:`poll` reads it and collects the finished
  completions with ``rbd_poll_io_events`` in the caller's thread, in the order they
  finished.
* Scatter-gather straight into and out of the caller's buffers: ``rbd_aio_readv`` /
  ``rbd_aio_writev`` over an iovec array built on ``ffi.from_buffer`` views.
* Bounded: at most ``max_in_flight`` requests; past that a submit raises
  ``BlockingIOError`` (EAGAIN).
* FUA: librbd has no per-write FUA. With the librbd cache off (``rbd_cache=false``)
  a write completes only once the OSD has it on stable storage, so every write is
  already FUA; with the cache on, ``submit_write(fua=True)`` issues a flush after the
  write and completes the token when the flush is done.
* librados reconnects to monitors and OSDs by itself; requests wait meanwhile
  (``rados_osd_op_timeout``, default 0 = forever, bounds that if set in ``options``).

Create the image object in the process that uses it (librados threads do not
survive fork). All failures of calls are ``OSError`` with an errno.
"""
from __future__ import annotations

import errno
import os
import select
from typing import Mapping, Sequence

from .base import BackendUnavailable

__all__ = ["BackendUnavailable", "RbdImage", "load_librbd"]

# <rados/librados.h> and <rbd/librbd.h> of Ceph 16.2 (librbd-dev, librados-dev).
CDEF = """
typedef void *rados_t;
typedef void *rados_ioctx_t;
typedef void *rbd_image_t;
typedef void *rbd_completion_t;
typedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg);
struct iovec { void *iov_base; size_t iov_len; };
typedef struct {
  uint64_t size;
  uint64_t obj_size;
  uint64_t num_objs;
  int order;
  char block_name_prefix[24];
  int64_t parent_pool;
  char parent_name[96];
} rbd_image_info_t;

void rados_version(int *major, int *minor, int *extra);
int rados_create2(rados_t *pcluster, const char *const clustername, const char * const name,
                  uint64_t flags);
int rados_conf_read_file(rados_t cluster, const char *path);
int rados_conf_set(rados_t cluster, const char *option, const char *value);
int rados_conf_get(rados_t cluster, const char *option, char *buf, size_t len);
int rados_connect(rados_t cluster);
void rados_shutdown(rados_t cluster);
int rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx);
void rados_ioctx_destroy(rados_ioctx_t io);
void rados_ioctx_set_namespace(rados_ioctx_t io, const char *nspace);

void rbd_version(int *major, int *minor, int *extra);
int rbd_open(rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name);
int rbd_open_read_only(rados_ioctx_t io, const char *name, rbd_image_t *image,
                       const char *snap_name);
int rbd_close(rbd_image_t image);
int rbd_get_size(rbd_image_t image, uint64_t *size);
int rbd_stat(rbd_image_t image, rbd_image_info_t *info, size_t infosize);
int rbd_get_features(rbd_image_t image, uint64_t *features);
int rbd_set_image_notification(rbd_image_t image, int fd, int type);
int rbd_poll_io_events(rbd_image_t image, rbd_completion_t *comps, int numcomp);

int rbd_aio_create_completion(void *cb_arg, rbd_callback_t complete_cb, rbd_completion_t *c);
ssize_t rbd_aio_get_return_value(rbd_completion_t c);
void *rbd_aio_get_arg(rbd_completion_t c);
void rbd_aio_release(rbd_completion_t c);
int rbd_aio_readv(rbd_image_t image, const struct iovec *iov, int iovcnt, uint64_t off,
                  rbd_completion_t c);
int rbd_aio_writev(rbd_image_t image, const struct iovec *iov, int iovcnt, uint64_t off,
                   rbd_completion_t c);
int rbd_aio_discard(rbd_image_t image, uint64_t off, uint64_t len, rbd_completion_t c);
int rbd_aio_write_zeroes(rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c,
                         int zero_flags, int op_flags);
int rbd_aio_flush(rbd_image_t image, rbd_completion_t c);
"""

LIBRBD_SONAME = "librbd.so.1"
LIBRADOS_SONAME = "librados.so.2"
EVENT_TYPE_EVENTFD = 2
RBD_WRITE_ZEROES_FLAG_THICK_PROVISION = 1
RBD_FEATURE_EXCLUSIVE_LOCK = 1 << 2
DEFAULT_MAX_IN_FLIGHT = 64
#: Completions collected per rbd_poll_io_events call.
_POLL_BATCH = 64
_IOV_MAX = 1024

_lib_cache: tuple | None = None


def load_librbd():
    """``(ffi, rados, rbd)`` for librados.so.2 and librbd.so.1, loaded once."""
    global _lib_cache
    if _lib_cache is None:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(CDEF)
        libs = []
        for so, pkg in ((LIBRADOS_SONAME, "librados2"), (LIBRBD_SONAME, "librbd1")):
            try:
                libs.append(ffi.dlopen(so))
            except OSError as e:
                raise BackendUnavailable(
                    errno.ENOSYS, f"RBD LUNs need {so} ({e}); on Debian: apt-get install {pkg}") from None
        _lib_cache = (ffi, libs[0], libs[1])
    return _lib_cache


def _check(r: int, what: str) -> int:
    if r < 0:
        cls = BlockingIOError if -r == errno.EAGAIN else OSError
        raise cls(-r, f"{what}: {os.strerror(-r)}")
    return r


class _Request:
    __slots__ = ("token", "comp", "keep", "then_flush")

    def __init__(self, token, comp, keep, then_flush=False):
        self.token = token
        self.comp = comp
        self.keep = keep
        self.then_flush = then_flush


class RbdImage:
    """``pool/image[@snap]`` opened through its own librados client.

    ``conf``: a ceph.conf (None: librados' default search path); ``client_id``: the cephx
    user without ``client.``; ``keyring``: overrides the conf's keyring; ``options``: more
    librados/librbd settings (``rados_conf_set``), e.g. ``{"rbd_cache": "false"}``. A
    snapshot, or ``read_only=True``, opens the image read-only (``rbd_open_read_only``).
    """

    def __init__(self, pool: str, image: str, *, snap: str | None = None, conf: str | None = None,
                 client_id: str = "admin", keyring: str | None = None, namespace: str | None = None,
                 read_only: bool = False, options: Mapping[str, str] | None = None,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, connect_timeout: float = 30.0):
        if not 1 <= max_in_flight <= 4096:
            raise ValueError("max_in_flight must be 1..4096")
        self._ffi, self._rados, self._rbd = load_librbd()
        ffi, rados = self._ffi, self._rados
        self.pool, self.image, self.snap = pool, image, snap
        self.max_in_flight = max_in_flight
        self.read_only = bool(read_only or snap)
        self._cluster = self._ioctx = self._image = None
        self._efd = -1
        self._reqs: dict[int, _Request] = {}
        self._next_token = 1
        self._comps = ffi.new("rbd_completion_t[]", _POLL_BATCH)
        self._nocb = ffi.cast("rbd_callback_t", 0)
        name = f"{pool}/{image}" + (f"@{snap}" if snap else "")
        self.name = name
        try:
            pc = ffi.new("rados_t *")
            _check(rados.rados_create2(pc, b"ceph", f"client.{client_id}".encode(), 0),
                   f"rados_create2 client.{client_id}")
            self._cluster = pc[0]
            _check(rados.rados_conf_read_file(self._cluster, conf.encode() if conf else ffi.NULL),
                   f"read {conf or 'the default ceph.conf'}")
            settings = {"client_mount_timeout": str(int(connect_timeout)),
                        "rados_mon_op_timeout": str(int(connect_timeout))}
            if keyring:
                settings["keyring"] = keyring
            settings.update(options or {})
            for k, v in settings.items():
                _check(rados.rados_conf_set(self._cluster, k.encode(), str(v).encode()), f"set {k}={v}")
            _check(rados.rados_connect(self._cluster), f"connect to the cluster as client.{client_id}")
            pio = ffi.new("rados_ioctx_t *")
            _check(rados.rados_ioctx_create(self._cluster, pool.encode(), pio), f"open pool {pool}")
            self._ioctx = pio[0]
            if namespace:
                rados.rados_ioctx_set_namespace(self._ioctx, namespace.encode())
            pimg = ffi.new("rbd_image_t *")
            opener = self._rbd.rbd_open_read_only if self.read_only else self._rbd.rbd_open
            _check(opener(self._ioctx, image.encode(), pimg, snap.encode() if snap else ffi.NULL),
                   f"open image {name}")
            self._image = pimg[0]
            self._read_info()
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            _check(self._rbd.rbd_set_image_notification(self._image, self._efd, EVENT_TYPE_EVENTFD),
                   "rbd_set_image_notification")
        except BaseException:
            self._teardown()
            raise

    # ------------------------------------------------------------------ info
    def _conf_get(self, key: str) -> str:
        buf = self._ffi.new("char[]", 256)
        _check(self._rados.rados_conf_get(self._cluster, key.encode(), buf, 256), f"get {key}")
        return self._ffi.string(buf).decode()

    def _read_info(self) -> None:
        ffi, rbd = self._ffi, self._rbd
        size = ffi.new("uint64_t *")
        _check(rbd.rbd_get_size(self._image, size), "rbd_get_size")
        self.size = int(size[0])
        info = ffi.new("rbd_image_info_t *")
        _check(rbd.rbd_stat(self._image, info, ffi.sizeof("rbd_image_info_t")), "rbd_stat")
        self.object_size = int(info.obj_size)
        feats = ffi.new("uint64_t *")
        _check(rbd.rbd_get_features(self._image, feats), "rbd_get_features")
        self.features = int(feats[0])
        self.write_cache = self._conf_get("rbd_cache") == "true"
        # Without librbd's cache a completed write is on the OSD's stable storage.
        self.can_fua = True
        self.can_flush = True
        self.can_discard = not self.read_only
        self.can_zero = not self.read_only

    def refresh_size(self) -> int:
        """The image's size now (librbd follows resizes through its header watch)."""
        size = self._ffi.new("uint64_t *")
        _check(self._rbd.rbd_get_size(self._image, size), "rbd_get_size")
        self.size = int(size[0])
        return self.size

    def describe(self) -> dict:
        return dict(name=self.name, size=self.size, read_only=self.read_only,
                    object_size=self.object_size, features=self.features, write_cache=self.write_cache)

    # ------------------------------------------------------------------ event loop
    def fileno(self) -> int:
        """The eventfd librbd signals when a request finished (readable: call :meth:`poll`)."""
        return self._efd

    def events(self) -> int:
        return select.EPOLLIN

    def handle_events(self, revents: int) -> None:
        """Nothing to do: :meth:`poll` reads the eventfd (same interface as the NBD client)."""

    def poll(self) -> list[tuple[int, int]]:
        """``[(token, err)]`` for every finished request, err 0 or an errno."""
        out: list[tuple[int, int]] = []
        if self._image is None:
            return out
        try:
            os.read(self._efd, 8)
        except BlockingIOError:
            pass
        # The count is read before the queue is drained, so a completion queued after this
        # drain signals the eventfd again.
        ffi, rbd, comps, reqs = self._ffi, self._rbd, self._comps, self._reqs
        while True:
            n = rbd.rbd_poll_io_events(self._image, comps, _POLL_BATCH)
            if n <= 0:
                break
            for i in range(n):
                c = comps[i]
                r = rbd.rbd_aio_get_return_value(c)
                token = int(ffi.cast("uintptr_t", rbd.rbd_aio_get_arg(c)))
                rbd.rbd_aio_release(c)
                req = reqs.get(token)
                if req is None:
                    continue
                if r >= 0 and req.then_flush:
                    req.then_flush = False
                    try:
                        img = self._image
                        self._start(req, "flush after FUA write", lambda c: rbd.rbd_aio_flush(img, c))
                        continue
                    except OSError as e:
                        r = -e.errno
                del reqs[token]
                out.append((token, -r if r < 0 else 0))
            if n < _POLL_BATCH:
                break
        return out

    # ------------------------------------------------------------------ state
    @property
    def in_flight(self) -> int:
        return len(self._reqs)

    @property
    def free_slots(self) -> int:
        return self.max_in_flight - len(self._reqs)

    def _new(self, what: str, keep, then_flush: bool = False) -> _Request:
        if self._image is None:
            raise OSError(errno.EBADF, f"{what}: image {self.name} is closed")
        if len(self._reqs) >= self.max_in_flight:
            raise BlockingIOError(errno.EAGAIN, f"{what}: {self.max_in_flight} requests already in flight")
        token = self._next_token
        self._next_token = token + 1
        return _Request(token, None, keep, then_flush)

    def _start(self, req: _Request, what: str, call) -> int:
        """Create a completion carrying the token and start ``call(completion)``."""
        ffi, rbd = self._ffi, self._rbd
        pc = ffi.new("rbd_completion_t *")
        _check(rbd.rbd_aio_create_completion(ffi.cast("void *", req.token), self._nocb, pc),
               "rbd_aio_create_completion")
        c = pc[0]
        r = call(c)
        if r < 0:
            rbd.rbd_aio_release(c)
            _check(r, what)
        req.comp = c
        self._reqs[req.token] = req
        return req.token

    def _iov(self, views: Sequence, writable: bool):
        n = len(views)
        if not 0 < n <= _IOV_MAX:
            raise OSError(errno.EINVAL, f"{n} buffers (1..{_IOV_MAX})")
        ffi = self._ffi
        iov = ffi.new("struct iovec[]", n)
        keep = [iov]
        for i, v in enumerate(views):
            c = ffi.from_buffer(v, require_writable=writable)
            keep.append(c)
            iov[i].iov_base = c
            iov[i].iov_len = len(c)
        return iov, n, keep

    def _check_rw(self, what: str, offset: int, length: int) -> None:
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"{what}: {length}@{offset} outside the {self.size}-byte image")

    # ------------------------------------------------------------------ commands
    def submit_read(self, views: Sequence, offset: int) -> int:
        """``rbd_aio_readv`` into ``views`` (writable buffers) from ``offset``."""
        iov, n, keep = self._iov(views, True)
        self._check_rw("read", offset, sum(iov[i].iov_len for i in range(n)))
        req = self._new("read", keep)
        img, fn = self._image, self._rbd.rbd_aio_readv
        return self._start(req, "read", lambda c: fn(img, iov, n, offset, c))

    def submit_write(self, views: Sequence, offset: int, fua: bool = False) -> int:
        """``rbd_aio_writev`` of ``views`` at ``offset``; ``fua`` adds a flush if librbd caches."""
        if self.read_only:
            raise OSError(errno.EROFS, f"write: {self.name} is read-only")
        iov, n, keep = self._iov(views, False)
        self._check_rw("write", offset, sum(iov[i].iov_len for i in range(n)))
        req = self._new("write", keep, then_flush=fua and self.write_cache)
        img, fn = self._image, self._rbd.rbd_aio_writev
        return self._start(req, "write", lambda c: fn(img, iov, n, offset, c))

    def submit_flush(self) -> int:
        req = self._new("flush", None)
        img, fn = self._image, self._rbd.rbd_aio_flush
        return self._start(req, "flush", lambda c: fn(img, c))

    def submit_discard(self, offset: int, length: int) -> int:
        """Deallocate a range. librbd may skip parts smaller than its discard granularity
        (``rbd_skip_partial_discard``), so a discarded range need not read back as zeros;
        use :meth:`submit_zero` for that."""
        if self.read_only:
            raise OSError(errno.EROFS, f"discard: {self.name} is read-only")
        self._check_rw("discard", offset, length)
        req = self._new("discard", None)
        img, fn = self._image, self._rbd.rbd_aio_discard
        return self._start(req, "discard", lambda c: fn(img, offset, length, c))

    def submit_zero(self, offset: int, length: int, *, may_trim: bool = True) -> int:
        """``rbd_aio_write_zeroes``: the range reads back as zeros; ``may_trim=False``
        keeps it allocated (RBD_WRITE_ZEROES_FLAG_THICK_PROVISION)."""
        if self.read_only:
            raise OSError(errno.EROFS, f"zero: {self.name} is read-only")
        self._check_rw("zero", offset, length)
        flags = 0 if may_trim else RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        req = self._new("zero", None)
        img, fn = self._image, self._rbd.rbd_aio_write_zeroes
        return self._start(req, "zero", lambda c: fn(img, offset, length, c, flags, 0))

    # ------------------------------------------------------------------ teardown
    def close(self) -> list[tuple[int, int]]:
        """Wait for the requests still out (rbd_close does), then disconnect; returns their
        ``[(token, err)]``."""
        out: list[tuple[int, int]] = []
        if self._image is not None:
            # rbd_close waits for in-flight I/O, whose buffers must live until then.
            self._rbd.rbd_close(self._image)
            out = self._drain_after_close()
            self._image = None
        self._teardown()
        return out

    def _drain_after_close(self) -> list[tuple[int, int]]:
        out = []
        for token, req in list(self._reqs.items()):
            if req.comp is not None:
                r = self._rbd.rbd_aio_get_return_value(req.comp)
                self._rbd.rbd_aio_release(req.comp)
                out.append((token, -r if r < 0 else 0))
        self._reqs.clear()
        return out

    def _teardown(self) -> None:
        if self._image is not None:
            self._rbd.rbd_close(self._image)
            self._image = None
        if self._ioctx is not None:
            self._rados.rados_ioctx_destroy(self._ioctx)
            self._ioctx = None
        if self._cluster is not None:
            self._rados.rados_shutdown(self._cluster)
            self._cluster = None
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1

    def __enter__(self) -> "RbdImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
