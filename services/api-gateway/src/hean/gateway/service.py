"""Gateway wiring: settings, one pooled Redis client, the app, and the HTTP component."""

from __future__ import annotations

from typing import cast

import redis.asyncio as aioredis

from hean.core.service import ServiceContext
from hean.core.settings import SettingsError
from hean.gateway.app import GatewayDeps, create_app
from hean.gateway.server import GatewayServer, bind_socket
from hean.gateway.settings import GatewaySettings

COMPONENT = "http_api"


def redis_pool_client(url: str) -> aioredis.Redis:
    """Requests share a bounded pool and wait for a free connection rather than fail."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=64, timeout=5, socket_timeout=5.0, socket_connect_timeout=2.0
    )
    return aioredis.Redis(connection_pool=pool)


class _ClientCloser:
    """Closes the pooled client after the HTTP server (components stop in reverse order)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def stop(self) -> None:
        await self.client.aclose()


def build(ctx: ServiceContext) -> None:
    settings = cast(GatewaySettings, ctx.settings)
    try:
        sock = bind_socket(settings.gateway_host, settings.gateway_port)
    except OSError as exc:
        raise SettingsError(
            f"GATEWAY_HOST/GATEWAY_PORT: cannot listen on "
            f"{settings.gateway_host}:{settings.gateway_port}: {exc.strerror or exc}"
        ) from None
    client = redis_pool_client(settings.redis_url)
    app = create_app(GatewayDeps(settings, client, ctx.metrics))
    ctx.orchestrator.register_component(
        name="redis_pool", component=_ClientCloser(client), circuit_breaker=False
    )
    ctx.orchestrator.register_component(
        name=COMPONENT, component=GatewayServer(app, sock), circuit_breaker=False
    )
