"""Portfolio core: positions, P&L, equity, dedupe and trade statistics (hean.portfolio.core)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hean.core.types import Side
from hean.portfolio.core import Fill, Portfolio, trade_stats

D = Decimal


def fill(side: str, qty: str, price: str, fee: str = "0", fid: str | None = None, sym: str = "BTC"):
    return Fill(
        order_id=f"o-{fid}",
        symbol=sym,
        side=Side(side),
        qty=D(qty),
        price=D(price),
        fee=D(fee),
        fill_id=fid,
    )


def test_portfolio_long_round_trip_realizes_price_difference_minus_fees():
    p = Portfolio(D(10000))
    p.apply_fill(fill("BUY", "2", "100", "0.2", "f1"))
    p.apply_fill(fill("SELL", "2", "110", "0.22", "f2"))
    assert p.realized_pnl == D(20)
    assert p.unrealized_pnl == 0
    assert p.fees == D("0.42")
    assert p.total_pnl == D("19.58")
    assert p.equity == D("10019.58")
    assert p.positions["BTC"].qty == 0


def test_portfolio_maker_rebate_is_a_negative_fee_that_adds_to_equity():
    p = Portfolio(D(10000))
    p.apply_fill(fill("BUY", "1", "100", "-0.01", "f1"))  # a venue's maker rebate
    assert p.fees == D("-0.01")
    assert p.equity == D("10000.01")


def test_portfolio_average_entry_weighted_by_quantity():
    p = Portfolio(D(10000))
    p.apply_fill(fill("BUY", "1", "100", fid="a"))
    p.apply_fill(fill("BUY", "3", "200", fid="b"))
    assert p.positions["BTC"].average_entry_price == D(175)


def test_portfolio_short_marked_up_has_negative_unrealized():
    p = Portfolio(D(10000))
    p.apply_fill(fill("SELL", "1", "100", fid="a"))
    p.mark("BTC", D(120))
    assert p.positions["BTC"].qty == D(-1)
    assert p.unrealized_pnl == D(-20)
    assert p.equity == D(9980)


def test_portfolio_flip_long_to_short_realizes_closed_part_and_reopens_at_fill_price():
    p = Portfolio(D(10000))
    p.apply_fill(fill("BUY", "1", "100", fid="a"))
    p.apply_fill(fill("SELL", "3", "90", fid="b"))
    pos = p.positions["BTC"]
    assert p.realized_pnl == D(-10)
    assert pos.qty == D(-2)
    assert pos.average_entry_price == D(90)
    p.mark("BTC", D(80))
    assert p.unrealized_pnl == D(20)


def test_portfolio_partial_reduce_keeps_average_entry():
    p = Portfolio(D(10000))
    p.apply_fill(fill("BUY", "4", "100", fid="a"))
    p.apply_fill(fill("SELL", "1", "130", fid="b"))
    assert p.realized_pnl == D(30)
    assert p.positions["BTC"].average_entry_price == D(100)
    assert p.positions["BTC"].qty == D(3)


def test_portfolio_same_fill_id_twice_counts_once():
    p = Portfolio(D(10000))
    assert p.apply_fill(fill("BUY", "1", "100", "0.1", "dup"))
    assert not p.apply_fill(fill("BUY", "1", "100", "0.1", "dup"))
    assert p.positions["BTC"].qty == D(1)
    assert p.fees == D("0.1")
    assert p.fills_applied == 1


def test_portfolio_fill_without_id_deduped_by_order_qty_price():
    p = Portfolio(D(10000))
    first = Fill("o1", "BTC", Side.BUY, D("1.0"), D("100"))
    again = Fill("o1", "BTC", Side.BUY, D("1"), D("100.00"))
    other_price = Fill("o1", "BTC", Side.BUY, D("1"), D("101"))
    assert p.apply_fill(first)
    assert not p.apply_fill(again)
    assert p.apply_fill(other_price)
    assert p.positions["BTC"].qty == D(2)


def test_portfolio_mark_of_unheld_symbol_changes_nothing():
    p = Portfolio(D(10000))
    assert not p.mark("ETH", D(3000))
    assert p.equity == D(10000)


def test_portfolio_drawdown_tracks_peak_equity():
    p = Portfolio(D(1000))
    p.apply_fill(fill("BUY", "1", "100", fid="a"))
    p.mark("BTC", D(200))
    p.mark("BTC", D(100))
    assert p.peak_equity == D(1100)
    assert abs(p.drawdown - D(100) / D(1100)) < D("1e-25")


def test_portfolio_snapshot_has_pnl_update_fields():
    p = Portfolio(D(10000))
    p.apply_fill(fill("BUY", "1", "100", "0.05", "a"))
    snap = p.snapshot()
    for key in ("total_pnl", "realized_pnl", "unrealized_pnl", "equity", "fees", "positions"):
        assert key in snap
    assert snap["positions"]["BTC"]["qty"] == D(1)
    assert snap["equity"] == D("9999.95")


def test_trade_stats_win_rate_payoff_and_sharpe():
    p = Portfolio(D(10000))
    p.apply_fill(fill("BUY", "1", "100", fid="1"))
    p.apply_fill(fill("SELL", "1", "120", fid="2"))  # +20, +20%
    p.apply_fill(fill("BUY", "1", "100", fid="3"))
    p.apply_fill(fill("SELL", "1", "90", fid="4"))  # -10, -10%
    p.apply_fill(fill("BUY", "1", "100", fid="5"))
    p.apply_fill(fill("SELL", "1", "110", fid="6"))  # +10, +10%
    stats = p.stats()
    assert stats.closed_trades == 3
    assert stats.wins == 2
    assert abs(stats.win_rate - D(2) / D(3)) < D("1e-25")
    assert stats.payoff_ratio == D("1.5")
    # returns 0.2, -0.1, 0.1: mean 0.0666..., sample stdev 0.152752...
    assert stats.sharpe_ratio is not None
    assert abs(stats.sharpe_ratio - D("0.4364357804719847")) < D("1e-12")


def test_trade_stats_no_trades_gives_zero_rates_and_no_ratios():
    stats = trade_stats([])
    assert stats.closed_trades == 0
    assert stats.win_rate == 0
    assert stats.payoff_ratio is None
    assert stats.sharpe_ratio is None


@pytest.mark.parametrize(("qty", "price"), [("0", "1"), ("-1", "1"), ("1", "0"), ("1", "NaN")])
def test_fill_impossible_values_rejected(qty, price):
    with pytest.raises(ValueError, match="must be > 0"):
        Fill("o", "BTC", Side.BUY, D(qty), D(price))


def test_portfolio_nonpositive_starting_equity_rejected():
    with pytest.raises(ValueError, match="starting equity"):
        Portfolio(D(0))


# --- properties ----------------------------------------------------------------------------

prices = st.decimals(min_value="0.01", max_value="100000", places=2)
qtys = st.decimals(min_value="0.001", max_value="50", places=3)
fees = st.decimals(min_value="0", max_value="5", places=4)
fill_specs = st.lists(
    st.tuples(
        st.sampled_from(["BTC", "ETH"]), st.sampled_from(["BUY", "SELL"]), qtys, prices, fees
    ),
    min_size=1,
    max_size=40,
)
TOLERANCE = D("1e-20")


@settings(max_examples=300, deadline=None)
@given(specs=fill_specs, marks=st.tuples(prices, prices))
def test_portfolio_pnl_equals_independent_cash_flow_calculation(specs, marks):
    """realized + unrealized = -(sum of signed qty x price) + held qty x mark, per symbol;
    fees are subtracted once; equity = start + that - fees."""
    p = Portfolio(D(10000))
    cash = {"BTC": D(0), "ETH": D(0)}
    held = {"BTC": D(0), "ETH": D(0)}
    fee_sum = D(0)
    for i, (sym, side, qty, price, fee) in enumerate(specs):
        p.apply_fill(Fill(f"o{i}", sym, Side(side), qty, price, fee, fill_id=str(i)))
        signed = qty if side == "BUY" else -qty
        cash[sym] -= signed * price
        held[sym] += signed
        fee_sum += fee
    mark = dict(zip(("BTC", "ETH"), marks, strict=True))
    for sym in ("BTC", "ETH"):
        if sym in p.positions:
            p.mark(sym, mark[sym])
    expected = sum((cash[s] + held[s] * mark[s] for s in p.positions), D(0))
    assert abs(p.realized_pnl + p.unrealized_pnl - expected) < TOLERANCE
    assert p.fees == fee_sum
    assert abs(p.equity - (D(10000) + expected - fee_sum)) < TOLERANCE
    for sym, pos in p.positions.items():
        assert pos.qty == held[sym]


@settings(max_examples=300, deadline=None)
@given(specs=fill_specs)
def test_portfolio_position_sign_and_entry_follow_fills(specs):
    p = Portfolio(D(10000))
    for i, (sym, side, qty, price, fee) in enumerate(specs):
        before = p.positions[sym].qty if sym in p.positions else D(0)
        p.apply_fill(Fill(f"o{i}", sym, Side(side), qty, price, fee, fill_id=str(i)))
        pos = p.positions[sym]
        signed = qty if side == "BUY" else -qty
        assert pos.qty == before + signed
        if pos.qty == 0:
            assert pos.cost_basis == 0
        elif before == 0 or (before > 0) != (pos.qty > 0):
            # newly opened or flipped: the open part entered at this fill's price
            assert pos.average_entry_price == price
        assert pos.cost_basis >= 0


@settings(max_examples=200, deadline=None)
@given(specs=fill_specs)
def test_portfolio_replaying_every_fill_twice_equals_once(specs):
    once, twice = Portfolio(D(10000)), Portfolio(D(10000))
    fills = [
        Fill(f"o{i}", sym, Side(side), qty, price, fee, fill_id=str(i))
        for i, (sym, side, qty, price, fee) in enumerate(specs)
    ]
    for f in fills:
        once.apply_fill(f)
        twice.apply_fill(f)
        twice.apply_fill(f)
    assert twice.snapshot() == once.snapshot()


def test_trade_stats_running_tally_equals_the_batch_formulas_over_many_trades():
    """The running tally (constant work per trade) against the textbook formulas computed
    over all the trades at once."""
    import random

    rng = random.Random(7)
    p = Portfolio(D(1_000_000))
    returns: list[D] = []
    pnls: list[D] = []
    for i in range(400):
        entry = D(100)
        exit_ = D(rng.randint(80, 120)) + D(rng.randint(0, 99)) / 100
        p.apply_fill(fill("BUY", "2", str(entry), fid=f"b{i}"))
        p.apply_fill(fill("SELL", "2", str(exit_), fid=f"s{i}"))
        pnls.append(2 * (exit_ - entry))
        returns.append((exit_ - entry) / entry)
    stats = p.stats()
    wins = [x for x in pnls if x > 0]
    losses = [-x for x in pnls if x < 0]
    assert stats.closed_trades == 400
    assert (stats.wins, stats.losses) == (len(wins), len(losses))
    payoff = (sum(wins, D(0)) / len(wins)) / (sum(losses, D(0)) / len(losses))
    assert stats.payoff_ratio is not None and abs(stats.payoff_ratio - payoff) < D("1e-20")
    mean = sum(returns, D(0)) / len(returns)
    variance = sum(((r - mean) ** 2 for r in returns), D(0)) / (len(returns) - 1)
    sharpe = mean / variance.sqrt()
    assert stats.sharpe_ratio is not None and abs(stats.sharpe_ratio - sharpe) < D("1e-20")
    assert len(p.recent_trades) == 400
