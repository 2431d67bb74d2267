"""What the daemon reports about itself: ``status`` and ``stats`` as plain data, for
the admin socket (vscsid-ctl) and the Prometheus metrics. Nothing here sends a
message to a worker: request counters come from the workers' statistics pages
(statspage.py), process figures from psutil."""
from __future__ import annotations

import os
import time

from vscsid import __version__
from vscsid.virtio.defs import (
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
)
from vscsid.virtio.memory import GuestMemoryError, fault_count
from vscsid.virtio.splitq import peek_indices
from vscsid.virtio.scsi_wire import (
    FIRST_REQUEST_QUEUE, VIRTIO_SCSI_F_CHANGE, VIRTIO_SCSI_F_HOTPLUG, VIRTIO_SCSI_F_INOUT,
    VIRTIO_SCSI_F_T10_PI,
)

from .statspage import merge, percentile

FEATURE_NAMES = {
    VIRTIO_SCSI_F_INOUT: "INOUT", VIRTIO_SCSI_F_HOTPLUG: "HOTPLUG",
    VIRTIO_SCSI_F_CHANGE: "CHANGE", VIRTIO_SCSI_F_T10_PI: "T10_PI",
    VIRTIO_RING_F_INDIRECT_DESC: "INDIRECT_DESC", VIRTIO_RING_F_EVENT_IDX: "EVENT_IDX",
    VIRTIO_F_VERSION_1: "VERSION_1", 30: "PROTOCOL_FEATURES",
}
SENSE_KEYS = ("NO SENSE", "RECOVERED ERROR", "NOT READY", "MEDIUM ERROR", "HARDWARE ERROR",
              "ILLEGAL REQUEST", "UNIT ATTENTION", "DATA PROTECT", "BLANK CHECK",
              "VENDOR SPECIFIC", "COPY ABORTED", "ABORTED COMMAND", "RESERVED 0C",
              "VOLUME OVERFLOW", "MISCOMPARE", "COMPLETED")
PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999))


def feature_names(bits: int) -> list[str]:
    return [FEATURE_NAMES.get(b, f"bit{b}") for b in range(64) if bits & (1 << b)]


def status(sup) -> dict:
    s = sup.session
    frontend = {"connected": s is not None, "connections": sup.connections_total}
    queues = []
    if s is not None:
        dev = s.device
        frontend.update(conn=s.conn_id, features=feature_names(dev.acked_features),
                        features_hex=hex(dev.acked_features))
        for ring in dev.rings:
            kind = ("control" if ring.index == 0 else "event" if ring.index == 1
                    else f"request {ring.index - FIRST_REQUEST_QUEUE}")
            row = {"vq": ring.index, "kind": kind, "size": ring.num,
                   "started": ring.started, "enabled": ring.enabled, "broken": ring.broken}
            if ring.started:
                row["ring"] = _ring_indices(s, ring)
            if ring.index < FIRST_REQUEST_QUEUE:      # (a request queue's are in stats)
                row["late_interrupts"] = (s.control if ring.index == 0 else s.events).late_calls
            queues.append(row)
        frontend["events"] = dict(s.events.stats, **{"by_type": dict(s.events.by_type)})
    workers = []
    for w in sup.workers:
        last = w.last_stats
        workers.append({"queue": w.queue, "pid": w.pid if w.alive else None,
                        "state": w.state.value, "restarts": w.life.restarts,
                        "ring_started": bool(last.started) if last else None,
                        "in_flight": last.in_flight if last else None})
    return {
        "version": __version__, "pid": os.getpid(),
        "uptime_s": round(sup.ops.monotonic() - sup.started_at, 3),
        "started_at": sup.started_wall,
        "socket": sup.cfg.socket_path or f"fd:{sup.cfg.listen_fd}",
        "admin_socket": sup.cfg.admin_socket,
        "metrics": ("%s:%d" % sup.metrics.address) if sup.metrics else None,
        "config_file": sup.cfg.config_file,
        "engine": sup.cfg.engine, "num_queues": sup.cfg.num_queues,
        "luns": len(sup.luns.by_slot), "frontend": frontend, "queues": queues,
        "workers": workers, "tracing": sup.tracer.active if sup.tracer else False,
    }


def _ring_indices(session, ring) -> dict | None:
    """The started ring's indices in guest memory now (None off the map, or when the
    read faulted: the front end took its memory away, and its session is told)."""
    mem = session.handler.mem
    if mem is None or not ring.addr_set:
        return None
    before = fault_count()
    try:
        out = peek_indices(mem, ring.num, mem.uva_to_gpa(ring.avail_uva),
                           mem.uva_to_gpa(ring.used_uva))
    except GuestMemoryError:
        return None
    if fault_count() != before:
        session.memory_fault("the supervisor (status)")
        return None
    return out


def raw(sup) -> dict:
    """Every queue's page: {queue: {"queue": {...}, "luns": {slot: {...}}}}, for the
    LUNs in the table."""
    out = {}
    slots = [x.slot for x in sup.luns.luns()]
    for w in sup.workers:
        if w.stats is None:
            continue
        try:
            out[w.queue] = {"queue": w.stats.queue(),
                            "luns": {slot: w.stats.lun(slot) for slot in slots}}
        except (ValueError, IndexError):
            continue
    return out


def bounds_us(sup) -> list[int]:
    for w in sup.workers:
        if w.stats is not None:
            return w.stats.bounds_us
    return []


def ops_names(sup) -> list[str]:
    for w in sup.workers:
        if w.stats is not None:
            return w.stats.ops
    return ["read", "write", "other"]


def _latency(hist_rows: list[list[int]], counts: list[int], sums: list[int], ops: list[str],
             bounds: list[int]) -> dict:
    out = {}
    for i, op in enumerate(ops):
        n = counts[i]
        if not n:
            continue
        d = {"count": n, "mean": round(sums[i] / n / 1000, 1)}
        for name, q in PERCENTILES:
            d[name] = percentile(hist_rows[i], bounds, q)
        out[op] = d
    return out


def processes(sup) -> dict:
    ps = sup.proc_stats
    workers = []
    for w in sup.workers:
        sample = ps.sample(w.pid) if w.alive else None
        row = {"queue": w.queue, "pid": w.pid if w.alive else None, "state": w.state.value,
               "restarts": w.life.restarts}
        if sample:
            row.update({k: sample[k] for k in ("cpu_user_s", "cpu_system_s", "ctx_voluntary",
                                                "ctx_involuntary", "mem_uss", "mem_rss",
                                                "num_fds")})
        workers.append(row)
    me = ps.sample(os.getpid()) or {}
    return {"workers": workers,
            "supervisor": {k: me.get(k) for k in ("pid", "cpu_user_s", "cpu_system_s",
                                                   "ctx_voluntary", "ctx_involuntary",
                                                   "mem_uss", "num_fds")}}


def stats(sup) -> dict:
    pages = raw(sup)
    bounds = bounds_us(sup)
    ops = ops_names(sup)
    queues = []
    per_lun: dict[int, dict] = {}
    for q, page in sorted(pages.items()):
        qs = page["queue"]
        in_flight = sum(ls["in_flight"] for ls in page["luns"].values())
        queues.append({"queue": q, "requests": qs["fast"] + qs["slow"], "fast": qs["fast"],
                       "slow": qs["slow"], "bytes_read": qs["bytes_in"],
                       "bytes_written": qs["bytes_out"], "in_flight": in_flight,
                       "interrupts": qs["calls"], "late_interrupts": qs["late_calls"],
                       "kicks": qs["kicks"],
                       "poll_hits": qs["poll_hits"], "max_in_flight_async": qs["max_in_flight"]})
        for slot, ls in page["luns"].items():
            per_lun[slot] = merge(per_lun.get(slot), ls)
    luns = []
    for x in sup.luns.luns():
        ls = per_lun.get(x.slot)
        if ls is None:
            continue
        errors = {SENSE_KEYS[k]: n for k, n in enumerate(ls["errors"]) if n}
        luns.append({
            "lun": x.address, "reads": ls["ops"][0], "writes": ls["ops"][1],
            "other": ls["ops"][2], "requests": sum(ls["ops"]),
            "bytes_read": ls["bytes_in"], "bytes_written": ls["bytes_out"],
            "errors": errors, "transport_failures": ls["failures"],
            "in_flight": ls["in_flight"],
            "latency_us": _latency(ls["lat"], ls["lat_count"], ls["lat_sum_ns"], ops, bounds)})
    out = {"time": time.time(), "queues": queues, "luns": luns,
           "latency_sample": sup.cfg.latency_sample}
    out.update(processes(sup))
    return out
