"""Risk wiring: SIGNAL -> ORDER_REQUEST, ORDER_REQUEST -> ORDER_APPROVED | ORDER_REJECTED.

Durable state in Redis (keys `hean:risk:*`):

- `hean:risk:killswitch` (hash: active, reason, timestamp, announced): written before
  KILLSWITCH_TRIGGERED is published, read at start. A switch found active but not
  announced (a crash between the two) is announced again at start; one whose write failed
  (Redis refusing writes) is written and announced when the event or command is retried.
- `hean:risk:day` (hash: day, start_equity, peak_equity): the UTC day and its starting
  equity; the highest equity seen, across days (MAX_DRAWDOWN_LIMIT's high-water mark),
  written with each PNL_UPDATE that raised it and at a kill-switch reset.
- `hean:risk:commands` (stream): the command path for the gateway and operators.
  `XADD hean:risk:commands * command trigger reason "<why>"` or `command reset`. Read through
  the consumer group `risk`, acked after the command is applied.

At start the governor is rebuilt from Redis: kill switch and day from the hashes above,
positions by replaying the ORDER_FILLED stream (deduplicated by fill id), the reservations
of the orders execution is still working from risk's ORDER_APPROVED less the closed ones
(`RiskService._restore_reservations`), equity, marks and trade statistics from the last
PNL_UPDATE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from decimal import Decimal
from typing import Annotated, Any, cast

import orjson
import redis.asyncio as aioredis
from pydantic import Field, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hean.core.bus import EventBus
from hean.core.errors import PermanentError
from hean.core.event_streams import (
    RedisEventStream,
    as_str,
    decode_entry,
    ensure_group,
    entry_position,
    stream_key,
)
from hean.core.metrics import Metrics
from hean.core.service import ServiceContext
from hean.core.settings import CoreSettings, RiskSettings
from hean.core.topology import APPROVER
from hean.core.types import Event, EventType, InvalidEventError, OrderRequestData, Side
from hean.risk.kelly import KellyParams
from hean.risk.risk_governor import (
    NS_PER_DAY,
    KillSwitchState,
    NoOrder,
    RiskGovernor,
    RiskLimits,
)

log = logging.getLogger(__name__)

ZERO = Decimal(0)
DLQ_PAGE = 1000

KILLSWITCH_KEY = "hean:risk:killswitch"
DAY_KEY = "hean:risk:day"
COMMAND_STREAM = "hean:risk:commands"
COMMAND_GROUP = "risk"
#: A reset older than this is not applied: the command group starts at the beginning of the
#: stream, so a risk service starting for the first time (or after its group was lost) would
#: otherwise replay an old reset and lift a kill switch tripped since. Old triggers are still
#: applied: erring towards stopped trading is the safe side.
STALE_RESET_S = 300
#: How many answered order ids risk remembers, to skip its own ORDER_REQUESTs read back.
ANSWERED_MEMORY = 100_000
#: The market moving held positions this long after the last PNL_UPDATE makes risk
#: degraded: portfolio is not reporting, and the drawdown stop runs on risk's estimate.
PNL_SILENCE_S = 60.0

UnitDecimal = Annotated[Decimal, Field(gt=0, le=1, allow_inf_nan=False)]
PositiveDecimal = Annotated[Decimal, Field(gt=0, allow_inf_nan=False)]


class RiskServiceSettings(CoreSettings, RiskSettings):
    starting_equity: PositiveDecimal = Field(default=Decimal("10000"), alias="STARTING_EQUITY")
    max_total_exposure: PositiveDecimal | None = Field(default=None, alias="MAX_TOTAL_EXPOSURE")
    max_drawdown_limit: Annotated[Decimal, Field(gt=0, lt=1, allow_inf_nan=False)] | None = Field(
        default=None, alias="MAX_DRAWDOWN_LIMIT"
    )
    min_order_notional: Annotated[Decimal, Field(ge=0, allow_inf_nan=False)] = Field(
        default=Decimal("5"), alias="MIN_ORDER_NOTIONAL"
    )
    order_size_step: PositiveDecimal = Field(default=Decimal("0.000001"), alias="ORDER_SIZE_STEP")
    kelly_fraction: UnitDecimal = Field(default=Decimal("0.25"), alias="KELLY_FRACTION")
    kelly_max_fraction: UnitDecimal = Field(default=Decimal("0.2"), alias="KELLY_MAX_FRACTION")
    kelly_prior_payoff: PositiveDecimal = Field(default=Decimal("1"), alias="KELLY_PRIOR_PAYOFF")
    kelly_prior_trades: Annotated[int, Field(ge=0)] = Field(default=20, alias="KELLY_PRIOR_TRADES")
    kelly_default_win_probability: Annotated[Decimal, Field(ge=0, le=1)] = Field(
        default=Decimal("0.55"), alias="KELLY_DEFAULT_WIN_PROBABILITY"
    )
    risk_command_block_ms: Annotated[int, Field(ge=10, le=2000)] = Field(
        default=200, alias="RISK_COMMAND_BLOCK_MS"
    )

    def limits(self) -> RiskLimits:
        return RiskLimits(
            max_position_size=self.max_position_size,
            max_leverage=self.max_leverage,
            daily_drawdown_limit=self.daily_drawdown_limit,
            max_total_exposure=self.max_total_exposure,
            max_drawdown_limit=self.max_drawdown_limit,
            min_order_notional=self.min_order_notional,
            size_step=self.order_size_step,
        )

    def kelly(self) -> KellyParams:
        return KellyParams(
            fraction=self.kelly_fraction,
            max_fraction=self.kelly_max_fraction,
            prior_payoff=self.kelly_prior_payoff,
            prior_trades=self.kelly_prior_trades,
            default_win_probability=self.kelly_default_win_probability,
        )


class RiskService:
    """Subscribes the governor to the bus, persists the kill switch, serves commands."""

    def __init__(
        self,
        bus: EventBus,
        governor: RiskGovernor,
        *,
        redis: aioredis.Redis | None = None,
        redis_url: str | None = None,
        metrics: Metrics | None = None,
        consumer: str = "risk:local",
        command_block_ms: int = 200,
        rebuild: bool = True,
    ) -> None:
        self.bus = bus
        self.governor = governor
        self._saved_day: tuple[int, Decimal] | None = None  # what DAY_KEY holds
        self._saved_peak: Decimal | None = None  # and its peak_equity
        #: The kill switch state known written and announced (`_hold_kill_switch`).
        self._announced: KillSwitchState | None = None
        #: Orders decided as they were sized (oldest first): their requests read back are
        #: skipped.
        self._answered: OrderedDict[str, None] = OrderedDict()
        self.redis = redis
        self.redis_url = redis_url
        self.metrics = metrics
        self.consumer = consumer
        self.command_block_ms = command_block_ms
        self.rebuild_on_start = rebuild
        self._command_task: asyncio.Task[None] | None = None
        self._command_client: aioredis.Redis | None = None
        self._running = False
        self._last_error: str | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self.redis is not None:
            await self.restore()
        b = self.bus
        b.subscribe(EventType.SIGNAL, self.on_signal, name="risk.on_signal")
        b.subscribe(EventType.ORDER_REQUEST, self.on_order_request, name="risk.on_order_request")
        b.subscribe(EventType.ORDER_FILLED, self.on_fill, name="risk.on_fill")
        b.subscribe(EventType.ORDER_CANCELLED, self.on_order_closed, name="risk.on_cancelled")
        b.subscribe(EventType.ORDER_REJECTED, self.on_order_closed, name="risk.on_rejected")
        b.subscribe(EventType.PNL_UPDATE, self.on_pnl, name="risk.on_pnl")
        # Marks only: the newest price per symbol is enough (conflated, see hean.core.bus).
        b.subscribe(EventType.TICK, self.on_tick, name="risk.on_tick", conflate=True)
        b.subscribe(EventType.CANDLE, self.on_candle, name="risk.on_candle", conflate=True)
        if self.redis is not None and self.redis_url is not None:
            self._running = True
            self._command_task = asyncio.create_task(self._command_loop(), name="risk-commands")
        self._update_metrics()

    async def stop(self) -> None:
        self._running = False
        if self._command_task is not None:
            await asyncio.wait([self._command_task], timeout=self.command_block_ms / 1000 + 5)
            if not self._command_task.done():
                self._command_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._command_task
            self._command_task = None
        if self._command_client is not None:
            await self._command_client.aclose()
            self._command_client = None

    def health_check(self) -> dict[str, Any]:
        if self._last_error:
            return {"state": "degraded", "error_message": self._last_error}
        if self.governor.kill_switch.active:
            return {
                "state": "degraded",
                "error_message": f"kill switch active: {self.governor.kill_switch.reason}",
            }
        unreported = self.governor.unreported_s()
        if unreported > PNL_SILENCE_S:
            return {
                "state": "degraded",
                "error_message": (
                    f"no PNL_UPDATE for {unreported:.0f} s while the market moved open "
                    "positions: equity and drawdown are risk's own estimate from its marks "
                    "and fills (is portfolio running?)"
                ),
            }
        return {"state": "healthy"}

    async def restore(self) -> None:
        """Rebuild the governor from Redis (see the module docstring)."""
        assert self.redis is not None
        gov = self.governor
        raw = await self.redis.hgetall(KILLSWITCH_KEY)
        state = {as_str(k): as_str(v) for k, v in raw.items()}
        if state:
            gov.kill_switch = KillSwitchState.from_mapping(state)
            if state.get("announced") == "1":
                self._announced = gov.kill_switch
        day = {as_str(k): as_str(v) for k, v in (await self.redis.hgetall(DAY_KEY)).items()}
        if day.get("day"):
            gov.day = int(day["day"])
            gov.day_start_equity = Decimal(day["start_equity"])
            self._saved_day = (gov.day, gov.day_start_equity)
        if day.get("peak_equity"):
            gov.peak_equity = max(gov.peak_equity, Decimal(day["peak_equity"]))
            self._saved_peak = Decimal(day["peak_equity"])
        stream = RedisEventStream(self.redis_url or "redis://localhost", client=self.redis)
        group = self.consumer.split(":", 1)[0]
        await ensure_group(self.redis, stream_key(EventType.ORDER_FILLED), group, start_id="0")
        fills = 0
        filled: dict[str, Decimal] = {}  # order id -> signed quantity filled, while unfinished
        finished: set[str] = set()
        async for event in stream.replay_events(EventType.ORDER_FILLED):
            if self._apply_fill(event):
                fills += 1
                _note_fill(event.data, filled, finished)
        working = await self._restore_reservations(stream, filled, finished)
        pnl = await self._pnl_update()
        if pnl is not None:
            pnl_day = pnl.timestamp // NS_PER_DAY
            if gov.day is None or pnl_day > gov.day:
                # Risk was down when the day began (or never saw a day): the day starts at
                # the last equity of an earlier day, else at the day's first; not at
                # STARTING_EQUITY, which may be far from the account's equity today.
                midnight_ms = pnl_day * NS_PER_DAY // 1_000_000
                start = await self._pnl_update(newest=f"({midnight_ms}-0")
                start = start or await self._pnl_update(oldest=f"{midnight_ms}-0", first=True)
                equity = (start or pnl).data.get("equity")
                if equity is not None:
                    gov.equity = Decimal(str(equity))
            gov.on_pnl(pnl.data, pnl.timestamp)
        await self._hold_kill_switch()
        decided = await self._recall_decisions(group)
        log.info(
            "risk restored: %d fills, equity %s, kill switch %s, %d recent decisions, "
            "%d working orders reserved",
            fills,
            gov.equity,
            "ACTIVE" if gov.kill_switch.active else "off",
            decided,
            working,
        )

    async def _restore_reservations(
        self, stream: RedisEventStream, filled: dict[str, Decimal], finished: set[str]
    ) -> int:
        """Reserve again the orders a previous run approved that are still working: risk's
        ORDER_APPROVED, less the orders closed since (a fill leaving nothing to fill, an
        ORDER_CANCELLED, execution's ORDER_REJECTED) and those execution dead-lettered
        (not being worked), each less what it has filled. Without this a restarted risk
        would size new orders as if execution's working orders were not there, and their
        fills could take a position past MAX_POSITION_SIZE or MAX_TOTAL_EXPOSURE."""
        closed = set(finished)
        async for event in stream.replay_events(EventType.ORDER_CANCELLED):
            closed.add(str(event.data["order_id"]))
        async for event in stream.replay_events(EventType.ORDER_REJECTED):
            if event.data.get("rejected_by") != "risk":  # execution's: never placed
                closed.add(str(event.data["order_id"]))
        closed |= await _dead_lettered_approvals(stream)
        restored = 0
        async for event in stream.replay_events(EventType.ORDER_APPROVED):
            order_id = str(event.data["order_id"])
            if event.source_service != APPROVER or order_id in closed:
                continue  # not risk's (execution refuses it) or not working any more
            try:
                order = OrderRequestData.model_validate(dict(event.data))
            except ValidationError as exc:
                log.warning("restore: approval %s is not an order: %s", order_id, exc)
                continue
            restored += self.governor.restore_reservation(order, filled.get(order_id, ZERO))
        return restored

    async def _recall_decisions(self, group: str) -> int:
        """Remember the orders a previous run decided whose SIGNAL or ORDER_REQUEST this
        group has not acked yet (pending, or not read: a crash, or a stop before risk read
        its own requests back). Decided again, each would reserve exposure a second time
        that no fill or cancel releases, and get a second approval. Read from the oldest
        such entry on, in ORDER_APPROVED and risk's ORDER_REJECTED."""
        assert self.redis is not None
        oldest: str | None = None
        for etype in (EventType.SIGNAL, EventType.ORDER_REQUEST):
            key = stream_key(etype)
            try:
                groups: Any = await self.redis.xinfo_groups(key)
                pending: Any = await self.redis.xpending(key, group)
            except ResponseError:  # no stream or no group yet: nothing read before
                continue
            ours = [g for g in groups if as_str(g["name"]) == group]
            if not ours:
                continue
            for entry_id in (pending.get("min"), ours[0].get("last-delivered-id")):
                if entry_id is None:
                    continue
                position = entry_position(as_str(entry_id))
                if oldest is None or position < entry_position(oldest):
                    oldest = as_str(entry_id)
        if oldest is None:
            return 0
        decided = 0
        for etype in (EventType.ORDER_APPROVED, EventType.ORDER_REJECTED):
            entries: Any = await self.redis.xrange(
                stream_key(etype), min=oldest, count=ANSWERED_MEMORY
            )
            for _entry_id, fields in entries:
                try:
                    event = decode_entry(stream_key(etype), fields)
                except InvalidEventError:
                    continue  # dead-lettered by consumers; not a decision of ours to recall
                if etype is EventType.ORDER_REJECTED and event.data.get("rejected_by") != "risk":
                    continue
                self._remember_answered(str(event.data["order_id"]))
                decided += 1
        return decided

    def _remember_answered(self, order_id: str) -> None:
        """`order_id` is decided: its request read back, or its signal again, is skipped
        (the newest ANSWERED_MEMORY are kept)."""
        self._answered[order_id] = None
        while len(self._answered) > ANSWERED_MEMORY:
            self._answered.popitem(last=False)

    # --- handlers ----------------------------------------------------------------------------

    async def on_signal(self, event: Event) -> None:
        result = self.governor.size_signal(event)
        if isinstance(result, NoOrder):
            log.info("signal %s: no order: %s", event.event_id, result.reason)
            if self.metrics is not None:
                self.metrics.orders_rejected_total.labels("risk", "sizing").inc()
            return
        if result.order_id in self._answered:
            log.info("order %s was decided before; redelivered signal ignored", result.order_id)
            return
        request = await self.bus.publish(
            Event(event_type=EventType.ORDER_REQUEST, data=result.data)
        )
        # Decided here rather than when the request comes back through Redis: one stream
        # hop less between a signal and its order. The request is in its stream all the
        # same (audit, replay, other subscribers); read back, it is already answered. If
        # deciding fails here, the request read back is decided then, with the bus's
        # retries and dead letters.
        order_id = str(request.data["order_id"])
        try:
            await self._answer(request)
        except Exception as exc:  # noqa: BLE001 - the stream path takes over
            log.warning(
                "order %s: deciding at once failed (%s: %s); deciding when it is read back",
                order_id,
                type(exc).__name__,
                exc,
            )
            return
        # (Should the decision's write fail, the signal stays unacked and comes back.)
        self._remember_answered(order_id)

    async def on_order_request(self, event: Event) -> None:
        if str(event.data.get("order_id")) in self._answered:
            return  # decided when risk sized it (on_signal)
        await self._answer(event)

    async def _answer(self, event: Event) -> None:
        """Decide an ORDER_REQUEST and publish the decision."""
        decision = await self.governor.decide(event)
        await self._save_day()
        if decision.approved:
            await self.bus.publish(Event(event_type=EventType.ORDER_APPROVED, data=decision.order))
            return
        if self.metrics is not None:
            self.metrics.orders_rejected_total.labels("risk", _reason_label(decision.reason)).inc()
        log.info("order %s rejected: %s", decision.order_id, decision.reason)
        await self.bus.publish(
            Event(
                event_type=EventType.ORDER_REJECTED,
                data={
                    "order_id": decision.order_id,
                    "reason": decision.reason,
                    "rejected_by": "risk",
                    "symbol": decision.order.get("symbol"),
                },
            )
        )

    def _apply_fill(self, event: Event) -> bool:
        data = event.data
        if not data.get("symbol") or data.get("side") is None:
            return False
        key = str(
            data.get("fill_id") or f"{data['order_id']}:{data['filled_qty']}:{data['fill_price']}"
        )
        return self.governor.on_fill(
            str(data["order_id"]),
            str(data["symbol"]),
            Side(data["side"]),
            Decimal(data["filled_qty"]),
            Decimal(data["fill_price"]),
            key,
            finished=_leaves_nothing(data),
        )

    async def on_fill(self, event: Event) -> None:
        if not event.data.get("symbol") or event.data.get("side") is None:
            raise PermanentError(f"fill {event.event_id} has no symbol or side")
        self._apply_fill(event)
        self._update_metrics()

    async def on_order_closed(self, event: Event) -> None:
        if event.data.get("rejected_by") == "risk":
            return
        self.governor.on_order_closed(str(event.data["order_id"]))

    async def on_pnl(self, event: Event) -> None:
        self.governor.on_pnl(event.data, event.timestamp)
        await self._hold_kill_switch()
        await self._save_day()
        await self._save_peak()
        self._update_metrics()

    async def on_tick(self, event: Event) -> None:
        await self._on_mark(str(event.data["symbol"]), event.data["price"])

    async def on_candle(self, event: Event) -> None:
        await self._on_mark(str(event.data["symbol"]), event.data["close"])

    async def _on_mark(self, symbol: str, price: Decimal) -> None:
        # The equity moves with risk's own marks between PNL_UPDATEs: the drawdown stop
        # does not wait for portfolio (slow, stalled or down) to see a fall.
        self.governor.on_mark(symbol, price)
        await self._hold_kill_switch()  # tripped by this mark, or an announcement that failed
        self._update_metrics()

    # --- kill switch ---------------------------------------------------------------------------

    async def trigger_kill_switch(self, reason: str, timestamp_ns: int) -> bool:
        """Activate the kill switch by command; False if it was already active."""
        state = self.governor.trigger_kill_switch(reason, timestamp_ns)
        await self._hold_kill_switch()
        self._update_metrics()
        return state is not None

    async def reset_kill_switch(self, timestamp_ns: int) -> bool:
        """Clear the kill switch (the only way to); False if it was not active."""
        if not self.governor.reset_kill_switch(timestamp_ns):
            return False
        if self.redis is not None:
            await self.redis.hset(
                KILLSWITCH_KEY,
                mapping=_fields({**self.governor.kill_switch.to_mapping(), "announced": "1"}),
            )
        await self._save_day()
        await self._save_peak()
        log.warning("kill switch reset")
        self._update_metrics()
        return True

    async def _hold_kill_switch(self) -> None:
        """Persist and announce an active kill switch that is not yet. The governor turns
        it on first; if the write or the announcement then fails (Redis refusing writes or
        dropping the connection), the redelivered event or command finds it on but not
        announced and does both again, instead of skipping it as already active (lost at
        the next restart, and execution never cancelling)."""
        state = self.governor.kill_switch
        if state.active and state is not self._announced:
            await self._persist_and_announce(state)

    async def _persist_and_announce(self, state: KillSwitchState) -> None:
        log.critical("KILL SWITCH TRIGGERED: %s", state.reason)
        if self.redis is not None:
            await self.redis.hset(
                KILLSWITCH_KEY, mapping=_fields({**state.to_mapping(), "announced": "0"})
            )
        await self._announce(state)

    async def _announce(self, state: KillSwitchState) -> None:
        await self.bus.publish(
            Event(
                event_type=EventType.KILLSWITCH_TRIGGERED,
                data={"reason": state.reason, "timestamp": state.timestamp_ns},
            )
        )
        if self.redis is not None:
            await self.redis.hset(KILLSWITCH_KEY, "announced", "1")
        self._announced = state

    async def _pnl_update(
        self, newest: str = "+", oldest: str = "-", *, first: bool = False, scan: int = 1000
    ) -> Event | None:
        """The newest (`first`: the oldest) valid PNL_UPDATE between stream ids `oldest` and
        `newest`. Anyone who can write to Redis can add a malformed entry (the bus
        dead-letters it for consumers), and it must not stop risk from starting:
        undecodable entries are skipped with a warning, up to `scan` of them."""
        assert self.redis is not None
        key = stream_key(EventType.PNL_UPDATE)
        page, seen = 1, 0  # the entry asked for is almost always valid: ask for 1
        while seen < scan:
            entries: Any = await (
                self.redis.xrange(key, min=oldest, max=newest, count=page)
                if first
                else self.redis.xrevrange(key, max=newest, min=oldest, count=page)
            )
            for entry_id, fields in entries:
                try:
                    return decode_entry(key, fields)
                except InvalidEventError as exc:
                    log.warning("restore: skipping undecodable %s entry %s: %s", key, entry_id, exc)
            if len(entries) < page:
                return None
            seen += len(entries)
            after = f"({as_str(entries[-1][0])}"
            oldest, newest = (after, newest) if first else (oldest, after)
            page = 100
        return None

    async def _save_day(self) -> None:
        """Persist the trading day and its starting equity when they changed (once a day,
        not on every order: a Redis round trip on the order path)."""
        gov = self.governor
        if self.redis is None or gov.day is None:
            return
        day = (gov.day, gov.day_start_equity)
        if day == self._saved_day:
            return
        await self.redis.hset(
            DAY_KEY, mapping={"day": str(gov.day), "start_equity": str(gov.day_start_equity)}
        )
        self._saved_day = day

    async def _save_peak(self) -> None:
        """Persist the peak equity when it changed: with each PNL_UPDATE (about once a
        second) that raised it, not from the order path. A crash loses at most the rise
        since the last update, so the stop then trips a little later, never earlier."""
        peak = self.governor.peak_equity
        if self.redis is None or peak == self._saved_peak:
            return
        await self.redis.hset(DAY_KEY, mapping={"peak_equity": str(peak)})
        self._saved_peak = peak

    # --- command path --------------------------------------------------------------------------

    async def _command_loop(self) -> None:
        assert self.redis_url is not None
        # Its own connection: a BLOCK must not hold a pooled connection others need.
        self._command_client = aioredis.Redis.from_url(
            self.redis_url,
            single_connection_client=True,
            socket_timeout=self.command_block_ms / 1000 + 5,
            socket_connect_timeout=5.0,
        )
        client = self._command_client
        group_ready = False
        while self._running:
            try:
                if not group_ready:
                    await ensure_group(client, COMMAND_STREAM, COMMAND_GROUP, start_id="0")
                    group_ready = True
                # Our own pending entries first (a crash after reading), then new ones.
                for start in ("0", ">"):
                    response: Any = await client.xreadgroup(
                        COMMAND_GROUP,
                        self.consumer,
                        {COMMAND_STREAM: start},
                        count=10,
                        block=None if start == "0" else self.command_block_ms,
                    )
                    for _stream, entries in response or ():
                        for entry_id, fields in entries:
                            await self._run_command(as_str(entry_id), fields or {})
                            await client.xack(COMMAND_STREAM, COMMAND_GROUP, entry_id)
                self._last_error = None
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    group_ready = False
                    continue
                self._last_error = f"command stream: {exc}"
                log.error("risk command stream: %s", exc)
                await asyncio.sleep(1)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                self._last_error = f"command stream: Redis unreachable: {exc}"
                await asyncio.sleep(1)

    async def _run_command(self, entry_id: str, fields: dict[Any, Any]) -> None:
        values = {as_str(k): as_str(v) for k, v in fields.items()}
        command = values.get("command", "").lower()
        # Commands carry no event time; the stream entry id is its Redis-assigned time (ms).
        timestamp_ns = int(entry_id.split("-", 1)[0]) * 1_000_000
        if command == "trigger":
            reason = values.get("reason") or "manual kill switch"
            await self.trigger_kill_switch(f"command: {reason}", timestamp_ns)
        elif command == "reset":
            age_s = time.time() - timestamp_ns / 1e9
            if age_s > STALE_RESET_S:
                log.warning(
                    "risk command %s ignored: a reset %.0f s old is stale (limit %d s); "
                    "send a new one",
                    entry_id,
                    age_s,
                    STALE_RESET_S,
                )
                return
            await self.reset_kill_switch(timestamp_ns)
        else:
            log.error("risk command %s ignored: unknown command %r", entry_id, command)

    def _update_metrics(self) -> None:
        m = self.metrics
        if m is None:
            return
        gov = self.governor
        m.killswitch_active.set(1 if gov.kill_switch.active else 0)
        m.drawdown_ratio.set(float(gov.drawdown))
        m.daily_drawdown_limit.set(float(gov.limits.daily_drawdown_limit))
        m.peak_drawdown_ratio.set(float(gov.peak_drawdown))
        m.max_drawdown_limit.set(float(gov.limits.max_drawdown_limit or 0))


def _fields(values: dict[str, str]) -> Any:
    """A str mapping in the shape redis-py's HSET annotation wants."""
    return values


def _reason_label(reason: str) -> str:
    """A bounded label for the rejection metric (reasons carry numbers)."""
    for label in (
        "kill switch",
        "reduce-only",
        "daily drawdown",
        "drawdown from the peak",
        "no market price",
        "below minimum",
        "MAX_POSITION_SIZE",
        "total exposure",
        "MAX_LEVERAGE",
        "equity",
    ):
        if label in reason:
            return label.lower()
    return "custom"


def build(ctx: ServiceContext) -> None:
    settings = cast(RiskServiceSettings, ctx.settings)
    governor = RiskGovernor(
        settings.limits(), starting_equity=settings.starting_equity, kelly=settings.kelly()
    )
    service = RiskService(
        ctx.bus,
        governor,
        redis=ctx.redis,
        redis_url=settings.redis_url,
        metrics=ctx.metrics,
        consumer=settings.consumer_name,
        command_block_ms=settings.risk_command_block_ms,
    )
    ctx.orchestrator.register_component(name="risk_governor", component=service)


def _leaves_nothing(fill: Any) -> bool:
    """The fill left its order nothing to fill (`remaining_qty` 0; execution may work less
    than was approved)."""
    remaining = fill.get("remaining_qty")
    return remaining is not None and Decimal(remaining) == 0


def _note_fill(data: Any, filled: dict[str, Decimal], finished: set[str]) -> None:
    """Count a replayed fill towards its order: `filled` while the order has more to fill,
    `finished` once a fill leaves it nothing (remaining_qty 0)."""
    order_id = str(data["order_id"])
    if _leaves_nothing(data):
        finished.add(order_id)
        filled.pop(order_id, None)
        return
    qty = Decimal(data["filled_qty"])
    signed = qty if Side(data["side"]) is Side.BUY else -qty
    filled[order_id] = filled.get(order_id, ZERO) + signed


async def _dead_lettered_approvals(stream: RedisEventStream) -> set[str]:
    """Order ids of the ORDER_APPROVED entries in the dead-letter stream (execution gave
    up on them: they are not being worked unless retried from there)."""
    approved = stream_key(EventType.ORDER_APPROVED)
    found: set[str] = set()
    start = "-"
    while True:
        letters = await stream.dead_letters(count=DLQ_PAGE, start_id=start)
        for letter in letters:
            if letter.stream != approved:
                continue
            try:
                data = orjson.loads(letter.payload).get("data") or {}
            except (orjson.JSONDecodeError, AttributeError):
                continue  # not an event at all: nothing was approved by it
            if isinstance(data, dict) and data.get("order_id"):
                found.add(str(data["order_id"]))
        if len(letters) < DLQ_PAGE:
            return found
        start = f"({letters[-1].dlq_id}"
