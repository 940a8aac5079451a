"""`python -m hean.gateway`: run the api-gateway (HTTP on GATEWAY_PORT, default 8000)."""

from __future__ import annotations

import sys

from hean.core.service import run_service
from hean.gateway.service import build
from hean.gateway.settings import GatewaySettings

if __name__ == "__main__":
    # It consumes no stream and keeps no trading state: several may run behind a load
    # balancer (docs/DEPLOYMENT.md), so it takes no service lease.
    sys.exit(run_service("api-gateway", build, settings_cls=GatewaySettings, exclusive=False))
