"""`python -m hean.execution`: run the execution service (paper exchange by default)."""

from __future__ import annotations

import sys

from hean.core.service import run_service
from hean.execution.service import ExecutionSettings, build

if __name__ == "__main__":
    sys.exit(run_service("execution", build, settings_cls=ExecutionSettings))
