"""Daemon settings and LUN specifications (frozen dataclasses, validated on creation)."""
from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import asdict, dataclass, field

MAX_LUNS = 256
DEFAULT_QUEUE_SIZE = 128
MAX_QUEUE_SIZE = 1024
MAX_REQUEST_QUEUES = 64
DEFAULT_IMAGE_SIZE = 1 << 30

_SIZE_RE = re.compile(r"^(\d+)([kKmMgGtT]?)(i?[bB])?$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class ConfigError(ValueError):
    """A bad command line or configuration value (exit code 2)."""


def parse_size(text: str) -> int:
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ConfigError(f"bad size {text!r} (examples: 4096, 512M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


@dataclass(frozen=True)
class LunSpec:
    """One logical unit: ``FILE[,ro][,blocksize=512|4096][,serial=S][,rotational]...``.

    ``path`` may be ``null:SIZE`` for a backend without storage (reads return
    zeros, writes are dropped), used to measure the pure protocol cost.
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

    @property
    def is_null(self) -> bool:
        return self.path.startswith("null:")

    @property
    def null_size(self) -> int:
        return parse_size(self.path[5:])

    def effective_serial(self, index: int) -> str:
        if self.serial:
            return self.serial
        digest = hashlib.sha256(f"{os.path.abspath(self.path)}#{index}".encode()).hexdigest()
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
            elif key in ("vendor", "product"):
                limit = 8 if key == "vendor" else 16
                if not value or len(value) > limit or not value.isascii() or not value.isprintable():
                    raise ConfigError(f"--lun {text!r}: {key} must be 1-{limit} printable ASCII characters")
                kw[key] = value
            else:
                raise ConfigError(f"--lun {text!r}: unknown option {key!r}")
        spec = cls(path=path, **kw)
        if spec.is_null:
            size = spec.null_size
            if size < spec.block_size or size % spec.block_size:
                raise ConfigError(f"--lun {text!r}: null size must be a multiple of the block size")
        return spec


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
    """Fail early (exit 2) when the image cannot be used."""
    if spec.is_null:
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
