"""`python -m hean.market_data`: run the market-data service."""

from __future__ import annotations

import sys

from hean.core.service import run_service
from hean.market_data.service import MarketDataSettings, build

if __name__ == "__main__":
    sys.exit(run_service("market-data", build, settings_cls=MarketDataSettings))
