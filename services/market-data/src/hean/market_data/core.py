"""Pure decisions of the market-data service: no I/O, no clock reads.

- `ticks_for_bar`: the TICKs replayed inside one bar (open, the nearer extreme, the other
  extreme, close), with the bar's volume split so the ticks sum to it exactly.
- `replay_shift_ns` / `replay_offset_s`: where a looped replay puts its bars in time, and
  when (after the start) a bar is due at a given speed.
- `BarTracker`: the live feed's memory of the last published bar per symbol. It turns what
  an exchange returned into the bars to publish: closed bars strictly after the last one
  (nothing twice, nothing out of order, whatever a reconnect or an overlapping poll returns),
  plus the gaps between them.
- `StreamedBars`: what a websocket feed has been pushed for one symbol and not yet
  published: the latest update of each bar (the forming bar arrives again and again). A
  bar is closed once a newer bar has been pushed; `missing` names the bars the stream never
  delivered (a reconnect, a lost message), to be fetched over REST before publishing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal

from hean.core.candles import Candle

NS_PER_SECOND = 1_000_000_000
#: How long past its end a bar the exchange shows nothing newer after still counts as
#: forming (at most half a bar): an exchange's REST answer can lag the bar's last trades,
#: and the local clock can run ahead of the exchange's.
CLOSE_GRACE_NS = 10 * NS_PER_SECOND
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def timeframe_ns(timeframe: str) -> int:
    """`"1m"` -> 60e9. Accepts `<n><s|m|h|d|w>`; raises `ValueError` otherwise."""
    text = timeframe.strip()
    unit = text[-1:].lower()
    count = text[:-1]
    if unit not in _UNIT_SECONDS or not count.isdigit() or int(count) <= 0:
        raise ValueError(f"unsupported timeframe {timeframe!r} (use e.g. 1m, 5m, 1h, 1d)")
    return int(count) * _UNIT_SECONDS[unit] * NS_PER_SECOND


@dataclass(frozen=True, slots=True)
class TickSpec:
    """One replayed trade inside a bar."""

    price: Decimal
    volume: Decimal
    timestamp_ns: int


def ticks_for_bar(candle: Candle, bar_ns: int) -> tuple[TickSpec, ...]:
    """Four ticks that reproduce the bar: open, low then high on an up bar (high then low on
    a down bar: the usual assumption that price passes the nearer extreme first), close.

    Times are spread over the bar (0, 1/4, 1/2, 3/4 of it, all before the bar closes); each
    tick carries a quarter of the volume and the last one the remainder, so they sum to the
    bar's volume exactly.
    """
    up = candle.close >= candle.open
    prices = (
        candle.open,
        candle.low if up else candle.high,
        candle.high if up else candle.low,
        candle.close,
    )
    part = candle.volume / 4
    volumes = (part, part, part, candle.volume - 3 * part)
    step = bar_ns // 4
    return tuple(
        TickSpec(price=p, volume=v, timestamp_ns=candle.timestamp_ns + i * step)
        for i, (p, v) in enumerate(zip(prices, volumes, strict=True))
    )


def replay_shift_ns(first_ns: int, last_ns: int, bar_ns: int, loop_index: int) -> int:
    """Time shift of a replay's `loop_index`-th pass (0 for the first), so that time keeps
    going forward across loops: each pass starts one bar after the previous one ended."""
    return loop_index * (last_ns - first_ns + bar_ns)


def replay_offset_s(bars_done: int, bar_ns: int, speed: float, warmup_bars: int = 0) -> float:
    """Seconds after pacing started at which bar number `bars_done` (0-based) is due, at
    `speed` times real time. 0 for speed 0 (as fast as consumers keep up), and for the first
    `warmup_bars` bars, which only warm up indicators: pacing starts after them."""
    if speed <= 0 or bars_done < warmup_bars:
        return 0.0
    return (bars_done - warmup_bars) * bar_ns / NS_PER_SECOND / speed


def shifted(candle: Candle, symbol: str, shift_ns: int) -> Candle:
    """The candle relabelled for `symbol` and moved `shift_ns` later."""
    if shift_ns == 0 and candle.symbol == symbol:
        return candle
    return replace(candle, symbol=symbol, timestamp_ns=candle.timestamp_ns + shift_ns)


@dataclass(frozen=True, slots=True)
class Gap:
    """Bars missing between two published bars of one symbol."""

    symbol: str
    after_ns: int
    next_ns: int
    missing_bars: int

    def describe(self) -> str:
        return (
            f"{self.symbol}: {self.missing_bars} bar(s) missing between "
            f"{self.after_ns} and {self.next_ns} (ns)"
        )


@dataclass(frozen=True, slots=True)
class TrackResult:
    """What to do with one answer from the exchange for one symbol."""

    publish: tuple[Candle, ...]
    gaps: tuple[Gap, ...]
    already_seen: int
    forming: Candle | None


@dataclass
class BarTracker:
    """Last published bar per symbol (bar open time, ns); see the module docstring."""

    bar_ns: int
    last_bar_ns: dict[str, int] = field(default_factory=dict)

    def since_ns(self, symbol: str) -> int | None:
        """Where the next fetch should start: the bar after the last published one."""
        last = self.last_bar_ns.get(symbol)
        return None if last is None else last + self.bar_ns

    def accept(self, symbol: str, rows: Iterable[Candle], now_ns: int) -> TrackResult:
        """Decide which of `rows` (any order, may overlap earlier answers) to publish.

        A bar is closed once `now_ns` has passed its end and the exchange shows a newer
        one (its clock has moved past it too), or, for the newest bar of the answer, once
        `now_ns` is `CLOSE_GRACE_NS` (at most half a bar) past its end: a bar published at
        its end by the local clock alone could miss its last trades (the exchange's answer
        lagging, or this clock ahead), and the exchange's final version would then be
        dropped as already seen. The newest bar not closed is returned as `forming` (its
        close is the latest traded price). Bars at or before the last published one are
        counted in `already_seen` and dropped.
        """
        ordered = sorted(rows, key=lambda c: c.timestamp_ns)
        last = self.last_bar_ns.get(symbol)
        publish: list[Candle] = []
        gaps: list[Gap] = []
        seen = 0
        forming: Candle | None = None
        grace = min(CLOSE_GRACE_NS, self.bar_ns // 2)
        for i, candle in enumerate(ordered):
            ts = candle.timestamp_ns
            if last is not None and ts <= last:
                seen += 1
                continue
            newest = i == len(ordered) - 1
            if ts + self.bar_ns > now_ns or (newest and ts + self.bar_ns + grace > now_ns):
                forming = candle
                break  # later rows cannot be closed either
            if last is not None and ts > last + self.bar_ns:
                missing = (ts - last) // self.bar_ns - 1
                gaps.append(Gap(symbol, last, ts, missing))
            publish.append(candle)
            last = ts
        return TrackResult(tuple(publish), tuple(gaps), seen, forming)

    def commit(self, symbol: str, published: Sequence[Candle]) -> None:
        """Record that `published` (from `accept`) reached the bus."""
        if published:
            self.last_bar_ns[symbol] = max(
                self.last_bar_ns.get(symbol, published[-1].timestamp_ns),
                published[-1].timestamp_ns,
            )

    @classmethod
    def restore(cls, bar_ns: int, stored: Mapping[str, int]) -> BarTracker:
        return cls(bar_ns, dict(stored))


@dataclass
class StreamedBars:
    """One symbol's streamed bars not yet published, by bar open time (see the module
    docstring). Each update replaces the bar's earlier one."""

    bar_ns: int
    bars: dict[int, Candle] = field(default_factory=dict)

    def update(self, candles: Iterable[Candle]) -> None:
        """Updates pushed by the exchange: the newest value of each bar wins."""
        for candle in candles:
            self.bars[candle.timestamp_ns] = candle

    def fill(self, candles: Iterable[Candle]) -> None:
        """Closed bars fetched over REST (the exchange's record): they replace what was
        streamed for the same bar, except the newest streamed bar, which is still forming."""
        newest = self.newest_ns()
        for candle in candles:
            if newest is None or candle.timestamp_ns < newest:
                self.bars[candle.timestamp_ns] = candle

    def newest_ns(self) -> int | None:
        """Open time of the newest bar pushed: the forming one; every older bar is closed."""
        return max(self.bars, default=None)

    def missing(self, last_published_ns: int | None) -> tuple[int, int] | None:
        """`(from_ns, to_ns)`: the closed bars to fetch over REST before publishing, from
        the first bar after `last_published_ns` that the stream lacks up to (excluding) the
        forming bar. None when the stream holds every bar in between (or nothing is closed,
        or nothing was published yet, so there is nothing to continue from)."""
        newest = self.newest_ns()
        if last_published_ns is None or newest is None:
            return None
        expected = last_published_ns + self.bar_ns
        for ts in range(expected, newest, self.bar_ns):
            if ts not in self.bars:
                return ts, newest
        return None

    def candles(self) -> list[Candle]:
        """The bars held, oldest first (input for `BarTracker.accept` with `now_ns` = the
        forming bar's open time, so that exactly the bars before it count as closed)."""
        return [self.bars[ts] for ts in sorted(self.bars)]

    def prune(self, last_published_ns: int | None) -> None:
        """Forget the bars at or before the last published one."""
        if last_published_ns is not None:
            for ts in [t for t in self.bars if t <= last_published_ns]:
                del self.bars[ts]
