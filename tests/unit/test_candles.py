"""Candle record, CSV loader and bundled data lookup (hean.core.candles)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import shutil
from decimal import Decimal
from pathlib import Path

import pytest

from hean.core.candles import (
    BUNDLED_OHLCV_FILE,
    DATA_DIR_ENV,
    Candle,
    CandleLoadError,
    bundled_data_path,
    load_candles,
    parse_timestamp_ns,
)

HEADER = "timestamp,open,high,low,close,volume\n"
T0_NS = 1_640_991_660_000_000_000  # 2021-12-31 23:01:00 UTC


def _write(tmp_path: Path, body: str, header: str = HEADER) -> Path:
    path = tmp_path / "bars.csv"
    path.write_text(header + body, encoding="utf-8")
    return path


def test_load_candles_bundled_file_all_rows_valid_and_decimal() -> None:
    result = load_candles(bundled_data_path(), "BTC-PERP")
    assert result.report.rows_read == 45_031
    assert result.report.rows_loaded == 45_031
    assert result.report.problems == ()
    first, last = result.candles[0], result.candles[-1]
    assert first == Candle(
        symbol="BTC-PERP",
        timeframe="1m",
        timestamp_ns=T0_NS,
        open=Decimal("46319.0"),
        high=Decimal("46385.0"),
        low=Decimal("46319.0"),
        close=Decimal("46377.0"),
        volume=Decimal("2300413.7295"),
    )
    assert last.timestamp_ns == T0_NS + 45_030 * 60 * 10**9  # no gaps
    steps = {b.timestamp_ns - a.timestamp_ns for a, b in itertools.pairwise(result.candles)}
    assert steps == {60 * 10**9}


def test_load_candles_bad_rows_skipped_counted_and_logged_with_row_number(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = (
        "2022-01-01 00:00:00,100,110,90,105,10\n"  # line 2 ok
        "2022-01-01 00:01:00,100,110,,105,10\n"  # line 3 missing low
        "2022-01-01 00:02:00,abc,110,90,105,10\n"  # line 4 unparsable open
        "2022-01-01 00:03:00,0,110,90,105,10\n"  # line 5 zero price
        "2022-01-01 00:04:00,100,110,-90,105,10\n"  # line 6 negative price
        "2022-01-01 00:05:00,100,90,110,105,10\n"  # line 7 high < low
        "2022-01-01 00:06:00,100,110,90,120,10\n"  # line 8 close above high
        "2022-01-01 00:07:00,100,110,90,105,-1\n"  # line 9 negative volume
        "2022-01-01 00:08:00,100,110,90,105,10\n"  # line 10 ok
        "2022-01-01 00:08:00,100,110,90,105,10\n"  # line 11 duplicate time
        "2022-01-01 00:07:30,100,110,90,105,10\n"  # line 12 backwards
        "2022-01-01 00:09:00,100,110,90\n"  # line 13 short row
        "not-a-time,100,110,90,105,10\n"  # line 14 bad timestamp
        "2022-01-01 00:10:00,NaN,110,90,105,10\n"  # line 15 NaN price
        "2022-01-01 00:11:00,100,110,90,105,0\n"  # line 16 ok (zero volume is real)
    )
    with caplog.at_level(logging.WARNING, logger="hean.core.candles"):
        result = load_candles(_write(tmp_path, body), "X")
    assert [c.timestamp_ns for c in result.candles] == [
        parse_timestamp_ns("2022-01-01 00:00:00"),
        parse_timestamp_ns("2022-01-01 00:08:00"),
        parse_timestamp_ns("2022-01-01 00:11:00"),
    ]
    problems = {p.row: p.reason for p in result.report.problems}
    assert sorted(problems) == [3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15]
    assert problems[3].startswith("missing field: low")
    assert problems[4].startswith("unparsable open")
    assert problems[5].startswith("non-positive price: open")
    assert problems[6].startswith("non-positive price: low")
    assert problems[7].startswith("high below low")
    assert problems[8].startswith("inconsistent OHLC")
    assert problems[9].startswith("negative volume")
    assert problems[11].startswith("duplicate timestamp")
    assert problems[12].startswith("time going backwards")
    assert problems[13].startswith("missing field: close")
    assert problems[14].startswith("unparsable timestamp")
    assert problems[15].startswith("unparsable open")
    assert result.report.rows_read == 15
    assert result.report.rows_skipped == 12
    assert result.report.counts_by_reason()["non-positive price"] == 2
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for row, reason in problems.items():
        assert f"row {row} skipped: {reason}" in logged


def test_load_candles_reordered_columns_and_blank_lines_accepted(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "\n5,105,90,110,2022-01-01T00:00:00Z,100,x\n\n",
        header="Volume,Close,Low,High,Timestamp,Open,extra\n",
    )
    result = load_candles(path, "X", timeframe="5m")
    assert result.report.problems == ()
    (candle,) = result.candles
    assert candle.timeframe == "5m"
    assert (candle.open, candle.high, candle.low, candle.close, candle.volume) == (
        Decimal(100),
        Decimal(110),
        Decimal(90),
        Decimal(105),
        Decimal(5),
    )


def test_load_candles_header_missing_column_raises(tmp_path: Path) -> None:
    path = _write(tmp_path, "", header="timestamp,open,high,low,close\n")
    with pytest.raises(CandleLoadError, match="volume"):
        load_candles(path, "X")


def test_load_candles_empty_file_raises(tmp_path: Path) -> None:
    path = _write(tmp_path, "", header="")
    with pytest.raises(CandleLoadError, match="empty"):
        load_candles(path, "X")


def test_candle_assignment_rejected() -> None:
    candle = Candle("X", "1m", 0, Decimal(1), Decimal(1), Decimal(1), Decimal(1), Decimal(0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        candle.close = Decimal(2)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2021-12-31 23:01:00.000000", T0_NS),
        ("2021-12-31T23:01:00Z", T0_NS),
        ("2022-01-01T00:01:00+01:00", T0_NS),
        ("2021-12-31 23:01:00.000001", T0_NS + 1_000),
        ("1640991660", T0_NS),
        ("1640991660000", T0_NS),
        ("1640991660000000", T0_NS),
        (str(T0_NS), T0_NS),
    ],
)
def test_parse_timestamp_ns_formats_give_utc_nanoseconds(text: str, expected: int) -> None:
    assert parse_timestamp_ns(text) == expected


def test_bundled_data_path_env_var_directory_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "ohlcv"
    target.mkdir()
    shutil.copy(bundled_data_path(), target / BUNDLED_OHLCV_FILE)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert bundled_data_path() == target / BUNDLED_OHLCV_FILE


def test_bundled_data_path_env_var_without_file_raises_naming_places(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=DATA_DIR_ENV):
        bundled_data_path()
