"""One benchmark run: guest memory and the vhost-user control path (or, with
``--loopback``, a C device thread per queue in this process), the request queues,
one thread per queue running its loop (:mod:`vscsid.bench.loops`), CPU samples at
the window's edges, and the result dict (``--json``)."""
from __future__ import annotations

import os
import resource
import struct
import threading
import time
from array import array
from dataclasses import asdict
from typing import Any

from vscsid.vhost.protocol import VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature, feature_mask
from vscsid.virtio.defs import (
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, ring_sizes,
)

from . import virtio_scsi as vs
from ._loop import ffi as _ffi, lib as _lib
from .config import EXIT_USAGE, BenchConfig, BenchError, _align_up, _fmt_size
from .driverq import DriverQueue
from .frontend import VhostUserFrontend
from .guestmem import FrontendMemory
from .loops import MODE_READBACK, MODE_TIMED, QueueSetup
from .pattern import GEN_UNKNOWN, VERIFY_REASONS
from .stats import (
    HIST_N, cgroup_cpu_seconds, hist_bounds, percentile, system_busy_seconds, thread_cpu_ns,
    tree_cpu_seconds,
)

__all__ = ["Bench", "run"]

# virtio-blk feature bits (virtio 1.x, 5.2.3): what the bench offers a blk back end
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_MQ = 12


class Bench:
    """One run: guest memory, the vhost-user connection (or the loopback devices), one
    :class:`~vscsid.bench.loops.QueueSetup` and loop per request queue, the results."""

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
        dsz, asz, usz = ring_sizes(qs)
        ring = _align_up(dsz + asz, 4096) + _align_up(usz, 4096) + 4096
        per_q = ring + cfg.iodepth * (_align_up(cfg.bs, 4096) + 512) + 8192
        if cfg.engine == "python":
            per_q += cfg.iodepth * 256      # the indirect tables the driver queue allocates
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
            self.hdr_len, self.resp_len = _lib.VIRTIO_BLK_OUTHDR_SIZE, _lib.VIRTIO_BLK_STATUS_SIZE
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
        self.capacity = capacity_sectors * _lib.VIRTIO_BLK_SECTOR_SIZE
        blk_size = (struct.unpack_from("<I", conf, 20)[0] if fe.features & (1 << VIRTIO_BLK_F_BLK_SIZE)
                    else _lib.VIRTIO_BLK_SECTOR_SIZE)
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
            d.format = _lib.BQ_FMT_SCSI if self.fmt == "scsi" else _lib.BQ_FMT_BLK
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
    def _run_phase(self, loops, mode: int, stop, main_sample=None) -> None:
        pin = self._loopback_cpus()[0] if self.cfg.loopback else None

        def body(e):
            if pin:
                os.sched_setaffinity(0, pin)       # this thread only
            e.run(mode)

        threads = [threading.Thread(target=body, args=(e,), name=f"bench-q{i}", daemon=True)
                   for i, e in enumerate(loops)]
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

        loops = []
        for qs in self.queues:
            mk = qs.c_loop if use_c else qs.python_loop
            loops.append(mk(stop, gens, busy, nonce, 0, 0))
        # The clock starts now: I/Os issued during the ramp are excluded, and with --ramp 0
        # every I/O counts.
        ramp_end = time.monotonic_ns() + int(cfg.ramp * 1e9)
        end = ramp_end + int(cfg.seconds * 1e9)
        for e in loops:
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
            if cfg.daemon_cgroup and tag == "0":
                samples["cgroup_0"] = cgroup_cpu_seconds(cfg.daemon_cgroup)
            if cfg.daemon_pids and tag == "0":
                samples["daemon_0"] = tree_cpu_seconds(cfg.daemon_pids)
            if tag == "0":
                samples["sys_0"] = system_busy_seconds()
            samples[f"self_{tag}"] = resource.getrusage(resource.RUSAGE_SELF)
            samples[f"main_{tag}"] = thread_cpu_ns()
            samples[f"t_{tag}"] = time.monotonic_ns()
            if tag == "1":
                samples["sys_1"] = system_busy_seconds()
            if cfg.daemon_pids and tag == "1":
                samples["daemon_1"] = tree_cpu_seconds(cfg.daemon_pids)
            if cfg.daemon_cgroup and tag == "1":
                samples["cgroup_1"] = cgroup_cpu_seconds(cfg.daemon_cgroup)

        timeline: list[list[int]] = [[] for _ in loops]
        # the daemon's CPU per step too when it is one file read (a cgroup), not a /proc scan
        daemon_steps: list[float] = []

        def main_sample(threads) -> None:
            sleep_until(ramp_end, threads)
            sample("0")
            # Completions per queue over time (the window in timeline_interval steps);
            # returns early when the queues finish (--once).
            step = int(cfg.timeline_interval * 1e9)
            t = ramp_end
            last = [0] * len(loops)
            last_cpu = samples.get("cgroup_0")
            while t < end and any(th.is_alive() for th in threads):
                t = min(end, t + step)
                sleep_until(t, threads)
                now = [e.ios_now() for e in loops]
                for k, n in enumerate(now):
                    timeline[k].append(n - last[k])
                last = now
                if last_cpu is not None:
                    c = cgroup_cpu_seconds(cfg.daemon_cgroup)
                    daemon_steps.append(c - last_cpu)
                    last_cpu = c
            sample("1")

        try:
            self._run_phase(loops, MODE_TIMED, stop, main_sample)
            timed = [e.stats() for e in loops]
            readback = None
            if cfg.verify and not any(s["fatal"] for s in timed) and not stop[0] \
                    and any(s["writes"] or s["total_ios"] for s in timed) and cfg.rw_code != 0:
                for e in loops:
                    e.reset_stats()
                t = time.monotonic_ns()
                self._run_phase(loops, MODE_READBACK, stop)
                readback = [e.stats() for e in loops]
                readback_s = (time.monotonic_ns() - t) / 1e9
        finally:
            if dev_stop is not None:
                dev_stop[0] = 1
                for t in self._dev_threads:
                    t.join(2)
        res = self._results(timed, samples)
        res["timeline"] = {"interval_s": cfg.timeline_interval, "per_queue_ios": timeline}
        if daemon_steps:
            res["timeline"]["daemon_cpu_seconds"] = daemon_steps
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
        kinds = {_lib.BQ_ERR_RESPONSE: "virtio-scsi response", _lib.BQ_ERR_STATUS: "SCSI status",
                 _lib.BQ_ERR_RESIDUAL: "residual", _lib.BQ_ERR_BLK_STATUS: "virtio-blk status",
                 _lib.BQ_ERR_VERIFY: "verify"}
        e = {"phase": phase, "kind": kinds.get(s["err_kind"], str(s["err_kind"])),
             "op": "write" if s["err_is_write"] else "read",
             "offset": s["err_blk"] * self.cfg.bs, "status": s["err_status"]}
        if self.fmt == "scsi":
            e.update(response=vs.RESPONSE_NAMES.get(s["err_response"], s["err_response"]),
                     residual=s["err_residual"])
            if s["err_sense_key"] >= 0 and s["err_kind"] == _lib.BQ_ERR_STATUS:
                e["sense"] = {"key": s["err_sense_key"], "asc": s["err_asc"], "ascq": s["err_ascq"]}
        if s["err_kind"] == _lib.BQ_ERR_VERIFY:
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
            "flushes": sum(s["flushes"] for s in stats),
            "flush_lat_mean_ns": (sum(s["flush_lat_sum"] for s in stats)
                                  / max(1, sum(s["flushes"] for s in stats))),
            "seconds": seconds,
            "lat_ns": {"min": lat_min, "mean": lat_sum / ios if ios else 0.0,
                       "p50": pct[50], "p90": pct[90], "p99": pct[99], "p99.9": pct[99.9],
                       "max": lat_max},
            # the latency histogram's non-empty buckets: [low ns, high ns, count]
            "lat_hist": [[*hist_bounds(i), c] for i, c in enumerate(hist) if c],
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
        # The cgroup (when given) counts every process the daemon ran, exited workers included.
        for source, key, extra in (("pids", "daemon", {"daemon_pids": cfg.daemon_pids}),
                                   ("cgroup", "cgroup", {"daemon_cgroup": cfg.daemon_cgroup})):
            if f"{key}_0" in samples and f"{key}_1" in samples:
                d = samples[f"{key}_1"] - samples[f"{key}_0"]
                res.update(extra, daemon_cpu_seconds=d, daemon_cpu_source=source,
                           daemon_cpu_us_per_io=d * 1e6 / ios if ios else None)
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
            if qs.loop is not None:
                qs.loop.close()
            qs.loop = None
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
