"""Fixtures of the reliability suite, and the report it writes (docs/RELIABILITY.md).

Every test adds its figures to the session's `Report`; at the end of the session the report
is rendered into docs/RELIABILITY.md (figures of this run only; sections whose tests did
not run say so). `HEAN_CHAOS_LONG=1` selects the long variants (longer soak, more bars).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.chaos.harness import System, base_env
from tests.conftest import ROOT

LONG = os.environ.get("HEAN_CHAOS_LONG", "") not in ("", "0", "false")
REPORT_PATH = ROOT / "docs" / "RELIABILITY.md"

#: Section titles in the order they appear in the report.
SECTIONS = (
    "Process kills",
    "Redis faults",
    "Exchange faults",
    "Bad input",
    "API fuzzing",
    "Invalid settings",
    "Access control",
    "Secrets",
    "Soak",
)


@dataclass
class Report:
    started: float = field(default_factory=time.time)
    sections: dict[str, list[str]] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)  # test id -> passed/failed/...

    def add(self, section: str, line: str) -> None:
        self.sections.setdefault(section, []).append(line)

    def table(self, section: str, header: tuple[str, ...], rows: list[tuple[object, ...]]) -> None:
        self.add(section, "| " + " | ".join(header) + " |")
        self.add(section, "|" + "---|" * len(header))
        for row in rows:
            self.add(section, "| " + " | ".join(str(c) for c in row) + " |")
        self.add(section, "")

    def render(self) -> str:
        took = time.time() - self.started
        passed = sum(1 for o in self.outcomes.values() if o == "passed")
        xfailed = sum(1 for o in self.outcomes.values() if o == "xfailed")
        failed = sum(1 for o in self.outcomes.values() if o == "failed")
        lines = [
            "# Reliability: faults, bad input, access, load (measured)",
            "",
            "Written by `pytest tests/chaos` itself at the end of its run "
            "(`tests/chaos/conftest.py`); every figure below comes from that run. Real "
            "service processes (`python -m hean.<pkg>`) on real redis-servers and the paper "
            "exchange; no mocks of Redis.",
            "",
            f"- run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(self.started))}, "
            f"{took:.0f} s, {'long' if LONG else 'CI'} variant "
            f"(`HEAN_CHAOS_LONG={'1' if LONG else '0'}`), {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}",
            f"- tests: {passed} passed, {xfailed} expected failures (known bugs, "
            f"see below), {failed} failed",
            "",
        ]
        for title in SECTIONS:
            lines.append(f"## {title}")
            lines.append("")
            body = self.sections.get(title)
            lines.extend(body if body else ["(not run in this session)"])
            lines.append("")
        extra = [t for t in self.sections if t not in SECTIONS]
        for title in extra:
            lines += [f"## {title}", "", *self.sections[title], ""]
        lines.append("## Tests of this run")
        lines.append("")
        for test_id, result in sorted(self.outcomes.items()):
            lines.append(f"- `{test_id}`: {result}")
        lines.append("")
        return "\n".join(lines)


_REPORT = Report()


@pytest.fixture(scope="session")
def report() -> Report:
    return _REPORT


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if "tests/chaos" not in item.nodeid:
        return
    name = item.nodeid.split("tests/chaos/", 1)[-1]
    if rep.when == "call" or (rep.when == "setup" and rep.outcome != "passed"):
        result = rep.outcome
        if hasattr(rep, "wasxfail"):
            result = "xfailed" if rep.skipped else "xpassed"
        _REPORT.outcomes[name] = result


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _REPORT.outcomes and not os.environ.get("HEAN_CHAOS_NO_REPORT"):
        REPORT_PATH.write_text(_REPORT.render())


@pytest.fixture
def system(redis_url: str, tmp_path: Path) -> Iterator[System]:
    sys_ = System(base_env(redis_url), tmp_path / "logs")
    yield sys_
    sys_.stop_all()
