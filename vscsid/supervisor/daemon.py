"""The supervisor: owns the vhost-user socket and the workers.

It runs a uvloop event loop that

* accepts one front-end connection at a time on the vhost-user socket and, for
  each, runs a :class:`~vscsid.supervisor.session.Session` (transport, sans-IO
  vhost-user handler, the virtio-scsi control and event queues);
* spawns one worker per request virtqueue at start-up, hands each its LUNs,
  then per connection the guest memory and its ring, and watches them (the
  lifecycle state machine, heartbeats, restarts);
* handles signals, systemd notification and periodic statistics;
* serves the admin socket (JSON-RPC, vscsid-ctl: admin.py), the Prometheus
  metrics (metrics.py) and LUN changes (lunops.py), and on SIGHUP re-reads the
  configuration file.

When a front end disconnects, the session's rings are stopped, its memory
unmapped, and the daemon waits for the next connection.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket

from vscsid import log as vlog
from vscsid import messages as M
from vscsid import systemd
from vscsid.config import DaemonConfig
from vscsid.virtio.scsi_wire import VIRTIO_SCSI_CDB_DEFAULT_SIZE, VIRTIO_SCSI_SENSE_DEFAULT_SIZE

from .lifecycle import Action, Policy, WState
from .lunops import LunManager
from .luns import LunTable
from .osops import OsOps
from .session import Session
from .statspage import StatsReader
from .workerpool import WorkerGone, WorkerHandle, describe_exit

#: seconds a new front end waits for the previous one's session to finish closing
CLOSE_WAIT = 30.0


class Supervisor:
    def __init__(self, cfg: DaemonConfig, listener: socket.socket, luns: LunTable,
                 ops: OsOps | None = None, policy: Policy | None = None,
                 stats_interval: float = 60.0, admin_listener: socket.socket | None = None,
                 metrics_listener: socket.socket | None = None):
        self.cfg = cfg
        self.listener = listener
        self.luns = luns
        self.ops = ops or OsOps()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.workers: list[WorkerHandle] = []
        self.session: Session | None = None
        self._session_task: asyncio.Task | None = None
        self.conn_counter = 0
        self.log = vlog.get()
        self.stopping = False
        self.exit_code = 0
        self._stop_event: asyncio.Event | None = None
        self._signal_queue: list[int] = []
        self.log_settings = vlog.settings()
        self.policy = policy or Policy()
        self.stats_interval = stats_interval
        self.early_signals: list[int] = []
        from vscsid.stats import ProcessStats
        self.proc_stats = ProcessStats()
        self.lunops = LunManager(self)
        self.admin_listener = admin_listener
        self.metrics_listener = metrics_listener
        self.admin = None
        self.metrics = None
        self.tracer = None
        self.started_at = self.ops.monotonic()
        self.started_wall = 0.0
        self.connections_total = 0
        #: () -> (settings, LUN specs) of the configuration file (given by the cli)
        self.read_config = None

    # ------------------------------------------------------------------ workers
    def _spawn(self, w: WorkerHandle) -> None:
        if w.stats_fd < 0:
            # The queue's statistics page outlives its workers (see workers/stats.py).
            w.stats_fd = self.ops.memfd(f"vscsid-stats-q{w.queue}", 0)
        w.spawn(self.log_settings["format"], self.log_settings["level"])
        if self.cfg.cpu_affinity:
            from vscsid.stats import apply_affinity, format_cpus, worker_cpus

            cpus = worker_cpus(self.cfg.cpu_affinity, w.queue)
            try:
                apply_affinity(w.pid, cpus)
                w.log.info("worker_pinned", cpus=format_cpus(cpus))
            except (OSError, ValueError) as exc:
                w.log.error("worker_pin_failed", cpus=format_cpus(cpus), error=str(exc))

    async def _configure(self, w: WorkerHandle) -> None:
        cfg = self.session.config if self.session else None
        msg = self.luns.configure_message(
            queue=w.queue, queues=self.cfg.num_queues, engine=self.cfg.engine,
            poll_us=self.cfg.poll_us,
            cdb_size=cfg.cdb_size if cfg else VIRTIO_SCSI_CDB_DEFAULT_SIZE,
            sense_size=cfg.sense_size if cfg else VIRTIO_SCSI_SENSE_DEFAULT_SIZE,
            latency_sample=self.cfg.latency_sample)
        msg.stats_page = w.stats_fd
        rep = await w.request(msg, timeout=60)
        if not rep.ok:
            raise RuntimeError(f"worker {w.queue} failed to configure: {rep.error}")
        result = rep.result(M.Configure)
        self.luns.learn(result, w.queue, self.cfg.num_queues)
        layout = result.stats_layout
        if layout and w.stats is None:
            try:
                w.stats = StatsReader(w.stats_fd, layout)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                w.log.error("stats_page_unreadable", error=str(exc))
        w.life.configured(self.ops.monotonic())
        if self.tracer is not None:
            await self.tracer.worker_configured(w)

    async def set_injections(self, lun: int, text: str) -> str:
        """Change the fault injection rules of the LUN in slot ``lun`` on every worker
        at run time (vscsid.inject grammar; "" removes them); returns the canonical
        text. The admin socket's lun_inject calls it. Raises ValueError for a bad LUN
        or text, RuntimeError when a worker refuses."""
        canon = self.luns.set_injections(lun, text)
        errors = []
        for w in self.workers:
            if w.chan is None:
                continue            # a restarting worker gets the rules with its configure
            rep = await w.request(M.SetInjections(lun=lun, inject=canon), timeout=30)
            if not rep.ok:
                errors.append(f"worker {w.queue}: {rep.error}")
        if errors:
            raise RuntimeError("; ".join(errors))
        self.log.info("injection_set", lun=lun, inject=canon)
        return canon

    def _on_worker_exit(self, w: WorkerHandle, code: int) -> None:
        if self.stopping:
            w.life.stopping()
        decision = w.life.exited(self.ops.monotonic(), code)
        if decision.action == Action.NONE:
            w.log.info("worker_exited", status=describe_exit(code))
            return
        w.log.error("worker_died", status=describe_exit(code), next=decision.action.value,
                    delay=decision.delay, reason=decision.reason)
        if decision.action == Action.FATAL:
            self.log.critical("worker_failing_repeatedly", queue=w.queue, reason=decision.reason,
                              status=describe_exit(code))
            self.exit_code = 1
            self.request_stop()
            return
        self.loop.create_task(self._restart(w, decision.delay))

    async def _restart(self, w: WorkerHandle, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self.stopping:
            return
        self._spawn(w)
        try:
            await self._configure(w)
            if self.session is not None:
                await self.session.resume_worker(w)
        except Exception as exc:
            w.log.error("worker_restart_failed", error=str(exc))
            w.signal(signal.SIGKILL)

    async def _heartbeat_loop(self) -> None:
        """Ping every worker; a worker that stops answering gets SIGABRT (it dumps
        its stack), then SIGKILL; its exit then restarts it like any crash."""
        interval = self.policy.heartbeat_interval
        last_stats = self.ops.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = self.ops.monotonic()
            pings = [w for w in self.workers if w.alive and w.chan is not None
                     and w.state in (WState.RUNNING, WState.STARTING)]
            results = await asyncio.gather(*(w.request(M.Ping(), timeout=interval)
                                             for w in pings), return_exceptions=True)
            now = self.ops.monotonic()
            for w, res in zip(pings, results):
                if isinstance(res, M.Reply) and res.ok:
                    w.life.heartbeat(now)
                    w.last_stats = res.result(M.Ping)
            for w in self.workers:
                if not w.alive:
                    continue
                d = w.life.check(now)
                if d.action == Action.ABORT:
                    w.log.error("worker_hung", reason=d.reason, action="SIGABRT")
                    w.signal(signal.SIGABRT)
                elif d.action == Action.KILL:
                    w.log.error("worker_hung", reason=d.reason, action="SIGKILL")
                    w.signal(signal.SIGKILL)
            if self.stats_interval and now - last_stats >= self.stats_interval:
                last_stats = now
                self.log_stats()

    def log_stats(self) -> None:
        """One structured line per worker (and one for the supervisor): CPU time,
        context switches and private memory (USS: RSS also counts the guest
        memory every worker maps) from psutil, request counters from the worker."""
        keys = ("cpu_user_s", "cpu_system_s", "ctx_voluntary", "ctx_involuntary", "mem_uss",
                "num_fds")
        for w in self.workers:
            sample = self.proc_stats.sample(w.pid) if w.alive else None
            last = w.last_stats
            ring = last.stats if last is not None else {}
            w.log.info("worker_stats", state=w.state.value, restarts=w.life.restarts,
                       requests=ring.get("requests"), fast=ring.get("fast"),
                       in_flight=last.in_flight if last is not None else None,
                       **({k: sample[k] for k in keys} if sample else {}))
        me = self.proc_stats.sample(os.getpid())
        if me:
            self.log.info("supervisor_stats", **{k: me[k] for k in keys})

    # ------------------------------------------------------------------ main
    def request_stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()

    def _on_signal(self, sig: int) -> None:
        # Handlers only enqueue; the loop acts.
        self._signal_queue.append(sig)
        self.loop.call_soon(self._handle_signals)

    def _handle_signals(self) -> None:
        while self._signal_queue:
            sig = self._signal_queue.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.log.info("shutdown_requested", signal=signal.Signals(sig).name)
                self.request_stop()
            elif sig == signal.SIGHUP:
                systemd.reloading("reopening logs" + (", re-reading the configuration"
                                                      if self.cfg.config_file else ""))
                vlog.reopen()
                self.log.info("logs_reopened")
                if self.cfg.config_file:
                    self.loop.create_task(self._reload_then_ready())
                else:
                    systemd.ready(self._status_text())

    async def _reload_then_ready(self) -> None:
        try:
            await self.reload()
        finally:
            systemd.ready(self._status_text())

    async def reload(self) -> dict:
        """Re-read the configuration file: apply its LUN differences and its log level;
        report (and log) settings that only a restart applies."""
        from vscsid.config import ConfigError

        path = self.cfg.config_file
        if path is None or self.read_config is None:
            return {"error": "the daemon was started without --config"}
        try:
            args, specs = self.read_config()
        except ConfigError as exc:
            self.log.error("reload_failed", config=path, error=str(exc))
            return {"error": str(exc)}
        result = await self.lunops.reconcile(specs, "config")
        level = args.log_level
        if level != vlog.settings()["level"]:
            await self.set_log_level(level)
        restart = []
        for name, now in (("num_queues", self.cfg.num_queues), ("queue_size", self.cfg.queue_size),
                          ("engine", self.cfg.engine), ("socket_path", self.cfg.socket_path),
                          ("poll_us", self.cfg.poll_us)):
            new = getattr(args, name, None)
            if new is not None and name != "socket_path" and new != now:
                restart.append(name.replace("_", "-"))
        if restart:
            self.log.warning("reload_needs_restart", settings=restart)
        result["restart_needed"] = restart
        self.log.info("config_reloaded", config=path, **{k: v for k, v in result.items() if v})
        return result

    async def set_log_level(self, level: str) -> str:
        """Change the log threshold of the supervisor and of every worker (a worker
        started later gets it on its command line)."""
        old = vlog.settings()["level"]
        vlog.set_level(level)
        self.log_settings = vlog.settings()
        await asyncio.gather(*(self._tell_level(w, level) for w in self.workers
                               if w.chan is not None))
        self.log.warning("log_level_changed", level=level, previous=old)
        return old

    async def _tell_level(self, w: WorkerHandle, level: str) -> None:
        try:
            await w.request(M.SetLogLevel(level=level), timeout=10)
        except (WorkerGone, asyncio.TimeoutError):
            pass      # a replacement starts with the new level

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        for sig in self.early_signals:      # arrived before the loop ran
            self._on_signal(sig)
        self.workers = [WorkerHandle(q, self.loop, self.ops, on_event=self._on_worker_event,
                                     on_exit=self._on_worker_exit, policy=self.policy)
                        for q in range(self.cfg.num_queues)]
        from .admin import AdminServer
        from .trace import Tracer

        self.tracer = Tracer(self)
        for w in self.workers:
            self._spawn(w)
        results = await asyncio.gather(*(self._configure(w) for w in self.workers),
                                       return_exceptions=True)
        for w, res in zip(self.workers, results):
            if isinstance(res, BaseException):
                self.log.critical("worker_boot_failed", queue=w.queue, error=str(res))
                self.exit_code = 1          # the "stopped" line says what the process exits with
                await self._shutdown()
                return self.exit_code
        self.listener.setblocking(False)
        import time as _time

        self.started_wall = _time.time()
        if self.admin_listener is not None:
            self.admin = AdminServer(self, self.admin_listener)
            await self.admin.start()
        if self.metrics_listener is not None:
            from .metrics import MetricsServer

            self.metrics = MetricsServer(self, self.metrics_listener)
            await self.metrics.start()
        accept_task = self.loop.create_task(self._accept_loop())
        heartbeat_task = self.loop.create_task(self._heartbeat_loop())
        self.log.info("ready", socket=self.cfg.socket_path or f"fd:{self.cfg.listen_fd}",
                      queues=self.cfg.num_queues, luns=len(self.luns.specs),
                      workers=[w.pid for w in self.workers], admin=self.cfg.admin_socket,
                      metrics=("%s:%d" % self.metrics.address) if self.metrics else None)
        systemd.ready(self._status_text())
        watchdog_task = None
        interval = systemd.watchdog_interval()
        if interval:
            watchdog_task = self.loop.create_task(self._watchdog_loop(interval))
        await self._stop_event.wait()
        systemd.stopping("draining in-flight requests")
        accept_task.cancel()
        heartbeat_task.cancel()
        if watchdog_task is not None:
            watchdog_task.cancel()
        await self._shutdown()
        return self.exit_code

    def _status_text(self) -> str:
        where = self.cfg.socket_path or f"fd {self.cfg.listen_fd}"
        if self.session is not None:
            return (f"serving {len(self.luns.specs)} LUN(s) on {self.cfg.num_queues} queue(s) "
                    f"to front end #{self.session.conn_id}")
        return f"{len(self.luns.specs)} LUN(s), {self.cfg.num_queues} queue(s); waiting for a front end on {where}"

    def healthy(self) -> bool:
        """No worker hung or failing: what the systemd watchdog vouches for."""
        return all(w.life.aborted_at is None and w.state != WState.FATAL for w in self.workers)

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            if self.healthy():
                systemd.watchdog_ping()
            await asyncio.sleep(interval)

    async def _accept_loop(self) -> None:
        while True:
            conn, _ = await self.loop.sock_accept(self.listener)
            if self.session is not None and self.session.ending:
                # The previous front end is gone and its session is being torn down
                # (rings drained, memory unmapped): a VM restarted at once waits for
                # that rather than being refused.
                try:
                    await asyncio.wait_for(asyncio.shield(self._session_task), CLOSE_WAIT)
                except (asyncio.TimeoutError, Exception):
                    pass
                await asyncio.sleep(0)          # its done callback clears self.session
            if self.session is not None:
                self.log.warning("connection_refused", reason="a front end is already connected")
                conn.close()
                continue
            self.conn_counter += 1
            self.connections_total += 1
            self.session = Session(self, conn, self.conn_counter)
            self.log.info("frontend_connected", conn=self.conn_counter)
            systemd.status(self._status_text())
            task = self._session_task = self.session.start()
            task.add_done_callback(self._session_done)

    def _session_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("session_crashed", error=repr(task.exception()))
        self.session = None
        if not self.stopping:
            systemd.status(self._status_text())

    def _on_worker_event(self, w: WorkerHandle, msg: M.Event) -> None:
        if isinstance(msg, M.TraceRecords):
            if self.tracer is not None:
                self.tracer.records(w, msg)
            return
        if self.session is not None:
            self.session.on_worker_event(w, msg)

    async def _shutdown(self) -> None:
        self.stopping = True
        if self.admin is not None:
            await self.admin.close()
        if self.metrics is not None:
            await self.metrics.close()
        if self.tracer is not None:
            self.tracer.close()
        if self.session is not None:
            self.session.end()
            try:
                await asyncio.wait_for(self.session.closed.wait(), 30)
            except asyncio.TimeoutError:
                self.log.error("session_teardown_timeout")
        for w in self.workers:
            w.life.stopping()
            if w.chan is not None:
                try:
                    await w.request(M.Exit(), timeout=5)
                except (WorkerGone, asyncio.TimeoutError):
                    pass
        deadline = self.ops.monotonic() + 5
        while any(w.alive for w in self.workers) and self.ops.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for w in self.workers:
            if w.alive:
                w.signal(signal.SIGKILL)
        while any(w.alive for w in self.workers):
            await asyncio.sleep(0.02)
        try:
            self.listener.close()
        except OSError:
            pass
        if self.cfg.socket_path:
            self.ops.unlink(self.cfg.socket_path)
        if self.admin_listener is not None and self.cfg.admin_socket:
            if self.admin is None:
                self.admin_listener.close()
            self.ops.unlink(self.cfg.admin_socket)
        if self.metrics_listener is not None and self.metrics is None:
            self.metrics_listener.close()
        for w in self.workers:
            if w.stats is not None:
                w.stats.close()
                w.stats = None
            if w.stats_fd >= 0:
                self.ops.close(w.stats_fd)
                w.stats_fd = -1
        self.luns.close()
        self.log.info("stopped", exit_code=self.exit_code)
