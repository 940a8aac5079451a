"""OHLCV candles: a typed record and a validating CSV loader.

Prices and volume are `Decimal` (parsed from the file's text, never through float), so a
candle carries exactly what the exchange reported. Bad rows are never returned: each is
skipped, counted in a `LoadReport` and logged as a warning naming its row number and why.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Protocol

__all__ = [
    "BUNDLED_OHLCV_FILE",
    "DATA_DIR_ENV",
    "Candle",
    "CandleLoadError",
    "LoadReport",
    "LoadResult",
    "RowProblem",
    "bundled_data_path",
    "load_candles",
    "parse_timestamp_ns",
    "validate_candle_rows",
]

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "HEAN_DATA_DIR"
"""Environment variable naming a directory that holds the bundled data file."""

BUNDLED_OHLCV_FILE = "ftx_btc-perp_1m_20211231-20220201.csv"
"""File name of the bundled real BTC 1-minute data (see data/README.md for attribution)."""

REQUIRED_COLUMNS: tuple[str, ...] = ("timestamp", "open", "high", "low", "close", "volume")

_NS_PER_SECOND = 1_000_000_000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class CandleLoadError(ValueError):
    """The file as a whole cannot be read as candles (e.g. a required column is missing)."""


@dataclass(frozen=True, slots=True)
class Candle:
    """One OHLCV bar.

    `timestamp_ns` is the bar's open time in nanoseconds since the Unix epoch, UTC.
    Prices and volume are exact decimals as reported by the source.
    """

    symbol: str
    timeframe: str
    timestamp_ns: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal


@dataclass(frozen=True, slots=True)
class RowProblem:
    """Why one input row was skipped. `row` is the file's line number (the header is 1)."""

    row: int
    reason: str


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What the loader read, kept and skipped."""

    rows_read: int
    rows_loaded: int
    problems: tuple[RowProblem, ...] = ()

    @property
    def rows_skipped(self) -> int:
        """Number of rows that were rejected."""
        return len(self.problems)

    def counts_by_reason(self) -> dict[str, int]:
        """Skipped rows per reason category (the text before the first ':')."""
        return dict(Counter(p.reason.split(":", 1)[0] for p in self.problems))


@dataclass(frozen=True, slots=True)
class LoadResult:
    """The valid candles, in time order, and the report on the rows that were not."""

    candles: tuple[Candle, ...]
    report: LoadReport


def parse_timestamp_ns(text: str) -> int:
    """Parse a bar time into integer nanoseconds since the epoch, UTC.

    Accepts ISO-8601 (`2021-12-31 23:01:00.000000`, `...T...Z`, with an offset; a time
    without an offset is taken as UTC) or an integer epoch whose unit is inferred from its
    magnitude (seconds, milliseconds, microseconds or nanoseconds).
    Raises `ValueError` when the text is neither.
    """
    raw = text.strip()
    if not raw:
        raise ValueError("empty timestamp")
    if raw.lstrip("-").isdigit():
        value = int(raw)
        magnitude = abs(value)
        # Unit by magnitude: any date between 1973 and 2286 is unambiguous this way.
        if magnitude < 10**11:
            return value * _NS_PER_SECOND
        if magnitude < 10**14:
            return value * 1_000_000
        if magnitude < 10**17:
            return value * 1_000
        return value
    iso = raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw
    parsed = dt.datetime.fromisoformat(iso)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    # Integer arithmetic on the timedelta: a float timestamp() would lose sub-us exactness.
    delta = parsed - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * _NS_PER_SECOND + delta.microseconds * 1_000


def _parse_decimal(name: str, text: str | None) -> Decimal:
    if text is None or not text.strip():
        raise _RowError(f"missing field: {name}")
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise _RowError(f"unparsable {name}: {text!r}") from None
    if not value.is_finite():
        raise _RowError(f"unparsable {name}: {text!r} is not finite")
    return value


class _RowError(Exception):
    """Internal: a row is invalid; the message is the reported reason."""


def _candle_from_row(values: dict[str, str | None], symbol: str, timeframe: str) -> Candle:
    ts_text = values.get("timestamp")
    if ts_text is None or not ts_text.strip():
        raise _RowError("missing field: timestamp")
    try:
        timestamp_ns = parse_timestamp_ns(ts_text)
    except ValueError:
        raise _RowError(f"unparsable timestamp: {ts_text!r}") from None

    open_ = _parse_decimal("open", values.get("open"))
    high = _parse_decimal("high", values.get("high"))
    low = _parse_decimal("low", values.get("low"))
    close = _parse_decimal("close", values.get("close"))
    volume = _parse_decimal("volume", values.get("volume"))

    for name, price in (("open", open_), ("high", high), ("low", low), ("close", close)):
        if price <= 0:
            raise _RowError(f"non-positive price: {name}={price}")
    if high < low:
        raise _RowError(f"high below low: high={high} low={low}")
    if not (low <= open_ <= high and low <= close <= high):
        raise _RowError(
            f"inconsistent OHLC: open={open_} close={close} outside [low={low}, high={high}]"
        )
    if volume < 0:
        raise _RowError(f"negative volume: {volume}")
    return Candle(
        symbol=symbol,
        timeframe=timeframe,
        timestamp_ns=timestamp_ns,
        open=open_,
        high=high,
        low=low,
        close=close,
        volume=volume,
    )


def validate_candle_rows(
    rows: Iterable[tuple[int, dict[str, str | None]]],
    symbol: str,
    timeframe: str = "1m",
    *,
    source: str = "<rows>",
) -> LoadResult:
    """Validate `(row_number, {column: text})` pairs into candles.

    Rows with a missing field, an unparsable or non-positive price, high below low or
    open/close outside [low, high], a negative volume, or a time not strictly after the
    previous kept candle are skipped; each is logged as a warning and listed in the report.
    """
    candles: list[Candle] = []
    problems: list[RowProblem] = []
    rows_read = 0
    last_ts: int | None = None
    for row_number, values in rows:
        rows_read += 1
        try:
            candle = _candle_from_row(values, symbol, timeframe)
            if last_ts is not None:
                if candle.timestamp_ns == last_ts:
                    raise _RowError(f"duplicate timestamp: {values.get('timestamp')}")
                if candle.timestamp_ns < last_ts:
                    raise _RowError(f"time going backwards: {values.get('timestamp')}")
        except _RowError as exc:
            problem = RowProblem(row=row_number, reason=str(exc))
            problems.append(problem)
            logger.warning("%s row %d skipped: %s", source, row_number, problem.reason)
            continue
        candles.append(candle)
        last_ts = candle.timestamp_ns
    report = LoadReport(rows_read=rows_read, rows_loaded=len(candles), problems=tuple(problems))
    if problems:
        logger.warning(
            "%s: %d of %d rows skipped %s",
            source,
            report.rows_skipped,
            rows_read,
            report.counts_by_reason(),
        )
    return LoadResult(candles=tuple(candles), report=report)


class _LineReader(Protocol):
    line_num: int

    def __iter__(self) -> Iterator[list[str]]: ...

    def __next__(self) -> list[str]: ...


def _iter_csv_rows(
    reader: _LineReader, header: Sequence[str]
) -> Iterator[tuple[int, dict[str, str | None]]]:
    for fields in reader:
        # The file's line number (header = 1); for a quoted multi-line row, its last line.
        row_number = reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue
        values: dict[str, str | None] = {
            name: (fields[i] if i < len(fields) else None) for i, name in enumerate(header)
        }
        yield row_number, values


def load_candles(path: str | os.PathLike[str], symbol: str, timeframe: str = "1m") -> LoadResult:
    """Load candles from a CSV with a `timestamp,open,high,low,close,volume` header.

    Column names are matched case-insensitively and extra columns are ignored. Returns the
    valid candles in file order plus a `LoadReport`; invalid rows are skipped (see
    `validate_candle_rows`). Raises `CandleLoadError` if the header lacks a required column.
    """
    file_path = Path(path)
    with file_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        try:
            header_row = next(reader)
        except StopIteration:
            raise CandleLoadError(f"{file_path}: empty file, no header") from None
        header = [name.strip().lower() for name in header_row]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise CandleLoadError(
                f"{file_path}: header {header_row!r} lacks column(s) {', '.join(missing)}"
            )
        return validate_candle_rows(
            _iter_csv_rows(reader, header), symbol, timeframe, source=str(file_path)
        )


def _candidate_dirs(start: Path) -> Iterator[Path]:
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        root = Path(env).expanduser()
        yield root
        yield root / "ohlcv"
        return
    for parent in (start, *start.parents):
        yield parent / "data" / "ohlcv"


def bundled_data_path(filename: str = BUNDLED_OHLCV_FILE) -> Path:
    """Path of the bundled OHLCV file.

    If `HEAN_DATA_DIR` is set, only that directory (or its `ohlcv/` subfolder) is searched,
    so a misconfiguration is an error rather than a silent fallback to another copy.
    Otherwise `data/ohlcv/` is searched upwards from this module's location.
    Raises `FileNotFoundError` listing where it looked.
    """
    looked: list[str] = []
    for directory in _candidate_dirs(Path(__file__).resolve().parent):
        candidate = directory / filename
        looked.append(str(candidate))
        if candidate.is_file():
            return candidate
    hint = f" ({DATA_DIR_ENV}={os.environ[DATA_DIR_ENV]})" if os.environ.get(DATA_DIR_ENV) else ""
    raise FileNotFoundError(
        f"bundled data file {filename!r} not found{hint}; looked in: " + ", ".join(looked)
    )
