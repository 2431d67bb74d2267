"""Supervisor ↔ worker channel.

One ``SOCK_SEQPACKET`` socketpair per worker. Each datagram is one message: a
UTF-8 JSON object with an ``"op"`` field, plus file descriptors sent with
``SCM_RIGHTS``. Requests that want an answer carry ``"seq"``; the answer is
``{"op": "reply", "seq": n, "ok": bool, ...}``. Datagram boundaries keep fds
paired with their message, so no framing state is needed.

Operations (supervisor → worker):

============  =========================================  ==========================
op            fields                                      fds
============  =========================================  ==========================
configure     queue, vq, luns[], cdb_size, sense_size,    LUN fds (in ``luns`` order),
              log, features                               LUN state page
mem           generation, regions[]                       one per region
start         size, desc, avail, used (GPAs),             kick, call (call optional:
              last_avail, event_idx, enabled               ``call`` field false)
call          -                                           new call fd (or none)
err           -                                           err fd (or none)
enable        on                                          -
stop          -                                           -   → reply last_avail
ping          -                                           -   → reply stats
exit          -                                           -
============  =========================================  ==========================

Worker → supervisor: ``reply`` messages, and ``event`` messages (``ring_broken``).
"""
from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any, Sequence

MAX_MSG = 1 << 20
MAX_FDS = 64


class ChannelClosed(Exception):
    pass


class ChannelError(Exception):
    pass


def socketpair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def encode(msg: dict) -> bytes:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MSG:
        raise ChannelError(f"message of {len(data)} bytes too large")
    return data


def send(sock: socket.socket, msg: dict, fds: Sequence[int] = ()) -> None:
    data = encode(msg)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


_FD = struct.Struct("i")


def fds_from_ancdata(anc) -> list[int]:
    """The fds carried by ``recvmsg`` ancillary data (SCM_RIGHTS), in order."""
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD.size
            fds.extend(struct.unpack(f"{usable // _FD.size}i", payload[:usable]))
    return fds


def recv(sock: socket.socket, flags: int = 0) -> tuple[dict[str, Any], list[int]]:
    """Receive one message (pass ``socket.MSG_DONTWAIT`` to never block).

    Uses ``recvmsg`` directly: ``socket.recv_fds`` ignores its ``flags`` argument
    on Python 3.11, so neither MSG_DONTWAIT nor MSG_CMSG_CLOEXEC would apply."""
    data, anc, flags, _ = sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(MAX_FDS * _FD.size),
                                       flags | socket.MSG_CMSG_CLOEXEC)
    fds = fds_from_ancdata(anc)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ChannelError("control data truncated (too many fds)")
    if not data:
        for fd in fds:
            os.close(fd)
        raise ChannelClosed()
    if flags & socket.MSG_TRUNC:
        for fd in fds:
            os.close(fd)
        raise ChannelError("message truncated")
    try:
        msg = json.loads(data)
    except ValueError as exc:
        for fd in fds:
            os.close(fd)
        raise ChannelError(f"bad message: {exc}") from None
    if not isinstance(msg, dict) or "op" not in msg:
        for fd in fds:
            os.close(fd)
        raise ChannelError("message without op")
    return msg, fds
