"""Prometheus metrics (``--metrics-address HOST:PORT``): ``GET /metrics``.

The exposition is prometheus-client's (a custom collector, ``generate_latest``);
the HTTP side is a minimal server on the supervisor's event loop, so a scrape
reads the daemon's state on the loop that owns it (no thread), and a client can
hold at most MAX_CLIENTS connections, REQUEST_LIMIT bytes and REQUEST_TIMEOUT
seconds. Request counters come from the workers' statistics pages, so a scrape
costs the data path nothing.

Latency histograms are exported with power-of-two bucket bounds (1 µs … 16.8 s;
the pages keep four buckets per power of two, which ``vscsid-ctl stats`` uses
for its percentiles).
"""
from __future__ import annotations

import asyncio
import socket

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from vscsid import __version__
from vscsid import log as vlog

from . import inspect
from .servers import close_server

MAX_CLIENTS = 8
REQUEST_LIMIT = 8192
REQUEST_TIMEOUT = 10.0
#: exported histogram bounds: powers of two from 1 µs
EXPORT_BOUNDS_US = [1 << k for k in range(25)]


def listen_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket for the metrics server (OSError if it cannot bind)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    last: OSError | None = None
    for family, kind, proto, _name, addr in infos:
        s = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and not host:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(addr)
            s.listen(16)
            s.setblocking(False)
            return s
        except OSError as exc:
            s.close()
            last = exc
    raise last or OSError(f"cannot resolve {host!r}")


def _cumulative(hist: list[int], bounds_us: list[int]) -> list[tuple[str, float]]:
    """Prometheus buckets (le in seconds, cumulative) from fine log-linear buckets."""
    out = []
    total = 0
    i = 0
    n = len(hist)
    for le in EXPORT_BOUNDS_US:
        # bucket i covers [bounds[i], bounds[i+1]): it is below le when bounds[i+1] <= le
        while i < n and i + 1 < len(bounds_us) and bounds_us[i + 1] <= le:
            total += hist[i]
            i += 1
        out.append((repr(le / 1e6), float(total)))
    out.append(("+Inf", float(sum(hist))))
    return out


class Collector:
    def __init__(self, sup):
        self.sup = sup

    def collect(self):
        sup = self.sup
        yield _gauge("vscsid_info", "The daemon's version", ["version"], [([__version__], 1)])
        yield _gauge("vscsid_uptime_seconds", "Seconds since the daemon started", [],
                     [([], sup.ops.monotonic() - sup.started_at)])
        yield _gauge("vscsid_frontend_connected", "1 while a vhost-user front end is connected",
                     [], [([], 1 if sup.session is not None else 0)])
        yield _counter("vscsid_frontend_connections", "Front-end connections accepted", [],
                       [([], sup.connections_total)])
        luns = sup.luns.luns()
        yield _gauge("vscsid_luns", "LUNs served", [], [([], len(luns))])
        yield _gauge("vscsid_lun_size_bytes", "Capacity of each LUN", ["target", "lun"],
                     [([str(x.target), str(x.lun)], x.size) for x in luns])
        yield _gauge("vscsid_tracing", "1 while a command trace is on", [],
                     [([], 1 if sup.tracer and sup.tracer.active else 0)])

        pages = inspect.raw(sup)
        bounds = inspect.bounds_us(sup)
        ops = inspect.ops_names(sup)
        by_slot = {x.slot: x for x in luns}
        req, rd, wr, err, fail, infl = [], [], [], [], [], []
        qreq, qbytes, qcalls, qlate, qkicks, qpoll, qinfl = [], [], [], [], [], [], []
        hist: dict[tuple[int, int], dict] = {}
        for q, page in sorted(pages.items()):
            qs = page["queue"]
            ql = str(q)
            qreq += [([ql, "fast"], qs["fast"]), ([ql, "slow"], qs["slow"])]
            qbytes += [([ql, "read"], qs["bytes_in"]), ([ql, "write"], qs["bytes_out"])]
            qcalls.append(([ql], qs["calls"]))
            qlate.append(([ql], qs["late_calls"]))
            qkicks.append(([ql], qs["kicks"]))
            qpoll.append(([ql], qs["poll_hits"]))
            qinfl.append(([ql], sum(ls["in_flight"] for ls in page["luns"].values())))
            for slot, ls in page["luns"].items():
                x = by_slot.get(slot)
                if x is None:
                    continue
                lab = [ql, str(x.target), str(x.lun)]
                for i, op in enumerate(ops):
                    req.append((lab + [op], ls["ops"][i]))
                rd.append((lab, ls["bytes_in"]))
                wr.append((lab, ls["bytes_out"]))
                for k, n in enumerate(ls["errors"]):
                    if n:
                        err.append((lab + [inspect.SENSE_KEYS[k]], n))
                fail.append((lab, ls["failures"]))
                infl.append((lab, ls["in_flight"]))
                h = hist.get((x.target, x.lun))
                hist[(x.target, x.lun)] = {
                    "lat": [list(r) for r in ls["lat"]] if h is None else
                    [[a + b for a, b in zip(r0, r1)] for r0, r1 in zip(h["lat"], ls["lat"])],
                    "sum": list(ls["lat_sum_ns"]) if h is None else
                    [a + b for a, b in zip(h["sum"], ls["lat_sum_ns"])]}
        yield _counter("vscsid_requests", "SCSI commands completed, per queue and LUN, by "
                       "operation (read, write, other)", ["queue", "target", "lun", "op"], req)
        yield _counter("vscsid_read_bytes", "Bytes read by the guest", ["queue", "target", "lun"],
                       rd)
        yield _counter("vscsid_written_bytes", "Bytes written by the guest",
                       ["queue", "target", "lun"], wr)
        yield _counter("vscsid_scsi_errors", "Commands completed with CHECK CONDITION, by sense "
                       "key", ["queue", "target", "lun", "sense_key"], err)
        yield _counter("vscsid_transport_failures", "Requests answered with a virtio-scsi "
                       "response other than OK", ["queue", "target", "lun"], fail)
        yield _gauge("vscsid_in_flight_requests", "Requests in flight",
                     ["queue", "target", "lun"], infl)
        h = HistogramMetricFamily("vscsid_request_duration_seconds",
                                  "Time from taking a request off the ring to completing it "
                                  "(one request in --latency-sample is timed)",
                                  labels=["target", "lun", "op"])
        for (target, lun), d in sorted(hist.items()):
            for i, op in enumerate(ops):
                rows = d["lat"][i]
                if not sum(rows):
                    continue
                h.add_metric([str(target), str(lun), op], _cumulative(rows, bounds),
                             d["sum"][i] / 1e9)
        yield h
        yield _counter("vscsid_queue_requests", "Requests taken off each request queue, by the "
                       "path that served them (fast: the C fast path)", ["queue", "path"], qreq)
        yield _counter("vscsid_queue_bytes", "Data bytes moved by each queue",
                       ["queue", "direction"], qbytes)
        yield _counter("vscsid_queue_interrupts", "Used-buffer notifications sent", ["queue"],
                       qcalls)
        yield _counter("vscsid_queue_late_interrupts", "Notifications sent only as the queue "
                       "went idle: the driver's wish for them was seen only after its "
                       "completions were published (re-arming just then, or a guest that "
                       "loses wake-ups)", ["queue"], qlate)
        yield _counter("vscsid_queue_kicks", "Kicks the C loop woke up for", ["queue"], qkicks)
        yield _counter("vscsid_queue_poll_hits", "Requests found by busy polling", ["queue"],
                       qpoll)
        yield _gauge("vscsid_queue_in_flight_requests", "Requests in flight per queue", ["queue"],
                     qinfl)

        procs = inspect.processes(sup)
        cpu, uss, ctx, restarts, up = [], [], [], [], []
        for w in procs["workers"]:
            ql = [str(w["queue"])]
            restarts.append((ql, w["restarts"]))
            up.append((ql, 1 if w["pid"] and w["state"] == "running" else 0))
            if "cpu_user_s" in w:
                cpu += [(ql + ["user"], w["cpu_user_s"]), (ql + ["system"], w["cpu_system_s"])]
                ctx += [(ql + ["voluntary"], w["ctx_voluntary"]),
                        (ql + ["involuntary"], w["ctx_involuntary"])]
                if w.get("mem_uss") is not None:
                    uss.append((ql, w["mem_uss"]))
        yield _counter("vscsid_worker_cpu_seconds", "CPU time of each worker",
                       ["queue", "mode"], cpu)
        yield _gauge("vscsid_worker_memory_uss_bytes", "Memory private to each worker (USS)",
                     ["queue"], uss)
        yield _counter("vscsid_worker_context_switches", "Context switches of each worker",
                       ["queue", "kind"], ctx)
        yield _counter("vscsid_worker_restarts", "Times each queue's worker was replaced",
                       ["queue"], restarts)
        yield _gauge("vscsid_worker_up", "1 while the queue's worker runs", ["queue"], up)
        me = procs["supervisor"]
        if me.get("cpu_user_s") is not None:
            yield _counter("vscsid_supervisor_cpu_seconds", "CPU time of the supervisor",
                           ["mode"], [(["user"], me["cpu_user_s"]),
                                      (["system"], me["cpu_system_s"])])
            if me.get("mem_uss") is not None:
                yield _gauge("vscsid_supervisor_memory_uss_bytes", "Memory private to the "
                             "supervisor (USS)", [], [([], me["mem_uss"])])
        s = sup.session
        ev = [] if s is None else [([k], n) for k, n in sorted(s.events.by_type.items())]
        yield _counter("vscsid_events", "Events sent on the event queue (this front end)",
                       ["event"], ev)
        yield _counter("vscsid_events_missed", "Events lost because the driver had no event "
                       "buffer posted (this front end)", [],
                       [([], s.events.stats["missed"] if s is not None else 0)])


def _counter(name, doc, labels, samples):
    f = CounterMetricFamily(name, doc, labels=labels)
    for lab, v in samples:
        f.add_metric(lab, v)
    return f


def _gauge(name, doc, labels, samples):
    f = GaugeMetricFamily(name, doc, labels=labels)
    for lab, v in samples:
        f.add_metric(lab, v)
    return f


class MetricsServer:
    def __init__(self, sup, listener: socket.socket):
        self.sup = sup
        self.listener = listener
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(sup))
        self.server = None
        self.clients: set[asyncio.Task] = set()
        self.log = vlog.get(metrics=True)
        self.scrapes = 0
        addr = listener.getsockname()
        self.address = (addr[0], addr[1])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, sock=self.listener,
                                                 limit=REQUEST_LIMIT)

    async def close(self) -> None:
        await close_server(self.server, self.clients)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def _client(self, reader, writer) -> None:
        if len(self.clients) >= MAX_CLIENTS:
            writer.close()
            return
        task = asyncio.current_task()
        self.clients.add(task)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await self._respond(writer, 400, b"bad request\n")
            elif parts[0] not in ("GET", "HEAD"):
                await self._respond(writer, 405, b"only GET\n", extra="Allow: GET, HEAD\r\n")
            elif parts[1].split("?", 1)[0] not in ("/metrics", "/"):
                await self._respond(writer, 404, b"see /metrics\n")
            else:
                self.scrapes += 1
                body = self.render()
                await self._respond(writer, 200, body if parts[0] == "GET" else b"",
                                    ctype=CONTENT_TYPE_LATEST, length=len(body))
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        except Exception:
            self.log.exception("metrics_scrape_failed")
            try:
                await self._respond(writer, 500, b"internal error\n")
            except (ConnectionError, OSError):
                pass
        finally:
            self.clients.discard(task)
            writer.close()

    async def _respond(self, writer, code: int, body: bytes, ctype: str = "text/plain",
                       length: int | None = None, extra: str = "") -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  500: "Internal Server Error"}[code]
        head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body) if length is None else length}\r\n"
                f"Connection: close\r\n{extra}\r\n")
        writer.write(head.encode() + body)
        await writer.drain()
