"""Execution core: the paper exchange model and the router's algorithms."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hean.core.types import OrderType, Side
from hean.execution.exchange import ChildOrder, MarketRules, OrderRefusedError
from hean.execution.paper import PaperConfig, PaperExchange
from hean.execution.router import ExecutionRouter, ParentStatus, RouterConfig

D = Decimal
S = 1_000_000_000
BTC = MarketRules("BTC/USDT", tick_size=D("0.1"), qty_step=D("0.001"), min_qty=D("0.001"))


def paper(**overrides) -> PaperExchange:
    cfg: dict[str, Any] = {"markets": {"BTC/USDT": BTC}, "default_rules": None}
    cfg.update(overrides)
    ex = PaperExchange(PaperConfig(**cfg))
    ex.last_price["BTC/USDT"] = D(100)
    return ex


def child(cid="c1", side="BUY", qty="1", type_="market", price=None, sym="BTC/USDT"):
    return ChildOrder(cid, "p1", sym, Side(side), D(qty), type_, D(price) if price else None)


# --- paper exchange ----------------------------------------------------------------------


async def test_paper_market_buy_fills_at_slipped_price_with_taker_fee():
    ex = paper(base_slippage_bps=D(10), impact_bps=D(0))
    result = await ex.place(child(qty="2"), 7)
    (fill,) = result.fills
    assert fill.price == D("100.1")  # 100 + 10 bps, rounded to the 0.1 tick against us
    assert fill.qty == D(2)
    assert fill.fee == D("2") * D("100.1") * D("0.00055")
    assert fill.liquidity == "taker"
    assert fill.slippage_bps == D(10)
    assert fill.timestamp_ns == 7
    assert result.open_qty == 0


async def test_paper_market_sell_slips_down():
    ex = paper(base_slippage_bps=D(10), impact_bps=D(0))
    (fill,) = (await ex.place(child(side="SELL"), 0)).fills
    assert fill.price == D("99.9")


async def test_paper_larger_order_slips_more():
    ex = paper(base_slippage_bps=D(1), impact_bps=D(100), depth_notional=D(1000))
    small = (await ex.place(child("a", qty="0.1"), 0)).fills[0]
    large = (await ex.place(child("b", qty="5"), 0)).fills[0]
    assert large.price > small.price


async def test_paper_market_over_liquidity_fills_partially_then_on_next_ticks():
    ex = paper(liquidity_notional=D(150))
    result = await ex.place(child(qty="4"), 0)
    assert result.fills[0].qty == D("1.5")
    assert result.open_qty == D("2.5")
    second = await ex.on_market_data("BTC/USDT", D(100), D(0), 1)
    third = await ex.on_market_data("BTC/USDT", D(100), D(0), 2)
    assert [f.qty for f in second + third] == [D("1.5"), D("1")]
    assert await ex.open_client_order_ids() == []


async def test_paper_limit_rests_then_fills_as_maker_when_crossed():
    ex = paper()
    result = await ex.place(child(type_="limit", price="95"), 0)
    assert result.fills == ()
    assert await ex.on_market_data("BTC/USDT", D(96), D(0), 1) == []
    (fill,) = await ex.on_market_data("BTC/USDT", D("94.5"), D(0), 2)
    assert fill.price == D(95)
    assert fill.liquidity == "maker"
    assert fill.fee == D(95) * D("0.0002")


async def test_paper_resting_limit_touched_but_not_traded_through_does_not_fill():
    ex = paper()
    await ex.place(child(type_="limit", price="99"), 0)
    assert await ex.on_market_data("BTC/USDT", D(99), D(0), 1) == []  # touched
    (fill,) = await ex.on_market_data("BTC/USDT", D("98.9"), D(0), 2)  # through
    assert (fill.price, fill.liquidity) == (D(99), "maker")
    sell = paper()
    await sell.place(child(side="SELL", type_="limit", price="101"), 0)
    assert await sell.on_market_data("BTC/USDT", D(101), D(0), 1) == []
    assert len(await sell.on_market_data("BTC/USDT", D("101.1"), D(0), 2)) == 1


async def test_paper_marketable_limit_rest_rests_as_maker_at_its_limit():
    # The book takes 100 x 100 now; the other 50 rest at 100 as a venue's would, and do
    # not fill at 100 once the market has moved up to 110.
    ex = paper(liquidity_notional=D(10000), base_slippage_bps=D(0), impact_bps=D(0))
    result = await ex.place(child(type_="limit", price="100", qty="150"), 0)
    assert [(f.qty, f.liquidity) for f in result.fills] == [(D(100), "taker")]
    assert result.open_qty == D(50)
    assert await ex.on_market_data("BTC/USDT", D(110), D(0), 1) == []
    (fill,) = await ex.on_market_data("BTC/USDT", D("99.9"), D(0), 2)
    assert (fill.qty, fill.price, fill.liquidity) == (D(50), D(100), "maker")


async def test_paper_marketable_limit_never_fills_through_its_price():
    ex = paper(base_slippage_bps=D(100), impact_bps=D(0))
    (fill,) = (await ex.place(child(type_="limit", price="100.5"), 0)).fills
    assert fill.price == D("100.5")


async def test_paper_cancel_returns_open_qty():
    ex = paper()
    await ex.place(child(type_="limit", price="90", qty="3"), 0)
    assert await ex.cancel("c1", 1) == D(3)
    assert await ex.cancel("c1", 2) == 0


@pytest.mark.parametrize(
    ("order", "reason"),
    [
        (child(sym="DOGE/USDT"), "unknown symbol DOGE/USDT"),
        (child(qty="0.0001"), "below minimum"),
        (child(qty="1.0005"), "qty step"),
        (child(type_="limit", price="100.05"), "tick size"),
    ],
)
async def test_paper_bad_order_refused_with_reason(order, reason):
    with pytest.raises(OrderRefusedError, match=reason):
        await paper().place(order, 0)


async def test_paper_market_child_below_minimum_notional_refused_at_the_last_price():
    rules = MarketRules("BTC/USDT", qty_step=D("0.001"), min_qty=D("0.001"), min_notional=D(5))
    ex = paper(markets={"BTC/USDT": rules})
    with pytest.raises(OrderRefusedError, match=r"value 4\.00 below the minimum notional 5"):
        await ex.place(child(qty="0.04"), 0)  # 0.04 x 100
    assert (await ex.place(child(cid="c2", qty="0.05"), 0)).fills


def test_rules_min_size_rounds_the_minimum_notional_up_to_the_step():
    assert BTC_MIN5.min_size(D(60000)) == D("0.000084")
    assert BTC_MIN5.min_size(None) == BTC_MIN5.min_qty
    assert BTC.min_size(D(60000)) == BTC.min_qty


async def test_paper_same_client_order_id_twice_refused():
    ex = paper()
    await ex.place(child(), 0)
    with pytest.raises(OrderRefusedError, match="duplicate client order id"):
        await ex.place(child(), 1)


async def test_paper_unlisted_symbol_tradeable_after_market_data_when_allowed():
    ex = PaperExchange(PaperConfig())
    assert ex.rules("ETH/USDT") is None
    await ex.on_market_data("ETH/USDT", D(2000), D(1), 0)
    assert ex.rules("ETH/USDT") is not None
    assert (await ex.place(child(sym="ETH/USDT"), 1)).fills


@settings(max_examples=200, deadline=None)
@given(
    qty=st.decimals(min_value="0.001", max_value="100", places=3),
    side=st.sampled_from(["BUY", "SELL"]),
)
async def test_paper_fill_never_better_than_market_and_fees_non_negative(qty, side):
    ex = paper(liquidity_notional=D(10**9))
    (fill,) = (await ex.place(child(side=side, qty=str(qty)), 0)).fills
    assert fill.qty == qty
    assert fill.slippage_bps >= 0
    assert fill.fee >= 0
    assert fill.price % BTC.tick_size == 0


# --- router ------------------------------------------------------------------------------


def order(type_: str, size: str = "1", **extra) -> dict[str, Any]:
    base = {"order_id": "o1", "symbol": "BTC/USDT", "side": "BUY", "size": size, "type": type_}
    return base | extra


def test_router_market_one_child_now():
    parent = ExecutionRouter().route(order("market"), BTC, 10)
    children = parent.due_children(10)
    assert [(c.client_order_id, c.qty, c.type) for c in children] == [("o1-1", D(1), "market")]
    assert parent.due_children(10**12) == []


def test_router_twap_equal_slices_on_schedule():
    parent = ExecutionRouter().route(order("twap", "1", slices=4, duration_s=40), BTC, 0)
    assert [c.qty for c in parent.due_children(0)] == [D("0.25")]
    assert parent.due_children(9 * S) == []
    assert [c.qty for c in parent.due_children(20 * S)] == [D("0.25"), D("0.25")]
    assert [c.qty for c in parent.due_children(30 * S)] == [D("0.25")]
    assert parent.next_due_ns is None


def test_router_vwap_follows_candle_volume_profile():
    volumes = [D(1), D(1), D(2), D(1), D(3), D(1)]  # the last 3 are the profile: 1, 3, 1
    parent = ExecutionRouter().route(order("vwap", "1", slices=3), BTC, 0, volumes)
    assert [s.qty for s in parent.plan] == [D("0.2"), D("0.6"), D("0.2")]


def test_router_vwap_without_volume_falls_back_to_equal_slices():
    parent = ExecutionRouter().route(order("vwap", "0.9", slices=3), BTC, 0, [])
    assert [s.qty for s in parent.plan] == [D("0.3")] * 3


def test_router_iceberg_shows_one_slice_at_a_time():
    parent = ExecutionRouter().route(order("iceberg", "1", display_size="0.4"), BTC, 0)
    (first,) = parent.due_children(0)
    assert first.qty == D("0.4")
    assert parent.due_children(1) == []
    parent.on_fill(first.client_order_id, D("0.4"))
    (second,) = parent.due_children(2)
    parent.on_fill(second.client_order_id, D("0.4"))
    (last,) = parent.due_children(3)
    assert last.qty == D("0.2")
    parent.on_fill(last.client_order_id, D("0.2"))
    assert parent.status is ParentStatus.FILLED


def test_router_limit_child_carries_price():
    parent = ExecutionRouter().route(order("limit", price="99.5"), BTC, 0)
    (c,) = parent.due_children(0)
    assert (c.type, c.price) == ("limit", D("99.5"))


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (order("market", "0.0001"), "size 0.0001 rounded to the qty step 0.001: .*below minimum"),
        (order("limit", price="99.55"), "tick size"),
    ],
)
def test_router_order_venue_would_refuse_raises(bad, reason):
    with pytest.raises(OrderRefusedError, match=reason):
        ExecutionRouter().route(bad, BTC, 0)


def test_router_rounds_the_size_down_to_the_venue_step_and_finishes_there():
    # Risk sizes to one step for every symbol (0.000001 by default); the venue's is 0.001.
    parent = ExecutionRouter().route(order("market", "0.008333"), BTC, 0)
    assert parent.size == D("0.008")
    (c,) = parent.due_children(0)
    assert c.qty == D("0.008")
    assert BTC.refusal(c.qty, None) is None
    parent.on_fill(c.client_order_id, c.qty)
    assert parent.status is ParentStatus.FILLED
    assert parent.remaining == 0


BTC_MIN5 = MarketRules(
    "BTC/USDT",
    tick_size=D("0.1"),
    qty_step=D("0.000001"),
    min_qty=D("0.000001"),
    min_notional=D(5),
)


def test_router_refuses_an_order_below_the_venue_minimum_notional():
    with pytest.raises(OrderRefusedError, match="below the minimum notional 5"):
        ExecutionRouter().route(order("market", "0.00006", reference_price="60000"), BTC_MIN5, 0)
    with pytest.raises(OrderRefusedError, match="below the minimum notional 5"):
        ExecutionRouter().route(order("limit", "0.00006", price="60000"), BTC_MIN5, 0)


def test_router_slices_never_below_the_venue_minimum_notional():
    # 20 USDT in 5 TWAP slices would be 4 USDT children; the venue takes 5 at least.
    parent = ExecutionRouter().route(
        order("twap", "0.000333", slices=5, duration_s=10, reference_price="60000"), BTC_MIN5, 0
    )
    sizes = [s.qty for s in parent.plan]
    assert sum(sizes) == D("0.000333")
    assert len(sizes) == 3
    # Still taken if the price has fallen 9% when a later slice goes out.
    assert all(q * 60000 * D("0.91") >= 5 for q in sizes)


def test_router_cancel_stops_algorithm_and_returns_open_children():
    parent = ExecutionRouter().route(order("twap", "1", slices=2, duration_s=10), BTC, 0)
    (c,) = parent.due_children(0)
    assert list(parent.cancel()) == [c.client_order_id]
    assert parent.status is ParentStatus.CANCELLED
    assert parent.due_children(100 * S) == []


@settings(max_examples=300, deadline=None)
@given(
    size=st.decimals(min_value="0.001", max_value="50", places=3),
    algo=st.sampled_from([OrderType.TWAP, OrderType.VWAP, OrderType.ICEBERG]),
    slices=st.integers(min_value=1, max_value=20),
    volumes=st.lists(st.decimals(min_value=0, max_value=1000, places=2), max_size=25),
)
def test_router_children_sum_to_order_size_in_valid_steps(size, algo, slices, volumes):
    router = ExecutionRouter(RouterConfig(iceberg_display_ratio=D("0.3")))
    parent = router.route(
        order(algo.value, str(size), slices=slices, duration_s=10), BTC, 0, volumes
    )
    total = D(0)
    for step in range(200):
        for c in parent.due_children(step * S):
            assert c.qty >= BTC.min_qty
            assert c.qty % BTC.qty_step == 0
            total += c.qty
            parent.on_fill(c.client_order_id, c.qty)
        if parent.done:
            break
    assert total == size
    assert parent.status is ParentStatus.FILLED
