"""Structured logging with structlog: JSON lines (default when stderr is not a
terminal) or a human console format. The supervisor and every worker call
:func:`setup` with the same settings; context (``conn``, ``queue``, ``worker``,
``lun``) is bound on the loggers that need it.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")

_state: dict[str, Any] = {"stream": None, "path": None, "format": "json", "level": "info"}


class _ReopenableStream:
    """stderr, or a log file that SIGHUP can reopen (log rotation)."""

    def __init__(self, path: str | None):
        self.path = path
        self._f = None
        self.reopen()

    def reopen(self) -> None:
        if self.path is None:
            self._f = sys.stderr
            return
        old = self._f
        self._f = open(self.path, "a", buffering=1, encoding="utf-8")
        if old is not None and old is not sys.stderr:
            old.close()

    def write(self, s: str) -> int:
        return self._f.write(s)

    def flush(self) -> None:
        try:
            self._f.flush()
        except (OSError, ValueError):
            pass


def resolve_format(fmt: str) -> str:
    if fmt == "auto":
        return "console" if sys.stderr.isatty() else "json"
    return fmt


def setup(fmt: str = "auto", level: str = "info", path: str | None = None, **context: Any) -> None:
    fmt = resolve_format(fmt)
    if level not in LEVELS:
        raise ValueError(f"bad log level {level!r}")
    stream = _ReopenableStream(path)
    _state.update(stream=stream, path=path, format=fmt, level=level)
    _state["level_no"] = _LEVEL_NO[level]
    processors: list = [
        _level_filter,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer(sort_keys=False))
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=processors,
        # The threshold is applied by _level_filter, so that set_level() also
        # reaches loggers already bound (a filtering wrapper class is fixed at bind).
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        # One write() per record (message and newline together): several
        # processes share stderr, and print() would write the newline
        # separately, letting records from different processes interleave.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    if context:
        structlog.contextvars.bind_contextvars(**context)


_LEVEL_NO = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "exception": 40,
             "critical": 50, "fatal": 50, "msg": 20}


def _level_filter(logger, method_name: str, event_dict):
    if _LEVEL_NO.get(method_name, 20) < _state.get("level_no", 20):
        raise structlog.DropEvent
    return event_dict


def set_level(level: str) -> None:
    """Change the threshold at run time (every logger of this process)."""
    if level not in LEVELS:
        raise ValueError(f"bad log level {level!r}")
    _state["level"] = level
    _state["level_no"] = _LEVEL_NO[level]


def reopen() -> None:
    stream = _state.get("stream")
    if stream is not None:
        stream.reopen()


def settings() -> dict:
    return {"format": _state["format"], "level": _state["level"], "path": _state["path"]}


def get(**context: Any):
    return structlog.get_logger().bind(**context) if context else structlog.get_logger()



class RateLimiter:
    """Token bucket per key, for log lines a guest can trigger at will (malformed
    requests): a hostile guest must not be able to flood the log. ``check(key)``
    returns None when the line should be dropped, else how many lines of that key
    were dropped since the last one let through (to report as ``suppressed=``)."""

    def __init__(self, rate: float | None = None, burst: int | None = None, clock=None):
        import time as _time

        if rate is None:
            rate = float(os.environ.get("VSCSID_GUEST_LOG_RATE", "10"))
        self.rate = rate
        self.burst = burst if burst is not None else max(1, int(rate * 10))
        self.clock = clock or _time.monotonic
        self._buckets: dict[str, list] = {}      # key -> [tokens, last time, dropped]

    def check(self, key: str) -> int | None:
        now = self.clock()
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = [float(self.burst), now, 0]
        b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
        b[1] = now
        if b[0] < 1.0:
            b[2] += 1
            return None
        b[0] -= 1.0
        dropped, b[2] = b[2], 0
        return dropped

    def emit(self, logger, level: str, event: str, **fields) -> None:
        """``logger.<level>(event, **fields)`` unless rate limited (adds ``suppressed=``)."""
        dropped = self.check(event)
        if dropped is None:
            return
        if dropped:
            fields["suppressed"] = dropped
        getattr(logger, level)(event, **fields)

    def warn(self, logger, event: str, **fields) -> None:
        self.emit(logger, "warning", event, **fields)


class GuestLog:
    """A logger for lines a guest can cause at will (malformed or failing
    requests, task management, notification queries): the one mechanism that
    keeps a guest from flooding the log. Every record goes through a shared
    :class:`RateLimiter`, per event name; ``bind`` keeps the same limiter."""

    __slots__ = ("_log", "_limiter")

    def __init__(self, logger, limiter: RateLimiter | None = None):
        self._log = logger
        self._limiter = limiter if limiter is not None else RateLimiter()

    def bind(self, **context) -> "GuestLog":
        return GuestLog(self._log.bind(**context), self._limiter)

    def debug(self, event: str, **fields) -> None:
        self._limiter.emit(self._log, "debug", event, **fields)

    def info(self, event: str, **fields) -> None:
        self._limiter.emit(self._log, "info", event, **fields)

    def warning(self, event: str, **fields) -> None:
        self._limiter.emit(self._log, "warning", event, **fields)

    def error(self, event: str, **fields) -> None:
        self._limiter.emit(self._log, "error", event, **fields)

    def exception(self, event: str, **fields) -> None:
        self._limiter.emit(self._log, "exception", event, **fields)
