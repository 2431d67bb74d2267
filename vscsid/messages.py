"""The supervisor ↔ worker channel and its messages, typed (used by both sides).

One ``SOCK_SEQPACKET`` socketpair per worker. Each datagram is one message: a
UTF-8 JSON object with an ``"op"`` field, plus file descriptors (SCM_RIGHTS).
Datagram boundaries keep fds paired with their message, so no framing state is
needed. Each message is a dataclass below; its fd fields (``fd(...)``) travel in
SCM_RIGHTS and the JSON carries, for each, its index in the fd list (or null):
nothing is positional, and a receiver closes every fd no field claimed.

A request that wants an answer carries ``seq``; the answer is a :class:`Reply`
with the same ``seq``, ``ok``, an ``error`` text when not ok, and the fields of
the request's result type (``Request.result``). The worker also sends
:class:`Event` messages (a ring broke, guest memory faulted) and, while a trace
is on, :class:`TraceRecords` (completed commands, batched per loop pass).

=============  ==============================  ========================  ==================
message        fields                          fds                       result
=============  ==============================  ========================  ==================
Configure      queue, queues, luns, engine,    lun_fds (per LUN, or      ConfigureResult
               poll_us, cdb_size, sense_size,  null), state_page,
               latency_sample                  stats_page
AddLun         lun (a LunEntry)                lun_fd (null: no file)    ConfigureResult
RemoveLun      slot                            -                         -
ResizeLun      slot, num_blocks                -                         -
TraceStart     slots (null: every request)     -                         -
TraceStop      -                               -                         -
SetLogLevel    level                           -                         -
MapMemory      regions, generation,            region_fds (one each)     -
               max_regions
StartRing      size, desc, avail, used,        kick, call?, inflight?,   -
               last_avail, event_idx,          err?
               enabled, recover, resume,
               inflight_offset, inflight_size
SetKick        -                               kick                      -
SetCall        -                               call?                     -
SetErr         -                               err?                      -
EnableRing     on                              -                         -
StopRing       -                               -                         StopResult
SetParams      cdb_size, sense_size            -                         -
TaskMgmt       kind, target, lun, tag          -                         TaskMgmtResult
SetInjections  lun (a slot), inject            -                         -
Unmap          -                               -                         -
Ping           -                               -                         PingResult
Exit           -                               -                         -
=============  ==============================  ========================  ==================
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from .fdpass import fds_from_ancdata

MAX_MSG = 1 << 20
MAX_FDS = 64


class ChannelClosed(Exception):
    pass


class ChannelError(Exception):
    pass


def fd(optional: bool = True):
    """A field holding a file descriptor (sent with SCM_RIGHTS); None when absent."""
    return field(default=None if optional else -1, metadata={"fd": "one"})


def fd_list():
    """A field holding a list of file descriptors (entries may be None)."""
    return field(default_factory=list, metadata={"fd": "list"})


_REGISTRY: dict[str, type["Message"]] = {}


@dataclass
class Message:
    """Base of every message; ``op`` names it on the wire."""

    op: ClassVar[str] = ""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.op:
            _REGISTRY[cls.op] = cls

    # -- wire form
    def encode(self) -> tuple[dict, list[int]]:
        body: dict[str, Any] = {"op": self.op}
        fds: list[int] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = f.metadata.get("fd")
            if kind == "one":
                if value is None or value < 0:
                    body[f.name] = None
                else:
                    body[f.name] = len(fds)
                    fds.append(value)
            elif kind == "list":
                idx = []
                for v in value:
                    if v is None or v < 0:
                        idx.append(None)
                    else:
                        idx.append(len(fds))
                        fds.append(v)
                body[f.name] = idx
            else:
                body[f.name] = value
        return body, fds

    @classmethod
    def decode(cls, body: dict, fds: list[int]) -> "Message":
        """The message from its wire form; raises ChannelError (closing every fd) when
        it does not fit its type."""
        kw: dict[str, Any] = {}
        used: set[int] = set()

        def take(i):
            if i is None:
                return None
            if not isinstance(i, int) or not 0 <= i < len(fds) or i in used:
                raise ChannelError(f"{cls.op}: bad fd index {i!r}")
            used.add(i)
            return fds[i]

        try:
            for f in dataclasses.fields(cls):
                if f.name not in body:
                    continue
                kind = f.metadata.get("fd")
                if kind == "one":
                    kw[f.name] = take(body[f.name])
                elif kind == "list":
                    kw[f.name] = [take(i) for i in body[f.name]]
                else:
                    kw[f.name] = body[f.name]
            msg = cls(**kw)
        except (ChannelError, TypeError, ValueError) as exc:
            for x in fds:
                os.close(x)
            raise ChannelError(f"{cls.op}: {exc}") from None
        for i, x in enumerate(fds):
            if i not in used:
                os.close(x)
        return msg

    def fds(self) -> list[int]:
        """Every fd this message holds (to close on a failure path)."""
        return self.encode()[1]


@dataclass
class Request(Message):
    """A message that is answered (``seq`` pairs the Reply)."""

    seq: int = 0
    result: ClassVar[type | None] = None


# ----------------------------------------------------------------------------- results

@dataclass
class StopResult:
    last_avail: int = 0


@dataclass
class TaskMgmtResult:
    found: bool = False


@dataclass
class ConfigureResult:
    """For each network LUN: its identity as the worker built it from what the server
    advertises (``info``, a DiskInfo dict) and the server's capabilities (``facts``);
    the supervisor hands both to later workers (a restarted worker then comes up even
    while the server is unreachable)."""
    luns: list = field(default_factory=list)           # [{"lun", "info", "facts"}]
    #: how to read the worker's statistics page (see workers/stats.py)
    stats_layout: dict = field(default_factory=dict)


@dataclass
class PingResult:
    stats: dict = field(default_factory=dict)
    started: bool = False
    enabled: bool = False
    broken: bool = False
    in_flight: int = 0


# ----------------------------------------------------------------------------- supervisor → worker

@dataclass
class LunEntry:
    """One LUN of a worker's configuration: its address (target, LUN number), its slot
    (its index in the LUN table, the state page and the statistics page), its spec
    (config.LunSpec as a dict) and its identity (scsi.DiskInfo as a dict)."""
    lun: int
    spec: dict
    info: dict
    facts: dict | None = None       # network LUNs: what the server advertised (ConfigureResult)
    target: int = 0
    slot: int | None = None         # None: the LUN number (single-target callers)

    def __post_init__(self):
        if self.slot is None:
            self.slot = self.lun


@dataclass
class Configure(Request):
    op: ClassVar[str] = "configure"
    result: ClassVar[type] = ConfigureResult
    queue: int = 0
    queues: int = 1                 # how many workers (network LUNs: one connection each)
    luns: list = field(default_factory=list)          # [LunEntry as dict]
    lun_fds: list = fd_list()                          # aligned with luns (None: no fd)
    state_page: int | None = fd()                      # the shared per-LUN state page
    stats_page: int | None = fd()                      # this queue's statistics page
    engine: str = "c"
    poll_us: int = 0
    cdb_size: int = 32
    sense_size: int = 96
    latency_sample: int = 1        # time one request in N (0: none)
    result: ClassVar[type] = ConfigureResult

    def lun_entries(self) -> list[LunEntry]:
        return [LunEntry(**e) for e in self.luns]


@dataclass
class AddLun(Request):
    """A LUN comes (hot-add): the worker opens its backend on ``fd`` and serves it."""
    op: ClassVar[str] = "add_lun"
    lun: dict = field(default_factory=dict)            # a LunEntry as a dict
    lun_fd: int | None = fd()

    def entry(self) -> LunEntry:
        return LunEntry(**self.lun)


@dataclass
class RemoveLun(Request):
    """A LUN goes: new requests to it get the answer a missing LUN gets; the reply
    comes once none of its requests is in flight on this queue any more."""
    op: ClassVar[str] = "remove_lun"
    slot: int = 0


@dataclass
class ResizeLun(Request):
    """The LUN's capacity changed; a shrink is applied (and answered) once none of
    the LUN's requests is in flight on this queue."""
    op: ClassVar[str] = "resize_lun"
    slot: int = 0
    num_blocks: int = 0


@dataclass
class TraceStart(Request):
    """Report every completed command (of the LUNs in ``slots``; None: every request,
    missing LUNs and targets included) with TraceRecords; those LUNs leave the C
    fast path while the trace lasts."""
    op: ClassVar[str] = "trace_start"
    slots: list | None = None


@dataclass
class TraceStop(Request):
    op: ClassVar[str] = "trace_stop"


@dataclass
class SetLogLevel(Request):
    op: ClassVar[str] = "log_level"
    level: str = "info"


@dataclass
class MapMemory(Request):
    op: ClassVar[str] = "mem"
    regions: list = field(default_factory=list)       # [memory.RegionSpec as dict]
    region_fds: list = fd_list()
    generation: int = 0
    max_regions: int = 8


@dataclass
class StartRing(Request):
    op: ClassVar[str] = "start"
    size: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    last_avail: int = 0
    event_idx: bool = False
    enabled: bool = False
    recover: bool = False
    resume: bool = False
    kick: int | None = fd()
    call: int | None = fd()
    err: int | None = fd()
    inflight: int | None = fd()
    inflight_offset: int = 0
    inflight_size: int = 0


@dataclass
class SetKick(Request):
    op: ClassVar[str] = "kick"
    kick: int | None = fd()


@dataclass
class SetCall(Request):
    op: ClassVar[str] = "call"
    call: int | None = fd()


@dataclass
class SetErr(Request):
    op: ClassVar[str] = "err"
    err: int | None = fd()


@dataclass
class EnableRing(Request):
    op: ClassVar[str] = "enable"
    on: bool = False


@dataclass
class StopRing(Request):
    op: ClassVar[str] = "stop"
    result: ClassVar[type] = StopResult


@dataclass
class SetParams(Request):
    op: ClassVar[str] = "params"
    cdb_size: int = 32
    sense_size: int = 96


@dataclass
class TaskMgmt(Request):
    op: ClassVar[str] = "tmf"
    result: ClassVar[type] = TaskMgmtResult
    kind: str = ""
    target: int = 0
    lun: int | None = None          # None: every LUN of the target (I_T nexus reset)
    tag: int = 0


@dataclass
class SetInjections(Request):
    """Replace LUN ``lun``'s fault injection rules with ``inject`` (the grammar of
    vscsid.inject; "" removes them). Every worker gets it; a bad text is refused."""
    op: ClassVar[str] = "inject"
    lun: int = 0
    inject: str = ""


@dataclass
class Unmap(Request):
    op: ClassVar[str] = "unmap"


@dataclass
class Ping(Request):
    op: ClassVar[str] = "ping"
    result: ClassVar[type] = PingResult


@dataclass
class Exit(Request):
    op: ClassVar[str] = "exit"


# ----------------------------------------------------------------------------- worker → supervisor

@dataclass
class Reply(Message):
    op: ClassVar[str] = "reply"
    seq: int = 0
    ok: bool = True
    error: str | None = None
    body: dict = field(default_factory=dict)           # the request's result fields

    def result(self, request_type: type[Request]):
        rt = request_type.result
        if rt is None:
            return None
        names = {f.name for f in dataclasses.fields(rt)}
        return rt(**{k: v for k, v in self.body.items() if k in names})


@dataclass
class Event(Message):
    """Something the worker noticed on its own: ``ring_broken`` or ``memory_fault``."""
    op: ClassVar[str] = "event"
    event: str = ""
    reason: str | None = None


@dataclass
class TraceRecords(Message):
    """Completed commands (while a trace is on): ``records`` is a list of
    [time_ns, target, lun, cdb hex, status, sense hex, response, latency_ns,
    data_in, data_out]; ``dropped`` counts the records the worker could not send."""
    op: ClassVar[str] = "trace"
    records: list = field(default_factory=list)
    dropped: int = 0


# ----------------------------------------------------------------------------- the channel

def socketpair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def send(sock: socket.socket, msg: Message, flags: int = 0) -> None:
    body, fds = msg.encode()
    data = json.dumps(body, separators=(",", ":")).encode()
    if len(data) > MAX_MSG:
        raise ChannelError(f"message of {len(data)} bytes too large")
    if fds:
        socket.send_fds(sock, [data], fds, flags)
    else:
        sock.send(data, flags)


def recv(sock: socket.socket, flags: int = 0) -> Message:
    """Receive one message (pass ``socket.MSG_DONTWAIT`` to never block).

    Uses ``recvmsg`` directly: ``socket.recv_fds`` ignores its ``flags`` argument
    on Python 3.11, so neither MSG_DONTWAIT nor MSG_CMSG_CLOEXEC would apply."""
    data, anc, rflags, _ = sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(MAX_FDS * 4),
                                        flags | socket.MSG_CMSG_CLOEXEC)
    fds = fds_from_ancdata(anc)

    def fail(why: str, exc: type[Exception] = ChannelError):
        for x in fds:
            os.close(x)
        raise exc(why)

    if rflags & socket.MSG_CTRUNC:
        fail("control data truncated (too many fds)")
    if not data:
        fail("", ChannelClosed)
    if rflags & socket.MSG_TRUNC:
        fail("message truncated")
    try:
        body = json.loads(data)
    except ValueError as exc:
        fail(f"bad message: {exc}")
    if not isinstance(body, dict) or body.get("op") not in _REGISTRY:
        fail(f"unknown message {body.get('op') if isinstance(body, dict) else body!r}")
    return _REGISTRY[body["op"]].decode(body, fds)


def fds_of(msgs: Sequence[Message]) -> list[int]:
    return [x for m in msgs for x in m.fds()]
