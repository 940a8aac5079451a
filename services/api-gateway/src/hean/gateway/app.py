"""The gateway's HTTP and WebSocket API (FastAPI). It reads and writes Redis only.

`create_app(deps)` builds the application around one pooled Redis client; the wiring
(`hean.gateway.service`) serves it with uvicorn inside the standard service process.
Endpoints, auth and error rules: docs/GATEWAY.md.
"""

import asyncio
import contextlib
import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, cast

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, WebSocket
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import Counter
from pydantic import AfterValidator, BaseModel, Field
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from hean.core.event_streams import (
    DLQ_STREAM,
    RedisEventStream,
    as_str,
    decode_entry,
    entries_of,
    entry_position,
    stream_key,
)
from hean.core.health import read_snapshots
from hean.core.logs import RedactingFilter, secret_values
from hean.core.metrics import CONTENT_TYPE, Metrics
from hean.core.types import RETENTION, Event, EventType, InvalidEventError, json_dumps
from hean.gateway.health_view import known_names, lookup, merge_health, state_of
from hean.gateway.killswitch import MAX_REASON_LENGTH, killswitch_state, send_command
from hean.gateway.orders import open_orders
from hean.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

ORDER_TYPES: Final = (
    EventType.ORDER_REQUEST,
    EventType.ORDER_APPROVED,
    EventType.ORDER_PLACED,
    EventType.ORDER_FILLED,
    EventType.ORDER_CANCELLED,
    EventType.ORDER_REJECTED,
)
#: What `/ws/events` streams when no `types` are given: everything but the high-frequency
#: market data and model streams (ask for TICK, CANDLE, ... explicitly).
DEFAULT_WS_TYPES: Final = tuple(t for t in EventType if RETENTION[t] != "high_frequency")
STREAM_ID = re.compile(r"^\d+(-\d+)?$")
DLQ_ID_PATTERN: Final = r"^\d+-\d+$"


class JSONResponse(Response):
    """JSON with the project's encoder (Decimal as a string, like the wire format)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json_dumps(content)


class TriggerRequest(BaseModel):
    reason: Annotated[str, Field(min_length=1, max_length=MAX_REASON_LENGTH)] = (
        "manual kill switch (gateway)"
    )


@dataclass
class GatewayDeps:
    """What the API needs, built once in the wiring (or a test) and passed in."""

    settings: GatewaySettings
    redis: aioredis.Redis
    metrics: Metrics
    wall_clock: Callable[[], float] = time.time
    redactor: RedactingFilter = field(init=False)

    def __post_init__(self) -> None:
        self.redactor = RedactingFilter(secret_values(self.settings))


#: Request methods counted by name; any other is counted as "other" (the server takes any
#: token as a method, and a label value per made-up method would grow without end).
COUNTED_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


class GatewayMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.requests = Counter(
            "hean_gateway_requests_total",
            "Gateway HTTP requests",
            ["method", "route", "status"],
            registry=metrics.registry,
        )
        self.commands = Counter(
            "hean_gateway_commands_total",
            "Gateway commands by outcome",
            ["command", "outcome"],
            registry=metrics.registry,
        )


def _printable(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _error(status: int, error: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, **extra}, status_code=status)


def _entry(entry_id: str, event: Event) -> dict[str, Any]:
    return {"stream_id": entry_id, **event.to_dict()}


def _decoded(key: str, entries: Any) -> list[tuple[str, Event]]:
    out: list[tuple[str, Event]] = []
    for raw_id, fields in entries_of(entries):
        entry_id = as_str(raw_id)
        try:
            out.append((entry_id, decode_entry(key, fields)))
        except InvalidEventError as exc:
            log.warning("gateway: skipping undecodable entry %s %s: %s", key, entry_id, exc)
    return out


def _order_key(pair: tuple[str, Event]) -> tuple[int, int, int]:
    """Across streams: Redis time (ms), then the event's own ns time within that ms (the
    sequence part of an id counts per stream, so it cannot order two streams)."""
    ms, seq = entry_position(pair[0])
    return ms, pair[1].timestamp, seq


def _parse_type(name: str) -> EventType:
    try:
        return EventType(name.upper())
    except ValueError:
        known = ", ".join(t.value for t in EventType)
        raise HTTPException(404, f"unknown event type {name!r}; known types: {known}") from None


U64_MAX: Final = 2**64 - 1


def _fits_redis(stream_id: str) -> bool:
    """Both parts of a stream id are unsigned 64-bit integers, as Redis requires."""
    return all(int(part) <= U64_MAX for part in stream_id.split("-"))


def _dlq_id(value: str) -> str:
    if not _fits_redis(value):
        raise ValueError("both parts of a stream id must be below 2**64")
    return value


def _check_range_id(value: str, open_end: str, what: str) -> str:
    bare = value[1:] if value.startswith("(") else value
    if value == open_end or (STREAM_ID.match(bare) and _fits_redis(bare)):
        return value
    raise HTTPException(
        400,
        f"invalid {what} {value!r}: use {open_end!r}, a stream id like 1700000000000-0, "
        "a millisecond time, or '(' before an id to exclude it",
    )


def create_app(deps: GatewayDeps) -> FastAPI:
    settings = deps.settings
    client = deps.redis
    gm = GatewayMetrics(deps.metrics)
    max_count = settings.gateway_max_count
    api_token = settings.api_token.get_secret_value().encode()

    app = FastAPI(
        title="HEAN api-gateway",
        version="0.1.0",
        description=(
            "System health, positions, orders, events, dead letters and the kill switch of a "
            "HEAN trading system. Commands need `Authorization: Bearer <API_TOKEN>`."
        ),
        default_response_class=JSONResponse,
    )

    # --- errors: 4xx with a message, 503 on a Redis outage, never a traceback ---------------

    def down_detail(exc: Exception) -> str:
        return "Redis is unavailable: " + deps.redactor.redact(f"{type(exc).__name__}: {exc}")

    def redis_down(exc: Exception) -> JSONResponse:
        return _error(503, "redis_unavailable", down_detail(exc))

    async def on_redis_down(request: Request, exc: Exception) -> Response:
        return redis_down(exc)

    async def on_redis_error(request: Request, exc: Exception) -> Response:
        reason = deps.redactor.redact(str(exc))
        log.error("Redis error on %s %s: %s", request.method, request.url.path, reason)
        return _error(502, "redis_error", f"Redis refused the request: {reason}")

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.error(
            "unexpected error on %s %s: %s",
            request.method,
            request.url.path,
            deps.redactor.redact(f"{type(exc).__name__}: {exc}"),
        )
        return _error(500, "internal_error", "internal error; the gateway log has the details")

    async def on_invalid_request(request: Request, exc: Exception) -> Response:
        # FastAPI's own handler echoes the rejected input and fails (a 500) on a body that
        # is not UTF-8; the same 422 shape, with undecodable bytes shown replaced.
        errors = cast(RequestValidationError, exc).errors()
        detail = jsonable_encoder(errors, custom_encoder={bytes: _printable})
        return JSONResponse({"detail": detail}, status_code=422)

    app.add_exception_handler(RequestValidationError, on_invalid_request)
    app.add_exception_handler(RedisConnectionError, on_redis_down)
    app.add_exception_handler(RedisTimeoutError, on_redis_down)
    app.add_exception_handler(ConnectionError, on_redis_down)
    app.add_exception_handler(ResponseError, on_redis_error)
    app.add_exception_handler(Exception, on_unexpected)

    @app.middleware("http")
    async def count_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        method = request.method if request.method in COUNTED_METHODS else "other"
        gm.requests.labels(method, route, str(response.status_code)).inc()
        # Path only: a query string may carry a token.
        log.debug(
            "%s %s -> %d in %.1f ms",
            request.method,
            request.url.path,
            response.status_code,
            (time.perf_counter() - started) * 1000,
        )
        return response

    # --- auth ----------------------------------------------------------------------------

    def token_ok(presented: str | None) -> bool:
        return bool(api_token) and hmac.compare_digest((presented or "").encode(), api_token)

    def bearer(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None

    def require_command_token(request: Request) -> None:
        if not api_token:
            raise HTTPException(
                403,
                "commands are disabled: no API_TOKEN is configured on the gateway "
                "(set API_TOKEN and send it as 'Authorization: Bearer <token>')",
            )
        presented = bearer(request)
        if presented is None:
            raise HTTPException(
                401,
                "this command needs 'Authorization: Bearer <API_TOKEN>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not token_ok(presented):
            raise HTTPException(
                401, "invalid token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )

    def require_read_token(request: Request) -> None:
        if settings.gateway_read_token_required:
            require_command_token(request)

    read = [Depends(require_read_token)]
    command = [Depends(require_command_token)]
    Count = Annotated[int, Query(ge=1, le=max_count, description=f"at most {max_count}")]  # noqa: N806

    # --- health and metrics ----------------------------------------------------------------

    async def merged_health() -> dict[str, Any]:
        snapshots = await read_snapshots(client)
        return merge_health(
            snapshots,
            expected=settings.expected_services,
            now=deps.wall_clock(),
            max_age_s=settings.gateway_snapshot_max_age_s,
        )

    @app.get("/health", tags=["health"], summary="System health merged from every service")
    async def health() -> Response:
        try:
            merged = await merged_health()
        except (RedisConnectionError, RedisTimeoutError, ConnectionError) as exc:
            return JSONResponse(
                {
                    "orchestrator": {"running": False, "uptime_seconds": 0,
                                     "overall_state": "unhealthy"},
                    "components": {},
                    "services": {},
                    "missing_services": list(settings.expected_services),
                    "error": "redis_unavailable",
                    "detail": down_detail(exc),
                },
                status_code=503,
            )  # fmt: skip
        status = 503 if merged["orchestrator"]["overall_state"] == "unhealthy" else 200
        return JSONResponse(merged, status_code=status)

    @app.get(
        "/health/{component}",
        tags=["health"],
        summary="One component, service, or the system orchestrator block",
    )
    async def health_of(component: str) -> Response:
        merged = await merged_health()
        entry = lookup(merged, component)
        if entry is None:
            known = known_names(merged)
            return _error(
                404,
                "unknown_component",
                f"unknown component {component!r}; known: {', '.join(known)}",
                known=known,
            )
        status = 503 if state_of(entry).value == "unhealthy" else 200
        return JSONResponse(entry, status_code=status)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics of the gateway process")
    async def metrics() -> Response:
        return Response(deps.metrics.render(), media_type=CONTENT_TYPE)

    # --- portfolio ----------------------------------------------------------------------------

    async def latest_pnl() -> tuple[str, Event] | None:
        key = stream_key(EventType.PNL_UPDATE)
        decoded = _decoded(key, await client.xrevrange(key, count=1))
        return decoded[0] if decoded else None

    @app.get("/pnl", tags=["portfolio"], dependencies=read, summary="Latest P&L")
    async def pnl() -> dict[str, Any]:
        latest = await latest_pnl()
        if latest is None:
            return {"available": False, "detail": "no PNL_UPDATE published yet"}
        entry_id, event = latest
        data = {k: v for k, v in event.to_dict()["data"].items() if k != "positions"}
        return {"available": True, "stream_id": entry_id, "timestamp": event.timestamp, **data}

    @app.get("/positions", tags=["portfolio"], dependencies=read, summary="Open positions")
    async def positions() -> dict[str, Any]:
        latest = await latest_pnl()
        if latest is None:
            return {"available": False, "positions": {}, "detail": "no PNL_UPDATE published yet"}
        entry_id, event = latest
        data = event.to_dict()["data"]
        return {
            "available": True,
            "stream_id": entry_id,
            "timestamp": event.timestamp,
            "positions": data.get("positions", {}),
            "equity": data.get("equity"),
            "exposure": data.get("exposure"),
        }

    # --- orders -------------------------------------------------------------------------------

    @app.get("/orders", tags=["orders"], dependencies=read, summary="Recent order events")
    async def orders(count: Count = 50) -> dict[str, Any]:
        merged: list[tuple[str, Event]] = []
        for etype in ORDER_TYPES:
            key = stream_key(etype)
            merged += _decoded(key, await client.xrevrange(key, count=count))
        merged.sort(key=_order_key, reverse=True)
        return {"count": min(count, len(merged)), "events": [_entry(*p) for p in merged[:count]]}

    @app.get("/orders/open", tags=["orders"], dependencies=read, summary="Orders still working")
    async def orders_open() -> dict[str, Any]:
        approved_key = stream_key(EventType.ORDER_APPROVED)
        approved = _decoded(
            approved_key,
            await client.xrevrange(approved_key, count=settings.gateway_open_orders_window),
        )
        if not approved:
            return {"count": 0, "orders": []}
        oldest = min(approved, key=lambda p: entry_position(p[0]))[0]
        events = list(approved)
        for etype in (
            EventType.ORDER_PLACED,
            EventType.ORDER_FILLED,
            EventType.ORDER_CANCELLED,
            EventType.ORDER_REJECTED,
        ):
            key = stream_key(etype)
            events += _decoded(key, await client.xrange(key, min=oldest, max="+"))
        events.sort(key=_order_key)
        working = open_orders(e for _, e in events)
        return {"count": len(working), "orders": working}

    @app.get("/fills", tags=["orders"], dependencies=read, summary="Recent fills, newest first")
    async def fills(count: Count = 50) -> dict[str, Any]:
        key = stream_key(EventType.ORDER_FILLED)
        decoded = _decoded(key, await client.xrevrange(key, count=count))
        return {"count": len(decoded), "fills": [_entry(*p) for p in decoded]}

    # --- events ---------------------------------------------------------------------------

    @app.get("/events", tags=["events"], dependencies=read, summary="Event types and lengths")
    async def event_types() -> dict[str, Any]:
        async with client.pipeline(transaction=False) as pipe:
            for etype in EventType:
                pipe.xlen(stream_key(etype))
            lengths = await pipe.execute()
        return {
            "types": [
                {"event_type": t.value, "stream": stream_key(t), "length": int(n),
                 "retention": RETENTION[t]}
                for t, n in zip(EventType, lengths, strict=True)
            ]
        }  # fmt: skip

    @app.get(
        "/events/{event_type}",
        tags=["events"],
        dependencies=read,
        summary="Events of one type: the latest, or from a stream id onwards",
    )
    async def events_of(
        event_type: str,
        count: Count = 100,
        start: Annotated[
            str | None,
            Query(description="stream id to read from (oldest first); omitted: the latest"),
        ] = None,
        end: Annotated[str, Query(description="last stream id to include")] = "+",
    ) -> dict[str, Any]:
        etype = _parse_type(event_type)
        key = stream_key(etype)
        end = _check_range_id(end, "+", "end")
        if start is None:
            decoded = _decoded(key, await client.xrevrange(key, max=end, count=count))
            decoded.reverse()
        else:
            start = _check_range_id(start, "-", "start")
            decoded = _decoded(key, await client.xrange(key, min=start, max=end, count=count))
        next_start = f"({decoded[-1][0]}" if decoded else start
        return {
            "event_type": etype.value,
            "count": len(decoded),
            "events": [_entry(*p) for p in decoded],
            "next_start": next_start,
        }

    # --- dead letters -------------------------------------------------------------------------

    stream = RedisEventStream("redis://unused", client=client)
    DlqId = Annotated[  # noqa: N806
        str,
        Path(pattern=DLQ_ID_PATTERN, description="dead-letter entry id"),
        AfterValidator(_dlq_id),
    ]

    @app.get("/dlq", tags=["dead letters"], dependencies=read, summary="Dead-letter entries")
    async def dlq(count: Count = 100) -> dict[str, Any]:
        letters = await stream.dead_letters(count=count)
        total = int(await client.xlen(DLQ_STREAM))
        return {"total": total, "count": len(letters), "entries": [d.to_dict() for d in letters]}

    @app.get("/dlq/{dlq_id}", tags=["dead letters"], dependencies=read)
    async def dlq_entry(dlq_id: DlqId) -> dict[str, Any]:
        letter = await stream.dead_letter(dlq_id)
        if letter is None:
            raise HTTPException(404, f"no dead-letter entry {dlq_id}")
        return letter.to_dict()

    @app.post(
        "/dlq/{dlq_id}/retry",
        tags=["dead letters"],
        dependencies=command,
        summary="Publish a dead-lettered event again and drop the entry",
    )
    async def dlq_retry(dlq_id: DlqId) -> dict[str, Any]:
        try:
            new_id = await stream.retry_dead_letter(dlq_id)
        except KeyError:
            gm.commands.labels("dlq_retry", "not_found").inc()
            raise HTTPException(404, f"no dead-letter entry {dlq_id}") from None
        except InvalidEventError as exc:
            gm.commands.labels("dlq_retry", "invalid").inc()
            raise HTTPException(
                409, f"entry {dlq_id} is still not a valid event: {exc}; drop it instead"
            ) from None
        gm.commands.labels("dlq_retry", "ok").inc()
        log.warning("dead letter %s retried as %s", dlq_id, new_id)
        return {"dlq_id": dlq_id, "retried": True, "new_stream_id": new_id}

    @app.delete(
        "/dlq/{dlq_id}", tags=["dead letters"], dependencies=command, summary="Drop an entry"
    )
    async def dlq_drop(dlq_id: DlqId) -> dict[str, Any]:
        if not await stream.drop_dead_letter(dlq_id):
            gm.commands.labels("dlq_drop", "not_found").inc()
            raise HTTPException(404, f"no dead-letter entry {dlq_id}")
        gm.commands.labels("dlq_drop", "ok").inc()
        log.warning("dead letter %s dropped", dlq_id)
        return {"dlq_id": dlq_id, "dropped": True}

    # --- kill switch ----------------------------------------------------------------------

    @app.get("/killswitch", tags=["kill switch"], dependencies=read, summary="Kill switch state")
    async def killswitch() -> dict[str, Any]:
        return await killswitch_state(client)

    async def run_command(name: str, reason: str = "") -> Response:
        result = await send_command(
            client,
            "trigger" if name == "trigger" else "reset",
            reason=reason,
            source="gateway",
            wait_s=settings.gateway_command_timeout_s,
        )
        log.warning("kill switch %s command %s sent (%s)", name, result.command_id, reason)
        if result.applied:
            gm.commands.labels(f"killswitch_{name}", "applied").inc()
            return JSONResponse(result.to_dict())
        gm.commands.labels(f"killswitch_{name}", "queued").inc()
        why = (
            "risk has not applied it yet"
            if result.risk_consuming
            else "the risk service is not consuming commands (is it running?)"
        )
        return JSONResponse(
            {
                **result.to_dict(),
                "detail": f"command queued in hean:risk:commands but {why}; "
                "it is applied when risk reads it: check GET /killswitch",
                "status_url": "/killswitch",
            },
            status_code=202,
        )

    @app.post(
        "/killswitch/trigger",
        tags=["kill switch"],
        dependencies=command,
        summary="Trigger the kill switch (only position-reducing orders pass)",
        responses={202: {"description": "queued; risk has not applied it yet"}},
    )
    async def killswitch_trigger(body: TriggerRequest | None = None) -> Response:
        reason = (body or TriggerRequest()).reason
        return await run_command("trigger", reason)

    @app.post(
        "/killswitch/reset",
        tags=["kill switch"],
        dependencies=command,
        summary="Reset the kill switch",
        responses={202: {"description": "queued; risk has not applied it yet"}},
    )
    async def killswitch_reset() -> Response:
        return await run_command("reset")

    # --- live events ----------------------------------------------------------------------

    @app.websocket("/ws/events")
    async def ws_events(
        websocket: WebSocket,
        types: str = "",
        start: str = "$",
        token: str | None = None,
    ) -> None:
        """Live events as JSON text messages (`{"stream_id", "event_type", ...}`).

        `types`: comma-separated event types (default: all but the high-frequency ones);
        `start`: `$` (only new events, the default) or a stream id to catch up from;
        `token`: the API token when reads need one (or an Authorization header).
        """
        if settings.gateway_read_token_required:
            header = websocket.headers.get("authorization", "")
            scheme, _, value = header.partition(" ")
            presented = value.strip() if scheme.lower() == "bearer" else token
            if not token_ok(presented):
                await websocket.close(code=1008, reason="a valid API token is required")
                return
        try:
            wanted = (
                [EventType(t.strip().upper()) for t in types.split(",") if t.strip()]
                if types
                else list(DEFAULT_WS_TYPES)
            )
        except ValueError:
            await websocket.close(code=1008, reason=f"unknown event type in {types[:100]!r}")
            return
        if start != "$" and not STREAM_ID.match(start):
            await websocket.close(code=1008, reason="start must be '$' or a stream id")
            return
        await stream_events(websocket, wanted, start)

    async def stream_events(websocket: WebSocket, wanted: list[EventType], start: str) -> None:
        # Its own connection: a blocking XREAD must not hold a pooled one (DESIGN.md).
        block_ms = settings.gateway_ws_block_ms
        reader = aioredis.Redis.from_url(
            settings.redis_url,
            single_connection_client=True,
            socket_timeout=block_ms / 1000 + 5,
            socket_connect_timeout=5.0,
        )
        try:
            cursors: dict[str, str] = {}
            try:
                for etype in wanted:
                    key = stream_key(etype)
                    if start == "$":
                        last = entries_of(await reader.xrevrange(key, count=1))
                        cursors[key] = as_str(last[0][0]) if last else "0-0"
                    else:
                        cursors[key] = start
            except RedisError as exc:
                await websocket.close(code=1013, reason=f"Redis is unavailable: {exc}"[:120])
                return
            await websocket.accept()
            closed = asyncio.Event()

            async def watch_close() -> None:
                try:
                    while (await websocket.receive())["type"] != "websocket.disconnect":
                        pass
                except (WebSocketDisconnect, RuntimeError):
                    pass
                finally:
                    closed.set()

            watcher = asyncio.create_task(watch_close())
            try:
                while not closed.is_set():
                    try:
                        response: Any = await reader.xread(
                            cast(Any, cursors), count=200, block=block_ms
                        )
                    except RedisError as exc:
                        reason = deps.redactor.redact(f"{type(exc).__name__}: {exc}")
                        await websocket.send_text(
                            json_dumps({"error": "redis_unavailable", "detail": reason}).decode()
                        )
                        await websocket.close(code=1011, reason="Redis is unavailable")
                        return
                    for raw_key, entries in response or ():
                        key = as_str(raw_key)
                        for entry_id, event in _decoded(key, entries):
                            cursors[key] = entry_id
                            await websocket.send_text(json_dumps(_entry(entry_id, event)).decode())
                        if entries:
                            # Skipped (undecodable) entries still move the cursor.
                            cursors[key] = as_str(entries_of(entries)[-1][0])
            except (WebSocketDisconnect, RuntimeError):
                pass
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                if websocket.application_state is WebSocketState.CONNECTED and not closed.is_set():
                    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                        await websocket.close()
        finally:
            await reader.aclose()

    return app
