"""Serving the API with uvicorn inside a standard HEAN service process.

`GatewayServer` is an orchestrator component: `start()` serves the app on a socket bound
beforehand (so a taken port is a clear start-up error, not uvicorn's `sys.exit`), `stop()`
lets in-flight requests finish. Signals stay with `hean.core.service.serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator
from typing import Any

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port). Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The service's composition root owns SIGTERM/SIGINT and stops us in order.
        yield


class GatewayServer:
    """The HTTP/WebSocket API as a component (`http_api`) of the gateway service."""

    def __init__(self, app: FastAPI, sock: socket.socket, *, graceful_s: int = 5) -> None:
        self.app = app
        self.sock = sock
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,  # query strings may carry a token; the app logs paths itself
            lifespan="off",
            timeout_graceful_shutdown=graceful_s,
            ws_ping_interval=20.0,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.sock]), name="http-api")
        while not self._server.started:
            if self._task.done():
                exc = self._task.exception()
                raise RuntimeError(f"the HTTP API did not start: {exc!r}")
            await asyncio.sleep(0.01)
        host = self.sock.getsockname()[0]
        log.info("HTTP API on http://%s:%d (OpenAPI docs at /docs)", host, self.port)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=10.0)
        except TimeoutError:
            self._server.force_exit = True
            await self._task
        self._task = None
        self.sock.close()

    def health_check(self) -> dict[str, Any]:
        if self._task is not None and self._task.done():
            return {"state": "unhealthy", "error_message": "the HTTP server stopped"}
        return {"state": "healthy"}
