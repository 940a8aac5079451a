"""The dashboard server: static files plus a reverse proxy to the api-gateway.

The browser talks to this one origin only: `/api/<path>` is forwarded to
`GATEWAY_URL/<path>` (method, query, body, and the `Authorization` header that kill-switch
commands carry), and `/api/ws/events` is relayed to the gateway's `/ws/events` WebSocket.
The server holds no state of its own and never talks to Redis.

It never logs a request's query string or headers (a token may travel in either), and a
gateway that cannot be reached is answered with a JSON error the page shows as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from importlib.resources import files
from pathlib import Path
from typing import Final

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler
from yarl import URL

from hean.ui.settings import UiSettings

log = logging.getLogger(__name__)

STATIC_DIR: Final = Path(str(files("hean.ui") / "static"))
API_PREFIX: Final = "/api"
WS_PATH: Final = "/api/ws/events"

#: Request headers passed on to the gateway; everything else (cookies, hop-by-hop headers)
#: stays here.
FORWARDED_REQUEST_HEADERS: Final = ("Authorization", "Content-Type", "Accept")
#: Response headers passed back to the browser.
FORWARDED_RESPONSE_HEADERS: Final = ("Content-Type", "WWW-Authenticate", "Retry-After")

SECURITY_HEADERS: Final = {
    # Every asset is local; the live stream is same-origin ('self' covers ws:/wss: to it).
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

SETTINGS_KEY: Final = web.AppKey("settings", UiSettings)
SESSION_KEY: Final = web.AppKey("session", aiohttp.ClientSession)


class PathOnlyAccessLogger(AbstractAccessLogger):
    """Method, path, status and time: never the query string or headers (tokens)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug(
            "%s %s -> %d in %.1f ms", request.method, request.path, response.status, time * 1000
        )


def _json_error(status: int, error: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


def gateway_target(gateway_url: str, request: web.Request, *, websocket: bool = False) -> URL:
    """`/api/x?y` -> `GATEWAY_URL/x?y`, path and query passed on as the browser encoded them."""
    base = URL(gateway_url)
    tail = request.rel_url.raw_path[len(API_PREFIX) :] or "/"
    query = request.rel_url.raw_query_string
    scheme = base.scheme
    if websocket:
        scheme = "wss" if scheme == "https" else "ws"
    origin = f"{scheme}://{base.raw_authority}"
    text = origin + base.raw_path.rstrip("/") + tail + (f"?{query}" if query else "")
    return URL(text, encoded=True)


async def healthz(request: web.Request) -> web.Response:
    """Liveness of this server (for compose); the gateway's own health is `/api/health`."""
    settings = request.app[SETTINGS_KEY]
    return web.json_response({"status": "ok", "gateway_url": settings.gateway_url_redacted})


async def ui_config(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    return web.json_response(
        {
            "poll_interval_ms": int(settings.poll_interval_s * 1000),
            "gateway_url": settings.gateway_url_redacted,
        },
        headers={"Cache-Control": "no-store"},
    )


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def proxy_rest(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    session = request.app[SESSION_KEY]
    target = gateway_target(settings.gateway_url, request)
    headers = {h: request.headers[h] for h in FORWARDED_REQUEST_HEADERS if h in request.headers}
    body = await request.read() if request.can_read_body else None
    try:
        async with session.request(
            request.method, target, headers=headers, data=body, allow_redirects=False
        ) as upstream:
            payload = await upstream.read()
            out = {
                h: upstream.headers[h] for h in FORWARDED_RESPONSE_HEADERS if h in upstream.headers
            }
            out["Cache-Control"] = "no-store"
            return web.Response(status=upstream.status, body=payload, headers=out)
    except TimeoutError:
        return _json_error(
            504,
            "gateway_timeout",
            f"the gateway at {settings.gateway_url_redacted} did not answer "
            f"within {settings.gateway_timeout_s:g} s",
        )
    except (aiohttp.ClientError, OSError) as exc:
        log.warning("gateway unreachable for %s %s: %s", request.method, request.path, exc)
        return _json_error(
            502,
            "gateway_unreachable",
            f"cannot reach the gateway at {settings.gateway_url_redacted}: "
            f"{type(exc).__name__}: {exc}",
        )


async def _relay_to_browser(
    upstream: aiohttp.ClientWebSocketResponse, browser: web.WebSocketResponse
) -> None:
    async for msg in upstream:
        if msg.type is WSMsgType.TEXT:
            await browser.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await browser.send_bytes(msg.data)
        elif msg.type is WSMsgType.ERROR:
            break


async def _relay_to_gateway(
    browser: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    async for msg in browser:
        if msg.type is WSMsgType.TEXT:
            await upstream.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await upstream.send_bytes(msg.data)
        elif msg.type is WSMsgType.ERROR:
            break


async def _close_with_error(
    browser: web.WebSocketResponse, error: str, detail: str, code: int = 1011
) -> None:
    if not browser.closed:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await browser.send_json({"error": error, "detail": detail})
            await browser.close(code=code, message=error.encode()[:120])


async def proxy_ws(request: web.Request) -> web.StreamResponse:
    """Relay the gateway's live event stream; an error becomes one JSON message, then close."""
    settings = request.app[SETTINGS_KEY]
    session = request.app[SESSION_KEY]
    browser = web.WebSocketResponse(heartbeat=30.0)
    await browser.prepare(request)
    target = gateway_target(settings.gateway_url, request, websocket=True)
    headers = {h: request.headers[h] for h in ("Authorization",) if h in request.headers}
    try:
        async with session.ws_connect(
            target, headers=headers, heartbeat=30.0, timeout=aiohttp.ClientWSTimeout(ws_close=5.0)
        ) as upstream:
            to_browser = asyncio.create_task(_relay_to_browser(upstream, browser))
            to_gateway = asyncio.create_task(_relay_to_gateway(browser, upstream))
            done, pending = await asyncio.wait(
                {to_browser, to_gateway}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for task in done:
                if (exc := task.exception()) is not None and not isinstance(
                    exc, ConnectionError | aiohttp.ClientError
                ):
                    raise exc
            if to_browser in done and not browser.closed:
                # The gateway ended the stream (Redis lost, shutdown): pass its code on.
                await browser.close(code=upstream.close_code or 1011, message=b"gateway closed")
    except aiohttp.WSServerHandshakeError as exc:
        await _close_with_error(
            browser,
            "stream_refused",
            f"the gateway refused the live stream (HTTP {exc.status}); "
            "Redis may be unavailable or the gateway needs an API token for reads",
        )
    except TimeoutError:
        await _close_with_error(
            browser, "gateway_timeout", f"the gateway at {settings.gateway_url_redacted} timed out"
        )
    except (aiohttp.ClientError, OSError) as exc:
        await _close_with_error(
            browser,
            "gateway_unreachable",
            f"cannot reach the gateway at {settings.gateway_url_redacted}: "
            f"{type(exc).__name__}: {exc}",
        )
    return browser


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    if not response.prepared:
        response.headers.update(SECURITY_HEADERS)
    return response


def create_app(settings: UiSettings) -> web.Application:
    """The aiohttp application; the gateway client session lives as long as the app."""
    app = web.Application(middlewares=[security_headers])
    app[SETTINGS_KEY] = settings

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=settings.gateway_timeout_s, connect=5.0)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=True) as session:
            app[SESSION_KEY] = session
            yield

    app.cleanup_ctx.append(client_session)
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ui-config.json", ui_config)
    app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)
    app.router.add_get(WS_PATH, proxy_ws)
    app.router.add_route("*", API_PREFIX + "/{tail:.*}", proxy_rest)
    return app


async def serve(settings: UiSettings, stop: asyncio.Event) -> None:
    """Serve until `stop` is set, then close connections and the gateway session."""
    runner = web.AppRunner(create_app(settings), access_log_class=PathOnlyAccessLogger)
    await runner.setup()
    site = web.TCPSite(runner, settings.ui_host, settings.ui_port)
    await site.start()
    started = time.monotonic()
    log.info(
        "HEAN dashboard on http://%s:%d (gateway %s)",
        settings.ui_host,
        settings.ui_port,
        settings.gateway_url_redacted,
    )
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        log.info("dashboard stopped after %.0f s", time.monotonic() - started)
