"""Daemon settings and LUN specifications (frozen dataclasses, validated on creation)."""
from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from . import inject as _inject

MAX_LUNS = 256
#: SCSI addresses a LUN may take: ``target=0..MAX_TARGET``, ``lun=0..MAX_LUN_NUMBER``
#: (single-level LUNs; the data plane's LUN map is sized by them).
MAX_TARGET = 255
MAX_LUN_NUMBER = 255
DEFAULT_QUEUE_SIZE = 128
MAX_QUEUE_SIZE = 1024
MAX_REQUEST_QUEUES = 64
DEFAULT_IMAGE_SIZE = 1 << 30

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:I?B)?\s*$", re.IGNORECASE)


class ConfigError(ValueError):
    """A bad command line or configuration value (exit code 2)."""


def parse_size(text: str | int) -> int:
    """A size in bytes, binary multiples: ``4096``, ``512K``, ``64KiB``, ``1G``, ``1.5GiB``,
    ``2T`` (units K M G T P E, case-insensitive, optional ``B``/``iB``). The one grammar of
    sizes: ``null:SIZE`` LUNs, the null backend, vscsid-bench's ``--bs``/``--size`` and the
    benchmark scripts. ConfigError (a ValueError) for anything else."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ConfigError(f"bad size {text!r} (examples: 4096, 512M, 1G)")
    number, unit = m.groups()
    mult = 1 << (10 * ("KMGTPE".index(unit.upper()) + 1)) if unit else 1
    if "." in number:
        return int(float(number) * mult)
    return int(number) * mult


# Network LUNs (docs/network-storage.md): an NBD URI or an RBD image.
NBD_SCHEMES = ("nbd", "nbd+unix")
#: Default seconds a request waits for an unreachable server before it fails with
#: NOT READY, LOGICAL UNIT IS IN PROCESS OF BECOMING READY (the guest retries it).
DEFAULT_HOLD = 15.0
MAX_HOLD = 3600.0
_RBD_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class LunSpec:
    """One logical unit: ``FILE[,ro][,blocksize=512|4096][,serial=S][,rotational]...``.

    ``path`` may be ``null:SIZE`` for a backend without storage (reads return
    zeros, writes are dropped), used to measure the pure protocol cost; an NBD URI
    (``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``); or an RBD
    image (``rbd:POOL[/NAMESPACE]/IMAGE[@SNAP]``, with ``conf=`` and ``id=``).
    """
    path: str
    readonly: bool = False
    block_size: int = 512
    serial: str = ""
    rotational: bool = False
    direct: bool = False            # O_DIRECT
    writethrough: bool = False      # every write is FUA; WCE=0
    delay_us: int = 0               # injected latency per I/O (testing, benchmarks)
    aio: str = "auto"               # C path I/O: sync preadv/pwritev, uring, or auto
                                    # (io_uring for O_DIRECT and injected latency)
    discard: bool = True            # UNMAP / WRITE SAME(UNMAP) punch holes
    vendor: str = "VSCSID"
    product: str = "vscsid disk"
    conf: str = ""                  # RBD: the ceph.conf (default: librados' search path)
    client_id: str = ""             # RBD: the cephx user without "client." (default admin)
    hold: float = DEFAULT_HOLD      # network LUNs: seconds a request waits for the server
    inject: str = ""                # fault injection rules (vscsid.inject), canonical text
    target: int = 0                 # SCSI target id (the T of H:C:T:L)
    lun: int | None = None          # LUN number; None: the next free LUN of the target

    @property
    def is_null(self) -> bool:
        return self.path.startswith("null:")

    @property
    def is_nbd(self) -> bool:
        return self.path.split("://", 1)[0].lower() in NBD_SCHEMES and "://" in self.path

    @property
    def is_rbd(self) -> bool:
        return self.path.startswith("rbd:")

    @property
    def is_network(self) -> bool:
        """Served through a network library (no fd, size from the server)."""
        return self.is_nbd or self.is_rbd

    def rbd_name(self) -> tuple[str, str | None, str, str | None]:
        """``(pool, namespace, image, snap)`` of an ``rbd:`` spec."""
        return _parse_rbd(self.path)

    @property
    def null_size(self) -> int:
        return parse_size(self.path[5:])

    def effective_serial(self, index: int, target: int = 0) -> str:
        if self.serial:
            return self.serial
        where = self.path if self.is_network else os.path.abspath(self.path)
        # Target 0 keeps the key it always had (path#lun), so serials stay stable.
        at = f"{index}" if target == 0 else f"{target}:{index}"
        digest = hashlib.sha256(f"{where}#{at}".encode()).hexdigest()
        return "VS" + digest[:14].upper()

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LunSpec":
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> "LunSpec":
        if not text:
            raise ConfigError("empty --lun value")
        parts = text.split(",")
        path, opts = parts[0], parts[1:]
        if not path:
            raise ConfigError(f"--lun {text!r}: missing file name")
        kw: dict = {}
        for opt in opts:
            key, eq, value = opt.partition("=")
            key = key.strip().lower()
            if key in ("ro", "readonly"):
                kw["readonly"] = _flag(value, eq, key, text)
            elif key == "rw":
                kw["readonly"] = not _flag(value, eq, key, text)
            elif key in ("rotational", "direct", "writethrough", "discard"):
                kw[key] = _flag(value, eq, key, text)
            elif key == "blocksize":
                try:
                    bs = int(value)
                except ValueError:
                    raise ConfigError(f"--lun {text!r}: blocksize must be 512 or 4096") from None
                if bs not in (512, 4096):
                    raise ConfigError(f"--lun {text!r}: blocksize must be 512 or 4096")
                kw["block_size"] = bs
            elif key == "serial":
                if not value or len(value) > 64 or not value.isprintable() or "," in value:
                    raise ConfigError(f"--lun {text!r}: serial must be 1-64 printable characters")
                kw["serial"] = value
            elif key == "delay_us":
                try:
                    kw["delay_us"] = int(value)
                except ValueError:
                    raise ConfigError(f"--lun {text!r}: delay_us must be an integer") from None
                if not 0 <= kw["delay_us"] <= 10_000_000:
                    raise ConfigError(f"--lun {text!r}: delay_us out of range")
            elif key == "cache":
                if value not in ("writeback", "writethrough", "none", "directsync"):
                    raise ConfigError(f"--lun {text!r}: cache must be writeback, writethrough, "
                                      "none or directsync")
                kw["writethrough"] = value in ("writethrough", "directsync")
                kw["direct"] = value in ("none", "directsync")
            elif key == "aio":
                if value not in ("auto", "sync", "uring"):
                    raise ConfigError(f"--lun {text!r}: aio must be auto, sync or uring")
                kw["aio"] = value
            elif key in ("target", "lun"):
                limit = MAX_TARGET if key == "target" else MAX_LUN_NUMBER
                try:
                    kw[key] = int(value)
                except ValueError:
                    raise ConfigError(f"--lun {text!r}: {key} must be an integer") from None
                if not 0 <= kw[key] <= limit:
                    raise ConfigError(f"--lun {text!r}: {key} must be between 0 and {limit}")
            elif key in ("vendor", "product"):
                limit = 8 if key == "vendor" else 16
                if not value or len(value) > limit or not value.isascii() or not value.isprintable():
                    raise ConfigError(f"--lun {text!r}: {key} must be 1-{limit} printable ASCII characters")
                kw[key] = value
            elif key in ("conf", "id", "hold", "inject"):
                _network_option(kw, key, value, text)
            else:
                raise ConfigError(f"--lun {text!r}: unknown option {key!r}")
        spec = cls(path=path, **kw)
        _check_network(spec, text, opts)
        if spec.is_null:
            size = spec.null_size
            if size < spec.block_size or size % spec.block_size:
                raise ConfigError(f"--lun {text!r}: null size must be a multiple of the block size")
        return spec


def _network_option(kw: dict, key: str, value: str, text: str) -> None:
    """conf=, id=, hold= (network LUNs) and inject= (any LUN)."""
    if key == "conf":
        if not value:
            raise ConfigError(f"--lun {text!r}: conf needs a path")
        kw["conf"] = value
    elif key == "id":
        if not value or not _RBD_NAME.match(value) or value.startswith("client."):
            raise ConfigError(f"--lun {text!r}: id must be a cephx user name without 'client.'")
        kw["client_id"] = value
    elif key == "hold":
        try:
            hold = float(value)
        except ValueError:
            raise ConfigError(f"--lun {text!r}: hold must be a number of seconds") from None
        if not 1.0 <= hold <= MAX_HOLD:
            raise ConfigError(f"--lun {text!r}: hold must be between 1 and {MAX_HOLD:.0f} seconds")
        kw["hold"] = hold
    else:
        try:
            kw["inject"] = _inject.canonical(value)
        except _inject.InjectError as exc:
            raise ConfigError(f"--lun {text!r}: {exc}") from None


def _parse_rbd(path: str) -> tuple[str, str | None, str, str | None]:
    body = path[4:]
    name, at, snap = body.partition("@")
    parts = name.split("/")
    if len(parts) == 2:
        pool, ns, image = parts[0], None, parts[1]
    elif len(parts) == 3:
        pool, ns, image = parts
    else:
        raise ConfigError(f"--lun {path!r}: an RBD LUN is rbd:POOL[/NAMESPACE]/IMAGE[@SNAP]")
    for what, v in (("pool", pool), ("namespace", ns), ("image", image), ("snapshot", snap if at else None)):
        if v is not None and not _RBD_NAME.match(v):
            raise ConfigError(f"--lun {path!r}: bad RBD {what} name {v!r}")
    return pool, ns, image, (snap if at else None)


def _check_nbd_uri(uri: str, text: str) -> None:
    u = urlsplit(uri)
    scheme = u.scheme.lower()
    if scheme not in NBD_SCHEMES:
        raise ConfigError(f"--lun {text!r}: NBD URIs are nbd://HOST[:PORT]/EXPORT or "
                          "nbd+unix:///EXPORT?socket=PATH")
    query = parse_qs(u.query, keep_blank_values=True)
    if scheme == "nbd":
        if not u.hostname:
            raise ConfigError(f"--lun {text!r}: nbd:// needs a host")
        try:
            u.port
        except ValueError:
            raise ConfigError(f"--lun {text!r}: bad port") from None
    else:
        sock = query.get("socket", [""])[0]
        if u.netloc or not sock:
            raise ConfigError(f"--lun {text!r}: nbd+unix:///EXPORT?socket=PATH (no host)")
        if len(os.fsencode(unquote(sock))) >= 108:
            raise ConfigError(f"--lun {text!r}: socket path too long")


def _check_network(spec: LunSpec, text: str, opts: list[str]) -> None:
    keys = {o.partition("=")[0].strip().lower() for o in opts}
    if spec.is_nbd:
        _check_nbd_uri(spec.path, text)
    elif spec.is_rbd:
        _parse_rbd(spec.path)
    else:
        bad = keys & {"conf", "id", "hold"}
        if bad:
            raise ConfigError(f"--lun {text!r}: {', '.join(sorted(bad))}: only for NBD and RBD LUNs")
        if "://" in spec.path:
            raise ConfigError(f"--lun {text!r}: unknown URI scheme (NBD LUNs are nbd:// or nbd+unix://)")
        return
    if spec.is_nbd and keys & {"conf", "id"}:
        raise ConfigError(f"--lun {text!r}: conf and id: only for RBD LUNs")
    bad = keys & {"direct", "aio"}
    if spec.direct or bad:
        raise ConfigError(f"--lun {text!r}: direct, aio and cache=none|directsync: only for files")


def _flag(value: str, eq: str, key: str, text: str) -> bool:
    if not eq:
        return True
    v = value.lower()
    if v in ("1", "on", "yes", "true"):
        return True
    if v in ("0", "off", "no", "false"):
        return False
    raise ConfigError(f"--lun {text!r}: bad value for {key}: {value!r}")


def check_lun_path(spec: LunSpec) -> None:
    """Fail early (exit 2) when the image cannot be used. Network LUNs are not
    looked at here (a worker connects to the server at start-up), only an RBD
    LUN's conf file."""
    if spec.is_null:
        return
    if spec.is_network:
        if spec.conf and not os.access(spec.conf, os.R_OK):
            raise ConfigError(f"LUN {spec.path!r}: conf {spec.conf!r} is not readable")
        return
    try:
        st = os.stat(spec.path)
    except FileNotFoundError:
        raise ConfigError(f"LUN image {spec.path!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"LUN image {spec.path!r}: {exc.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ConfigError(f"LUN image {spec.path!r} is not a regular file or block device")
    mode = os.R_OK if spec.readonly else os.R_OK | os.W_OK
    if not os.access(spec.path, mode):
        raise ConfigError(f"LUN image {spec.path!r} is not "
                          f"{'readable' if spec.readonly else 'readable and writable'}")
    if stat.S_ISREG(st.st_mode) and st.st_size < spec.block_size:
        raise ConfigError(f"LUN image {spec.path!r} is smaller than one block "
                          f"({st.st_size} < {spec.block_size} bytes)")


@dataclass(frozen=True)
class DaemonConfig:
    socket_path: str | None = None
    listen_fd: int | None = None
    luns: tuple[LunSpec, ...] = ()
    num_queues: int = 1
    queue_size: int = DEFAULT_QUEUE_SIZE
    log_format: str = "auto"
    log_level: str = "info"
    socket_mode: int = 0o600
    socket_owner: int | None = None
    socket_group: int | None = None
    cpu_affinity: tuple[tuple[int, ...], ...] = ()
    max_sectors: int = 0xFFFF
    cmd_per_lun: int = 128
    seg_max: int = field(default=0)   # 0 = queue_size - 2
    engine: str = "c"                 # data path: "c" fast path (+ Python reference) or "python"
    poll_us: int = 32                 # adaptive busy-poll window of the C loop (0: never poll)
    admin_socket: str | None = None   # the JSON-RPC admin socket (None: none)
    metrics_address: tuple[str, int] | None = None   # where /metrics is served
    latency_sample: int = 1           # time one request in N for the histograms (0: none)
    config_file: str | None = None    # --config FILE (SIGHUP re-reads it)
    config_luns: tuple[LunSpec, ...] = ()   # the LUNs that came from that file

    def __post_init__(self) -> None:
        if not 1 <= self.num_queues <= MAX_REQUEST_QUEUES:
            raise ConfigError(f"--num-queues must be between 1 and {MAX_REQUEST_QUEUES}")
        qs = self.queue_size
        if qs < 2 or qs > MAX_QUEUE_SIZE or qs & (qs - 1):
            raise ConfigError(f"--queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}")
        if len(self.luns) > MAX_LUNS:
            raise ConfigError(f"at most {MAX_LUNS} LUNs are supported")
        if not 0 <= self.poll_us <= 10_000:
            raise ConfigError("--poll-us must be between 0 and 10000")
        if self.engine not in ("c", "python"):
            raise ConfigError("--engine must be c or python")
        if (self.socket_path is None) == (self.listen_fd is None):
            raise ConfigError("exactly one of --socket-path and --fd is required")
        if not 0 <= self.latency_sample <= 1_000_000:
            raise ConfigError("--latency-sample must be between 0 and 1000000")
        if len(self.luns) + len(self.config_luns) > MAX_LUNS:
            raise ConfigError(f"at most {MAX_LUNS} LUNs are supported")


def parse_host_port(text: str, what: str = "--metrics-address") -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(f"{what} {text!r}: expected HOST:PORT")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{what} {text!r}: bad port") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"{what} {text!r}: port out of range")
    return host, number
