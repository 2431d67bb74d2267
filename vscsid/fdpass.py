"""File descriptors over Unix sockets (SCM_RIGHTS): the one parser of ancillary
data, for the vhost-user transport and the supervisor↔worker channel."""
from __future__ import annotations

import socket
import struct

_FD = struct.Struct("i")


def fds_from_ancdata(anc) -> list[int]:
    """The fds carried by ``recvmsg`` ancillary data (SCM_RIGHTS), in order."""
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD.size
            fds.extend(struct.unpack(f"{usable // _FD.size}i", payload[:usable]))
    return fds


def rights(fds) -> list[tuple[int, int, bytes]]:
    """Ancillary data passing ``fds``."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
