"""`python -m hean.ml`: run the ml-service (model training is `python -m hean.ml.train`)."""

from __future__ import annotations

import sys

from hean.core.service import run_service
from hean.ml.service import MLServiceSettings, build

if __name__ == "__main__":
    # Replicas share the group (--scale ml-service=3): not an exclusive consumer.
    sys.exit(run_service("ml-service", build, settings_cls=MLServiceSettings, exclusive=False))
