"""A JSON-RPC client for a test daemon's admin socket (vscsid-ctl's, which imports
nothing of the daemon)."""
from __future__ import annotations

from vscsid.ctl import Client, DaemonError


def rpc(path: str, method: str, params: dict | None = None, timeout: float = 60.0):
    """One call; the result, or DaemonError with the daemon's error object."""
    c = Client(str(path), timeout)
    try:
        return c.call(method, params)
    finally:
        c.close()


__all__ = ["rpc", "DaemonError", "Client"]
