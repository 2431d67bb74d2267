"""The admin socket: JSON-RPC 2.0 over a Unix stream socket (as SPDK's RPC server
does), served by the supervisor's event loop; ``vscsid-ctl`` is its client.

Framing: one JSON text per line (a request, a notification or a batch), answers
likewise. The socket is created mode 0600 (only the daemon's user may connect).
What a client can make the daemon do is bounded: a line longer than
MAX_MESSAGE is refused (and the connection closed), a batch holds at most
MAX_BATCH calls, at most MAX_CLIENTS connections are served at once (the next
is told so and closed), an idle connection is closed after IDLE_TIMEOUT, and a
client that does not read its answers is dropped once WRITE_LIMIT bytes wait
for it or an answer waited WRITE_TIMEOUT to be taken. Bad input gets a JSON-RPC
error, never an exception in the daemon.

Methods (params by name):

==============  ==========================  =========================================
method          params                      result
==============  ==========================  =========================================
status          -                           version, uptime, front end, queues, workers
lun_list        -                           [LUN]: address, backing, size, options, state
lun_add         spec (the --lun syntax)     the new LUN
lun_remove      lun ("T:L" or "L")          the removed LUN
lun_resize      lun                         lun, old_size, size, changed
lun_inject      lun, inject                 lun, inject (the rules now; "" removes them)
stats           -                           per queue, per LUN, per worker
trace           lun?, count?                notifications "trace" (one per command),
                                            then {records, dropped}
log_level       level                       level, previous
reload          -                           what the configuration reload changed
methods         -                           the method names
==============  ==========================  =========================================

Application errors: -32010 invalid LUN request, -32011 no such LUN, -32012 the
workers could not apply a change, -32020 no configuration file, -32000 busy.
"""
from __future__ import annotations

import asyncio
import json
import socket

from vscsid import log as vlog
from vscsid.config import ConfigError, LunSpec

from . import inspect
from .lunops import LunError
from .servers import close_server
from .luns import parse_address

MAX_MESSAGE = 64 * 1024
MAX_BATCH = 32
MAX_CLIENTS = 16
IDLE_TIMEOUT = 60.0
WRITE_LIMIT = 4 << 20
WRITE_TIMEOUT = 10.0

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
BUSY = -32000
NO_CONFIG = -32020


class RpcError(Exception):
    def __init__(self, code: int, message: str, data=None):
        super().__init__(message)
        self.code = code
        self.data = data


def _error(id_, code: int, message: str, data=None) -> dict:
    err = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": id_, "error": err}


def _params(params, allowed: dict[str, type], required: tuple[str, ...] = ()) -> dict:
    """Named parameters, checked: known names, the right JSON types."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, "params must be an object (named parameters)")
    for k, v in params.items():
        t = allowed.get(k)
        if t is None:
            raise RpcError(INVALID_PARAMS, f"unknown parameter {k!r}",
                           {"allowed": sorted(allowed)})
        if v is not None and (not isinstance(v, t) or (isinstance(v, bool) and t is not bool)):
            names = " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))
            raise RpcError(INVALID_PARAMS, f"parameter {k!r} must be {names}")
    for k in required:
        if params.get(k) is None:
            raise RpcError(INVALID_PARAMS, f"parameter {k!r} is required")
    return params


def _address(text) -> tuple[int, int]:
    try:
        return parse_address(str(text))
    except ConfigError as exc:
        raise RpcError(INVALID_PARAMS, str(exc)) from None


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    async def drain(self) -> None:
        try:
            await asyncio.wait_for(self.writer.drain(), WRITE_TIMEOUT)
        except asyncio.TimeoutError:
            raise ConnectionResetError("the client does not read its answers") from None

    def send(self, obj) -> None:
        """Queue one line for the client (dropped with the client when it does not read)."""
        t = self.writer.transport
        if t.is_closing():
            return
        if t.get_write_buffer_size() > WRITE_LIMIT:
            raise ConnectionResetError("the client does not read its answers")
        self.writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")


class AdminServer:
    def __init__(self, sup, listener: socket.socket):
        self.sup = sup
        self.listener = listener
        self.server: asyncio.AbstractServer | None = None
        self.clients: set[asyncio.Task] = set()
        self.log = vlog.get(admin=True)
        self.glog = vlog.GuestLog(self.log)     # a client can make us log at will
        self.methods = {
            "status": self.m_status, "lun_list": self.m_lun_list, "lun_add": self.m_lun_add,
            "lun_remove": self.m_lun_remove, "lun_resize": self.m_lun_resize,
            "lun_inject": self.m_lun_inject,
            "stats": self.m_stats, "trace": self.m_trace, "log_level": self.m_log_level,
            "reload": self.m_reload, "methods": self.m_methods,
        }

    async def start(self) -> None:
        self.listener.setblocking(False)
        self.server = await asyncio.start_unix_server(self._client, sock=self.listener,
                                                      limit=MAX_MESSAGE)

    async def close(self) -> None:
        await close_server(self.server, self.clients)

    # ------------------------------------------------------------------ connections
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        conn = Conn(reader, writer)
        if len(self.clients) >= MAX_CLIENTS:
            self.glog.warning("admin_client_refused", reason=f"{MAX_CLIENTS} clients connected")
            try:
                conn.send(_error(None, BUSY, f"too many clients ({MAX_CLIENTS} connected)"))
                await conn.drain()
            except (ConnectionError, OSError):
                pass
            writer.close()
            return
        self.clients.add(task)
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                except asyncio.TimeoutError:
                    break
                except (ValueError, asyncio.LimitOverrunError):
                    # Longer than MAX_MESSAGE: the rest of it cannot be parsed either.
                    self.glog.warning("admin_message_too_large", limit=MAX_MESSAGE)
                    conn.send(_error(None, INVALID_REQUEST,
                                     f"message larger than {MAX_MESSAGE} bytes"))
                    await conn.drain()
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                reply = await self._handle_line(line, conn)
                if reply is not None:
                    conn.send(reply)
                    await conn.drain()
        except ConnectionResetError as exc:
            self.glog.warning("admin_client_dropped", reason=str(exc))
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self.clients.discard(task)
            writer.close()

    async def _handle_line(self, line: bytes, conn: Conn):
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(None, PARSE_ERROR, f"parse error: {exc}")
        if isinstance(obj, list):
            if not obj:
                return _error(None, INVALID_REQUEST, "empty batch")
            if len(obj) > MAX_BATCH:
                return _error(None, INVALID_REQUEST, f"a batch holds at most {MAX_BATCH} calls")
            out = []
            for item in obj:
                r = await self._handle(item, conn, in_batch=True)
                if r is not None:
                    out.append(r)
            return out or None
        return await self._handle(obj, conn)

    async def _handle(self, obj, conn: Conn, in_batch: bool = False):
        if not isinstance(obj, dict):
            return _error(None, INVALID_REQUEST, "a request is a JSON object")
        id_ = obj.get("id")
        if "id" in obj and not (id_ is None or isinstance(id_, str)
                                or (isinstance(id_, int) and not isinstance(id_, bool))):
            return _error(None, INVALID_REQUEST, "id must be a string, a number or null")
        if obj.get("jsonrpc") != "2.0":
            return _error(id_, INVALID_REQUEST, 'not JSON-RPC 2.0 ("jsonrpc": "2.0" missing)')
        method = obj.get("method")
        if not isinstance(method, str):
            return _error(id_, INVALID_REQUEST, "method must be a string")
        notification = "id" not in obj
        fn = self.methods.get(method)
        if fn is None:
            return None if notification else _error(id_, METHOD_NOT_FOUND,
                                                    f"method not found: {method[:100]!r}")
        if method == "trace" and (in_batch or notification):
            return None if notification else _error(id_, INVALID_REQUEST,
                                                    "trace cannot be part of a batch")
        try:
            if method == "trace":
                result = await fn(obj.get("params"), conn, id_)
            else:
                result = await fn(obj.get("params"))
        except RpcError as exc:
            return None if notification else _error(id_, exc.code, str(exc), exc.data)
        except LunError as exc:
            return None if notification else _error(id_, exc.code, str(exc))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug: answer it, log it, keep serving
            self.log.exception("admin_method_failed", method=method)
            return None if notification else _error(id_, INTERNAL_ERROR,
                                                    f"internal error: {type(exc).__name__}: {exc}")
        if notification:
            return None
        return {"jsonrpc": "2.0", "id": id_, "result": result}

    # ------------------------------------------------------------------ methods
    async def m_methods(self, params):
        _params(params, {})
        return sorted(self.methods)

    async def m_status(self, params):
        _params(params, {})
        return inspect.status(self.sup)

    async def m_lun_list(self, params):
        _params(params, {})
        ops = self.sup.lunops
        return [ops.describe(x) for x in self.sup.luns.luns()]

    async def m_lun_add(self, params):
        p = _params(params, {"spec": str}, ("spec",))
        try:
            spec = LunSpec.parse(p["spec"])
        except ConfigError as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from None
        lun = await self.sup.lunops.add(spec, "admin")
        return self.sup.lunops.describe(lun)

    async def m_lun_remove(self, params):
        p = _params(params, {"lun": (str, int)}, ("lun",))
        lun = await self.sup.lunops.remove(*_address(p["lun"]))
        return self.sup.lunops.describe(lun)

    async def m_lun_resize(self, params):
        p = _params(params, {"lun": (str, int)}, ("lun",))
        target, number = _address(p["lun"])
        old, new = await self.sup.lunops.resize(target, number)
        return {"lun": f"{target}:{number}", "old_size": old, "size": new, "changed": old != new}

    async def m_lun_inject(self, params):
        """Fault injection rules of a LUN, changed at run time (vscsid.inject)."""
        p = _params(params, {"lun": (str, int), "inject": str}, ("lun",))
        target, number = _address(p["lun"])
        lun = self.sup.luns.find(target, number)
        if lun is None:
            raise LunError(LunError.NOT_FOUND, f"no LUN {target}:{number}")
        try:
            canon = await self.sup.set_injections(lun.slot, p.get("inject") or "")
        except ValueError as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from None
        except RuntimeError as exc:
            raise LunError(LunError.FAILED, str(exc)) from None
        return {"lun": lun.address, "inject": canon}

    async def m_stats(self, params):
        _params(params, {})
        return inspect.stats(self.sup)

    async def m_log_level(self, params):
        p = _params(params, {"level": str}, ("level",))
        level = p["level"].lower()
        if level not in ("debug", "info", "warning", "error"):
            raise RpcError(INVALID_PARAMS, "level must be debug, info, warning or error")
        return {"level": level, "previous": await self.sup.set_log_level(level)}

    async def m_reload(self, params):
        _params(params, {})
        if self.sup.cfg.config_file is None:
            raise RpcError(NO_CONFIG, "the daemon was started without --config")
        result = await self.sup.reload()
        if "error" in result and len(result) == 1:
            raise RpcError(INVALID_PARAMS, result["error"])
        return result

    async def m_trace(self, params, conn: Conn, id_):
        """Stream the completed commands as notifications; the result comes last."""
        p = _params(params, {"lun": (str, int), "count": int})
        address = _address(p["lun"]) if p.get("lun") is not None else None
        count = p.get("count")
        if count is not None and count <= 0:
            raise RpcError(INVALID_PARAMS, "count must be positive")
        if address is not None and self.sup.luns.find(*address) is None:
            raise RpcError(LunError.NOT_FOUND, "no LUN %d:%d" % address)
        tracer = self.sup.tracer
        sub = await tracer.subscribe(address, count)
        eof = asyncio.ensure_future(conn.reader.read(1))   # the client hung up (or spoke)
        try:
            while sub.left is None or sub.left > 0:
                if not sub.buf:
                    sub.wake.clear()
                    waiter = asyncio.ensure_future(sub.wake.wait())
                    done, _ = await asyncio.wait({waiter, eof},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if eof in done:
                        waiter.cancel()
                        break
                    if not tracer.active and not sub.buf:
                        break        # the daemon is stopping
                while sub.buf and (sub.left is None or sub.left > 0):
                    conn.send({"jsonrpc": "2.0", "method": "trace", "params": sub.buf.popleft()})
                    sub.sent += 1
                    if sub.left is not None:
                        sub.left -= 1
                await conn.drain()
        finally:
            eof.cancel()
            await tracer.unsubscribe(sub)
        return {"records": sub.sent, "dropped": sub.dropped}
