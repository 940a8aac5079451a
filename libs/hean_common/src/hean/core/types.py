"""Event types, the immutable `Event` envelope and one data model per event type.

Every event carries `data` validated against the model of its type. Validation happens when
the `Event` is built, so a wrong type, a negative size or a non-finite price is a clear
`InvalidEventError` at the publisher, never a surprise in a consumer. Fields users add are
kept and passed on. Prices, sizes and P&L are `Decimal` (strings on the wire).
"""

from __future__ import annotations

import contextvars
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Final, Literal

import orjson
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    computed_field,
    field_validator,
    model_validator,
)


class EventType(StrEnum):
    """The 14 event types of the integration guide. The value is the wire name."""

    TICK = "TICK"
    CANDLE = "CANDLE"
    FEATURES_READY = "FEATURES_READY"
    ML_PREDICTION = "ML_PREDICTION"
    SIGNAL = "SIGNAL"
    ORDER_REQUEST = "ORDER_REQUEST"
    ORDER_APPROVED = "ORDER_APPROVED"
    ORDER_PLACED = "ORDER_PLACED"
    ORDER_FILLED = "ORDER_FILLED"
    ORDER_CANCELLED = "ORDER_CANCELLED"
    ORDER_REJECTED = "ORDER_REJECTED"
    PNL_UPDATE = "PNL_UPDATE"
    ERROR = "ERROR"
    KILLSWITCH_TRIGGERED = "KILLSWITCH_TRIGGERED"


class InvalidEventError(ValueError):
    """An event whose envelope or data does not match its type's schema."""


# --- field types -------------------------------------------------------------------------

FiniteDecimal = Annotated[Decimal, Field(allow_inf_nan=False)]
PositiveDecimal = Annotated[Decimal, Field(gt=0, allow_inf_nan=False)]
NonNegativeDecimal = Annotated[Decimal, Field(ge=0, allow_inf_nan=False)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
UnitFloat = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Symbol = Annotated[str, Field(min_length=1, max_length=64)]
NonEmptyStr = Annotated[str, Field(min_length=1, max_length=256)]
TimestampNs = Annotated[int, Field(ge=0)]


class Side(StrEnum):
    BUY = "BUY"
    SELL = "SELL"

    @property
    def sign(self) -> int:
        return 1 if self is Side.BUY else -1


class OrderType(StrEnum):
    MARKET = "market"
    LIMIT = "limit"
    TWAP = "twap"
    VWAP = "vwap"
    ICEBERG = "iceberg"


class EventData(BaseModel):
    """Base of the per-type data models: extra fields are kept, never rejected."""

    model_config = ConfigDict(
        extra="allow",
        populate_by_name=True,
        str_strip_whitespace=True,
        validate_default=True,
    )


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class TickData(EventData):
    symbol: Symbol
    price: PositiveDecimal
    volume: NonNegativeDecimal = Decimal(0)
    timestamp: TimestampNs | None = None


class CandleData(EventData):
    symbol: Symbol
    open: PositiveDecimal
    high: PositiveDecimal
    low: PositiveDecimal
    close: PositiveDecimal
    volume: NonNegativeDecimal
    timeframe: NonEmptyStr = "1m"
    timestamp: TimestampNs | None = None

    @model_validator(mode="after")
    def _consistent_range(self) -> CandleData:
        if self.low > min(self.open, self.close) or self.high < max(self.open, self.close):
            raise ValueError(
                f"inconsistent candle: low={self.low} high={self.high} "
                f"open={self.open} close={self.close}"
            )
        return self


class FeaturesReadyData(EventData):
    symbol: Symbol
    features: dict[str, FiniteFloat]
    timestamp: TimestampNs | None = None


class MLPredictionData(EventData):
    symbol: Symbol | None = None
    prediction: FiniteFloat
    confidence: UnitFloat | None = None
    model_version: str | None = None


class SignalData(EventData):
    symbol: Symbol
    side: Side
    size: NonNegativeDecimal | None = None
    signal_strength: UnitFloat | None = None

    _side_upper = field_validator("side", mode="before")(_upper)


class OrderRequestData(EventData):
    """An order to be checked by risk. `id` is accepted for `order_id` (the guide's key)."""

    order_id: NonEmptyStr = Field(validation_alias=AliasChoices("order_id", "id"))
    symbol: Symbol
    side: Side
    size: PositiveDecimal
    type: OrderType = OrderType.MARKET
    price: PositiveDecimal | None = None
    reduce_only: bool = False

    _side_upper = field_validator("side", mode="before")(_upper)
    _type_lower = field_validator("type", mode="before")(_lower)

    @model_validator(mode="after")
    def _limit_needs_price(self) -> OrderRequestData:
        if self.type is OrderType.LIMIT and self.price is None:
            raise ValueError("a limit order needs a price")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def id(self) -> str:
        """The guide's examples read the order id as `order["id"]`."""
        return self.order_id


class OrderApprovedData(OrderRequestData):
    pass


class OrderPlacedData(EventData):
    order_id: NonEmptyStr = Field(validation_alias=AliasChoices("order_id", "id"))
    exchange_order_id: str | None = None
    client_order_id: str | None = None
    symbol: Symbol | None = None
    side: Side | None = None
    size: PositiveDecimal | None = None
    price: PositiveDecimal | None = None

    _side_upper = field_validator("side", mode="before")(_upper)


class OrderFilledData(EventData):
    order_id: NonEmptyStr = Field(validation_alias=AliasChoices("order_id", "id"))
    fill_price: PositiveDecimal
    filled_qty: PositiveDecimal
    fee: FiniteDecimal = Decimal(0)  # quote currency; negative: a maker rebate
    fill_id: str | None = None
    symbol: Symbol | None = None
    side: Side | None = None

    _side_upper = field_validator("side", mode="before")(_upper)


class OrderCancelledData(EventData):
    order_id: NonEmptyStr = Field(validation_alias=AliasChoices("order_id", "id"))
    reason: str = ""


class OrderRejectedData(EventData):
    order_id: NonEmptyStr = Field(validation_alias=AliasChoices("order_id", "id"))
    reason: NonEmptyStr


class PnlUpdateData(EventData):
    total_pnl: FiniteDecimal
    realized_pnl: FiniteDecimal
    unrealized_pnl: FiniteDecimal


class ErrorData(EventData):
    component: NonEmptyStr
    error: NonEmptyStr
    timestamp: TimestampNs | None = None


class KillswitchTriggeredData(EventData):
    reason: NonEmptyStr
    timestamp: TimestampNs | None = None


DATA_MODELS: Final[Mapping[EventType, type[EventData]]] = {
    EventType.TICK: TickData,
    EventType.CANDLE: CandleData,
    EventType.FEATURES_READY: FeaturesReadyData,
    EventType.ML_PREDICTION: MLPredictionData,
    EventType.SIGNAL: SignalData,
    EventType.ORDER_REQUEST: OrderRequestData,
    EventType.ORDER_APPROVED: OrderApprovedData,
    EventType.ORDER_PLACED: OrderPlacedData,
    EventType.ORDER_FILLED: OrderFilledData,
    EventType.ORDER_CANCELLED: OrderCancelledData,
    EventType.ORDER_REJECTED: OrderRejectedData,
    EventType.PNL_UPDATE: PnlUpdateData,
    EventType.ERROR: ErrorData,
    EventType.KILLSWITCH_TRIGGERED: KillswitchTriggeredData,
}


# --- immutable mappings --------------------------------------------------------------------


class FrozenDict(dict[str, Any]):
    """A dict that refuses mutation, so a handler cannot change an event others also see.

    It stays a `dict` (JSON encoders, `isinstance` checks and `**` unpacking work); copy it
    with `dict(event.data)` to build a new event from an old one.
    """

    __slots__ = ()

    def _readonly(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("event data is immutable; copy it with dict(event.data)")

    __setitem__ = __delitem__ = _readonly
    clear = pop = popitem = setdefault = update = _readonly
    __ior__ = _readonly

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items(), key=lambda kv: kv[0])))

    def __copy__(self) -> dict[str, Any]:
        return dict(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return {k: _thaw(v) for k, v in self.items()}


_ATOMIC = (str, int, float, Decimal, type(None))


def _freeze(value: Any) -> Any:
    if isinstance(value, FrozenDict):
        return value
    if isinstance(value, Mapping):
        return FrozenDict(
            {str(k): v if isinstance(v, _ATOMIC) else _freeze(v) for k, v in value.items()}
        )
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


# --- ids and the envelope ----------------------------------------------------------------


class _IdGenerator:
    """Event ids sortable by creation time: 16 hex digits of ns time, then 8 of uniqueness.

    Within one process ids are strictly increasing (a counter breaks ties inside one ns);
    across processes the random prefix keeps them unique.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ns = 0
        self._counter = 0
        self._node = int.from_bytes(os.urandom(2), "big")

    def next_id(self, now_ns: int) -> str:
        with self._lock:
            if now_ns <= self._last_ns:
                now_ns = self._last_ns
                self._counter += 1
            else:
                self._last_ns = now_ns
                self._counter = 0
            return f"{now_ns:016x}{self._node:04x}{self._counter & 0xFFFF:04x}"

    def reseed(self) -> None:
        self._node = int.from_bytes(os.urandom(2), "big")


_ids = _IdGenerator()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.reseed)


def new_event_id() -> str:
    return _ids.next_id(time.time_ns())


#: The event being handled in the current task; set by the bus while a handler runs, so an
#: event published from inside a handler inherits its correlation id.
current_event: contextvars.ContextVar[Event | None] = contextvars.ContextVar(
    "hean_current_event", default=None
)


#: Wire names to types: a decoded event's type looked up without the enum's slower call.
_EVENT_TYPES: Final[Mapping[str, EventType]] = {t.value: t for t in EventType}


def validate_data(event_type: EventType, data: Mapping[str, Any]) -> dict[str, Any]:
    """Validate `data` for `event_type`; return it normalised (Decimals, enums, defaults).

    Keys the caller gave under an alias (the guide's `id` for `order_id`) are kept as given.
    """
    model = DATA_MODELS[event_type]
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        raise InvalidEventError(f"invalid {event_type.value} data: {_describe(exc)}") from exc
    if model.__pydantic_computed_fields__:
        normalised = parsed.model_dump(mode="python")
    else:
        # The models are flat: their validated fields plus the extras are the dump.
        normalised = {**parsed.__dict__, **(parsed.__pydantic_extra__ or {})}
    return {**data, **normalised}


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "data"
        given = err.get("input")
        if isinstance(given, dict) or err["type"] == "missing":
            parts.append(f"{where}: {err['msg']}")
            continue
        shown = repr(given)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        parts.append(f"{where}: {err['msg']} (got {shown})")
    return "; ".join(parts)


class Event(BaseModel):
    """The immutable event envelope.

    `Event(event_type=EventType.SIGNAL, data={"symbol": "BTC/USDT", "side": "BUY"})` builds a
    validated event with a fresh sortable `event_id` and a UTC `timestamp` in nanoseconds.
    `source` and `correlation_id` are filled by the bus at publish time when left empty.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    event_type: EventType
    data: FrozenDict = Field(default_factory=FrozenDict)
    event_id: str = Field(default_factory=new_event_id, min_length=1, max_length=64)
    timestamp: int = Field(default_factory=time.time_ns, ge=0)
    source: str = ""
    correlation_id: str | None = None

    WIRE_FIELDS: ClassVar[tuple[str, ...]] = (
        "event_type",
        "event_id",
        "timestamp",
        "source",
        "correlation_id",
        "data",
    )

    def __init__(self, **kwargs: Any) -> None:
        raw_type = kwargs.get("event_type")
        # An EventType is a str equal to its wire name: one lookup serves both.
        event_type = _EVENT_TYPES.get(raw_type) if isinstance(raw_type, str) else None
        if event_type is None:
            try:
                event_type = EventType(str(raw_type).upper())
            except ValueError:
                raise InvalidEventError(f"unknown event type {raw_type!r}") from None
        data = kwargs.get("data")
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise InvalidEventError(
                f"invalid {event_type.value} data: expected a mapping, got {type(data).__name__}"
            )
        kwargs["event_type"] = event_type
        kwargs["data"] = _freeze(validate_data(event_type, data))
        if _envelope_ok(kwargs):
            # Every event of the system passes here twice (publisher and consumer): the
            # envelope's few plain fields are checked by hand, the same rules as the
            # declared fields, and pydantic's slower path only runs to explain an error.
            if "event_id" not in kwargs:  # a decoded event has one: no new id to make
                kwargs["event_id"] = new_event_id()
            if "timestamp" not in kwargs:
                kwargs["timestamp"] = time.time_ns()
            kwargs.setdefault("source", "")
            kwargs.setdefault("correlation_id", None)
            object.__setattr__(self, "__dict__", kwargs)
            object.__setattr__(self, "__pydantic_fields_set__", set(kwargs))
            object.__setattr__(self, "__pydantic_extra__", None)
            object.__setattr__(self, "__pydantic_private__", None)
            return
        try:
            super().__init__(**kwargs)
        except ValidationError as exc:
            raise InvalidEventError(f"invalid event envelope: {_describe(exc)}") from exc

    @property
    def stream_fields(self) -> dict[str, bytes]:
        """The event as one Redis stream entry: a single JSON field (see ADR 0002)."""
        return {"event": self.to_json()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_type": self.event_type.value,
            "event_id": self.event_id,
            "timestamp": self.timestamp,
            "source": self.source,
            "correlation_id": self.correlation_id,
            "data": _thaw(self.data),
        }

    def to_json(self) -> bytes:
        # orjson writes FrozenDict (a dict), tuples and enums natively; Decimal via default.
        return orjson.dumps(
            {
                "event_type": self.event_type,
                "event_id": self.event_id,
                "timestamp": self.timestamp,
                "source": self.source,
                "correlation_id": self.correlation_id,
                "data": self.data,
            },
            default=_json_default,
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Event:
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidEventError(f"event is not valid JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise InvalidEventError("event JSON must be an object")
        unknown = set(payload) - set(cls.WIRE_FIELDS)
        if unknown:
            raise InvalidEventError(f"unknown envelope fields: {sorted(unknown)}")
        return cls(**payload)

    @property
    def source_service(self) -> str:
        """The service that published it: `source` is its consumer name, `<service>:...`."""
        return self.source.split(":", 1)[0]

    def with_context(self, *, source: str) -> Event:
        """Fill `source` and `correlation_id` if empty (the bus calls this at publish)."""
        updates: dict[str, Any] = {}
        if not self.source:
            updates["source"] = source
        if self.correlation_id is None:
            parent = current_event.get()
            updates["correlation_id"] = (
                parent.correlation_id or parent.event_id if parent is not None else self.event_id
            )
        if not updates:
            return self
        # A shallow copy with two fields replaced: everything was validated when this event
        # was built, and publish() runs this for every event (pydantic's model_copy costs
        # several times more).
        stamped = object.__new__(type(self))
        object.__setattr__(stamped, "__dict__", {**self.__dict__, **updates})
        object.__setattr__(
            stamped, "__pydantic_fields_set__", self.__pydantic_fields_set__ | updates.keys()
        )
        object.__setattr__(stamped, "__pydantic_extra__", None)
        object.__setattr__(stamped, "__pydantic_private__", None)
        return stamped

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # Iterating over an event (dict(event)) yields its wire form, not pydantic internals.
        return iter(self.to_dict().items())

    def __str__(self) -> str:
        corr = f" corr={self.correlation_id}" if self.correlation_id else ""
        return (
            f"{self.event_type.value} id={self.event_id} src={self.source or '-'}{corr} "
            f"data={orjson.dumps(_thaw(self.data), default=_json_default).decode()}"
        )


_ENVELOPE_KEYS = frozenset(
    ("event_type", "data", "event_id", "timestamp", "source", "correlation_id")
)


def _envelope_ok(values: dict[str, Any]) -> bool:
    """True if the envelope fields in `values` satisfy `Event`'s declared constraints."""
    if not values.keys() <= _ENVELOPE_KEYS:
        return False
    event_id = values.get("event_id")
    if event_id is not None and not (type(event_id) is str and 0 < len(event_id) <= 64):
        return False
    timestamp = values.get("timestamp")
    if timestamp is not None and not (type(timestamp) is int and timestamp >= 0):
        return False
    if type(values.get("source", "")) is not str:
        return False
    correlation = values.get("correlation_id")
    return correlation is None or type(correlation) is str


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, FrozenDict):
        return dict(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise TypeError("non-finite float")
    raise TypeError(f"cannot serialise {type(value).__name__}")


def json_dumps(value: Any) -> bytes:
    """orjson with Decimal as string: the project's one JSON encoder."""
    return orjson.dumps(value, default=_json_default)


Retention = Literal["high_frequency", "important", "audit"]

#: Retention classes, from the guide's persistence strategy (see DESIGN.md and ADR 0002).
RETENTION: Final[Mapping[EventType, Retention]] = {
    EventType.TICK: "high_frequency",
    EventType.CANDLE: "high_frequency",
    EventType.FEATURES_READY: "high_frequency",
    EventType.ML_PREDICTION: "high_frequency",
    EventType.SIGNAL: "important",
    EventType.ORDER_REQUEST: "important",
    EventType.ORDER_APPROVED: "important",
    EventType.ORDER_PLACED: "important",
    EventType.ORDER_FILLED: "important",
    EventType.ORDER_CANCELLED: "important",
    EventType.ORDER_REJECTED: "important",
    EventType.PNL_UPDATE: "important",
    EventType.KILLSWITCH_TRIGGERED: "important",
    EventType.ERROR: "audit",
}
