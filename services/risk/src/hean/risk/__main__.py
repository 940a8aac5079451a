"""`python -m hean.risk`: run the risk service."""

from __future__ import annotations

import sys

from hean.core.service import run_service
from hean.risk.service import RiskServiceSettings, build

if __name__ == "__main__":
    sys.exit(run_service("risk", build, settings_cls=RiskServiceSettings))
