"""The bench's configuration (one run), its errors and exit codes."""
from __future__ import annotations

from dataclasses import dataclass, field

from vscsid.config import parse_size  # noqa: F401  (the one size grammar, for the bench's CLI)
from vscsid.virtio.defs import MAX_QUEUE_SIZE

from ._loop import lib as _lib

EXIT_OK, EXIT_IO_ERRORS, EXIT_USAGE, EXIT_FATAL = 0, 1, 2, 3

RW_MODES = ("randread", "randwrite", "read", "write", "randrw", "rw")


class BenchError(Exception):
    """A setup or run failure (exit code 3), or a usage error (exit code 2)."""

    def __init__(self, msg: str, code: int = EXIT_FATAL):
        super().__init__(msg)
        self.code = code


def _fmt_size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("k", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _align_up(v: int, a: int) -> int:
    return (v + a - 1) & ~(a - 1)


@dataclass
class BenchConfig:
    socket_path: str | None = None
    format: str = "scsi"
    rw: str = "randread"
    rwmixread: int = 50
    bs: int = 4096
    iodepth: int = 1
    queues: int = 1
    seconds: float = 5.0
    ramp: float = 1.0
    lun: int = 0
    size: int | None = None
    queue_size: int = 128
    indirect: str = "auto"
    event_idx: bool = True
    verify: bool = False
    seed: int = 1
    once: bool = False
    engine: str = "c"
    spin_us: int = 0
    stall_timeout: float = 30.0
    loopback: bool = False
    daemon_pids: list[int] = field(default_factory=list)
    daemon_cgroup: str | None = None     # a cgroup v1 cpuacct directory holding the daemon
    flush_every: int = 0                 # a flush after every N writes (per queue; C loop)
    timeline_interval: float = 0.1       # seconds between samples of per-queue completions

    @property
    def random(self) -> bool:
        return self.rw.startswith("rand")

    @property
    def rw_code(self) -> int:
        """The loop's ``BQ_RW_*`` code of ``rw``."""
        return {"randread": _lib.BQ_RW_READ, "read": _lib.BQ_RW_READ,
                "randwrite": _lib.BQ_RW_WRITE, "write": _lib.BQ_RW_WRITE,
                "randrw": _lib.BQ_RW_MIXED, "rw": _lib.BQ_RW_MIXED}[self.rw]

    def validate(self) -> None:
        def bad(msg):
            raise BenchError(msg, EXIT_USAGE)
        if self.format not in ("scsi", "blk"):
            bad("--format must be scsi or blk")
        if self.rw not in RW_MODES:
            bad(f"--rw must be one of {', '.join(RW_MODES)}")
        if not 0 <= self.rwmixread <= 100:
            bad("--rwmixread must be 0..100")
        if self.bs < 512 or self.bs % 512:
            bad("--bs must be a positive multiple of 512")
        if self.iodepth < 1 or self.queues < 1:
            bad("--iodepth and --queues must be >= 1")
        if self.queue_size < 1 or self.queue_size > MAX_QUEUE_SIZE or self.queue_size & (self.queue_size - 1):
            bad(f"--queue-size must be a power of two <= {MAX_QUEUE_SIZE}")
        if self.iodepth > self.queue_size:
            bad("--iodepth cannot exceed --queue-size")
        if self.seconds <= 0 or self.ramp < 0:
            bad("--seconds must be > 0 and --ramp >= 0")
        if self.indirect not in ("auto", "on", "off"):
            bad("--indirect must be auto, on or off")
        if self.flush_every < 0:
            bad("--flush-every must be >= 0")
        if self.flush_every and self.engine != "c":
            bad("--flush-every needs the C loop (--engine c)")
        if self.engine not in ("c", "python"):
            bad("--engine must be c or python")
        if not self.loopback and not self.socket_path:
            bad("--socket-path is required (or --loopback)")
        if self.loopback and self.verify:
            bad("--verify needs a real back end (the loopback device stores nothing)")
