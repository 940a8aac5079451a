"""`python -m hean.strategy`: run the strategy service."""

from __future__ import annotations

import sys

from hean.core.service import run_service
from hean.strategy.service import StrategySettings, build

if __name__ == "__main__":
    sys.exit(run_service("strategy", build, settings_cls=StrategySettings))
