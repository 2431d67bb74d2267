"""The socket side of a vhost-user session: framing, fds, backpressure.

Reading: bytes and SCM_RIGHTS fds go into the sans-IO codec; decoded messages
(or protocol errors) wait in a queue for the dispatcher. At most ``MAX_QUEUED``
of them wait: beyond that the transport stops reading the socket (backpressure)
and resumes once the dispatcher has caught up.

Writing: replies go out with non-blocking sendmsg; what the peer does not take
is buffered and flushed when the socket becomes writable. A front end that stops
reading its replies — past ``MAX_UNSENT`` bytes, or for ``UNREAD_TIMEOUT``
seconds once ``WRITE_HIGH`` bytes are pending — is dropped.
"""
from __future__ import annotations

import asyncio
import socket

from vscsid.fdpass import fds_from_ancdata, rights

from .protocol import MAX_FDS, BackendCodec, ProtocolError

RECV_SIZE = 65536
MAX_QUEUED = 64            # parsed messages waiting for the dispatcher before reading pauses
MAX_UNSENT = 1 << 20       # reply bytes a front end may leave unread before it is dropped
WRITE_HIGH = 64 << 10      # unread reply bytes that pause request processing …
WRITE_LOW = 16 << 10       # … until the front end has read down to this
UNREAD_TIMEOUT = 30.0      # seconds a paused session waits for the front end to read


class Transport:
    """One front end's connection: messages in, replies out."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, log, close_fd):
        self.sock = sock
        self.loop = loop
        self.log = log
        self.close_fd = close_fd
        self.codec = BackendCodec(close_fd=close_fd)
        self.queue: asyncio.Queue = asyncio.Queue()
        self._reading = False
        self.eof_seen = False
        self._writing = False
        self._outq: list = []
        self._unsent = 0
        self.send_failed = False
        self._drained = asyncio.Event()
        self._drained.set()

    # ------------------------------------------------------------------ reading
    def start(self) -> None:
        self.sock.setblocking(False)
        self._reading = False
        self.resume_reading()

    def resume_reading(self) -> None:
        if not self._reading and not self.eof_seen:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True

    def _on_readable(self) -> None:
        try:
            data, anc, flags, _ = self.sock.recvmsg(
                min(self.codec.wanted(), RECV_SIZE), socket.CMSG_SPACE(MAX_FDS * 4),
                socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.log.warning("connection_error", error=str(exc))
            self._eof()
            return
        fds = fds_from_ancdata(anc)
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                self.close_fd(fd)
            self.log.error("protocol_error", reason="too many fds attached (control data truncated)")
            self._eof()
            return
        if not data:
            for fd in fds:
                self.close_fd(fd)
            pending = self.codec.pending_bytes
            if pending:
                self.log.error("protocol_error", reason="truncated message: connection closed "
                               "in the middle of a message", pending_bytes=pending, fatal=True)
            self._eof()
            return
        self.codec.feed(data, fds)
        while True:
            try:
                msg = self.codec.next_message()
            except ProtocolError as err:
                self.queue.put_nowait(err)
                if err.fatal:
                    self.eof_seen = True
                    self.stop_reading()
                    return
                continue
            if msg is None:
                break
            self.queue.put_nowait(msg)
        if self.queue.qsize() >= MAX_QUEUED:
            self.stop_reading()      # backpressure: resumed by next()

    def stop_reading(self) -> None:
        if self._reading:
            try:
                self.loop.remove_reader(self.sock.fileno())
            except (ValueError, OSError):
                pass
            self._reading = False

    def _eof(self) -> None:
        self.eof_seen = True
        self.stop_reading()
        self.queue.put_nowait(None)

    def end(self) -> None:
        """Make the dispatcher see the end of the session (after what is queued)."""
        self.queue.put_nowait(None)

    async def next(self):
        """The next decoded message, a ProtocolError, or None at the end. Waits for the
        front end to read its replies first when too many are pending."""
        while self._unsent > WRITE_HIGH and not self.send_failed:
            # The front end is not reading its replies: stop taking requests.
            if not await self._wait_drained():
                break
        if self.queue.qsize() <= MAX_QUEUED // 4:
            self.resume_reading()
        return await self.queue.get()

    # ------------------------------------------------------------------ writing
    def send(self, data: bytes, fds=()) -> None:
        """Queue a reply (never blocks the event loop)."""
        if self.send_failed:
            return
        self._outq.append((memoryview(data), list(fds)))
        self._unsent += len(data)
        if self._unsent > MAX_UNSENT:
            self.log.error("frontend_not_reading", unsent_bytes=self._unsent,
                           reason="the front end does not read its replies")
            self._fail()
            return
        if not self._writing:
            self._flush_out()

    def _flush_out(self) -> None:
        while self._outq:
            view, fds = self._outq[0]
            try:
                if fds:
                    n = self.sock.sendmsg([view], rights(fds))
                    self._outq[0] = (view, [])      # fds travel with the first byte
                else:
                    n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.log.warning("reply_failed", error=str(exc))
                self._fail()
                break
            self._unsent -= n
            if n < len(view):
                self._outq[0] = (view[n:], [])
                break
            self._outq.pop(0)
        if self._unsent <= WRITE_LOW:
            self._drained.set()
        want_write = bool(self._outq)
        if want_write and not self._writing:
            self.loop.add_writer(self.sock.fileno(), self._flush_out)
            self._writing = True
        elif not want_write and self._writing:
            self.loop.remove_writer(self.sock.fileno())
            self._writing = False

    async def _wait_drained(self) -> bool:
        self.stop_reading()
        self._drained.clear()
        if self._unsent <= WRITE_LOW:
            self._drained.set()
        try:
            await asyncio.wait_for(self._drained.wait(), UNREAD_TIMEOUT)
            if self.send_failed:
                return False
        except asyncio.TimeoutError:
            self.log.error("frontend_not_reading", unsent_bytes=self._unsent,
                           reason=f"replies left unread for {UNREAD_TIMEOUT:.0f}s")
            self._fail()
            return False
        return True

    def _fail(self) -> None:
        self.send_failed = True
        self._outq.clear()
        self.drop()

    def drop(self) -> None:
        """End the session from our side (the dispatcher sees EOF next)."""
        self._drained.set()         # wake a dispatcher waiting for the peer to read
        if not self.eof_seen:
            self._eof()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def fail(self) -> None:
        """Drop the front end and discard what is still to be sent."""
        self._fail()

    def close(self) -> None:
        self.stop_reading()
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
            self._writing = False
        self.codec.close()
        try:
            self.sock.close()
        except OSError:
            pass
