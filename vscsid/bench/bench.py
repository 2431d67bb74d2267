"""``vscsid-bench``: a vhost-user storage load generator that needs no VM.

It plays QEMU and the guest driver at once: memfd guest memory, the vhost-user
control path (:class:`~vscsid.bench.frontend.VhostUserFrontend`) and, per
request queue, a driver-side split ring driven by a hot loop in C
(:mod:`vscsid.bench._benchfast`, built from ``_bench_build.py``). It drives
any vhost-user storage back end: vscsid (``--format scsi``, virtio-scsi) or
e.g. ``qemu-storage-daemon --export type=vhost-user-blk`` (``--format blk``).

Design
------
* One OS thread per request queue. Each thread makes a single cffi call,
  ``bq_run``, which runs the whole submit/kick/wait/reap loop for its queue
  and returns when the window is over and the ring is drained. API-mode cffi
  releases the GIL for the call, so the threads run in parallel and no Python
  runs per I/O. Threads (rather than processes) keep one guest memory, one
  vhost-user connection and one ``getrusage`` scope; the C loop touches no
  Python object so there is nothing for the GIL to serialise.
* Every slot (one per unit of ``--iodepth``) owns its request header, response
  and data buffer in guest memory and a fixed descriptor chain (3 ring
  descriptors, or one indirect descriptor + a 3-entry table). Per I/O only the
  CDB / virtio-blk sector, and the descriptor flags when the direction
  changes, are rewritten.
* EVENT_IDX on both sides: kicks only when ``vring_need_event(avail_event)``
  says so; ``used_event`` is kept behind ``last_used`` while busy and set to
  ``last_used`` just before sleeping in ``poll()`` on the call eventfd.
* Latency: ``CLOCK_MONOTONIC`` at submission and at reaping, into a
  log-linear histogram (64 sub-buckets per power of two, <= 1.6 % error).
* ``--engine python`` runs the same loop in pure Python (slow; a reference
  to cross-check the C engine, in particular its verification).
* ``--verify`` writes a pattern with a header per 512-byte sector (magic,
  sector, seed, generation) and checks every read; after the timed phase every
  block written is read back and checked. Each queue owns a disjoint slice of
  the blocks and never has two I/Os on one block in flight, so the expected
  generation of every block is known exactly.
* ``--loopback`` replaces the back end by a C device thread in this process
  that completes requests at once: it measures the generator's own ceiling.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import select
import struct
import sys
import threading
import time
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any

from vscsid.vhost.protocol import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature, feature_mask

from . import virtio_scsi as vs
from .driverq import DriverQueue
from .frontend import (
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VhostUserFrontend,
)
from .guestmem import FrontendMemory

try:
    from ._benchfast import ffi as _ffi, lib as _lib
except ImportError:  # pragma: no cover - only without the compiled extension
    _ffi = _lib = None

__all__ = ["main", "run", "BenchConfig", "BenchError", "parse_size", "fill_block", "check_block",
           "hist_index", "percentile", "MAGIC"]

MAGIC = int.from_bytes(b"vscsid-b", "little")
GEN_UNKNOWN = 0xFFFFFFFF
HIST_SUB_BITS = 6
HIST_N = (64 - HIST_SUB_BITS + 1) << HIST_SUB_BITS
M64 = (1 << 64) - 1

# virtio-blk
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

EXIT_OK, EXIT_IO_ERRORS, EXIT_USAGE, EXIT_FATAL = 0, 1, 2, 3

RW_MODES = ("randread", "randwrite", "read", "write", "randrw", "rw")


class BenchError(Exception):
    """A setup or run failure (exit code 3), or a usage error (exit code 2)."""

    def __init__(self, msg: str, code: int = EXIT_FATAL):
        super().__init__(msg)
        self.code = code


# ----------------------------------------------------------------------- helpers
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*$", re.I)


def parse_size(text: str | int) -> int:
    """'4k' -> 4096, '64KiB' -> 65536, '1g' -> 2**30 (binary units), '512' -> 512."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"bad size {text!r}")
    return int(m.group(1)) << (10 * "kmgtp".find(m.group(2).lower()) + 10 if m.group(2) else 0)


def _fmt_size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("k", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _align_up(v: int, a: int) -> int:
    return (v + a - 1) & ~(a - 1)


# --------------------------------------------------------------- verify pattern (reference)
def _splitmix_stream(x: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        x = (x + 0x9E3779B97F4A7C15) & M64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


def _pattern_key(sector: int, seed: int, gen: int) -> int:
    return (seed ^ ((sector * 0x9E3779B97F4A7C15) & M64) ^ ((gen * 0xD1B54A32D192ED03) & M64)) & M64


_SECTOR = struct.Struct("<64Q")


def fill_block(bs: int, first_sector: int, seed: int, gen: int) -> bytes:
    """The bytes ``--verify`` writes to a block: per 512-byte sector
    ``le64 magic, le64 sector, le64 seed, le64 gen`` + 60 words of splitmix64."""
    out = bytearray(bs)
    for k in range(bs // 512):
        s = first_sector + k
        words = [MAGIC, s, seed, gen] + _splitmix_stream(_pattern_key(s, seed, gen), 60)
        _SECTOR.pack_into(out, 512 * k, *words)
    return bytes(out)


VERIFY_REASONS = {-1: "no header", -2: "wrong sector", -3: "wrong seed",
                  -4: "stale or unexpected generation", -5: "payload corrupt",
                  -6: "partly written"}


def check_block(data, first_sector: int, seed: int, expected_gen: int = 0) -> tuple[int, int, int]:
    """Check a block written by :func:`fill_block`. Returns ``(rc, sector, gen_found)``:
    rc 0 valid (of ``expected_gen`` if non-zero), 1 all zero (only when ``expected_gen`` is 0),
    negative: see :data:`VERIFY_REASONS`."""
    b = bytes(data)
    zeros = good = 0
    for k in range(len(b) // 512):
        s = first_sector + k
        sec = b[512 * k:512 * (k + 1)]
        words = _SECTOR.unpack(sec)
        if words[0] != MAGIC:
            if expected_gen == 0 and not any(sec):
                zeros += 1
                continue
            return -1, s, 0
        gen = words[3]
        if words[1] != s:
            return -2, s, gen
        if words[2] != seed:
            return -3, s, gen
        if expected_gen and gen != expected_gen:
            return -4, s, gen
        if list(words[4:]) != _splitmix_stream(_pattern_key(s, seed, gen), 60):
            return -5, s, gen
        good += 1
    if zeros and good:
        return -6, first_sector, 0
    return (1 if zeros else 0), first_sector, 0


# ------------------------------------------------------------------------ histogram
def hist_index(v: int) -> int:
    if v < (1 << HIST_SUB_BITS):
        return v
    e = v.bit_length() - 1
    sub = (v >> (e - HIST_SUB_BITS)) & ((1 << HIST_SUB_BITS) - 1)
    return ((e - HIST_SUB_BITS + 1) << HIST_SUB_BITS) + sub


def hist_bounds(idx: int) -> tuple[int, int]:
    """[low, high] values of bucket ``idx``."""
    if idx < (1 << HIST_SUB_BITS):
        return idx, idx
    g, sub = idx >> HIST_SUB_BITS, idx & ((1 << HIST_SUB_BITS) - 1)
    shift = g - 1
    low = ((1 << HIST_SUB_BITS) + sub) << shift
    return low, low + (1 << shift) - 1


def percentile(hist, total: int, p: float, vmin: int, vmax: int) -> int:
    """Value at percentile ``p`` (bucket midpoint, clamped to the exact min/max)."""
    if total == 0:
        return 0
    rank = max(1, math.ceil(total * p / 100.0))
    cum = 0
    for i, c in enumerate(hist):
        if c:
            cum += c
            if cum >= rank:
                lo, hi = hist_bounds(i)
                return min(max((lo + hi) // 2, vmin), vmax)
    return vmax


# ------------------------------------------------------------------------ config
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

    @property
    def random(self) -> bool:
        return self.rw.startswith("rand")

    @property
    def rw_code(self) -> int:
        return {"randread": 0, "read": 0, "randwrite": 1, "write": 1, "randrw": 2, "rw": 2}[self.rw]

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
        if self.queue_size < 1 or self.queue_size > 32768 or self.queue_size & (self.queue_size - 1):
            bad("--queue-size must be a power of two <= 32768")
        if self.iodepth > self.queue_size:
            bad("--iodepth cannot exceed --queue-size")
        if self.seconds <= 0 or self.ramp < 0:
            bad("--seconds must be > 0 and --ramp >= 0")
        if self.indirect not in ("auto", "on", "off"):
            bad("--indirect must be auto, on or off")
        if self.engine not in ("c", "python"):
            bad("--engine must be c or python")
        if not self.loopback and not self.socket_path:
            bad("--socket-path is required (or --loopback)")
        if self.loopback and self.verify:
            bad("--verify needs a real back end (the loopback device stores nothing)")
        if self.engine == "c" and _lib is None:
            bad("the C engine is not built (pip install -e . builds vscsid.bench._benchfast)")


# ------------------------------------------------------------------------ CPU accounting
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(ppid, utime+stime+cutime+cstime in seconds) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    # rest[0] is field 3 (state); utime is field 14 -> rest[11]
    ppid = int(rest[1])
    ticks = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
    return ppid, ticks / _CLK_TCK


def tree_cpu_seconds(roots: list[int]) -> float:
    """CPU time (user+sys, incl. reaped children) of ``roots`` and all their descendants."""
    stats: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(int(name))
            if st is not None:
                stats[int(name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total = 0.0
    seen: set[int] = set()
    todo = [p for p in roots if p in stats]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def system_busy_seconds() -> tuple[float, float]:
    """(busy, steal): CPU time all CPUs spent busy (user, nice, system, irq, softirq) and
    stolen by the hypervisor, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return 0.0, 0.0
    v = [int(x) for x in parts[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / _CLK_TCK, v[7] / _CLK_TCK


def _thread_cpu_ns() -> tuple[int, int]:
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return int(ru.ru_utime * 1e9), int(ru.ru_stime * 1e9)


# ------------------------------------------------------------------------ per-queue setup
class Slot:
    """Guest buffers of one in-flight request (Python engine view)."""

    __slots__ = ("index", "head", "hdr_gpa", "resp_gpa", "data_gpa", "table_gpa",
                 "hdr", "resp", "data", "table", "start_ns", "blk", "gen", "dir", "is_write",
                 "inflight")


class QueueSetup:
    """Ring + per-slot buffers of one request queue, laid out in guest memory."""

    def __init__(self, bench: "Bench", qidx: int, ring_index: int, dq: DriverQueue,
                 blk_lo: int, blk_hi: int):
        cfg = bench.cfg
        self.bench = bench
        self.qidx = qidx
        self.ring_index = ring_index
        self.dq = dq
        self.blk_lo = blk_lo
        self.blk_hi = blk_hi
        mem = bench.mem
        depth = cfg.iodepth
        self.depth = depth
        self.meta_stride = (_align_up(bench.hdr_len, 64) + _align_up(bench.resp_len, 64) + 64)
        self.data_base = mem.alloc(depth * _align_up(cfg.bs, 4096), 4096)
        self.meta_base = mem.alloc(depth * self.meta_stride, 64)
        self.slots: list[dict] = []
        for k in range(depth):
            meta = self.meta_base + k * self.meta_stride
            hdr = meta
            resp = meta + _align_up(bench.hdr_len, 64)
            table = resp + _align_up(bench.resp_len, 64)
            data = self.data_base + k * _align_up(cfg.bs, 4096)
            head = k if bench.indirect else 3 * k
            if bench.fmt == "scsi":   # LUN and tag (slot + 1) are fixed; the CDB is written per I/O
                mem.write(hdr, vs.encode_cmd_req(cfg.lun, k + 1, b"", cdb_size=bench.cdb_size))
            else:
                mem.write(hdr, bytes(16))
            self.slots.append(dict(head=head, hdr=hdr, resp=resp, data=data, table=table))
        self.avail_idx = dq.avail_idx
        self.last_used = dq.last_used
        self.engine = None

    # -- C engine ----------------------------------------------------------
    def make_c(self, stop_flag, gens, busy, nonce: int, ramp_end: int, end: int):
        b, cfg, mem, dq = self.bench, self.bench.cfg, self.bench.mem, self.dq
        ffi, lib = _ffi, _lib
        q = ffi.new("struct bq *")
        keep = [q]
        q.qidx = self.qidx
        q.format = 0 if b.fmt == "scsi" else 1
        q.event_idx = int(b.event_idx)
        q.indirect = int(b.indirect)
        q.qsize = dq.size
        q.desc = ffi.cast("uint8_t *", dq.desc_uva)
        q.avail = ffi.cast("uint8_t *", dq.avail_uva)
        q.used = ffi.cast("uint8_t *", dq.used_uva)
        q.kick_fd = dq.kick_fd
        q.call_fd = dq.call_fd
        q.depth = self.depth
        slots = ffi.new("struct bq_slot[]", self.depth)
        h2s = ffi.new("int32_t[]", [-1] * dq.size)
        free = ffi.new("uint32_t[]", list(range(self.depth - 1, -1, -1)))
        hist = ffi.new("uint64_t[]", lib.BQ_HIST_N)
        keep += [slots, h2s, free, hist]
        for k, s in enumerate(self.slots):
            cs = slots[k]
            cs.hdr = ffi.cast("uint8_t *", mem.uva(s["hdr"]))
            cs.resp = ffi.cast("uint8_t *", mem.uva(s["resp"]))
            cs.data = ffi.cast("uint8_t *", mem.uva(s["data"]))
            cs.table = ffi.cast("uint8_t *", mem.uva(s["table"]))
            cs.hdr_gpa, cs.resp_gpa, cs.data_gpa, cs.table_gpa = s["hdr"], s["resp"], s["data"], s["table"]
            cs.head = s["head"]
            cs.dir = -1
            h2s[s["head"]] = k
        q.slots = slots
        q.head_to_slot = h2s
        q.free_stack = free
        q.nfree = self.depth
        q.hist = hist
        q.hdr_len = b.hdr_len
        q.resp_len = b.resp_len
        q.bs = cfg.bs
        q.lbs = b.lbs
        q.blk_lo, q.blk_hi = self.blk_lo, self.blk_hi
        q.rw = cfg.rw_code
        q.random = int(cfg.random)
        q.rwmixread = cfg.rwmixread
        q.once = int(cfg.once)
        q.seed = cfg.seed
        lib.bq_seed(q, (cfg.seed * 0x9E3779B97F4A7C15 + self.qidx + 1) & M64)
        q.verify = int(cfg.verify)
        q.nonce = nonce
        if cfg.verify:
            q.gens = gens
            q.busy = busy
        q.ramp_end_ns = ramp_end
        q.end_ns = end
        q.stall_ns = int(cfg.stall_timeout * 1e9)
        q.spin_ns = cfg.spin_us * 1000
        q.stop = stop_flag
        q.avail_idx = self.avail_idx
        q.kick_old = self.avail_idx
        q.last_used = self.last_used
        q.seq_next = self.blk_lo
        lib.bq_reset_stats(q)
        self.engine = CEngine(q, keep)
        return self.engine

    # -- Python engine -----------------------------------------------------
    def make_py(self, stop_flag, gens, busy, nonce: int, ramp_end: int, end: int):
        self.engine = PyEngine(self, stop_flag, gens, busy, nonce, ramp_end, end)
        return self.engine


class CEngine:
    def __init__(self, q, keep):
        self.q = q
        self._keep = keep
        self.rc = 0

    def run(self, mode: int) -> None:
        self.rc = _lib.bq_run(self.q, mode)

    def reset_stats(self) -> None:
        _lib.bq_reset_stats(self.q)

    def set_window(self, ramp_end: int, end: int) -> None:
        self.q.ramp_end_ns, self.q.end_ns = ramp_end, end

    def stats(self) -> dict:
        q = self.q
        d = {k: int(getattr(q, k)) for k in (
            "ios", "reads", "writes", "bytes", "lat_sum", "lat_min", "lat_max", "errors", "total_ios",
            "submitted", "kicks", "waits", "publishes", "reap_batches", "verify_ok",
            "verify_unwritten", "verify_errors", "win_start_ns", "win_end_ns", "cpu_user_ns0",
            "cpu_sys_ns0", "cpu_user_ns1", "cpu_sys_ns1", "fatal", "err_kind", "err_blk",
            "err_is_write", "err_status", "err_response", "err_residual", "err_sense_key",
            "err_asc", "err_ascq", "verr_reason", "verr_sector", "verr_expected", "verr_found")}
        d["hist"] = list(_ffi.unpack(q.hist, _lib.BQ_HIST_N))
        d["msg"] = _ffi.string(q.msg).decode(errors="replace")
        return d


class PyEngine:
    """The same loop as ``bq_run`` in pure Python: the reference implementation."""

    def __init__(self, qs: QueueSetup, stop_flag, gens, busy, nonce, ramp_end, end):
        from vscsid.virtio._ring import ffi as wffi, lib as wlib
        self._wlib = wlib
        b, cfg, mem, dq = qs.bench, qs.bench.cfg, qs.bench.mem, qs.dq
        self.fmt = 0 if b.fmt == "scsi" else 1
        self.event_idx = b.event_idx
        self.indirect = b.indirect
        self.qsize = dq.size
        self.mask = dq.size - 1
        self.depth = qs.depth
        self.kick_fd, self.call_fd = dq.kick_fd, dq.call_fd
        dsz = 16 * dq.size
        self.dv = mem.gpa_view(dq.desc_addr, dsz)
        self.av = mem.gpa_view(dq.avail_addr, 6 + 2 * dq.size)
        self.uv = mem.gpa_view(dq.used_addr, 6 + 8 * dq.size)
        self.ap = wffi.from_buffer("uint8_t[]", self.av)
        self.up = wffi.from_buffer("uint8_t[]", self.uv)
        self.used_event_off = 4 + 2 * dq.size
        self.avail_event_off = 4 + 8 * dq.size
        self.hdr_len, self.resp_len, self.bs, self.lbs = b.hdr_len, b.resp_len, cfg.bs, b.lbs
        self.slots: list[Slot] = []
        self.h2s = [-1] * dq.size
        for k, s in enumerate(qs.slots):
            sl = Slot()
            sl.index = k
            sl.head = s["head"]
            sl.hdr_gpa, sl.resp_gpa, sl.data_gpa, sl.table_gpa = s["hdr"], s["resp"], s["data"], s["table"]
            sl.hdr = mem.gpa_view(s["hdr"], b.hdr_len)
            sl.resp = mem.gpa_view(s["resp"], b.resp_len)
            sl.data = mem.gpa_view(s["data"], cfg.bs)
            sl.table = mem.gpa_view(s["table"], 48)
            sl.dir = -1
            sl.inflight = False
            sl.start_ns = sl.blk = sl.gen = sl.is_write = 0
            self.slots.append(sl)
            self.h2s[sl.head] = k
        self.free = list(range(self.depth - 1, -1, -1))
        self.blk_lo, self.blk_hi = qs.blk_lo, qs.blk_hi
        self.rw, self.random, self.rwmixread, self.once = cfg.rw_code, cfg.random, cfg.rwmixread, cfg.once
        import random as _random
        self.rng = _random.Random((cfg.seed * 0x9E3779B97F4A7C15 + qs.qidx + 1) & M64)
        self.verify, self.seed, self.nonce = cfg.verify, cfg.seed, nonce
        self.gens, self.busy = gens, busy
        self.ramp_end_ns, self.end_ns = ramp_end, end
        self.stall_ns = int(cfg.stall_timeout * 1e9)
        self.stop = stop_flag
        self.avail_idx = self.kick_old = qs.avail_idx
        self.last_used = qs.last_used
        self.gen_next = 0
        self.seq_next = qs.blk_lo
        self.rc = 0
        self.reset_stats()

    def close(self) -> None:
        """Drop every view of guest memory (so it can be unmapped)."""
        wffi = __import__("vscsid.virtio._ring", fromlist=["ffi"]).ffi
        for p in (self.ap, self.up):
            wffi.release(p)
        for s in self.slots:
            for v in (s.hdr, s.resp, s.data, s.table):
                v.release()
        for v in (self.dv, self.av, self.uv):
            v.release()
        self.slots = []

    def reset_stats(self) -> None:
        self.st = {k: 0 for k in (
            "ios", "reads", "writes", "bytes", "lat_sum", "lat_max", "errors", "total_ios",
            "submitted", "kicks", "waits", "publishes", "reap_batches", "verify_ok",
            "verify_unwritten", "verify_errors", "win_start_ns", "win_end_ns", "cpu_user_ns0",
            "cpu_sys_ns0", "cpu_user_ns1", "cpu_sys_ns1", "fatal", "err_kind", "err_blk",
            "err_is_write", "err_status", "err_response", "err_residual", "err_sense_key",
            "err_asc", "err_ascq", "verr_reason", "verr_sector", "verr_expected", "verr_found")}
        self.st["lat_min"] = M64
        self.hist = [0] * HIST_N
        self.msg = ""

    def set_window(self, ramp_end: int, end: int) -> None:
        self.ramp_end_ns, self.end_ns = ramp_end, end

    def stats(self) -> dict:
        d = dict(self.st)
        d["hist"] = list(self.hist)
        d["msg"] = self.msg
        return d

    def _fatal(self, msg: str) -> None:
        if not self.st["fatal"]:
            self.st["fatal"] = 1
            self.msg = msg

    # ring helpers
    def _build_chain(self, s: Slot, w: bool) -> None:
        segs = [(s.hdr_gpa, self.hdr_len, 0)]
        if self.fmt == 0:
            if w:
                segs += [(s.data_gpa, self.bs, 0), (s.resp_gpa, self.resp_len, F_WRITE)]
            else:
                segs += [(s.resp_gpa, self.resp_len, F_WRITE), (s.data_gpa, self.bs, F_WRITE)]
        else:
            segs += [(s.data_gpa, self.bs, 0 if w else F_WRITE), (s.resp_gpa, 1, F_WRITE)]
        pack = struct.pack_into
        if self.indirect:
            for i, (a, ln, fl) in enumerate(segs):
                pack("<QIHH", s.table, 16 * i, a, ln, fl | (F_NEXT if i < 2 else 0), i + 1 if i < 2 else 0)
            pack("<QIHH", self.dv, 16 * s.head, s.table_gpa, 48, F_INDIRECT, 0)
        else:
            h = s.head
            for i, (a, ln, fl) in enumerate(segs):
                pack("<QIHH", self.dv, 16 * (h + i), a, ln, fl | (F_NEXT if i < 2 else 0),
                     h + i + 1 if i < 2 else 0)
        s.dir = int(w)

    def _pick(self, s: Slot, mode: int) -> bool:
        rng = self.rng
        if mode == 1:
            while True:
                if self.seq_next >= self.blk_hi:
                    return False
                blk = self.seq_next
                self.seq_next += 1
                g = self.gens[blk]
                if g != 0 and g != GEN_UNKNOWN:
                    break
            w = False
        else:
            w = (rng.randrange(100) >= self.rwmixread) if self.rw == 2 else self.rw == 1
            n = self.blk_hi - self.blk_lo
            if self.random:
                blk = self.blk_lo + rng.randrange(n)
                if self.verify:
                    while self.busy[blk]:
                        blk = self.blk_lo + rng.randrange(n)
            else:
                while True:
                    if self.seq_next >= self.blk_hi:
                        if self.once:
                            return False
                        self.seq_next = self.blk_lo
                    blk = self.seq_next
                    self.seq_next += 1
                    if not self.verify or not self.busy[blk]:
                        break
        s.blk, s.is_write = blk, w
        if self.verify:
            self.busy[blk] = 1
            if w:
                self.gen_next += 1
                s.gen = (self.nonce << 32) | self.gen_next
                s.data[:] = fill_block(self.bs, blk * (self.bs // 512), self.seed, s.gen)
            else:
                g = self.gens[blk]
                s.gen = 0 if g in (0, GEN_UNKNOWN) else (self.nonce << 32) | g
        return True

    def _prep(self, s: Slot) -> None:
        if self.fmt == 0:
            nlb = self.bs // self.lbs
            lba = s.blk * nlb
            if lba + nlb <= 0xFFFFFFFF and nlb <= 0xFFFF:
                cdb = (vs.write10 if s.is_write else vs.read10)(lba, nlb)
            else:
                cdb = (vs.write16 if s.is_write else vs.read16)(lba, nlb)
            s.hdr[19:19 + 16] = cdb + bytes(16 - len(cdb))
            s.resp[10] = 0xFF
            s.resp[11] = 0xFF
        else:
            struct.pack_into("<IIQ", s.hdr, 0, VIRTIO_BLK_T_OUT if s.is_write else VIRTIO_BLK_T_IN, 0,
                             s.blk * (self.bs // 512))
            s.resp[0] = 0xFF
        if s.dir != int(s.is_write):
            self._build_chain(s, s.is_write)

    def _record_error(self, s: Slot, kind: int) -> None:
        st = self.st
        st["errors"] += 1
        if st["err_kind"]:
            return
        st["err_kind"], st["err_blk"], st["err_is_write"] = kind, s.blk, int(s.is_write)
        if self.fmt == 0:
            r = vs.parse_cmd_resp(s.resp, self.resp_len - 12)
            st["err_status"], st["err_response"], st["err_residual"] = r.status, r.response, r.residual
            si = r.sense_key()
            st["err_sense_key"], st["err_asc"], st["err_ascq"] = (si.key, si.asc, si.ascq) if si else (-1, -1, -1)
        else:
            st["err_status"] = s.resp[0]

    def _complete(self, s: Slot, t: int) -> None:
        st = self.st
        bad = 0
        if self.fmt == 0:
            r = s.resp
            if r[11]:
                bad = 1
            elif r[10]:
                bad = 2
            elif struct.unpack_from("<I", r, 4)[0]:
                bad = 3
        elif s.resp[0]:
            bad = 4
        if bad:
            self._record_error(s, bad)
        if self.verify:
            blk = s.blk
            if s.is_write:
                self.gens[blk] = GEN_UNKNOWN if bad else s.gen & 0xFFFFFFFF
            elif not bad:
                rc, sector, found = check_block(s.data, blk * (self.bs // 512), self.seed, s.gen)
                if rc == 0:
                    st["verify_ok"] += 1
                elif rc == 1:
                    st["verify_unwritten"] += 1
                else:
                    st["verify_errors"] += 1
                    if not st["verr_reason"]:
                        st["verr_reason"], st["verr_sector"] = rc, sector
                        st["verr_expected"], st["verr_found"] = s.gen, found
                    self._record_error(s, 5)
            self.busy[blk] = 0
        st["total_ios"] += 1
        if self.ramp_end_ns <= t < self.end_ns:
            lat = t - s.start_ns
            st["ios"] += 1
            st["bytes"] += self.bs
            st["writes" if s.is_write else "reads"] += 1
            st["lat_sum"] += lat
            if lat < st["lat_min"]:
                st["lat_min"] = lat
            if lat > st["lat_max"]:
                st["lat_max"] = lat
            self.hist[hist_index(lat)] += 1

    def _reap(self) -> int:
        wl = self._wlib
        uidx = wl.vq_load_u16(self.up, 2)
        last = self.last_used
        n = (uidx - last) & 0xFFFF
        if n == 0:
            return 0
        if n > self.depth - len(self.free):
            self._fatal(f"used->idx moved by {n} but only {self.depth - len(self.free)} requests are in flight")
            return -1
        t = time.monotonic_ns()
        for k in range(n):
            hid = struct.unpack_from("<I", self.uv, 4 + 8 * ((last + k) & self.mask))[0]
            si = self.h2s[hid] if hid < self.qsize else -1
            if si < 0 or not self.slots[si].inflight:
                self.last_used = (last + k) & 0xFFFF
                self._fatal(f"used element id {hid} is not an in-flight chain head")
                return -1
            s = self.slots[si]
            s.inflight = False
            self._complete(s, t)
            self.free.append(si)
        self.last_used = uidx
        self.st["reap_batches"] += 1
        if self.event_idx:
            struct.pack_into("<H", self.av, self.used_event_off, (uidx - 1) & 0xFFFF)
        return n

    def _publish_and_kick(self) -> None:
        wl = self._wlib
        new = self.avail_idx
        wl.vq_store_u16(self.ap, 2, new)          # release
        self.st["publishes"] += 1
        wl.vq_mb()
        old, self.kick_old = self.kick_old, new
        if self.event_idx:
            ev = wl.vq_load_u16(self.up, self.avail_event_off)
            need = ((new - ev - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        else:
            need = not (wl.vq_load_u16(self.up, 0) & USED_F_NO_NOTIFY)
        if need:
            os.eventfd_write(self.kick_fd, 1)
            self.st["kicks"] += 1

    def _cb_disable(self) -> None:
        if self.event_idx:
            struct.pack_into("<H", self.av, self.used_event_off, (self.last_used - 1) & 0xFFFF)
        else:
            struct.pack_into("<H", self.av, 0, AVAIL_F_NO_INTERRUPT)

    def _wait(self, timeout_ms: int) -> None:
        wl = self._wlib
        if self.event_idx:
            struct.pack_into("<H", self.av, self.used_event_off, self.last_used)
        else:
            struct.pack_into("<H", self.av, 0, 0)
        wl.vq_mb()
        if wl.vq_load_u16(self.up, 2) != self.last_used:
            self._cb_disable()
            return
        self.st["waits"] += 1
        r, _, _ = select.select([self.call_fd], [], [], timeout_ms / 1000)
        if r:
            try:
                os.eventfd_read(self.call_fd)
            except BlockingIOError:
                pass
        self._cb_disable()

    def run(self, mode: int) -> None:
        st = self.st
        submitting, in_window = True, 0
        if mode == 1:
            self.seq_next = self.blk_lo
            self.ramp_end_ns, self.end_ns = 0, M64
        self._cb_disable()
        now = last_progress = time.monotonic_ns()
        while True:
            if self.stop[0]:
                submitting = False
            reaped = self._reap()
            if reaped < 0:
                self.rc = -1
                break
            now = time.monotonic_ns()
            if not in_window and now >= self.ramp_end_ns:
                in_window = 1
                st["win_start_ns"] = now
                st["cpu_user_ns0"], st["cpu_sys_ns0"] = _thread_cpu_ns()
            if in_window == 1 and now >= self.end_ns:
                in_window = 2
                st["win_end_ns"] = now
                st["cpu_user_ns1"], st["cpu_sys_ns1"] = _thread_cpu_ns()
                submitting = False
            added = 0
            if submitting:
                while self.free:
                    s = self.slots[self.free[-1]]
                    if not self._pick(s, mode):
                        submitting = False
                        break
                    self.free.pop()
                    self._prep(s)
                    s.start_ns = now
                    s.inflight = True
                    struct.pack_into("<H", self.av, 4 + 2 * (self.avail_idx & self.mask), s.head)
                    self.avail_idx = (self.avail_idx + 1) & 0xFFFF
                    added += 1
                if added:
                    st["submitted"] += added
                    self._publish_and_kick()
            if len(self.free) == self.depth and not submitting:
                break
            if reaped or added:
                last_progress = now
                continue
            if now - last_progress > self.stall_ns:
                self._fatal(f"no completion for {(now - last_progress) / 1e9:.1f} s with "
                            f"{self.depth - len(self.free)} requests in flight")
                self.rc = -1
                break
            self._wait(100)
        now = time.monotonic_ns()
        if in_window == 1:
            st["win_end_ns"] = now
            st["cpu_user_ns1"], st["cpu_sys_ns1"] = _thread_cpu_ns()
        elif in_window == 0:
            st["win_start_ns"] = st["win_end_ns"] = now


# ------------------------------------------------------------------------ the bench
class Bench:
    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.fmt = cfg.format
        self.mem: FrontendMemory | None = None
        self.fe: VhostUserFrontend | None = None
        self.queues: list[QueueSetup] = []
        self.aux: list[DriverQueue] = []
        self.device: dict[str, Any] = {}
        self.event_idx = cfg.event_idx
        self.indirect = False
        self.cdb_size = vs.VIRTIO_SCSI_CDB_DEFAULT_SIZE
        self.sense_size = vs.VIRTIO_SCSI_SENSE_DEFAULT_SIZE
        self.lbs = 512
        self.capacity = 0
        self._dev_threads: list[threading.Thread] = []
        self._devs: list = []
        self._eventfds: list[int] = []

    # -- sizing ---------------------------------------------------------------
    def _mem_size(self) -> int:
        cfg = self.cfg
        qs = cfg.queue_size
        ring = _align_up(16 * qs + 6 + 2 * qs, 4096) + _align_up(6 + 8 * qs, 4096) + 4096
        per_q = ring + cfg.iodepth * (_align_up(cfg.bs, 4096) + 512) + 8192
        total = (cfg.queues + 2) * per_q + (1 << 20)
        return _align_up(total, 2 << 20)

    # -- setup ----------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.mem = FrontendMemory(self._mem_size(), name="vscsid-bench")
        if self.fmt == "scsi":
            self.hdr_len = vs.CMD_REQ_HDR_SIZE + self.cdb_size
            self.resp_len = vs.CMD_RESP_HDR_SIZE + self.sense_size
        else:
            self.hdr_len, self.resp_len = 16, 1
        if cfg.loopback:
            self._setup_loopback()
        elif self.fmt == "scsi":
            self._setup_scsi()
        else:
            self._setup_blk()

    def _choose_indirect(self, offered: bool) -> None:
        cfg = self.cfg
        fits = 3 * cfg.iodepth <= cfg.queue_size
        if cfg.indirect == "on":
            if not offered:
                raise BenchError("--indirect on, but the back end does not offer VIRTIO_RING_F_INDIRECT_DESC",
                                 EXIT_USAGE)
            self.indirect = True
        elif cfg.indirect == "off":
            if not fits:
                raise BenchError(f"--iodepth {cfg.iodepth} needs {3 * cfg.iodepth} descriptors; "
                                 f"--queue-size is {cfg.queue_size} (use indirect descriptors)", EXIT_USAGE)
            self.indirect = False
        else:
            if not fits and not offered:
                raise BenchError(f"--iodepth {cfg.iodepth} needs {3 * cfg.iodepth} descriptors but "
                                 f"--queue-size is {cfg.queue_size} and INDIRECT_DESC is not offered",
                                 EXIT_USAGE)
            self.indirect = not fits

    def _features(self, extra: int = 0) -> int:
        f = feature_mask(VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, VHOST_USER_F_PROTOCOL_FEATURES) | extra
        if self.cfg.event_idx:
            f |= 1 << VIRTIO_RING_F_EVENT_IDX
        return f

    def _connect(self, extra_features: int = 0) -> VhostUserFrontend:
        try:
            fe = VhostUserFrontend(self.cfg.socket_path, connect_timeout=10.0)
        except OSError as e:
            raise BenchError(f"cannot connect to {self.cfg.socket_path}: {e}") from None
        self.fe = fe
        fe.negotiate(features=self._features(extra_features),
                     protocol=feature_mask(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK,
                                           ProtocolFeature.CONFIG))
        if not fe.features & (1 << VIRTIO_F_VERSION_1):
            raise BenchError("the back end does not offer VIRTIO_F_VERSION_1")
        self.event_idx = fe.event_idx
        self._choose_indirect(bool(fe.features & (1 << VIRTIO_RING_F_INDIRECT_DESC)))
        fe.set_mem_table(self.mem)
        self.device.update(backend_features=hex(fe.backend_features), features=hex(fe.features),
                           protocol_features=hex(fe.protocol_features),
                           backend_queue_num=fe.queue_num)
        return fe

    def _new_ring(self, index: int) -> DriverQueue:
        dq = DriverQueue(self.mem, self.cfg.queue_size, event_idx=self.event_idx)
        self.fe.setup_queue(index, dq)
        return dq

    def _partition(self) -> list[tuple[int, int]]:
        cfg = self.cfg
        size = cfg.size if cfg.size is not None else self.capacity
        if size > self.capacity:
            raise BenchError(f"--size {size} exceeds the capacity {self.capacity}", EXIT_USAGE)
        nblocks = size // cfg.bs
        self.region_bytes = nblocks * cfg.bs
        if nblocks < cfg.queues:
            raise BenchError(f"the region ({size} bytes) holds fewer than {cfg.queues} blocks of {cfg.bs}",
                             EXIT_USAGE)
        self.nblocks = nblocks
        parts = [(q * nblocks // cfg.queues, (q + 1) * nblocks // cfg.queues) for q in range(cfg.queues)]
        if cfg.verify:
            if nblocks > 1 << 24:
                raise BenchError("--verify tracks every block: limit the region with --size "
                                 f"(at most {1 << 24} blocks of --bs)", EXIT_USAGE)
            small = min(hi - lo for lo, hi in parts)
            if small <= cfg.iodepth:
                raise BenchError(f"--verify needs more than --iodepth ({cfg.iodepth}) blocks per queue; "
                                 f"the region gives {small}", EXIT_USAGE)
        return parts

    def _setup_scsi(self) -> None:
        cfg = self.cfg
        fe = self._connect()
        if fe.protocol_features & (1 << ProtocolFeature.CONFIG):
            sc = vs.parse_config(fe.get_config(0, vs.CONFIG_SIZE))
            self.device["scsi_config"] = sc._asdict()
            if sc.cdb_size:
                self.cdb_size = sc.cdb_size
            if sc.sense_size:
                self.sense_size = sc.sense_size
            self.hdr_len = vs.CMD_REQ_HDR_SIZE + self.cdb_size
            self.resp_len = vs.CMD_RESP_HDR_SIZE + self.sense_size
            nq = sc.num_queues
        else:
            nq = max(0, fe.queue_num - 2)
        if nq and cfg.queues > nq:
            raise BenchError(f"--queues {cfg.queues}: the back end has {nq} request queues", EXIT_USAGE)
        ctl = self._new_ring(0)
        evq = self._new_ring(1)
        self.aux += [ctl, evq]
        vs.ScsiRequestBuilder(evq, self.mem).post_events(4)
        evq.publish_and_kick()
        rings = [self._new_ring(2 + q) for q in range(cfg.queues)]
        # Identify the LUN on the first request queue (Python, before the C loop owns it).
        b = vs.ScsiRequestBuilder(rings[0], self.mem, cdb_size=self.cdb_size, sense_size=self.sense_size)
        for attempt in range(10):
            h = self._command(b, rings[0], vs.test_unit_ready())
            if h.response.ok:
                break
            si = h.response.sense_key()
            if h.response.response != vs.VIRTIO_SCSI_S_OK or si is None or si.key != 6:
                raise BenchError(f"TEST UNIT READY on LUN {cfg.lun} failed: response "
                                 f"{h.response.response_name}, status 0x{h.response.status:02x}, sense {si}")
        else:
            raise BenchError(f"LUN {cfg.lun} keeps reporting UNIT ATTENTION")
        h = self._command(b, rings[0], vs.read_capacity16(), data_in_len=32)
        if not h.response.ok:
            raise BenchError(f"READ CAPACITY(16) failed: {h.response}")
        last_lba, lbs = vs.parse_read_capacity16(h.data_in)
        self.lbs = lbs
        self.capacity = (last_lba + 1) * lbs
        if cfg.bs % lbs:
            raise BenchError(f"--bs {cfg.bs} is not a multiple of the LUN's block size {lbs}", EXIT_USAGE)
        h = self._command(b, rings[0], vs.inquiry(alloc_len=36), data_in_len=36)
        if h.response.ok and len(h.data_in) >= 32:
            self.device["inquiry"] = (h.data_in[8:16].decode(errors="replace").strip() + " "
                                      + h.data_in[16:32].decode(errors="replace").strip())
        self._make_queues(rings, [2 + q for q in range(cfg.queues)])

    def _command(self, b, q: DriverQueue, cdb: bytes, data_in_len: int = 0):
        h = b.command(cdb, lun=self.cfg.lun, data_in_len=data_in_len, publish=True)
        if q.kick_needed():
            q.kick()
        deadline = time.monotonic() + 10
        while not h.done:
            b.reap()
            if h.done:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"no answer to CDB {cdb.hex()} within 10 s")
            q.wait_call(0.5)
        return h

    def _setup_blk(self) -> None:
        cfg = self.cfg
        extra = feature_mask(VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE,
                             VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_MQ)
        fe = self._connect(extra)
        if not fe.protocol_features & (1 << ProtocolFeature.CONFIG):
            raise BenchError("the back end does not offer VHOST_USER_PROTOCOL_F_CONFIG (needed for the capacity)")
        conf = fe.get_config(0, 36)
        (capacity_sectors,) = struct.unpack_from("<Q", conf, 0)
        self.capacity = capacity_sectors * 512
        blk_size = struct.unpack_from("<I", conf, 20)[0] if fe.features & (1 << VIRTIO_BLK_F_BLK_SIZE) else 512
        nq = struct.unpack_from("<H", conf, 34)[0] if fe.features & (1 << VIRTIO_BLK_F_MQ) else 1
        self.device.update(capacity_sectors=capacity_sectors, blk_size=blk_size, num_queues=nq)
        if cfg.queues > nq:
            raise BenchError(f"--queues {cfg.queues}: the back end has {nq} queue(s)"
                             + ("" if fe.features & (1 << VIRTIO_BLK_F_MQ) else " (no VIRTIO_BLK_F_MQ)"),
                             EXIT_USAGE)
        if blk_size and cfg.bs % blk_size:
            raise BenchError(f"--bs {cfg.bs} is not a multiple of the device block size {blk_size}", EXIT_USAGE)
        self.lbs = 512
        rings = [self._new_ring(q) for q in range(cfg.queues)]
        self._make_queues(rings, list(range(cfg.queues)))

    def _setup_loopback(self) -> None:
        cfg = self.cfg
        self._choose_indirect(True)
        self.capacity = cfg.size if cfg.size is not None else 1 << 30
        self.lbs = 512
        rings = []
        for q in range(cfg.queues):
            dq = DriverQueue(self.mem, cfg.queue_size, event_idx=self.event_idx)
            dq.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            dq.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._eventfds += [dq.kick_fd, dq.call_fd]
            rings.append(dq)
        bcpus, dcpus = self._loopback_cpus()
        self.device.update(loopback=True, bench_cpus=sorted(bcpus) if bcpus else None,
                           device_cpus=sorted(dcpus) if dcpus else None)
        self._make_queues(rings, list(range(cfg.queues)))

    def _make_queues(self, rings: list[DriverQueue], indices: list[int]) -> None:
        parts = self._partition()
        for q, (dq, idx, (lo, hi)) in enumerate(zip(rings, indices, parts)):
            self.queues.append(QueueSetup(self, q, idx, dq, lo, hi))
        self.device.update(capacity_bytes=self.capacity, logical_block_size=self.lbs,
                           event_idx=self.event_idx, indirect=self.indirect)

    def _loopback_cpus(self) -> tuple[set[int] | None, set[int] | None]:
        """(bench threads, device threads) CPU sets: disjoint halves when there are >= 2 CPUs,
        so a spinning device never sits on the bench's CPU."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return None, None
        half = len(cpus) // 2
        return set(cpus[:half]), set(cpus[half:])

    def _loopback_thread(self, d) -> None:
        cpus = self._loopback_cpus()[1]
        if cpus:
            os.sched_setaffinity(0, cpus)      # this thread only
        _lib.bq_loopback(d)

    def _start_loopback_devices(self, stop) -> None:
        region = self.mem.regions[0]
        for qs in self.queues:
            dq = qs.dq
            d = _ffi.new("struct bq_dev *")
            d.format = 0 if self.fmt == "scsi" else 1
            d.event_idx = int(self.event_idx)
            d.qsize = dq.size
            d.desc = _ffi.cast("uint8_t *", dq.desc_uva)
            d.avail = _ffi.cast("uint8_t *", dq.avail_uva)
            d.used = _ffi.cast("uint8_t *", dq.used_uva)
            d.kick_fd, d.call_fd = dq.kick_fd, dq.call_fd
            d.gpa_base = region.gpa
            d.host_base = _ffi.cast("uint8_t *", region.user_addr)
            d.mem_size = region.size
            d.spin_ns = 50_000
            d.stop = stop
            d.last_avail = dq.avail_idx
            d.used_idx = dq.last_used
            self._devs.append(d)
            t = threading.Thread(target=self._loopback_thread, args=(d,), name=f"loopback-{qs.qidx}",
                                 daemon=True)
            t.start()
            self._dev_threads.append(t)

    # -- run -----------------------------------------------------------------
    def _run_phase(self, engines, mode: int, stop, main_sample=None) -> None:
        pin = self._loopback_cpus()[0] if self.cfg.loopback else None

        def body(e):
            if pin:
                os.sched_setaffinity(0, pin)       # this thread only
            e.run(mode)

        threads = [threading.Thread(target=body, args=(e,), name=f"bench-q{i}", daemon=True)
                   for i, e in enumerate(engines)]
        for t in threads:
            t.start()
        try:
            if main_sample is not None:
                main_sample(threads)
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            stop[0] = 1
            for t in threads:
                t.join()
            raise

    def run(self) -> dict:
        cfg = self.cfg
        use_c = cfg.engine == "c"
        if use_c:
            stop = _ffi.new("int32_t *")
            dev_stop = _ffi.new("int32_t *")
        else:
            stop = [0]
            dev_stop = None
        nonce = int.from_bytes(os.urandom(4), "little") or 1
        gens = busy = None
        if cfg.verify:
            if use_c:
                gens = _ffi.new("uint32_t[]", self.nblocks)
                busy = _ffi.new("uint8_t[]", self.nblocks)
            else:
                gens = array("I", bytes(4 * self.nblocks))
                busy = bytearray(self.nblocks)
        if cfg.loopback:
            if dev_stop is None:
                dev_stop = _ffi.new("int32_t *")
            self._start_loopback_devices(dev_stop)

        engines = []
        for qs in self.queues:
            mk = qs.make_c if use_c else qs.make_py
            engines.append(mk(stop, gens, busy, nonce, 0, 0))
        # The clock starts now: I/Os issued during the ramp are excluded, and with --ramp 0
        # every I/O counts.
        ramp_end = time.monotonic_ns() + int(cfg.ramp * 1e9)
        end = ramp_end + int(cfg.seconds * 1e9)
        for e in engines:
            e.set_window(ramp_end, end)

        samples: dict[str, Any] = {}

        def sleep_until(t_ns: int, threads) -> None:
            while True:
                d = t_ns - time.monotonic_ns()
                if d <= 0 or not any(t.is_alive() for t in threads):
                    return
                time.sleep(min(d / 1e9, 0.05))

        def sample(tag: str) -> None:
            # the /proc scan for the daemon's CPU is kept outside the bench's own window
            if cfg.daemon_pids and tag == "0":
                samples["daemon_0"] = tree_cpu_seconds(cfg.daemon_pids)
            if tag == "0":
                samples["sys_0"] = system_busy_seconds()
            samples[f"self_{tag}"] = resource.getrusage(resource.RUSAGE_SELF)
            samples[f"main_{tag}"] = _thread_cpu_ns()
            samples[f"t_{tag}"] = time.monotonic_ns()
            if tag == "1":
                samples["sys_1"] = system_busy_seconds()
            if cfg.daemon_pids and tag == "1":
                samples["daemon_1"] = tree_cpu_seconds(cfg.daemon_pids)

        def main_sample(threads) -> None:
            sleep_until(ramp_end, threads)
            sample("0")
            sleep_until(end, threads)     # returns early when the queues finish (--once)
            sample("1")

        try:
            self._run_phase(engines, 0, stop, main_sample)
            timed = [e.stats() for e in engines]
            readback = None
            if cfg.verify and not any(s["fatal"] for s in timed) and not stop[0] \
                    and any(s["writes"] or s["total_ios"] for s in timed) and cfg.rw_code != 0:
                for e in engines:
                    e.reset_stats()
                t = time.monotonic_ns()
                self._run_phase(engines, 1, stop)
                readback = [e.stats() for e in engines]
                readback_s = (time.monotonic_ns() - t) / 1e9
        finally:
            if dev_stop is not None:
                dev_stop[0] = 1
                for t in self._dev_threads:
                    t.join(2)
        res = self._results(timed, samples)
        if cfg.verify:
            v = res["verify"] = {
                "seed": cfg.seed, "nonce": nonce,
                "timed_reads_ok": sum(s["verify_ok"] for s in timed),
                "timed_reads_unwritten": sum(s["verify_unwritten"] for s in timed),
                "timed_errors": sum(s["verify_errors"] for s in timed),
            }
            if use_c:
                written = sum(1 for i in range(self.nblocks) if gens[i] not in (0, GEN_UNKNOWN))
            else:
                written = sum(1 for g in gens if g not in (0, GEN_UNKNOWN))
            v["blocks_written"] = written
            if readback is not None:
                v["readback_ok"] = sum(s["verify_ok"] for s in readback)
                v["readback_errors"] = sum(s["errors"] for s in readback)
                v["readback_seconds"] = round(readback_s, 3)
                res["errors"] += v["readback_errors"]
                fe_ = next((s for s in readback if s["err_kind"]), None)
                if fe_ and not res["first_error"]:
                    res["first_error"] = self._first_error(fe_, "readback")
                fatal = next((s["msg"] for s in readback if s["fatal"]), None)
                if fatal and not res["fatal"]:
                    res["fatal"] = fatal
            v["ok"] = (res["errors"] == 0 and not res["fatal"]
                       and (readback is None or v["readback_ok"] == written))
        if stop[0]:
            res["interrupted"] = True
        return res

    # -- results -------------------------------------------------------------
    def _first_error(self, s: dict, phase: str) -> dict:
        kinds = {1: "virtio-scsi response", 2: "SCSI status", 3: "residual", 4: "virtio-blk status",
                 5: "verify"}
        e = {"phase": phase, "kind": kinds.get(s["err_kind"], str(s["err_kind"])),
             "op": "write" if s["err_is_write"] else "read",
             "offset": s["err_blk"] * self.cfg.bs, "status": s["err_status"]}
        if self.fmt == "scsi":
            e.update(response=vs.RESPONSE_NAMES.get(s["err_response"], s["err_response"]),
                     residual=s["err_residual"])
            if s["err_sense_key"] >= 0 and s["err_kind"] == 2:
                e["sense"] = {"key": s["err_sense_key"], "asc": s["err_asc"], "ascq": s["err_ascq"]}
        if s["err_kind"] == 5:
            e.update(reason=VERIFY_REASONS.get(s["verr_reason"], s["verr_reason"]),
                     sector=s["verr_sector"], expected_gen=hex(s["verr_expected"]),
                     found_gen=hex(s["verr_found"]))
        return e

    def _results(self, stats: list[dict], samples: dict) -> dict:
        cfg = self.cfg
        hist = [0] * HIST_N
        for s in stats:
            for i, c in enumerate(s["hist"]):
                if c:
                    hist[i] += c
        ios = sum(s["ios"] for s in stats)
        lat_min = min((s["lat_min"] for s in stats if s["ios"]), default=0)
        lat_max = max((s["lat_max"] for s in stats), default=0)
        lat_sum = sum(s["lat_sum"] for s in stats)
        if "t_0" in samples and "t_1" in samples:
            seconds = (samples["t_1"] - samples["t_0"]) / 1e9
        else:
            seconds = cfg.seconds
        # per-queue windows are exact; use their mean length for the rate
        wins = [(s["win_end_ns"] - s["win_start_ns"]) / 1e9 for s in stats if s["win_end_ns"] > s["win_start_ns"]]
        if wins:
            seconds = sum(wins) / len(wins)
        thread_cpu = sum((s["cpu_user_ns1"] - s["cpu_user_ns0"]) + (s["cpu_sys_ns1"] - s["cpu_sys_ns0"])
                         for s in stats) / 1e9
        thread_user = sum(s["cpu_user_ns1"] - s["cpu_user_ns0"] for s in stats) / 1e9
        main_cpu = 0.0
        if "main_0" in samples and "main_1" in samples:
            main_cpu = (sum(samples["main_1"]) - sum(samples["main_0"])) / 1e9
        cpu = thread_cpu + main_cpu
        pct = {p: percentile(hist, ios, p, lat_min, lat_max) for p in (50, 90, 99, 99.9)}
        res: dict[str, Any] = {
            "tool": "vscsid-bench",
            "config": {**{k: v for k, v in asdict(self.cfg).items() if k != "daemon_pids"},
                       "bs_human": _fmt_size(cfg.bs),
                       "size": self.region_bytes},
            "device": dict(self.device, format=self.fmt),
            "engine": cfg.engine,
            "iops": ios / seconds if seconds > 0 else 0.0,
            "bw_bytes": sum(s["bytes"] for s in stats) / seconds if seconds > 0 else 0.0,
            "ios": ios,
            "reads": sum(s["reads"] for s in stats),
            "writes": sum(s["writes"] for s in stats),
            "seconds": seconds,
            "lat_ns": {"min": lat_min, "mean": lat_sum / ios if ios else 0.0,
                       "p50": pct[50], "p90": pct[90], "p99": pct[99], "p99.9": pct[99.9],
                       "max": lat_max},
            "errors": sum(s["errors"] for s in stats),
            "first_error": None,
            "fatal": next((s["msg"] for s in stats if s["fatal"]), None),
            "cpu_seconds": cpu,
            "cpu_user_seconds": thread_user + ((samples["main_1"][0] - samples["main_0"][0]) / 1e9
                                               if "main_0" in samples else 0.0),
            "cpu_us_per_io": cpu * 1e6 / ios if ios else None,
            "cpu_util": cpu / seconds if seconds > 0 else 0.0,
            "total_ios": sum(s["total_ios"] for s in stats),
            "kicks_per_io": sum(s["kicks"] for s in stats) / max(1, sum(s["submitted"] for s in stats)),
            "waits_per_io": sum(s["waits"] for s in stats) / max(1, sum(s["total_ios"] for s in stats)),
            "ios_per_reap": sum(s["total_ios"] for s in stats) / max(1, sum(s["reap_batches"] for s in stats)),
            "per_queue": [{
                "queue": i, "ring": qs.ring_index, "ios": s["ios"],
                "iops": s["ios"] / ((s["win_end_ns"] - s["win_start_ns"]) / 1e9)
                if s["win_end_ns"] > s["win_start_ns"] else 0.0,
                "cpu_seconds": ((s["cpu_user_ns1"] - s["cpu_user_ns0"])
                                + (s["cpu_sys_ns1"] - s["cpu_sys_ns0"])) / 1e9,
                "kicks": s["kicks"], "waits": s["waits"], "submitted": s["submitted"],
                "errors": s["errors"]} for i, (qs, s) in enumerate(zip(self.queues, stats))],
        }
        if "self_0" in samples and "self_1" in samples:
            a, b = samples["self_0"], samples["self_1"]
            res["process_cpu_seconds"] = (b.ru_utime - a.ru_utime) + (b.ru_stime - a.ru_stime)
        if cfg.daemon_pids and "daemon_0" in samples and "daemon_1" in samples:
            d = samples["daemon_1"] - samples["daemon_0"]
            res["daemon_cpu_seconds"] = d
            res["daemon_cpu_us_per_io"] = d * 1e6 / ios if ios else None
            res["daemon_pids"] = cfg.daemon_pids
        if "sys_0" in samples and "sys_1" in samples:
            # Everything else the machine ran meanwhile (other processes, interrupts): a noisy
            # neighbour shows up here. Tick-based (1/CLK_TCK s) like the daemon's figure.
            busy = samples["sys_1"][0] - samples["sys_0"][0]
            res["system_busy_cpu_seconds"] = busy
            res["steal_cpu_seconds"] = samples["sys_1"][1] - samples["sys_0"][1]
            res["other_cpu_seconds"] = max(0.0, busy - res.get("process_cpu_seconds", cpu)
                                           - res.get("daemon_cpu_seconds", 0.0))
        first = next((s for s in stats if s["err_kind"]), None)
        if first:
            res["first_error"] = self._first_error(first, "timed")
        return res

    # -- teardown --------------------------------------------------------------
    def close(self) -> None:
        if self.fe is not None:
            self.fe.close()
            self.fe = None
        for fd in self._eventfds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._eventfds = []
        for qs in self.queues:
            if isinstance(qs.engine, PyEngine):
                qs.engine.close()
            qs.engine = None
            qs.dq.close()
        for dq in self.aux:
            dq.close()
        self.queues = []
        self.aux = []
        if self.mem is not None:
            self.mem.close()
            self.mem = None


def run(cfg: BenchConfig) -> dict:
    """Run one benchmark; returns the result dict (see ``--json``)."""
    cfg.validate()
    bench = Bench(cfg)
    try:
        bench.setup()
        return bench.run()
    finally:
        bench.close()


# ------------------------------------------------------------------------ output
def _fmt_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f}ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f}us"
    return f"{ns:.0f}ns"


def summary(res: dict) -> str:
    c = res["config"]
    lat = res["lat_ns"]
    lines = [
        f"vscsid-bench: {c['format']} {c['rw']}"
        + (f" (rwmixread={c['rwmixread']})" if c["rw"] in ("randrw", "rw") else "")
        + f" bs={c['bs_human']} iodepth={c['iodepth']} queues={c['queues']} engine={res['engine']}"
        + (" verify" if c["verify"] else ""),
        f"  device: {res['device'].get('inquiry', '')} capacity={res['device'].get('capacity_bytes')} "
        f"region={c['size']} event_idx={res['device'].get('event_idx')} indirect={res['device'].get('indirect')}",
        f"  iops={res['iops']:,.0f}  bw={res['bw_bytes'] / 2**20:,.1f} MiB/s  ios={res['ios']} "
        f"in {res['seconds']:.2f}s (ramp {c['ramp']}s excluded)",
        f"  lat: min={_fmt_ns(lat['min'])} mean={_fmt_ns(lat['mean'])} p50={_fmt_ns(lat['p50'])} "
        f"p90={_fmt_ns(lat['p90'])} p99={_fmt_ns(lat['p99'])} p99.9={_fmt_ns(lat['p99.9'])} "
        f"max={_fmt_ns(lat['max'])}",
        f"  bench cpu: {res['cpu_seconds']:.3f}s ({100 * res['cpu_util']:.0f}% of a core), "
        + (f"{res['cpu_us_per_io']:.2f} us/io" if res["cpu_us_per_io"] else "-")
        + f"; kicks/io={res['kicks_per_io']:.3f} waits/io={res['waits_per_io']:.3f}",
    ]
    if "daemon_cpu_seconds" in res:
        per = res["daemon_cpu_us_per_io"]
        lines.append(f"  daemon cpu: {res['daemon_cpu_seconds']:.2f}s"
                     + (f", {per:.2f} us/io" if per else ""))
    if "other_cpu_seconds" in res:
        lines.append(f"  machine: {res['system_busy_cpu_seconds']:.2f} CPU-s busy in the window, "
                     f"{res['other_cpu_seconds']:.2f} CPU-s of it neither bench nor daemon"
                     + ("" if "daemon_cpu_seconds" in res else " (no --daemon-pid given)"))
    if "verify" in res:
        lines.append("  verify: " + ", ".join(f"{k}={v}" for k, v in res["verify"].items()))
    lines.append(f"  errors: {res['errors']}")
    if res["first_error"]:
        lines.append(f"  first error: {res['first_error']}")
    if res["fatal"]:
        lines.append(f"  FATAL: {res['fatal']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vscsid-bench",
        description="Load generator for vhost-user storage back ends (virtio-scsi: vscsid; "
                    "virtio-blk: e.g. qemu-storage-daemon). Plays QEMU and the guest driver; "
                    "no VM needed.")
    p.add_argument("--socket-path", help="the back end's vhost-user unix socket")
    p.add_argument("--format", choices=("scsi", "blk"), default="scsi",
                   help="virtio-scsi (request queues from 2) or virtio-blk (from 0); default scsi")
    p.add_argument("--rw", choices=RW_MODES, default="randread", help="I/O pattern (default randread)")
    p.add_argument("--rwmixread", type=int, default=50, metavar="PCT",
                   help="percentage of reads for randrw/rw (default 50)")
    p.add_argument("--bs", default="4k", help="block size, e.g. 4k, 64k (default 4k)")
    p.add_argument("--iodepth", type=int, default=1, help="requests in flight per queue (default 1)")
    p.add_argument("--queues", type=int, default=1, help="request queues, one thread each (default 1)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured duration (default 5)")
    p.add_argument("--ramp", type=float, default=1.0, help="warm-up seconds excluded from stats (default 1)")
    p.add_argument("--lun", type=int, default=0, help="SCSI LUN (default 0)")
    p.add_argument("--size", help="bytes of the disk to use from offset 0 (default: all of it)")
    p.add_argument("--queue-size", type=int, default=128, help="virtqueue size (default 128)")
    p.add_argument("--indirect", choices=("auto", "on", "off"), default="auto",
                   help="indirect descriptors: auto = only when 3*iodepth > queue size (default)")
    p.add_argument("--no-event-idx", action="store_true", help="do not negotiate VIRTIO_RING_F_EVENT_IDX")
    p.add_argument("--verify", action="store_true",
                   help="write a checkable pattern (header per 512-byte sector: magic, sector, seed, "
                        "generation), check every read and finally read back every block written")
    p.add_argument("--seed", type=int, default=1, help="pattern and LBA sequence seed (default 1)")
    p.add_argument("--once", action="store_true",
                   help="sequential patterns stop after one pass over the region (e.g. to fill it)")
    p.add_argument("--engine", choices=("c", "python"), default="c",
                   help="c (default) or python (slow reference implementation)")
    p.add_argument("--spin-us", type=int, default=0,
                   help="poll the used ring this long before sleeping on the call eventfd (default 0)")
    p.add_argument("--stall-timeout", type=float, default=30.0,
                   help="fail if nothing completes for this long (default 30 s)")
    p.add_argument("--loopback", action="store_true",
                   help="no back end: an in-process C device completes every request at once "
                        "(measures the generator's own ceiling)")
    p.add_argument("--daemon-pid", type=int, action="append", default=[], metavar="PID",
                   help="also report the CPU time of PID and its descendants during the window "
                        "(repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    try:
        bs = parse_size(args.bs)
        size = parse_size(args.size) if args.size is not None else None
    except ValueError as e:
        raise BenchError(str(e), EXIT_USAGE) from None
    return BenchConfig(socket_path=args.socket_path, format=args.format, rw=args.rw,
                       rwmixread=args.rwmixread, bs=bs, iodepth=args.iodepth, queues=args.queues,
                       seconds=args.seconds, ramp=args.ramp, lun=args.lun, size=size,
                       queue_size=args.queue_size, indirect=args.indirect,
                       event_idx=not args.no_event_idx, verify=args.verify, seed=args.seed,
                       once=args.once, engine=args.engine, spin_us=args.spin_us,
                       stall_timeout=args.stall_timeout, loopback=args.loopback,
                       daemon_pids=list(args.daemon_pid))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        res = run(cfg)
    except BenchError as e:
        if args.json:
            print(json.dumps({"tool": "vscsid-bench", "fatal": str(e), "errors": 0}))
        print(f"vscsid-bench: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except (OSError, ConnectionError, TimeoutError) as e:
        if args.json:
            print(json.dumps({"tool": "vscsid-bench", "fatal": f"{type(e).__name__}: {e}", "errors": 0}))
        print(f"vscsid-bench: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FATAL
    res["machine"] = {"kernel": platform.release(), "python": platform.python_version(),
                      "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps(res))
    else:
        print(summary(res))
    if res["fatal"]:
        return EXIT_FATAL
    if res["errors"] or ("verify" in res and not res["verify"]["ok"]):
        return EXIT_IO_ERRORS
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
