"""The per-queue driver loops of ``vscsid-bench``: one thread per request queue runs
one of them until its measurement window closes and its ring is drained.

* :class:`CLoop` wraps loop.c's ``bq_run`` (``--engine c``, the default): one cffi
  call per phase, the GIL released, no Python per I/O.
* :class:`PythonLoop` is the same loop in pure Python (``--engine python``), the
  readable reference used to cross-check the C loop's verification. Its ring
  operations are the driver queue's (:class:`~vscsid.bench.driverq.DriverQueue`):
  the driver side of the ring exists once in Python and once in C.

:class:`QueueSetup` lays out one queue's slots (one per unit of ``--iodepth``) in
guest memory: each owns its request header, response and data buffer.
"""
from __future__ import annotations

import random
import struct
import time

from vscsid.virtio.defs import DESC_SIZE
from vscsid.virtio.scsi_wire import REQ_HDR_SIZE, RESP_HDR

from . import virtio_scsi as vs
from ._loop import ffi as _ffi, lib as _lib
from .driverq import DeviceProtocolError, DriverQueue
from .pattern import GEN_UNKNOWN, SECTOR, VERIFY_OK, VERIFY_UNWRITTEN, check_block, fill_block
from .stats import HIST_N, hist_index, thread_cpu_ns

__all__ = ["QueueSetup", "CLoop", "PythonLoop", "STAT_FIELDS"]

M64 = (1 << 64) - 1
CHAIN_LEN = _lib.BQ_CHAIN_LEN
MODE_TIMED = _lib.BQ_MODE_TIMED
MODE_READBACK = _lib.BQ_MODE_READBACK
#: struct virtio_blk_outhdr {le32 type; le32 reserved; le64 sector}
_BLK_OUTHDR = struct.Struct("<IIQ")
assert _BLK_OUTHDR.size == _lib.VIRTIO_BLK_OUTHDR_SIZE

#: the counters both loops keep (struct bq's fields of the same names), besides
#: lat_min, the histogram and the message
STAT_FIELDS = (
    "ios", "reads", "writes", "flushes", "flush_lat_sum", "bytes", "lat_sum", "lat_max",
    "errors", "total_ios",
    "submitted", "kicks", "waits", "publishes", "reap_batches", "verify_ok",
    "verify_unwritten", "verify_errors", "win_start_ns", "win_end_ns", "cpu_user_ns0",
    "cpu_sys_ns0", "cpu_user_ns1", "cpu_sys_ns1", "fatal", "err_kind", "err_blk",
    "err_is_write", "err_status", "err_response", "err_residual", "err_sense_key",
    "err_asc", "err_ascq", "verr_reason", "verr_sector", "verr_expected", "verr_found")


def _align_up(v: int, a: int) -> int:
    return (v + a - 1) & ~(a - 1)


def _rng_seed(seed: int, qidx: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + qidx + 1) & M64


class QueueSetup:
    """Ring + per-slot buffers of one request queue, laid out in guest memory.

    ``bench`` is the run (:class:`vscsid.bench.runner.Bench`, which imports this
    module): its configuration, guest memory and negotiated layout."""

    def __init__(self, bench, qidx: int, ring_index: int, dq: DriverQueue,
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
        table_len = CHAIN_LEN * DESC_SIZE
        self.meta_stride = (_align_up(bench.hdr_len, 64) + _align_up(bench.resp_len, 64)
                            + _align_up(table_len, 64))
        self.data_base = mem.alloc(depth * _align_up(cfg.bs, 4096), 4096)
        self.meta_base = mem.alloc(depth * self.meta_stride, 64)
        self.slots: list[dict] = []
        for k in range(depth):
            meta = self.meta_base + k * self.meta_stride
            hdr = meta
            resp = meta + _align_up(bench.hdr_len, 64)
            table = resp + _align_up(bench.resp_len, 64)
            data = self.data_base + k * _align_up(cfg.bs, 4096)
            # the C loop's fixed chains: one descriptor per slot (indirect) or CHAIN_LEN
            head = k if bench.indirect else CHAIN_LEN * k
            if bench.fmt == "scsi":   # LUN and tag (slot + 1) are fixed; the CDB is written per I/O
                mem.write(hdr, vs.encode_cmd_req(cfg.lun, k + 1, b"", cdb_size=bench.cdb_size))
            else:
                mem.write(hdr, bytes(bench.hdr_len))
            self.slots.append(dict(head=head, hdr=hdr, resp=resp, data=data, table=table))
        self.loop: CLoop | PythonLoop | None = None

    def c_loop(self, stop_flag, gens, busy, nonce: int, ramp_end: int, end: int) -> "CLoop":
        b, cfg, mem, dq = self.bench, self.bench.cfg, self.bench.mem, self.dq
        ffi, lib = _ffi, _lib
        q = ffi.new("struct bq *")
        keep = [q]
        q.qidx = self.qidx
        q.format = lib.BQ_FMT_SCSI if b.fmt == "scsi" else lib.BQ_FMT_BLK
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
        q.flush_every = cfg.flush_every
        q.seed = cfg.seed
        lib.bq_seed(q, _rng_seed(cfg.seed, self.qidx))
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
        # the ring as the driver queue left it (after the Python setup commands)
        q.avail_idx = dq.avail_idx
        q.kick_old = dq.avail_idx
        q.last_used = dq.last_used
        q.seq_next = self.blk_lo
        lib.bq_reset_stats(q)
        self.loop = CLoop(q, keep)
        return self.loop

    def python_loop(self, stop_flag, gens, busy, nonce: int, ramp_end: int, end: int) -> "PythonLoop":
        self.loop = PythonLoop(self, stop_flag, gens, busy, nonce, ramp_end, end)
        return self.loop


class CLoop:
    """loop.c's ``bq_run`` for one queue (``struct bq`` holds its state)."""

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

    def ios_now(self) -> int:
        """I/Os completed in the window so far (read while the loop runs)."""
        return int(self.q.ios)

    def stats(self) -> dict:
        q = self.q
        d = {k: int(getattr(q, k)) for k in STAT_FIELDS + ("lat_min",)}
        d["hist"] = list(_ffi.unpack(q.hist, _lib.BQ_HIST_N))
        d["msg"] = _ffi.string(q.msg).decode(errors="replace")
        return d

    def close(self) -> None:
        self._keep = []


class Slot:
    """Guest buffers of one in-flight request (the Python loop's view)."""

    __slots__ = ("index", "hdr_gpa", "resp_gpa", "data_gpa", "hdr", "resp", "data",
                 "start_ns", "blk", "gen", "is_write")


class PythonLoop:
    """The same loop as ``bq_run`` in pure Python, on the driver queue: the reference."""

    def __init__(self, qs: QueueSetup, stop_flag, gens, busy, nonce, ramp_end, end):
        b, cfg, mem, dq = qs.bench, qs.bench.cfg, qs.bench.mem, qs.dq
        self.dq = dq
        self.scsi = b.fmt == "scsi"
        self.indirect = b.indirect
        self.depth = qs.depth
        self.hdr_len, self.resp_len, self.bs, self.lbs = b.hdr_len, b.resp_len, cfg.bs, b.lbs
        self.slots: list[Slot] = []
        for k, s in enumerate(qs.slots):
            sl = Slot()
            sl.index = k
            sl.hdr_gpa, sl.resp_gpa, sl.data_gpa = s["hdr"], s["resp"], s["data"]
            sl.hdr = mem.gpa_view(s["hdr"], b.hdr_len)
            sl.resp = mem.gpa_view(s["resp"], b.resp_len)
            sl.data = mem.gpa_view(s["data"], cfg.bs)
            sl.start_ns = sl.blk = sl.gen = sl.is_write = 0
            self.slots.append(sl)
        self.free = list(range(self.depth - 1, -1, -1))
        self.blk_lo, self.blk_hi = qs.blk_lo, qs.blk_hi
        self.rw, self.random, self.rwmixread, self.once = cfg.rw_code, cfg.random, cfg.rwmixread, cfg.once
        self.rng = random.Random(_rng_seed(cfg.seed, qs.qidx))
        self.verify, self.seed, self.nonce = cfg.verify, cfg.seed, nonce
        self.gens, self.busy = gens, busy
        self.ramp_end_ns, self.end_ns = ramp_end, end
        self.stall_ns = int(cfg.stall_timeout * 1e9)
        self.stop = stop_flag
        self.gen_next = 0
        self.seq_next = qs.blk_lo
        self.rc = 0
        self.reset_stats()

    def close(self) -> None:
        """Drop every view of guest memory (so it can be unmapped)."""
        for s in self.slots:
            for v in (s.hdr, s.resp, s.data):
                v.release()
        self.slots = []

    def reset_stats(self) -> None:
        self.st = {k: 0 for k in STAT_FIELDS}
        self.st["lat_min"] = M64
        self.hist = [0] * HIST_N
        self.msg = ""

    def set_window(self, ramp_end: int, end: int) -> None:
        self.ramp_end_ns, self.end_ns = ramp_end, end

    def ios_now(self) -> int:
        return self.st["ios"]

    def stats(self) -> dict:
        d = dict(self.st)
        d["hist"] = list(self.hist)
        d["msg"] = self.msg
        return d

    def _fatal(self, msg: str) -> None:
        if not self.st["fatal"]:
            self.st["fatal"] = 1
            self.msg = msg

    # -- one request -----------------------------------------------------------
    def _chain(self, s: Slot) -> tuple[list, list]:
        """(device-readable, device-writable) buffers of the slot's request, in loop.c's order."""
        hdr, data = (s.hdr_gpa, self.hdr_len), (s.data_gpa, self.bs)
        resp = (s.resp_gpa, self.resp_len)
        if self.scsi:
            return ([hdr, data], [resp]) if s.is_write else ([hdr], [resp, data])
        return ([hdr, data], [resp]) if s.is_write else ([hdr], [data, resp])

    def _pick(self, s: Slot, mode: int) -> bool:
        rng = self.rng
        if mode == MODE_READBACK:
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
            w = ((rng.randrange(100) >= self.rwmixread) if self.rw == _lib.BQ_RW_MIXED
                 else self.rw == _lib.BQ_RW_WRITE)
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
                s.data[:] = fill_block(self.bs, blk * (self.bs // SECTOR), self.seed, s.gen)
            else:
                g = self.gens[blk]
                s.gen = 0 if g in (0, GEN_UNKNOWN) else (self.nonce << 32) | g
        return True

    def _prep(self, s: Slot) -> None:
        if self.scsi:
            nlb = self.bs // self.lbs
            lba = s.blk * nlb
            if lba + nlb <= 0xFFFFFFFF and nlb <= 0xFFFF:
                cdb = (vs.write10 if s.is_write else vs.read10)(lba, nlb)
            else:
                cdb = (vs.write16 if s.is_write else vs.read16)(lba, nlb)
            s.hdr[REQ_HDR_SIZE:REQ_HDR_SIZE + 16] = cdb + bytes(16 - len(cdb))
            s.resp[_lib.VIRTIO_SCSI_RESP_OFF_STATUS] = 0xFF       # poison status and response
            s.resp[_lib.VIRTIO_SCSI_RESP_OFF_RESPONSE] = 0xFF
        else:
            _BLK_OUTHDR.pack_into(s.hdr, 0, _lib.VIRTIO_BLK_T_OUT if s.is_write else _lib.VIRTIO_BLK_T_IN,
                                  0, s.blk * (self.bs // _lib.VIRTIO_BLK_SECTOR_SIZE))
            s.resp[0] = 0xFF                                       # poison the status byte

    def _record_error(self, s: Slot, kind: int) -> None:
        st = self.st
        st["errors"] += 1
        if st["err_kind"]:
            return
        st["err_kind"], st["err_blk"], st["err_is_write"] = kind, s.blk, int(s.is_write)
        if self.scsi:
            r = vs.parse_cmd_resp(s.resp, self.resp_len - vs.CMD_RESP_HDR_SIZE)
            st["err_status"], st["err_response"], st["err_residual"] = r.status, r.response, r.residual
            si = r.sense_key()
            st["err_sense_key"], st["err_asc"], st["err_ascq"] = (si.key, si.asc, si.ascq) if si else (-1, -1, -1)
        else:
            st["err_status"] = s.resp[0]

    def _complete(self, s: Slot, t: int) -> None:
        st = self.st
        bad = 0
        if self.scsi:
            _sense_len, residual, _squal, status, response = RESP_HDR.unpack_from(s.resp, 0)
            if response != vs.VIRTIO_SCSI_S_OK:
                bad = _lib.BQ_ERR_RESPONSE
            elif status != vs.SAM_STAT_GOOD:
                bad = _lib.BQ_ERR_STATUS
            elif residual:
                bad = _lib.BQ_ERR_RESIDUAL
        elif s.resp[0] != _lib.VIRTIO_BLK_S_OK:
            bad = _lib.BQ_ERR_BLK_STATUS
        if bad:
            self._record_error(s, bad)
        if self.verify:
            blk = s.blk
            if s.is_write:
                self.gens[blk] = GEN_UNKNOWN if bad else s.gen & 0xFFFFFFFF
            elif not bad:
                rc, sector, found = check_block(s.data, blk * (self.bs // SECTOR), self.seed, s.gen)
                if rc == VERIFY_OK:
                    st["verify_ok"] += 1
                elif rc == VERIFY_UNWRITTEN:
                    st["verify_unwritten"] += 1
                else:
                    st["verify_errors"] += 1
                    if not st["verr_reason"]:
                        st["verr_reason"], st["verr_sector"] = rc, sector
                        st["verr_expected"], st["verr_found"] = s.gen, found
                    self._record_error(s, _lib.BQ_ERR_VERIFY)
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

    # -- the ring, through the driver queue ---------------------------------------
    def _reap(self) -> int:
        """Complete what the device used; -1 after a device protocol error."""
        error = None
        try:
            done = self.dq.get_used()       # keeps used_event behind last_used (interrupts off)
        except DeviceProtocolError as e:
            done, error = e.completed, str(e)
        if done:
            t = time.monotonic_ns()
            for s, _written in done:
                self._complete(s, t)
                self.free.append(s.index)
            self.st["reap_batches"] += 1
        if error is not None:
            self._fatal(error)
            return -1
        return len(done)

    def _wait(self, timeout: float) -> None:
        """Sleep on the call eventfd unless used entries arrive while notifications are enabled."""
        dq = self.dq
        if not dq.enable_interrupts():
            self.st["waits"] += 1
            dq.wait_call(timeout)
        dq.disable_interrupts()

    def run(self, mode: int) -> None:
        st = self.st
        dq = self.dq
        submitting, in_window = True, 0
        if mode == MODE_READBACK:
            self.seq_next = self.blk_lo
            self.ramp_end_ns, self.end_ns = 0, M64
        dq.disable_interrupts()
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
                st["cpu_user_ns0"], st["cpu_sys_ns0"] = thread_cpu_ns()
            if in_window == 1 and now >= self.end_ns:
                in_window = 2
                st["win_end_ns"] = now
                st["cpu_user_ns1"], st["cpu_sys_ns1"] = thread_cpu_ns()
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
                    out, in_ = self._chain(s)
                    dq.add(out, in_, indirect=self.indirect, token=s)
                    added += 1
                if added:
                    st["submitted"] += added
                    st["publishes"] += 1
                    if dq.publish_and_kick():
                        st["kicks"] += 1
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
            self._wait(0.1)
        now = time.monotonic_ns()
        if in_window == 1:
            st["win_end_ns"] = now
            st["cpu_user_ns1"], st["cpu_sys_ns1"] = thread_cpu_ns()
        elif in_window == 0:
            st["win_start_ns"] = st["win_end_ns"] = now
