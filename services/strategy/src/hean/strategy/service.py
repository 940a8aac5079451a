"""strategy wiring: ML_PREDICTION in, SIGNAL out; per-symbol state in Redis.

The state after each prediction is written with the prediction's ack, in the same Redis
pipeline and after the SIGNAL is in Redis (`EventBus.write_on_ack`). A crash before that
redelivers the prediction to the old state, which signals again with the same event id
(`signal_event_id`), so downstream sees one signal and none is lost. (The state used to be
written by the handler itself, which could reach Redis before the SIGNAL did: a crash in
between lost the signal. It also cost a round trip per prediction.)
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, cast

import orjson
import redis.asyncio as aioredis
from pydantic import Field, field_validator, model_validator

from hean.core.bus import EventBus, HeldEvent
from hean.core.errors import PermanentError
from hean.core.event_streams import as_str
from hean.core.metrics import Metrics
from hean.core.service import ServiceContext
from hean.core.settings import CoreSettings
from hean.core.types import Event, EventType
from hean.strategy.core import (
    STRATEGIES,
    PredictionInput,
    Strategy,
    StrategyConfig,
    SymbolState,
    load_strategy,
    signal_event_id,
)

log = logging.getLogger(__name__)

COMPONENT = "strategy"
Probability = Annotated[float, Field(ge=0, le=1)]


class StrategySettings(CoreSettings):
    strategy: str = Field(default="ml_threshold", alias="STRATEGY", min_length=1)
    buy_threshold: Probability = Field(default=0.55, alias="STRATEGY_BUY_THRESHOLD")
    sell_threshold: Probability = Field(default=0.45, alias="STRATEGY_SELL_THRESHOLD")
    cooldown_bars: Annotated[int, Field(ge=0)] = Field(default=5, alias="STRATEGY_COOLDOWN_BARS")
    bar_seconds: Annotated[float, Field(gt=0)] = Field(default=60.0, alias="STRATEGY_BAR_SECONDS")
    max_age_ms: Annotated[int, Field(ge=0)] = Field(default=30_000, alias="STRATEGY_MAX_AGE_MS")
    trend_filter: bool = Field(default=True, alias="STRATEGY_TREND_FILTER")
    rsi_overbought: Annotated[float, Field(ge=0, le=100)] = Field(
        default=70.0, alias="STRATEGY_RSI_OVERBOUGHT"
    )
    rsi_oversold: Annotated[float, Field(ge=0, le=100)] = Field(
        default=30.0, alias="STRATEGY_RSI_OVERSOLD"
    )
    max_vol_ratio: Annotated[float, Field(ge=0)] = Field(
        default=3.0, alias="STRATEGY_MAX_VOL_RATIO"
    )
    strategy_state_key: str = Field(default="", alias="STRATEGY_STATE_KEY")
    reorder_wait_ms: Annotated[int, Field(ge=0, le=600_000)] = Field(
        default=2_000, alias="STRATEGY_REORDER_WAIT_MS"
    )

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGIES and ":" not in value:
            known = ", ".join(sorted(STRATEGIES))
            raise ValueError(f"unknown strategy {value!r} (known: {known}, or module:factory)")
        return value

    @model_validator(mode="after")
    def _thresholds(self) -> StrategySettings:
        if self.sell_threshold >= self.buy_threshold:
            raise ValueError(
                "STRATEGY_SELL_THRESHOLD must be below STRATEGY_BUY_THRESHOLD "
                f"(got {self.sell_threshold} and {self.buy_threshold})"
            )
        return self

    @property
    def state_key(self) -> str:
        return self.strategy_state_key or f"hean:strategy:{self.service_name}:state"

    def config(self) -> StrategyConfig:
        return StrategyConfig(
            buy_threshold=self.buy_threshold,
            sell_threshold=self.sell_threshold,
            cooldown_bars=self.cooldown_bars,
            bar_ns=int(self.bar_seconds * 1e9),
            max_age_ns=self.max_age_ms * 1_000_000,
            trend_filter=self.trend_filter,
            rsi_overbought=self.rsi_overbought,
            rsi_oversold=self.rsi_oversold,
            max_vol_ratio=self.max_vol_ratio,
        )


class StateStore:
    def __init__(self, client: aioredis.Redis, key: str) -> None:
        self.client = client
        self.key = key

    async def load(self) -> dict[str, SymbolState]:
        raw = await self.client.hgetall(self.key)
        return {as_str(k): SymbolState.from_dict(orjson.loads(v)) for k, v in raw.items()}

    def save_command(self, symbol: str, state: SymbolState) -> tuple[Any, ...]:
        return ("HSET", self.key, symbol, orjson.dumps(state.to_dict()))


def prediction_input(event: Event, received_ns: int) -> PredictionInput:
    data = event.data
    symbol = data.get("symbol")
    if not symbol:
        raise PermanentError(f"ML_PREDICTION {event.event_id} has no symbol")
    bar = data.get("timestamp")
    previous = data.get("previous_timestamp")
    features = data.get("features")
    try:
        bar_ns = int(bar) if bar is not None else event.timestamp
        previous_bar_ns = int(previous) if previous is not None else None
    except (TypeError, ValueError) as exc:  # retrying cannot help: dead-lettered at once
        raise PermanentError(f"ML_PREDICTION {event.event_id}: bad bar time: {exc}") from exc
    return PredictionInput(
        symbol=str(symbol),
        prediction=float(data["prediction"]),
        bar_ns=bar_ns,
        published_ns=event.timestamp,
        received_ns=received_ns,
        confidence=data.get("confidence"),
        model_version=data.get("model_version"),
        features=dict(features) if isinstance(features, dict) else None,
        previous_bar_ns=previous_bar_ns,
    )


@dataclass(slots=True)
class _Held:
    """A prediction set aside until the one before it (its `previous_bar_ns`) is handled."""

    prediction: PredictionInput
    event: HeldEvent
    deadline: float  # loop time after which it is handled without its predecessor


class StrategyService:
    """Predictions in, SIGNALs out, per symbol in bar order.

    ml-service replicas finish in any order, so a prediction can arrive before the one for
    the bar before it; the strategy would then drop that one as stale and decide on a
    different sequence than one replica gives. Features chains each symbol's rows
    (`previous_timestamp`, copied into the prediction), so a prediction whose predecessor
    has not been handled yet is held (its ack with it, `EventBus.hold`) and handled as
    soon as the predecessor is, or after `reorder_wait_s` without it (a FEATURES_READY
    dead-lettered in ml-service never comes).
    """

    def __init__(
        self,
        bus: EventBus,
        strategy: Strategy,
        store: StateStore,
        *,
        metrics: Metrics | None = None,
        wall_clock_ns: Callable[[], int] = time.time_ns,
        reorder_wait_s: float = 2.0,
    ) -> None:
        self.bus = bus
        self.strategy = strategy
        self.store = store
        self.metrics = metrics
        self.clock_ns = wall_clock_ns
        self.reorder_wait_s = reorder_wait_s
        self.states: dict[str, SymbolState] = {}
        self.signals = 0
        self.decisions = 0
        self.last_reason: dict[str, str] = {}
        self._held: dict[str, list[_Held]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    async def start(self) -> None:
        self.states = await self.store.load()
        self.bus.subscribe(EventType.ML_PREDICTION, self.on_prediction, name="strategy.on_pred")

    async def stop(self) -> None:
        """Held predictions stay unacked: the successor gets them again, in stream order."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for held in self._held.values():
            for item in held:
                item.event.abandon()
        self._held.clear()

    def on_prediction(self, event: Event) -> None:
        pred = prediction_input(event, self.clock_ns())
        if self._waits_for_predecessor(pred):
            loop = asyncio.get_running_loop()
            item = _Held(pred, self.bus.hold(), loop.time() + self.reorder_wait_s)
            held = self._held.setdefault(pred.symbol, [])
            bisect.insort(held, item, key=lambda h: h.prediction.bar_ns)
            if pred.symbol not in self._timers:
                self._rearm(pred.symbol)
            return
        self._decide(pred)
        self._release(pred.symbol)

    def _waits_for_predecessor(self, pred: PredictionInput) -> bool:
        if pred.previous_bar_ns is None or self.reorder_wait_s <= 0:
            return False
        last = self.states.get(pred.symbol, SymbolState()).last_bar_ns
        if last is not None and pred.bar_ns <= last:
            return False  # stale anyway
        return last is None or pred.previous_bar_ns > last

    def _release(self, symbol: str) -> None:
        """Handle the held predictions whose predecessor is now handled, in bar order."""
        held = self._held.get(symbol)
        while held and not self._waits_for_predecessor(held[0].prediction):
            self._resume(held.pop(0))
        self._rearm(symbol)

    def _give_up(self, symbol: str) -> None:
        """The oldest held prediction waited `reorder_wait_s`: handle it without its
        predecessor (which will be stale if it ever comes), then whatever follows it."""
        self._timers.pop(symbol, None)
        held = self._held.get(symbol)
        if not held:
            return
        first = held.pop(0)
        log.warning(
            "%s: the prediction for bar %d did not come within %.1f s; deciding on bar %d "
            "without it",
            symbol,
            first.prediction.previous_bar_ns or 0,
            self.reorder_wait_s,
            first.prediction.bar_ns,
        )
        self._resume(first)
        self._release(symbol)

    def _resume(self, item: _Held) -> None:
        try:
            with item.event.resume():
                self._decide(item.prediction)
        except Exception:  # left unacked by resume(): delivered again once idle
            log.exception("strategy failed on held prediction %s", item.event.event.event_id)

    def _rearm(self, symbol: str) -> None:
        """The symbol's give-up timer, set for its oldest held prediction (none if none)."""
        timer = self._timers.pop(symbol, None)
        if timer is not None:
            timer.cancel()
        held = self._held.get(symbol)
        if not held:
            self._held.pop(symbol, None)
            return
        loop = asyncio.get_running_loop()
        delay = max(held[0].deadline - loop.time(), 0.0)
        self._timers[symbol] = loop.call_later(delay, self._give_up, symbol)

    def _decide(self, pred: PredictionInput) -> None:
        state = self.states.get(pred.symbol, SymbolState())
        decision = self.strategy.decide(state, pred)
        self.decisions += 1
        self.last_reason[pred.symbol] = decision.reason
        if decision.signal is not None:
            signal = Event(
                event_type=EventType.SIGNAL,
                data=decision.signal,
                event_id=signal_event_id(
                    self.strategy.name, pred.symbol, decision.signal["side"], pred.bar_ns
                ),
            )
            self.bus.publish_nowait(signal)
            self.signals += 1
            log.info("SIGNAL %s %s (%s)", pred.symbol, decision.signal["side"], decision.reason)
            if self.metrics is not None:
                self.metrics.signals_total.labels(pred.symbol, decision.signal["side"]).inc()
        if decision.state != state:
            # Written with this prediction's ack, after the SIGNAL is in Redis: a crash
            # before that redelivers the prediction to the old state, so the signal is made
            # again (same id) rather than lost behind a state that had already moved on.
            self.bus.write_on_ack(*self.store.save_command(pred.symbol, decision.state))
            self.states[pred.symbol] = decision.state

    def health_check(self) -> dict[str, Any]:
        return {"state": "healthy"}


def build(ctx: ServiceContext) -> None:
    settings = cast(StrategySettings, ctx.settings)
    service = StrategyService(
        ctx.bus,
        load_strategy(settings.strategy, settings.config()),
        StateStore(ctx.redis, settings.state_key),
        metrics=ctx.metrics,
        reorder_wait_s=settings.reorder_wait_ms / 1000,
    )
    ctx.orchestrator.register_component(name=COMPONENT, component=service, circuit_breaker=False)
