"""What the supervisor's small asyncio servers (the admin socket, the metrics endpoint)
share: closing one with its client tasks."""
from __future__ import annotations

import asyncio


async def close_server(server: asyncio.AbstractServer | None, clients: set[asyncio.Task]) -> None:
    """Stop accepting, cancel every client task and wait for them, then (bounded) for the
    server to finish closing."""
    if server is not None:
        server.close()
    for t in list(clients):
        t.cancel()
    if clients:
        await asyncio.gather(*clients, return_exceptions=True)
    if server is not None:
        try:
            await asyncio.wait_for(server.wait_closed(), 2)
        except asyncio.TimeoutError:
            pass
