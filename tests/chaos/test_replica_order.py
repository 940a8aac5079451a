"""Three ml-service replicas decide as one: the same signals and the same orders.

Replicas of one consumer group finish in any order, so the predictions of one symbol reach
the ML_PREDICTION stream out of bar order (hundreds of them in a replay at full speed).
Strategy puts them back in bar order (features chains each symbol's rows and ml-service
copies the link; see docs/SIGNAL_PATH.md): without that it dropped every late prediction as
stale and traded differently with three replicas than with one (200 signals against 236
on this slice, measured 2026-12-01).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.conftest import Report
from tests.chaos.harness import WARMUP, clean_run, differences, invariants, pnl_consistent

BARS = WARMUP + 700


@pytest.mark.timeout(300)
async def test_three_replicas_give_the_same_signals_and_orders_as_one(
    redis_url: str, tmp_path: Path, report: Report
) -> None:
    one, one_took = await clean_run(redis_url, tmp_path / "one", bars=BARS)
    three, three_took = await clean_run(redis_url, tmp_path / "three", bars=BARS, ml_replicas=3)
    diffs = differences(one, three)
    report.add(
        "Process kills",
        f"Replicas and order: {BARS} bars x 2 symbols replayed at full speed (REPLAY_SPEED=0) "
        f"with one ml-service ({one_took:.0f} s) and with three ({three_took:.0f} s). "
        f"Predictions that reached the stream after a later bar's: "
        f"{len(one.late_predictions)} with one, {len(three.late_predictions)} with three. "
        f"Signals {len(one.signals)} and {len(three.signals)}, orders {len(one.approved)} "
        f"and {len(three.approved)}; differences: {diffs or 'none'}.",
    )
    assert one.late_predictions == []
    assert three.late_predictions, "the replicas never finished out of order: nothing tested"
    assert invariants(three) == [] and pnl_consistent(three) == []
    assert diffs == [], diffs
