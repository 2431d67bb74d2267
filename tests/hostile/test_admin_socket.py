"""The admin socket under a hostile client: garbage, huge messages, unknown methods,
bad parameters, malformed JSON-RPC, batches, too many clients, a client that never
reads. Every bad request gets a JSON-RPC error (never a crash), the daemon keeps
serving its guests and other admin clients, and nothing leaks."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest

from tests.support.admin import DaemonError, rpc

from .harness import wait_for

pytestmark = pytest.mark.timeout(120)

#: the limits of vscsid/supervisor/admin.py (stated here, checked against the daemon)
MAX_MESSAGE = 64 * 1024
MAX_CLIENTS = 16
MAX_BATCH = 32


class Raw:
    def __init__(self, path: str, timeout: float = 10):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def line(self):
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError("closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def call(self, obj):
        self.send((obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n")
        return self.line()

    def closed_by_peer(self, timeout: float = 10) -> bool:
        self.s.settimeout(timeout)
        try:
            while True:
                chunk = self.s.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.s.close()


def _code(reply) -> int:
    assert "error" in reply and "result" not in reply, reply
    assert reply["jsonrpc"] == "2.0"
    return reply["error"]["code"]


@pytest.fixture
def admin(daemon):
    before = daemon.fd_count()
    yield daemon.admin_socket

    def served():
        try:
            return rpc(daemon.admin_socket, "status")["version"]
        except DaemonError:          # the closed clients' slots are freed as their EOF is seen
            return None
    wait_for(served, what="the admin socket to serve again")
    wait_for(lambda: daemon.fd_count() <= before, what="the admin connections' fds to be closed")


@pytest.mark.parametrize("data", [
    b"garbage", b"{", b"\xff\xfe\x00", b"[1, 2", b'{"jsonrpc": "2.0", "method": "status", "id": 1',
    b"nan", b'"\\ud800"'])
def test_garbage_is_a_parse_error_and_the_connection_goes_on(daemon, baseline, admin, data):
    c = Raw(admin)
    try:
        r = c.call(data)
        assert _code(r) in (-32700, -32600) and r["id"] is None
        assert c.call({"jsonrpc": "2.0", "id": 7, "method": "status"})["id"] == 7
    finally:
        c.close()


@pytest.mark.parametrize("req,code", [
    (42, -32600), ("status", -32600), ([], -32600), (None, -32600),
    ({"method": "status", "id": 1}, -32600),                         # no "jsonrpc"
    ({"jsonrpc": "1.0", "method": "status", "id": 1}, -32600),
    ({"jsonrpc": "2.0", "id": 1}, -32600),                           # no method
    ({"jsonrpc": "2.0", "method": 5, "id": 1}, -32600),
    ({"jsonrpc": "2.0", "method": "status", "id": {"x": 1}}, -32600),
    ({"jsonrpc": "2.0", "method": "status", "id": [1]}, -32600),
    ({"jsonrpc": "2.0", "method": "no_such_method", "id": 1}, -32601),
    ({"jsonrpc": "2.0", "method": "x" * 5000, "id": 1}, -32601),
    ({"jsonrpc": "2.0", "method": "status", "params": [1, 2], "id": 1}, -32602),
    ({"jsonrpc": "2.0", "method": "status", "params": {"x": 1}, "id": 1}, -32602),
    ({"jsonrpc": "2.0", "method": "lun_add", "params": {}, "id": 1}, -32602),
    ({"jsonrpc": "2.0", "method": "lun_add", "params": {"spec": 7}, "id": 1}, -32602),
    ({"jsonrpc": "2.0", "method": "lun_add", "params": {"spec": ""}, "id": 1}, -32602),
    ({"jsonrpc": "2.0", "method": "lun_add", "params": {"spec": "x.img,blocksize=3"}, "id": 1},
     -32602),
    ({"jsonrpc": "2.0", "method": "lun_add", "params": {"spec": "/dev/null"}, "id": 1}, -32010),
    ({"jsonrpc": "2.0", "method": "lun_add", "params": {"spec": "/etc,ro"}, "id": 1}, -32010),
    ({"jsonrpc": "2.0", "method": "lun_add", "params": {"spec": "null:4M,lun=0"}, "id": 1},
     -32010),                                                        # 0:0 exists
    ({"jsonrpc": "2.0", "method": "lun_remove", "params": {"lun": "a:b"}, "id": 1}, -32602),
    ({"jsonrpc": "2.0", "method": "lun_remove", "params": {"lun": "999:0"}, "id": 1}, -32602),
    ({"jsonrpc": "2.0", "method": "lun_remove", "params": {"lun": True}, "id": 1}, -32602),
    ({"jsonrpc": "2.0", "method": "lun_remove", "params": {"lun": "0:200"}, "id": 1}, -32011),
    ({"jsonrpc": "2.0", "method": "lun_resize", "params": {"lun": "-1"}, "id": 1}, -32602),
    ({"jsonrpc": "2.0", "method": "trace", "params": {"count": -1}, "id": 1}, -32602),
    ({"jsonrpc": "2.0", "method": "trace", "params": {"count": "x"}, "id": 1}, -32602),
    ({"jsonrpc": "2.0", "method": "trace", "params": {"lun": "7:7"}, "id": 1}, -32011),
    ({"jsonrpc": "2.0", "method": "log_level", "params": {"level": "loud"}, "id": 1}, -32602),
    ({"jsonrpc": "2.0", "method": "reload", "id": 1}, -32020),
])
def test_bad_requests_get_json_rpc_errors(daemon, baseline, admin, req, code):
    c = Raw(admin)
    try:
        assert _code(c.call(req)) == code
        assert [x["lun"] for x in c.call({"jsonrpc": "2.0", "id": 2,
                                          "method": "lun_list"})["result"]] == ["0:0"]
    finally:
        c.close()


def test_notifications_are_not_answered(daemon, baseline, admin):
    c = Raw(admin)
    try:
        c.send(b'{"jsonrpc": "2.0", "method": "status"}\n'
               b'{"jsonrpc": "2.0", "method": "no_such_method"}\n'
               b'{"jsonrpc": "2.0", "method": "lun_remove", "params": {"lun": "0:99"}}\n')
        assert c.call({"jsonrpc": "2.0", "id": "after", "method": "methods"})["id"] == "after"
    finally:
        c.close()


def test_batches(daemon, baseline, admin):
    c = Raw(admin)
    try:
        r = c.call([{"jsonrpc": "2.0", "id": 1, "method": "status"}, 5,
                    {"jsonrpc": "2.0", "method": "status"},
                    {"jsonrpc": "2.0", "id": 3, "method": "nope"}])
        assert isinstance(r, list) and [x.get("id") for x in r] == [1, None, 3]
        assert "result" in r[0] and _code(r[1]) == -32600 and _code(r[2]) == -32601
        r = c.call([{"jsonrpc": "2.0", "id": i, "method": "methods"} for i in range(MAX_BATCH + 1)])
        assert _code(r) == -32600
        r = c.call([{"jsonrpc": "2.0", "id": 1, "method": "trace"}])
        assert _code(r[0]) == -32600
    finally:
        c.close()


def test_a_huge_message_is_refused_and_the_connection_closed(daemon, baseline, admin):
    c = Raw(admin)
    try:
        c.send(b'{"jsonrpc": "2.0", "id": 1, "method": "' + b"x" * (MAX_MESSAGE + 10))
        r = c.line()
        assert _code(r) == -32600 and "larger" in r["error"]["message"]
        assert c.closed_by_peer()
    finally:
        c.close()
    c = Raw(admin)            # a message just under the limit is fine
    try:
        big = {"jsonrpc": "2.0", "id": 1, "method": "lun_add",
               "params": {"spec": "x" * (MAX_MESSAGE - 200)}}
        assert _code(c.call(big)) == -32010
    finally:
        c.close()


def test_too_many_clients(daemon, baseline, admin):
    held = [Raw(admin) for _ in range(MAX_CLIENTS)]
    try:
        for c in held:                      # each is being served
            assert "result" in c.call({"jsonrpc": "2.0", "id": 1, "method": "methods"})
        extra = Raw(admin)
        try:
            r = extra.line()
            assert _code(r) == -32000 and "too many clients" in r["error"]["message"]
            assert extra.closed_by_peer()
        finally:
            extra.close()
        held.pop().close()
        time.sleep(0.2)
        assert rpc(admin, "status")["luns"] == 1          # room again
    finally:
        for c in held:
            c.close()


def test_a_client_that_never_reads_is_dropped_without_harm(daemon, baseline, admin):
    mark = daemon.mark()
    c = Raw(admin)
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        req = (json.dumps({"jsonrpc": "2.0", "id": 1, "method": "stats"}) + "\n").encode()
        c.s.settimeout(30)
        sent = 0
        try:
            for _ in range(20000):
                c.s.sendall(req)
                sent += 1
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass
        # Meanwhile everybody else is served.
        t0 = time.monotonic()
        assert rpc(admin, "status")["luns"] == 1
        assert time.monotonic() - t0 < 5
        rec = daemon.wait_since(mark, "admin_client_dropped", timeout=30)
        assert "does not read" in rec["reason"]
        assert c.closed_by_peer()
    finally:
        c.close()
    assert daemon.alive()


def test_a_trace_nobody_reads_ends(daemon, baseline, admin):
    from .harness import Guest
    from vscsid.bench import virtio_scsi as vs

    mark = daemon.mark()
    c = Raw(admin)
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.send(b'{"jsonrpc": "2.0", "id": 1, "method": "trace"}\n')
    wait_for(lambda: rpc(admin, "status")["tracing"], what="the trace to start")
    g = Guest(daemon)
    try:
        deadline = time.monotonic() + 40
        while rpc(admin, "status")["tracing"]:
            assert time.monotonic() < deadline, "the unread trace never ended"
            for _ in range(50):
                g.command(vs.test_unit_ready())
        daemon.wait_since(mark, "admin_client_dropped")
        daemon.wait_since(mark, "trace_stopped")
    finally:
        c.close()
        g.close_and_wait()


def test_the_admin_socket_is_the_daemons_users_only(daemon, baseline, admin):
    st = os.stat(admin)
    assert st.st_mode & 0o777 == 0o600
