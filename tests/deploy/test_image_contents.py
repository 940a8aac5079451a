"""What an image holds, checked without a Docker engine: the Dockerfile's build stage runs
deploy/install-service.sh, and so does this test, into a fresh venv per service. The venv
must hold hean-common and that service's own dependencies only, and run the service."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib.metadata import PathDistribution
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.deploy.tools import DEPLOY, ROOT, SERVICES, tool


def install(service: str, prefix: Path) -> Path:
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(
        ["sh", str(DEPLOY / "install-service.sh"), service, str(prefix), str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return prefix


def distributions(prefix: Path) -> set[str]:
    [site] = prefix.glob("lib/python*/site-packages")
    names = set()
    for info in site.glob("*.dist-info"):
        name = PathDistribution(info).metadata["Name"]
        names.add(name.lower().replace("_", "-"))
    return names


def run_health(prefix: Path, module: str, redis_url: str, extra: dict[str, str]) -> None:
    """Start `module` from the venv alone (no project on sys.path) and probe it with the
    image's healthcheck script until it answers 200."""
    port = free_port()
    env = {
        "PATH": f"{prefix / 'bin'}:/usr/bin:/bin",
        "REDIS_URL": redis_url,
        "HEALTH_PORT": str(port),
        "HEALTH_HOST": "127.0.0.1",
        **extra,
    }
    process = subprocess.Popen(
        [str(prefix / "bin" / "python"), "-m", module],
        env=env,
        cwd=prefix,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            probe = subprocess.run(
                [str(prefix / "bin" / "python"), str(DEPLOY / "healthcheck.py")],
                env={"HEALTH_PORT": str(port)},
                capture_output=True,
            )
            if probe.returncode == 0:
                break
            assert process.poll() is None, process.communicate()[0].decode(errors="replace")
            assert time.monotonic() < deadline, "no healthy /health within 60 s"
            time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(timeout=15)


@pytest.mark.timeout(600)
def test_ml_service_image_has_onnxruntime_and_model_not_ccxt(tmp_path, redis_url):
    prefix = install("ml-service", tmp_path / "ml")
    dists = distributions(prefix)
    assert {"hean-common", "hean-ml-service", "onnxruntime"} <= dists
    assert "ccxt" not in dists
    assert not any(
        d.startswith("hean-") and d not in {"hean-common", "hean-ml-service"} for d in dists
    )
    assert (prefix / "MODULE").read_text().strip() == SERVICES["ml-service"]
    [model] = prefix.glob("lib/python*/site-packages/hean/ml/models/default.onnx")
    assert model.stat().st_size > 0
    run_health(prefix, "hean.ml", redis_url, {})


@pytest.mark.timeout(600)
def test_execution_image_has_ccxt_not_onnxruntime(tmp_path, redis_url):
    prefix = install("execution", tmp_path / "execution")
    dists = distributions(prefix)
    assert {"hean-common", "hean-execution", "ccxt"} <= dists
    assert not {"onnxruntime", "lightgbm", "fastapi"} & dists
    run_health(prefix, "hean.execution", redis_url, {})


@pytest.mark.timeout(600)
def test_market_data_image_carries_the_bundled_candles(tmp_path, redis_url):
    prefix = install("market-data", tmp_path / "market-data")
    assert (prefix / "MODULE").read_text().strip() == "hean.market_data"
    csv = list((prefix / "data" / "ohlcv").glob("*.csv"))
    assert csv, "bundled OHLCV file not copied"
    # The Dockerfile sets HEAN_DATA_DIR=/opt/hean/data; here the venv is the prefix.
    run_health(prefix, "hean.market_data", redis_url, {"HEAN_DATA_DIR": str(prefix / "data")})


def test_install_service_refuses_an_unknown_service(tmp_path):
    result = subprocess.run(
        ["sh", str(DEPLOY / "install-service.sh"), "no-such-service", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "unknown service" in result.stderr


def test_dockerfile_passes_hadolint():
    binary = tool(
        "hadolint", Path(os.environ.get("HEAN_HADOLINT", "")), DEPLOY / ".tools" / "hadolint"
    )
    result = subprocess.run([binary, str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_and_checks_health():
    text = (DEPLOY / "Dockerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) == 2, "multi-stage: build and runtime"
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users == ["10001:10001"]
    assert "HEALTHCHECK" in text and "/opt/hean/healthcheck.py" in text
    assert "ARG SERVICE" in text and 'install-service.sh "${SERVICE}"' in text


def test_healthcheck_script_fails_on_unhealthy_503():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Unhealthy(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unhealthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = dict(os.environ, HEALTH_PORT=str(server.server_address[1]))
        result = subprocess.run(
            [sys.executable, str(DEPLOY / "healthcheck.py")],
            env=env,
            capture_output=True,
            text=True,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1
    assert "HTTP 503" in result.stderr
