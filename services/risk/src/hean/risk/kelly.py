"""Fractional Kelly sizing, pure Decimal arithmetic.

For a bet that wins `b` times the stake with probability `p` (and loses the stake
otherwise) the Kelly fraction of equity is `f* = p - (1 - p) / b`. We bet a fraction of
that (`fraction`, e.g. a quarter) and cap it (`max_fraction` of equity). `b` is the payoff
ratio (average win / average loss) of our own closed trades, shrunk towards a prior while
there are few of them: `b = (n * observed + m * prior) / (n + m)`.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from decimal import Decimal

ZERO = Decimal(0)
ONE = Decimal(1)
_CTX = decimal.Context(prec=40)


@dataclass(frozen=True, slots=True)
class KellyParams:
    fraction: Decimal = Decimal("0.25")
    max_fraction: Decimal = Decimal("0.2")
    prior_payoff: Decimal = ONE
    prior_trades: int = 20
    default_win_probability: Decimal = Decimal("0.55")

    def __post_init__(self) -> None:
        if not ZERO < self.fraction <= ONE:
            raise ValueError(f"Kelly fraction must be in (0, 1], got {self.fraction}")
        if not ZERO < self.max_fraction <= ONE:
            raise ValueError(f"Kelly max fraction must be in (0, 1], got {self.max_fraction}")
        if self.prior_payoff <= 0:
            raise ValueError(f"prior payoff ratio must be > 0, got {self.prior_payoff}")
        if self.prior_trades < 0:
            raise ValueError(f"prior trades must be >= 0, got {self.prior_trades}")
        if not ZERO <= self.default_win_probability <= ONE:
            raise ValueError("default win probability must be in [0, 1]")


def kelly_fraction(win_probability: Decimal, payoff_ratio: Decimal) -> Decimal:
    """Full Kelly `p - (1 - p) / b`; may be negative (then: no bet)."""
    if not ZERO <= win_probability <= ONE:
        raise ValueError(f"win probability must be in [0, 1], got {win_probability}")
    if payoff_ratio <= 0:
        raise ValueError(f"payoff ratio must be > 0, got {payoff_ratio}")
    return _CTX.subtract(win_probability, _CTX.divide(ONE - win_probability, payoff_ratio))


def shrunk_payoff_ratio(
    observed: Decimal | None, closed_trades: int, prior: Decimal, prior_trades: int
) -> Decimal:
    """The observed payoff ratio shrunk towards `prior` with the weight of `prior_trades`."""
    if observed is None or closed_trades <= 0 or observed <= 0:
        return prior
    total = closed_trades + prior_trades
    return _CTX.divide(_CTX.add(observed * closed_trades, prior * prior_trades), Decimal(total))


def bet_fraction(win_probability: Decimal, payoff_ratio: Decimal, params: KellyParams) -> Decimal:
    """Share of equity to commit: `fraction x f*`, capped at `max_fraction`, 0 if f* <= 0."""
    full = kelly_fraction(win_probability, payoff_ratio)
    if full <= 0:
        return ZERO
    return min(_CTX.multiply(params.fraction, full), params.max_fraction)
