"""Risk core: Kelly sizing, pre-trade checks, reservations and the kill switch."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hean.core.bus import EventBus
from hean.core.types import Event, EventType, Side
from hean.risk.kelly import KellyParams, bet_fraction, kelly_fraction, shrunk_payoff_ratio
from hean.risk.risk_governor import (
    NS_PER_DAY,
    NoOrder,
    RiskGovernor,
    RiskLimits,
    SizedOrder,
    order_id_for_signal,
)

D = Decimal
T0 = 20_000 * NS_PER_DAY + 3_600 * 1_000_000_000  # some UTC day, 01:00


def governor(**overrides) -> RiskGovernor:
    limits = {
        "max_position_size": D(10000),
        "max_leverage": D(3),
        "daily_drawdown_limit": D("0.05"),
        "min_order_notional": D(5),
    }
    limits.update(overrides)
    gov = RiskGovernor(RiskLimits(**limits), starting_equity=D(10000))
    gov.on_mark("BTC/USDT", D(100))
    gov.on_mark("ETH/USDT", D(10))
    return gov


def request(order_id: str, side: str, size: str, sym: str = "BTC/USDT", **extra) -> Event:
    return Event(
        event_type=EventType.ORDER_REQUEST,
        data={"order_id": order_id, "symbol": sym, "side": side, "size": size, **extra},
        timestamp=T0,
    )


def signal(strength: float | None = 0.7, **extra) -> Event:
    data = {"symbol": "BTC/USDT", "side": "BUY", **extra}
    if strength is not None:
        data["signal_strength"] = strength
    return Event(event_type=EventType.SIGNAL, data=data, timestamp=T0)


def fill(gov: RiskGovernor, order_id: str, side: str, qty: str, price: str = "100", sym="BTC/USDT"):
    return gov.on_fill(order_id, sym, Side(side), D(qty), D(price), key=f"{order_id}:{qty}")


# --- Kelly -------------------------------------------------------------------------------


def test_kelly_fraction_matches_formula():
    assert kelly_fraction(D("0.6"), D(1)) == D("0.2")
    assert kelly_fraction(D("0.5"), D(2)) == D("0.25")
    assert kelly_fraction(D("0.4"), D(1)) == D("-0.2")


def test_bet_fraction_non_positive_kelly_bets_nothing():
    assert bet_fraction(D("0.5"), D(1), KellyParams()) == 0
    assert bet_fraction(D("0.3"), D(1), KellyParams()) == 0


def test_shrunk_payoff_without_trades_is_prior_and_moves_toward_observed():
    assert shrunk_payoff_ratio(None, 0, D(1), 20) == D(1)
    assert shrunk_payoff_ratio(D(3), 20, D(1), 20) == D(2)
    assert shrunk_payoff_ratio(D(3), 0, D(1), 20) == D(1)


@settings(max_examples=500, deadline=None)
@given(
    p=st.decimals(min_value=0, max_value=1, places=4),
    b=st.decimals(min_value="0.01", max_value=100, places=3),
    fraction=st.decimals(min_value="0.01", max_value=1, places=2),
    cap=st.decimals(min_value="0.01", max_value=1, places=2),
)
def test_bet_fraction_within_zero_and_cap(p, b, fraction, cap):
    share = bet_fraction(p, b, KellyParams(fraction=fraction, max_fraction=cap))
    assert D(0) <= share <= cap
    assert (share == 0) == (kelly_fraction(p, b) <= 0)
    assert share <= max(kelly_fraction(p, b), D(0))


# --- sizing ------------------------------------------------------------------------------


def test_size_signal_redelivered_signal_gets_same_order_id():
    gov = governor()
    sig = signal()
    first, second = gov.size_signal(sig), gov.size_signal(sig)
    assert isinstance(first, SizedOrder)
    assert isinstance(second, SizedOrder)
    assert first.order_id == second.order_id == order_id_for_signal(sig.event_id)
    assert len(first.order_id) <= 36


def test_size_signal_quarter_kelly_of_equity():
    gov = governor()
    result = gov.size_signal(signal(0.7))
    assert isinstance(result, SizedOrder)
    # p=0.7, b=1 -> f*=0.4, quarter Kelly 0.1 of 10000 USDT = 1000 USDT at 100 -> 10
    assert result.data["size"] == D(10)
    assert result.data["order_id"] == order_id_for_signal(result.data["signal_id"])


def test_size_signal_capped_by_max_fraction_and_requested_size():
    gov = governor()
    capped = gov.size_signal(signal(1.0))  # f*=1 -> 0.25, capped at 0.2 -> 2000 USDT
    assert isinstance(capped, SizedOrder)
    assert capped.data["size"] == D(20)
    smaller = gov.size_signal(signal(1.0, size="3"))
    assert isinstance(smaller, SizedOrder)
    assert smaller.data["size"] == D(3)


def test_size_signal_coin_flip_gives_no_order():
    result = governor().size_signal(signal(0.5))
    assert isinstance(result, NoOrder)
    assert "Kelly" in result.reason


def test_size_signal_without_price_gives_no_order():
    gov = governor()
    sig = Event(event_type=EventType.SIGNAL, data={"symbol": "XRP/USDT", "side": "SELL"})
    result = gov.size_signal(sig)
    assert isinstance(result, NoOrder)
    assert "no market price" in result.reason


def test_size_signal_uses_realized_payoff_once_trades_exist():
    gov = governor()
    gov.on_pnl({"equity": "10000", "trade_stats": {"payoff_ratio": "3", "closed_trades": 20}}, T0)
    result = gov.size_signal(signal(0.5))  # b = (20*3 + 20*1)/40 = 2 -> f* = 0.25
    assert isinstance(result, SizedOrder)
    assert result.data["size"] == D("6.25")


# --- checks ------------------------------------------------------------------------------


async def test_decide_within_limits_approves_and_keeps_order_fields():
    decision = await governor().decide(request("a", "BUY", "10", type="twap", slices=4))
    assert decision.approved, decision.reasons
    assert decision.order["order_id"] == "a"
    assert decision.order["slices"] == 4


async def test_decide_position_over_max_position_size_rejected():
    decision = await governor().decide(request("a", "BUY", "101"))
    assert not decision.approved
    assert "MAX_POSITION_SIZE" in decision.reason


async def test_decide_below_minimum_notional_rejected():
    decision = await governor().decide(request("a", "BUY", "0.01"))
    assert not decision.approved
    assert "below minimum" in decision.reason


async def test_decide_leverage_over_max_rejected():
    gov = governor(max_position_size=D(100000))
    decision = await gov.decide(request("a", "BUY", "301"))
    assert not decision.approved
    assert "MAX_LEVERAGE" in decision.reason


async def test_decide_total_exposure_counts_other_symbols():
    gov = governor(max_total_exposure=D(1500))
    fill(gov, "e", "BUY", "100", "10", sym="ETH/USDT")  # 1000 USDT of ETH
    decision = await gov.decide(request("a", "BUY", "6"))  # +600 USDT of BTC
    assert not decision.approved
    assert "total exposure" in decision.reason


async def test_decide_pending_approved_orders_count_against_limits():
    gov = governor()
    first = await gov.decide(request("a", "BUY", "60"))
    second = await gov.decide(request("b", "BUY", "60"))
    assert first.approved
    assert not second.approved
    gov.on_order_closed("a")  # cancelled downstream: its reservation is released
    third = await gov.decide(request("c", "BUY", "60"))
    assert third.approved


async def test_decide_redelivered_request_same_decision_reserved_once():
    gov = governor()
    req = request("a", "BUY", "60")
    assert (await gov.decide(req)).approved
    assert (await gov.decide(req)).approved
    assert gov.worst_case_notional("BTC/USDT", D(100)) == D(6000)


async def test_decide_reduce_only_that_would_increase_rejected():
    gov = governor()
    fill(gov, "x", "BUY", "5")
    decision = await gov.decide(request("a", "BUY", "1", reduce_only=True))
    assert not decision.approved
    assert "reduce-only" in decision.reason
    ok = await gov.decide(request("b", "SELL", "5", reduce_only=True))
    assert ok.approved


async def test_kill_switch_blocks_new_orders_but_not_reducing_ones():
    gov = governor()
    fill(gov, "x", "BUY", "5")
    assert gov.trigger_kill_switch("manual", T0) is not None
    assert gov.trigger_kill_switch("again", T0) is None
    blocked = await gov.decide(request("a", "BUY", "1"))
    assert not blocked.approved
    assert "kill switch active: manual" in blocked.reason
    flip = await gov.decide(request("b", "SELL", "6"))
    assert not flip.approved
    reduce = await gov.decide(request("c", "SELL", "5"))
    assert reduce.approved


async def test_kill_switch_reset_only_by_explicit_call_allows_orders_again():
    gov = governor()
    gov.trigger_kill_switch("manual", T0)
    assert not (await gov.decide(request("a", "BUY", "1"))).approved
    assert gov.reset_kill_switch(T0 + 1)
    assert not gov.reset_kill_switch(T0 + 2)
    assert (await gov.decide(request("b", "BUY", "1"))).approved


def test_on_pnl_drawdown_at_limit_triggers_kill_switch_once():
    gov = governor()
    assert gov.on_pnl({"equity": "9600"}, T0) is None  # 4%
    state = gov.on_pnl({"equity": "9500"}, T0 + 1)  # 5%
    assert state is not None
    assert state.active
    assert state.timestamp_ns == T0 + 1
    assert "daily drawdown" in state.reason
    assert gov.on_pnl({"equity": "9400"}, T0 + 2) is None


def test_on_pnl_new_utc_day_starts_from_previous_equity():
    gov = governor()
    gov.on_pnl({"equity": "9600"}, T0)
    gov.on_pnl({"equity": "9600"}, T0 + NS_PER_DAY)
    assert gov.day_start_equity == D(9600)
    assert gov.on_pnl({"equity": "9200"}, T0 + NS_PER_DAY + 1) is None  # 4.2% of 9600
    assert gov.on_pnl({"equity": "9100"}, T0 + NS_PER_DAY + 2) is not None


async def test_decide_during_drawdown_breach_rejected():
    gov = governor()
    gov.on_pnl({"equity": "10000"}, T0)
    gov.equity = D(9000)
    decision = await gov.decide(request("a", "BUY", "1"))
    assert not decision.approved
    assert "daily drawdown" in decision.reason


# --- drawdown from the peak (MAX_DRAWDOWN_LIMIT) -------------------------------------------


def test_a_slow_loss_over_days_trips_the_peak_stop_that_the_daily_one_lets_through():
    # 4% a day for five days: never 5% in one day, 18.5% from the peak of 10,500.
    gov = governor(max_drawdown_limit=D("0.15"))
    gov.on_pnl({"equity": "10500"}, T0)  # a new high: the peak follows it
    assert gov.peak_equity == D(10500)
    equity, state = D(10500), None
    for day in range(1, 6):
        gov.on_pnl({"equity": str(equity)}, T0 + day * NS_PER_DAY)  # the day starts
        equity = (equity * D("0.96")).quantize(D("0.01"))
        state = gov.on_pnl({"equity": str(equity)}, T0 + day * NS_PER_DAY + 1)
        assert gov.drawdown < D("0.05")
        if state is not None:
            break
    assert state is not None and state.active, "the peak stop did not trip"
    assert day == 4  # 10,500 x 0.96^4 = 8,918.25: 15.06% below the peak
    assert "drawdown from the peak equity 10500.00" in state.reason
    assert "MAX_DRAWDOWN_LIMIT 15.00%" in state.reason
    assert gov.peak_drawdown >= D("0.15")


def test_the_peak_stop_is_off_by_default_and_the_peak_follows_marks_too():
    gov = governor()
    fill(gov, "o", "BUY", "10")
    gov.on_pnl({"equity": "10000", "positions": {"BTC/USDT": {"mark_price": "100"}}}, T0)
    gov.on_mark("BTC/USDT", D(200))  # +1,000 unrealised: a new peak between updates
    assert gov.peak_equity == D(11000)
    for day in range(1, 8):  # 4% a day, never the daily 5%
        gov.on_pnl({"equity": str(11000 - 400 * day)}, T0 + day * NS_PER_DAY)
    assert gov.peak_drawdown > D("0.25") and not gov.kill_switch.active


async def test_orders_are_rejected_past_the_peak_limit_and_a_reset_restarts_the_peak():
    gov = governor(max_drawdown_limit=D("0.1"), daily_drawdown_limit=D("0.5"))
    gov.on_pnl({"equity": "12000"}, T0)
    gov.equity = D(10700)  # 10.8% below the peak (within the day's 50%; no PNL_UPDATE yet)
    decision = await gov.decide(request("a", "BUY", "1"))
    assert not decision.approved
    assert "drawdown from the peak equity 12000.00" in decision.reason
    fill(gov, "long", "BUY", "5")
    assert (await gov.decide(request("r", "SELL", "5"))).approved  # reducing still passes
    gov.trigger_kill_switch("peak", T0 + 1)
    assert gov.reset_kill_switch(T0 + 2)
    assert gov.peak_equity == gov.equity == D(10700)
    assert (await gov.decide(request("b", "BUY", "1"))).approved


@pytest.mark.parametrize("limit", [D(0), D(1), D("-0.1"), D("1.5")])
def test_max_drawdown_limit_outside_0_1_is_refused(limit):
    with pytest.raises(ValueError, match="max drawdown limit"):
        RiskLimits(
            max_position_size=D(1), max_leverage=D(1), daily_drawdown_limit=D("0.05"),
            max_drawdown_limit=limit,
        )  # fmt: skip


async def test_registered_sync_check_can_veto():
    gov = governor()
    gov.register_check("no_eth", lambda o, _view: "ETH banned" if "ETH" in o.symbol else None)
    assert (await gov.decide(request("a", "BUY", "1"))).approved
    vetoed = await gov.decide(request("b", "BUY", "10", sym="ETH/USDT"))
    assert not vetoed.approved
    assert "no_eth: ETH banned" in vetoed.reason


class CustomRiskCheck:
    """The integration guide's custom check, unchanged apart from is_too_risky."""

    def __init__(self, bus: EventBus):
        self.bus = bus

    async def start(self):
        self.bus.subscribe(EventType.ORDER_REQUEST, self.validate_order)

    def is_too_risky(self, order):
        return order["size"] > D(5)

    async def validate_order(self, event: Event):
        order = event.data
        if self.is_too_risky(order):
            await self.bus.publish(
                Event(
                    event_type=EventType.ORDER_REJECTED,
                    data={"order_id": order["id"], "reason": "Risk limit exceeded"},
                )
            )
            return
        await self.bus.publish(Event(event_type=EventType.ORDER_APPROVED, data=order))


async def test_guide_style_check_must_also_approve():
    gov = governor()
    await CustomRiskCheck(gov.check_bus("custom")).start()  # type: ignore[arg-type]
    assert (await gov.decide(request("a", "BUY", "5"))).approved
    rejected = await gov.decide(request("b", "BUY", "6"))
    assert not rejected.approved
    assert rejected.reason == "custom: Risk limit exceeded"


async def test_check_that_gives_no_verdict_rejects():
    gov = governor()
    gov.check_bus("silent").subscribe(EventType.ORDER_REQUEST, lambda event: None)
    decision = await gov.decide(request("a", "BUY", "1"))
    assert not decision.approved
    assert "silent: no verdict" in decision.reason


def test_check_bus_only_for_order_requests():
    with pytest.raises(ValueError, match="ORDER_REQUEST"):
        governor().check_bus("x").subscribe(EventType.TICK, lambda event: None)


# --- property: limits hold whatever fills ------------------------------------------------

orders = st.lists(
    st.tuples(
        st.sampled_from(["BTC/USDT", "ETH/USDT"]),
        st.sampled_from(["BUY", "SELL"]),
        st.decimals(min_value="0.1", max_value="400", places=1),
        st.booleans(),  # fill it (else it is cancelled later)
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(orders=orders)
async def test_limits_never_exceeded_whichever_approved_orders_fill(orders):
    gov = governor(max_position_size=D(5000), max_total_exposure=D(8000))
    approved = []
    for i, (sym, side, size, fills) in enumerate(orders):
        decision = await gov.decide(request(f"o{i}", side, str(size), sym=sym))
        if decision.approved:
            approved.append((f"o{i}", sym, side, size, fills))
    for order_id, sym, side, size, fills in approved:
        if fills:
            gov.on_fill(order_id, sym, Side(side), size, gov.marks[sym], key=order_id)
        else:
            gov.on_order_closed(order_id)
        gross = D(0)
        for s, qty in gov.positions.items():
            notional = abs(qty) * gov.marks[s]
            assert notional <= D(5000)
            gross += notional
        assert gross <= D(8000)
        assert gross / gov.equity <= D(3)


async def test_guide_example_module_plugs_into_governor_unchanged():
    from examples.guide.custom_risk_check import CustomRiskCheck as GuideCheck

    class OverOneBtc(GuideCheck):  # the guide leaves is_too_risky to the user
        def is_too_risky(self, order):
            return order["size"] > D(1)

    gov = governor()
    await OverOneBtc(gov.check_bus("guide")).start()  # type: ignore[arg-type]
    assert (await gov.decide(request("small", "BUY", "1"))).approved
    big = await gov.decide(request("big", "BUY", "2"))
    assert not big.approved
    assert big.reason == "guide: Risk limit exceeded"


async def test_two_reduce_only_sells_of_the_whole_position_only_one_approved():
    # Each alone reduces a long of 5; both filling would leave a short of 5.
    gov = governor()
    fill(gov, "x", "BUY", "5")
    first = await gov.decide(request("a", "SELL", "5", reduce_only=True))
    assert first.approved
    second = await gov.decide(request("b", "SELL", "5", reduce_only=True))
    assert not second.approved
    assert "reduce-only" in second.reason
    part = await gov.decide(request("c", "SELL", "1", reduce_only=True))
    assert not part.approved
    gov.on_order_closed("a")  # the first was cancelled: its quantity may be sold again
    assert (await gov.decide(request("d", "SELL", "5", reduce_only=True))).approved


async def test_kill_switch_lets_reducing_orders_through_only_up_to_the_position():
    gov = governor()
    fill(gov, "x", "BUY", "5")
    gov.trigger_kill_switch("manual", T0)
    assert (await gov.decide(request("a", "SELL", "3"))).approved
    over = await gov.decide(request("b", "SELL", "3"))  # 3 + 3 pending > 5
    assert not over.approved
    assert "kill switch active" in over.reason
    assert (await gov.decide(request("c", "SELL", "2"))).approved
    fill(gov, "a", "SELL", "3")  # fills release what they reserved
    assert not (await gov.decide(request("e", "SELL", "1"))).approved  # 2 left, 2 pending
    # A pending buy does not count towards what a sell may reduce: it may never fill.
    short = governor()
    fill(short, "y", "SELL", "4")
    short.trigger_kill_switch("manual", T0)
    assert (await short.decide(request("f", "BUY", "4"))).approved
    assert not (await short.decide(request("g", "BUY", "1"))).approved


async def test_fill_that_finishes_an_order_smaller_than_approved_releases_the_rest():
    # Execution rounds 0.5 down to the venue's step 0.4 (say) and finishes there.
    gov = governor()
    assert (await gov.decide(request("a", "BUY", "0.5"))).approved
    assert gov.worst_case_notional("BTC/USDT", D(100)) == D(50)
    gov.on_fill("a", "BTC/USDT", Side.BUY, D("0.4"), D(100), key="f1", finished=True)
    assert gov.worst_case_notional("BTC/USDT", D(100)) == D(40)  # the position only


# --- what an order is checked at, whose clock rolls the day, votes that take time ---------


async def test_market_order_is_checked_at_the_market_whatever_price_it_carries():
    # Mark 100: 150 BTC is 15,000 USDT > MAX_POSITION_SIZE 10,000, even stamped price 1.
    gov = governor()
    decision = await gov.decide(request("m", "BUY", "150", price="1"))
    assert not decision.approved
    assert "would reach 15000.00 USDT > MAX_POSITION_SIZE" in decision.reasons[0]


async def test_marketable_sell_limit_is_checked_at_the_market_a_buy_limit_at_its_price():
    gov = governor()
    # A sell limit at 1 with the market at 100 fills near 100: a 15,000 USDT short.
    sell = await gov.decide(request("s", "SELL", "150", type="limit", price="1"))
    assert not sell.approved and "15000.00 USDT" in sell.reasons[0]
    # A buy limit fills at its price or lower: 150 at 50 is 7,500.
    buy = await gov.decide(request("b", "BUY", "150", type="limit", price="50"))
    assert buy.approved, buy.reasons


def test_signal_is_sized_at_the_market_not_at_the_price_it_carries():
    gov = governor()
    at_mark = gov.size_signal(signal(0.7))
    stamped = gov.size_signal(signal(0.7, price="1"))
    assert isinstance(at_mark, SizedOrder) and isinstance(stamped, SizedOrder)
    assert stamped.data["size"] == at_mark.data["size"]
    assert stamped.data["reference_price"] == D(100)
    # A buy limit is sized at its own price (it fills there or lower).
    limit = gov.size_signal(signal(0.7, type="limit", price="50"))
    assert isinstance(limit, SizedOrder) and limit.data["size"] == 2 * at_mark.data["size"]


async def test_a_request_stamped_tomorrow_does_not_start_a_new_day():
    gov = RiskGovernor(
        RiskLimits(max_position_size=D(10000), max_leverage=D(3), daily_drawdown_limit=D("0.05")),
        starting_equity=D(10000),
        clock=lambda: T0 + 10**9,
    )
    gov.on_mark("BTC/USDT", D(100))
    gov.on_pnl({"equity": "9600"}, T0)  # 4% down on the day
    tomorrow = request("t", "BUY", "1").model_copy(update={"timestamp": T0 + NS_PER_DAY})
    assert (await gov.decide(tomorrow)).approved
    assert gov.day_start_equity == D(10000)  # the day did not restart at 9,600
    assert gov.on_pnl({"equity": "9400"}, T0 + 2 * 10**9) is not None  # 6%: tripped


async def test_an_order_awaiting_its_votes_counts_in_the_limits_of_orders_decided_meanwhile():
    # MAX_TOTAL_EXPOSURE 15,000: BTC 9,000 and ETH 9,000 together are 18,000.
    gov = governor(max_total_exposure=D(15000))
    release = asyncio.Event()

    async def slow_yes(event: Event) -> None:
        if event.data["symbol"] == "BTC/USDT":
            await release.wait()  # e.g. a check that asks a service over the network
        await check.publish(Event(event_type=EventType.ORDER_APPROVED, data=event.data))

    check = gov.check_bus("slow")
    check.subscribe(EventType.ORDER_REQUEST, slow_yes)
    btc = asyncio.create_task(gov.decide(request("btc", "BUY", "90")))
    await asyncio.sleep(0)
    eth = await gov.decide(request("eth", "BUY", "900", sym="ETH/USDT"))
    release.set()
    assert (await btc).approved
    assert not eth.approved and "total exposure would reach 18000.00" in eth.reasons[0]
    # A no from the votes gives the reservation back.
    check.handlers[:] = [lambda event: None]
    assert not (await gov.decide(request("eth2", "BUY", "10", sym="ETH/USDT"))).approved
    assert set(gov._reserved) == {"btc"}


async def test_a_kill_switch_tripped_while_an_order_awaited_its_votes_rejects_it():
    gov = governor()
    release = asyncio.Event()

    async def slow_yes(event: Event) -> None:
        await release.wait()
        await check.publish(Event(event_type=EventType.ORDER_APPROVED, data=event.data))

    check = gov.check_bus("slow")
    check.subscribe(EventType.ORDER_REQUEST, slow_yes)
    pending = asyncio.create_task(gov.decide(request("o", "BUY", "1")))
    await asyncio.sleep(0)
    gov.trigger_kill_switch("manual", T0)
    release.set()
    decision = await pending
    assert not decision.approved and decision.reasons == ("kill switch active: manual",)
    assert gov._reserved == {}


# --- equity between PNL_UPDATEs -----------------------------------------------------------


def test_equity_follows_risk_s_marks_between_pnl_updates_and_trips_the_drawdown_stop():
    # Portfolio reported once (10,000, BTC long 100 at mark 100) and then nothing: the
    # market falls 6% and the 5% stop must still trip.
    gov = governor()
    fill(gov, "o", "BUY", "100")
    pnl = {"equity": "10000", "positions": {"BTC/USDT": {"qty": "100", "mark_price": "100"}}}
    assert gov.on_pnl(pnl, T0) is None
    assert gov.on_mark("BTC/USDT", D(96)) is None
    assert gov.equity == D(9600) and gov.drawdown == D("0.04")
    state = gov.on_mark("BTC/USDT", D(94))
    assert state is not None and state.active and "daily drawdown 6.0000%" in state.reason
    gov.on_pnl({"equity": "9390"}, T0 + 10**9)  # the next update replaces the estimate
    assert gov.equity == D(9390)


def test_a_fill_after_the_last_pnl_update_is_valued_from_its_own_price():
    gov = governor()
    gov.on_pnl({"equity": "10000"}, T0)  # flat, BTC mark 100
    fill(gov, "o", "BUY", "10", price="101")  # paid 1 over the mark
    assert gov.equity == D(9990)
    gov.on_mark("BTC/USDT", D(110))
    assert gov.equity == D(10090)  # 10,000 - 1,010 paid + 10 x 110


def test_unreported_seconds_count_market_moves_after_the_last_pnl_update():
    now = [T0]
    gov = RiskGovernor(
        RiskLimits(max_position_size=D(10000), max_leverage=D(3), daily_drawdown_limit=D("0.5")),
        starting_equity=D(10000),
        clock=lambda: now[0],
    )
    gov.on_mark("BTC/USDT", D(100))
    fill(gov, "o", "BUY", "1")
    gov.on_pnl({"equity": "10000"}, T0)
    now[0] = T0 + 61 * 10**9
    gov.on_mark("ETH/USDT", D(10))  # no position: not a move that matters
    assert gov.unreported_s() == 0
    gov.on_mark("BTC/USDT", D(101))
    assert gov.unreported_s() == 61
    gov.on_pnl({"equity": "10001"}, T0 + 61 * 10**9)
    assert gov.unreported_s() == 0


async def test_a_limit_order_on_a_symbol_without_a_mark_counts_in_other_orders_exposure():
    # SOL has no mark yet: its buy limit is checked at its price (100 x 50 = 5,000), and
    # that is what it adds to another symbol's total exposure check, not 0.
    gov = governor(max_total_exposure=D(10000))
    sol = await gov.decide(request("sol", "BUY", "100", sym="SOL/USDT", type="limit", price="50"))
    assert sol.approved, sol.reasons
    btc = await gov.decide(request("btc", "BUY", "60"))  # 6,000 at the mark 100
    assert not btc.approved and "total exposure would reach 11000.00" in btc.reasons[0]
