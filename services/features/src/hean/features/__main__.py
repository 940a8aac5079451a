"""`python -m hean.features`: run the features service."""

from __future__ import annotations

import sys

from hean.core.service import run_service
from hean.features.service import FeaturesSettings, build

if __name__ == "__main__":
    sys.exit(run_service("features", build, settings_cls=FeaturesSettings))
