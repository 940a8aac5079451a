from __future__ import annotations

import math
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hean.core.types import (
    DATA_MODELS,
    Event,
    EventType,
    InvalidEventError,
    OrderType,
    Side,
    current_event,
)


def test_event_types_cover_the_guide_fourteen() -> None:
    assert {t.value for t in EventType} == {
        "TICK", "CANDLE", "FEATURES_READY", "ML_PREDICTION", "SIGNAL", "ORDER_REQUEST",
        "ORDER_APPROVED", "ORDER_PLACED", "ORDER_FILLED", "ORDER_CANCELLED", "ORDER_REJECTED",
        "PNL_UPDATE", "ERROR", "KILLSWITCH_TRIGGERED",
    }  # fmt: skip
    assert set(DATA_MODELS) == set(EventType)


def test_event_envelope_defaults_unique_sortable_ids_and_ns_timestamp() -> None:
    events = [
        Event(event_type=EventType.ERROR, data={"component": "x", "error": "y"}) for _ in range(500)
    ]
    ids = [e.event_id for e in events]
    assert len(set(ids)) == 500
    assert ids == sorted(ids)
    assert events[0].timestamp > 1_600_000_000 * 10**9


def test_event_is_immutable_including_nested_data() -> None:
    event = Event(
        event_type=EventType.FEATURES_READY, data={"symbol": "BTC/USDT", "features": {"rsi": 50.0}}
    )
    with pytest.raises(Exception, match="frozen"):
        event.source = "other"  # type: ignore[misc]
    with pytest.raises(TypeError, match="immutable"):
        event.data["symbol"] = "ETH/USDT"
    with pytest.raises(TypeError, match="immutable"):
        event.data["features"]["rsi"] = 1.0


def test_event_guide_partial_payloads_validate() -> None:
    signal = Event(event_type=EventType.SIGNAL, data={"symbol": "BTC/USDT", "side": "BUY"})
    assert signal.data["side"] is Side.BUY
    prediction = Event(event_type=EventType.ML_PREDICTION, data={"prediction": 0.61})
    assert prediction.data["prediction"] == 0.61
    request = Event(
        event_type=EventType.ORDER_REQUEST,
        data={"id": "o-1", "symbol": "BTC/USDT", "side": "buy", "size": "0.01"},
    )
    approved = Event(event_type=EventType.ORDER_APPROVED, data=request.data)
    assert approved.data["order_id"] == "o-1" and approved.data["id"] == "o-1"
    assert approved.data["size"] == Decimal("0.01")
    assert approved.data["type"] is OrderType.MARKET


def test_event_order_request_without_id_key_still_exposes_id() -> None:
    request = Event(
        event_type=EventType.ORDER_REQUEST,
        data={"order_id": "o-2", "symbol": "BTC/USDT", "side": "SELL", "size": 1},
    )
    assert request.data["id"] == "o-2"


@pytest.mark.parametrize(
    ("event_type", "data", "message"),
    [
        (EventType.TICK, {"symbol": "BTC/USDT", "price": "nan"}, "finite"),
        (EventType.TICK, {"symbol": "BTC/USDT", "price": float("inf")}, "finite"),
        (EventType.TICK, {"symbol": "BTC/USDT", "price": 0}, "greater than 0"),
        (EventType.TICK, {"price": 1}, "symbol: Field required"),
        (EventType.TICK, {"symbol": "BTC/USDT", "price": "abc"}, "valid decimal"),
        (EventType.ORDER_REQUEST, {"id": "a", "symbol": "X", "side": "BUY", "size": -1}, "size"),
        (EventType.ORDER_REQUEST, {"id": "a", "symbol": "X", "side": "HOLD", "size": 1}, "side"),
        (
            EventType.ORDER_REQUEST,
            {"id": "a", "symbol": "X", "side": "BUY", "size": 1, "type": "limit"},
            "needs a price",
        ),
        (EventType.ORDER_FILLED, {"order_id": "a", "fill_price": 1, "filled_qty": 0}, "filled_qty"),
        (
            EventType.CANDLE,
            {"symbol": "X", "open": 2, "high": 1, "low": 1, "close": 2, "volume": 1},
            "inconsistent",
        ),
        (EventType.ML_PREDICTION, {"prediction": 0.5, "confidence": 1.5}, "confidence"),
        (EventType.PNL_UPDATE, {"total_pnl": "1", "realized_pnl": "1"}, "unrealized_pnl"),
        (EventType.ORDER_REJECTED, {"order_id": "a"}, "reason"),
    ],
)
def test_event_invalid_data_rejected_with_clear_error(
    event_type: EventType, data: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidEventError, match=message):
        Event(event_type=event_type, data=data)


def test_event_unknown_type_and_non_mapping_data_rejected() -> None:
    with pytest.raises(InvalidEventError, match="unknown event type"):
        Event(event_type="NOT_A_TYPE")
    with pytest.raises(InvalidEventError, match="expected a mapping"):
        Event(event_type=EventType.TICK, data=[1, 2])


def test_event_extra_fields_kept_and_round_trip_through_json() -> None:
    event = Event(
        event_type=EventType.ORDER_FILLED,
        data={"order_id": "o", "fill_price": "30000.5", "filled_qty": "0.001", "venue": {"x": [1]}},
        correlation_id="c-1",
        source="execution:host:1",
    )
    wire = event.to_json()
    assert b'"fill_price":"30000.5"' in wire  # Decimal as string, never float
    back = Event.from_json(wire)
    assert back == event
    assert back.data["venue"] == {"x": (1,)}
    assert back.data["fill_price"] == Decimal("30000.5")


def test_event_from_json_rejects_unknown_envelope_fields() -> None:
    with pytest.raises(InvalidEventError, match="unknown envelope fields"):
        Event.from_json(b'{"event_type":"ERROR","data":{"component":"a","error":"b"},"evil":1}')


def test_event_with_context_inherits_correlation_from_handled_event() -> None:
    parent = Event(event_type=EventType.TICK, data={"symbol": "BTC/USDT", "price": 1})
    root = parent.with_context(source="md")
    assert root.correlation_id == root.event_id and root.source == "md"
    token = current_event.set(root)
    try:
        child = Event(event_type=EventType.SIGNAL, data={"symbol": "BTC/USDT", "side": "BUY"})
        stamped = child.with_context(source="strategy")
    finally:
        current_event.reset(token)
    assert stamped.correlation_id == root.event_id
    assert stamped.event_id != root.event_id


@given(
    price=st.decimals(allow_nan=True, allow_infinity=True, places=8),
    size=st.decimals(allow_nan=True, allow_infinity=True, places=8),
)
def test_event_order_money_fields_accept_only_finite_positive(
    price: Decimal, size: Decimal
) -> None:
    data = {"id": "o", "symbol": "BTC/USDT", "side": "BUY", "size": size, "price": price}
    valid = price.is_finite() and size.is_finite() and price > 0 and size > 0
    if valid:
        event = Event(event_type=EventType.ORDER_REQUEST, data=data)
        assert event.data["price"] == price and event.data["size"] == size
        assert Event.from_json(event.to_json()).data["size"] == size
    else:
        with pytest.raises(InvalidEventError):
            Event(event_type=EventType.ORDER_REQUEST, data=data)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_event_features_reject_non_finite_floats(value: float) -> None:
    data = {"symbol": "BTC/USDT", "features": {"f": value}}
    if math.isfinite(value):
        assert Event(event_type=EventType.FEATURES_READY, data=data).data["features"]["f"] == value
    else:
        with pytest.raises(InvalidEventError):
            Event(event_type=EventType.FEATURES_READY, data=data)
