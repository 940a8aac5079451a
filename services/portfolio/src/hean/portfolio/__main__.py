"""`python -m hean.portfolio`: run the portfolio service."""

from __future__ import annotations

import sys

from hean.core.service import run_service
from hean.portfolio.service import PortfolioSettings, build

if __name__ == "__main__":
    sys.exit(run_service("portfolio", build, settings_cls=PortfolioSettings))
