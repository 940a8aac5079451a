"""strategy wiring: ML_PREDICTION in, SIGNAL out; per-symbol state in Redis.

The state after each prediction is written with the prediction's ack, in the same Redis
pipeline and after the SIGNAL is in Redis (`EventBus.write_on_ack`). A crash before that
redelivers the prediction to the old state, which signals again with the same event id
(`signal_event_id`), so downstream sees one signal and none is lost. (The state used to be
written by the handler itself, which could reach Redis before the SIGNAL did: a crash in
between lost the signal. It also cost a round trip per prediction.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Annotated, Any, cast

import orjson
import redis.asyncio as aioredis
from pydantic import Field, field_validator, model_validator

from hean.core.bus import EventBus
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
    features = data.get("features")
    return PredictionInput(
        symbol=str(symbol),
        prediction=float(data["prediction"]),
        bar_ns=int(bar) if bar is not None else event.timestamp,
        published_ns=event.timestamp,
        received_ns=received_ns,
        confidence=data.get("confidence"),
        model_version=data.get("model_version"),
        features=dict(features) if isinstance(features, dict) else None,
    )


class StrategyService:
    def __init__(
        self,
        bus: EventBus,
        strategy: Strategy,
        store: StateStore,
        *,
        metrics: Metrics | None = None,
        wall_clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.bus = bus
        self.strategy = strategy
        self.store = store
        self.metrics = metrics
        self.clock_ns = wall_clock_ns
        self.states: dict[str, SymbolState] = {}
        self.signals = 0
        self.decisions = 0
        self.last_reason: dict[str, str] = {}

    async def start(self) -> None:
        self.states = await self.store.load()
        self.bus.subscribe(EventType.ML_PREDICTION, self.on_prediction, name="strategy.on_pred")

    async def on_prediction(self, event: Event) -> None:
        pred = prediction_input(event, self.clock_ns())
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
            await self.bus.publish(signal)
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
    )
    ctx.orchestrator.register_component(name=COMPONENT, component=service, circuit_breaker=False)
