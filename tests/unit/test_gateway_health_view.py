"""The gateway's pure cores: merging health snapshots and deriving open orders."""

from __future__ import annotations

from typing import Any

from hean.core.types import Event, EventType
from hean.gateway.health_view import known_names, lookup, merge_health
from hean.gateway.orders import open_orders

NOW = 1_800_000_000.0
EXPECTED = ("ml-service", "execution", "risk")


def component(state: str = "healthy", breaker: str = "closed", **extra: Any) -> dict[str, Any]:
    return {
        "state": state,
        "last_check": int(NOW),
        "failure_count": 0,
        "circuit_breaker": breaker,
        **extra,
    }


def snapshot(
    service: str,
    instance: str,
    components: dict[str, dict[str, Any]],
    *,
    overall: str = "healthy",
    running: bool = True,
    age: float = 1.0,
) -> dict[str, Any]:
    return {
        "version": 1,
        "service": service,
        "instance": instance,
        "written_at": NOW - age,
        "health": {
            "orchestrator": {"running": running, "uptime_seconds": 30, "overall_state": overall},
            "components": {**components, "event_bus": component()},
        },
    }


def healthy_system() -> list[dict[str, Any]]:
    return [
        snapshot("ml-service", "h:1", {"ml_engine": component()}),
        snapshot("ml-service", "h:2", {"ml_engine": component()}),
        snapshot("execution", "h:3", {"execution": component()}),
        snapshot("risk", "h:4", {"risk_governor": component()}),
    ]


def test_merge_all_expected_healthy_is_healthy_in_guide_shape():
    merged = merge_health(healthy_system(), expected=EXPECTED, now=NOW)
    assert merged["orchestrator"] == {
        "running": True,
        "uptime_seconds": 30,
        "overall_state": "healthy",
    }
    ml = merged["components"]["ml_engine"]
    assert {"state", "last_check", "failure_count", "circuit_breaker"} <= set(ml)
    assert ml["instances"] == 2 and ml["service"] == "ml-service"
    assert set(merged["services"]["ml-service"]["instances"]) == {"h:1", "h:2"}
    assert "ml-service.event_bus" in merged["components"]
    assert "event_bus" not in merged["components"]


def test_merge_missing_expected_service_is_unhealthy_and_component_down():
    snaps = [s for s in healthy_system() if s["service"] != "risk"]
    merged = merge_health(snaps, expected=EXPECTED, now=NOW)
    assert merged["orchestrator"]["overall_state"] == "unhealthy"
    assert merged["missing_services"] == ["risk"]
    down = merged["components"]["risk_governor"]
    assert down["state"] == "unhealthy" and "down" in down["error_message"]


def test_merge_stale_snapshot_counts_as_down():
    snaps = healthy_system()
    snaps[2] = snapshot("execution", "h:3", {"execution": component()}, age=120)
    merged = merge_health(snaps, expected=EXPECTED, now=NOW, max_age_s=60)
    assert merged["missing_services"] == ["execution"]
    assert merged["orchestrator"]["overall_state"] == "unhealthy"


def test_merge_one_bad_replica_degrades_not_fails():
    snaps = healthy_system()
    snaps[1] = snapshot(
        "ml-service",
        "h:2",
        {"ml_engine": component("unhealthy", "open", error_message="boom")},
        overall="unhealthy",
    )
    merged = merge_health(snaps, expected=EXPECTED, now=NOW)
    assert merged["services"]["ml-service"]["state"] == "degraded"
    assert merged["orchestrator"]["overall_state"] == "degraded"
    ml = merged["components"]["ml_engine"]
    assert ml["state"] == "degraded"
    assert ml["circuit_breaker"] == "open"
    assert ml["error_message"] == "h:2: boom"


def test_merge_all_replicas_unhealthy_is_unhealthy():
    snaps = healthy_system()
    snaps[0] = snapshot("ml-service", "h:1", {"ml_engine": component()}, running=False)
    snaps[1] = snapshot("ml-service", "h:2", {"ml_engine": component()}, overall="unhealthy")
    merged = merge_health(snaps, expected=EXPECTED, now=NOW)
    assert merged["services"]["ml-service"]["state"] == "unhealthy"
    assert merged["orchestrator"]["overall_state"] == "unhealthy"


def test_merge_unexpected_unhealthy_service_only_degrades():
    snaps = [*healthy_system(), snapshot("demo", "h:9", {}, overall="unhealthy")]
    merged = merge_health(snaps, expected=EXPECTED, now=NOW)
    assert merged["orchestrator"]["overall_state"] == "degraded"


def test_merge_nothing_live_is_unhealthy_and_not_running():
    merged = merge_health([], expected=(), now=NOW)
    assert merged["orchestrator"] == {
        "running": False,
        "uptime_seconds": 0,
        "overall_state": "unhealthy",
    }


def test_merge_malformed_snapshot_is_ignored():
    merged = merge_health([{"service": "x"}, *healthy_system()], expected=EXPECTED, now=NOW)
    assert "x" not in merged["services"]


def test_lookup_guide_names_aliases_and_services():
    merged = merge_health(healthy_system(), expected=EXPECTED, now=NOW)
    orchestrator, ml, risk = (lookup(merged, n) for n in ("orchestrator", "ml_engine", "risk"))
    assert orchestrator is not None and orchestrator["overall_state"] == "healthy"
    assert ml is not None and ml["instances"] == 2
    assert lookup(merged, "execution_router") == lookup(merged, "execution")
    assert risk is not None and risk["service"] == "risk"
    assert lookup(merged, "nope") is None
    names = known_names(merged)
    assert {"orchestrator", "ml_engine", "execution", "execution_router", "risk"} <= set(names)


def approved(order_id: str, size: str = "1") -> Event:
    return Event(
        event_type=EventType.ORDER_APPROVED,
        source="risk:test",
        data={"order_id": order_id, "symbol": "BTC/USDT", "side": "BUY", "size": size},
    )


def filled(order_id: str, qty: str, fill_id: str, **extra: Any) -> Event:
    return Event(
        event_type=EventType.ORDER_FILLED,
        data={"order_id": order_id, "fill_price": "100", "filled_qty": qty, "fill_id": fill_id,
              **extra},
    )  # fmt: skip


def test_open_orders_terminal_events_close_orders():
    events = [
        approved("a"),
        approved("b"),
        approved("c", "2"),
        approved("d"),
        Event(event_type=EventType.ORDER_PLACED, data={"order_id": "d", "exchange_order_id": "x"}),
        filled("a", "1", "f1"),
        Event(event_type=EventType.ORDER_CANCELLED, data={"order_id": "b", "reason": "ks"}),
        filled("c", "1", "f2"),
        filled("c", "1", "f2"),  # a redelivered fill counts once
        filled("zzz", "1", "f3"),  # approved before the window: ignored
    ]
    working = open_orders(events)
    assert [o["order_id"] for o in working] == ["c", "d"]
    assert working[0]["status"] == "partially_filled" and working[0]["filled_qty"] == "1"
    assert working[1]["status"] == "placed" and working[1]["exchange_order_ids"] == ["x"]


def test_open_orders_remaining_zero_closes_order():
    working = open_orders([approved("a", "5"), filled("a", "1", "f", remaining_qty="0")])
    assert working == []
