"""A vhost-user front end in Python: plays QEMU's part over a real socket.

It drives a back end (vscsid, or any vhost-user device such as
qemu-storage-daemon) with real memfd guest memory and real eventfds. Tests use
it for byte-exact conversations and hostile messages; ``vscsid-bench`` uses it
as its control path.

Usage::

    with FrontendMemory(64 << 20) as mem, VhostUserFrontend(path) as fe:
        fe.negotiate()
        fe.set_mem_table(mem)
        q = DriverQueue(mem, 128, event_idx=fe.event_idx)
        fe.setup_queue(2, q)          # creates and sends kick/call eventfds
        ...
"""
from __future__ import annotations

import os
import select
import socket
import time
from typing import Sequence

from vscsid.virtio.defs import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from vscsid.vhost.protocol import (
    VHOST_USER_F_PROTOCOL_FEATURES, ConfigPayload, Empty, FrontendCodec, MemoryRegion,
    MemoryTable, Message, ProtocolFeature, Request, U64Payload,
    VringAddr, VringFile, VringState, encode_request, feature_mask,
)

DEFAULT_PROTOCOL = feature_mask(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK,
                                ProtocolFeature.CONFIG)


class FrontendError(Exception):
    pass


class Nack(FrontendError):
    """The back end answered a REPLY_ACK request with a failure."""


class VhostUserFrontend:
    def __init__(self, path: str | None = None, *, sock: socket.socket | None = None,
                 timeout: float = 30.0, connect_timeout: float = 10.0):
        self.timeout = timeout
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            deadline = time.monotonic() + connect_timeout
            while True:
                try:
                    sock.connect(path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        sock.close()
                        raise
                    time.sleep(0.05)
        self.sock = sock
        self.codec = FrontendCodec()
        self.features = 0
        self.protocol_features = 0
        self.backend_features = 0
        self.backend_protocol_features = 0
        self.queue_num = 0
        self._eventfds: list[int] = []

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        for fd in self._eventfds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._eventfds = []
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "VhostUserFrontend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & (1 << ProtocolFeature.REPLY_ACK))

    @property
    def event_idx(self) -> bool:
        return bool(self.features & (1 << VIRTIO_RING_F_EVENT_IDX))

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def send(self, request: int, payload=Empty(), fds: Sequence[int] = (), *,
             need_reply: bool = False, flags: int | None = None) -> None:
        self.send_raw(encode_request(request, payload, need_reply=need_reply, flags=flags), fds)

    def recv_reply(self, request: int, kind: str | None = None,
                   timeout: float | None = None) -> Message:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            msg = self.codec.next_reply(request, kind)
            if msg is not None:
                return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply to {Request(request).name}")
            r, _, _ = select.select([self.sock], [], [], remaining)
            if not r:
                continue
            data, fds, _flags, _ = socket.recv_fds(self.sock, 65536, 8)
            if not data:
                raise ConnectionError("back end closed the connection")
            self.codec.feed(data, fds)

    def connection_closed(self, timeout: float = 5.0) -> bool:
        """True if the back end closes the connection within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            r, _, _ = select.select([self.sock], [], [], remaining)
            if r:
                try:
                    data = self.sock.recv(65536)
                except ConnectionResetError:
                    return True
                if not data:
                    return True

    def request(self, request: int, payload=Empty(), fds: Sequence[int] = (), *,
                ack: bool | None = None) -> None:
        """Send a request that has no reply of its own. With REPLY_ACK negotiated
        (or ``ack=True``) wait for the ack and raise :class:`Nack` on failure."""
        want = self.reply_ack if ack is None else ack
        self.send(request, payload, fds, need_reply=want)
        if want:
            rep = self.recv_reply(request, "u64")
            if rep.payload.value != 0:
                raise Nack(f"{Request(request).name} failed ({rep.payload.value})")

    def get(self, request: int, payload=Empty(), kind: str | None = None) -> Message:
        self.send(request, payload)
        return self.recv_reply(request, kind)

    # ------------------------------------------------------------------ negotiation
    def negotiate(self, features: int | None = None, protocol: int | None = None,
                  *, set_owner: bool = True) -> None:
        self.backend_features = self.get(Request.GET_FEATURES).payload.value
        wanted = (features if features is not None else
                  feature_mask(VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
                               VIRTIO_RING_F_EVENT_IDX, VHOST_USER_F_PROTOCOL_FEATURES))
        self.features = wanted & self.backend_features
        if self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            self.backend_protocol_features = self.get(Request.GET_PROTOCOL_FEATURES).payload.value
            want_p = DEFAULT_PROTOCOL if protocol is None else protocol
            self.protocol_features = want_p & self.backend_protocol_features
            self.send(Request.SET_PROTOCOL_FEATURES, U64Payload(self.protocol_features))
            if self.protocol_features & (1 << ProtocolFeature.MQ):
                self.queue_num = self.get(Request.GET_QUEUE_NUM).payload.value
        if set_owner:
            self.request(Request.SET_OWNER)
        self.request(Request.SET_FEATURES, U64Payload(self.features))

    def get_config(self, offset: int = 0, size: int = 36) -> bytes:
        rep = self.get(Request.GET_CONFIG, ConfigPayload(offset, size, 0, b"\0" * size))
        if rep.payload.size != size:
            raise Nack(f"GET_CONFIG failed (reply size {rep.payload.size})")
        return rep.payload.data

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.request(Request.SET_CONFIG, ConfigPayload(offset, len(data), flags, data))

    # ------------------------------------------------------------------ memory
    def set_mem_table(self, mem) -> None:
        entries = mem.regions_for_mem_table()
        table = MemoryTable(tuple(MemoryRegion(e.guest_phys_addr, e.memory_size,
                                               e.userspace_addr, e.mmap_offset) for e in entries))
        self.request(Request.SET_MEM_TABLE, table, [e.fd for e in entries])

    # ------------------------------------------------------------------ rings
    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._eventfds.append(fd)
        return fd

    def setup_queue(self, index: int, q, *, enable: bool = True, base: int | None = None) -> None:
        """SET_VRING_NUM/BASE/ADDR/KICK/CALL (+ENABLE) for ring ``index`` backed by ``q``."""
        self.request(Request.SET_VRING_NUM, VringState(index, q.size))
        self.request(Request.SET_VRING_BASE, VringState(index, q.vring_base if base is None else base))
        a = q.vring_addr()
        self.request(Request.SET_VRING_ADDR, VringAddr(index, a.flags, a.desc_user_addr,
                                                       a.used_user_addr, a.avail_user_addr,
                                                       a.log_guest_addr))
        if q.kick_fd is None:
            q.kick_fd = self.eventfd()
        if q.call_fd is None:
            q.call_fd = self.eventfd()
        self.request(Request.SET_VRING_KICK, VringFile(index, False), [q.kick_fd])
        self.request(Request.SET_VRING_CALL, VringFile(index, False), [q.call_fd])
        if enable and self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            self.request(Request.SET_VRING_ENABLE, VringState(index, 1))

    def get_vring_base(self, index: int) -> int:
        rep = self.get(Request.GET_VRING_BASE, VringState(index, 0))
        if rep.payload.index != index:
            raise FrontendError(f"GET_VRING_BASE reply for ring {rep.payload.index}")
        return rep.payload.num

    def enable(self, index: int, on: bool = True) -> None:
        self.request(Request.SET_VRING_ENABLE, VringState(index, 1 if on else 0))
