"""deploy/docker-compose.yml through a real Compose v2 binary (`config`), plus the rules a
scalable, secure stack must keep: no pinned names or host ports on scalable services, every
`service_healthy` dependency has a healthcheck, Redis password-protected and persistent."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis as redis_py
import yaml

from tests.conftest import free_port
from tests.deploy.tools import (
    COMPOSE_FILE,
    PROFILE_SETS,
    PROMETHEUS_DIR,
    PUBLISHED,
    ROOT,
    SERVICES,
    compose,
    compose_config,
)


@pytest.mark.parametrize("profiles", PROFILE_SETS, ids=lambda p: "+".join(p) or "default")
def test_compose_config_each_profile_set_is_valid(profiles):
    result = compose("config", "-q", profiles=profiles)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_compose_profiles_select_the_expected_services():
    hean = set(SERVICES)
    assert set(compose_config()["services"]) == hean | {"redis"}
    assert set(compose_config(["full"])["services"]) == hean | {"redis", "prometheus", "grafana"}
    # Documented choice: no Kafka transport exists, so the profile adds nothing.
    assert set(compose_config(["kafka"])["services"]) == hean | {"redis"}


def test_compose_without_passwords_refuses_to_render(tmp_path):
    env = tmp_path / "empty.env"
    env.write_text("")
    result = compose("config", "-q", env_file=env, profiles=["full"])
    assert result.returncode != 0
    assert "REDIS_PASSWORD" in result.stderr


def test_compose_without_grafana_password_refuses_every_profile_set(tmp_path):
    """Compose interpolates services of inactive profiles too, so the Grafana password is
    required even for the basic stack (docs/DEPLOYMENT.md says so)."""
    env = tmp_path / "no-grafana.env"
    env.write_text("REDIS_PASSWORD=only-redis-set\n")
    for profiles in PROFILE_SETS:
        result = compose("config", "-q", env_file=env, profiles=profiles)
        assert result.returncode != 0
        assert "GF_SECURITY_ADMIN_PASSWORD" in result.stderr


@pytest.mark.parametrize("profiles", PROFILE_SETS, ids=lambda p: "+".join(p) or "default")
def test_compose_no_scalable_service_pins_a_name_or_host_port(profiles):
    for name, service in compose_config(profiles)["services"].items():
        assert "container_name" not in service, name
        if name not in PUBLISHED:
            assert not service.get("ports"), f"{name} publishes {service.get('ports')}"


@pytest.mark.parametrize("profiles", PROFILE_SETS, ids=lambda p: "+".join(p) or "default")
def test_compose_every_healthy_dependency_has_a_healthcheck(profiles):
    services = compose_config(profiles)["services"]
    checked = 0
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on {dep}, which this profile set lacks"
            if spec["condition"] == "service_healthy":
                check = services[dep].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), f"{name} -> {dep}"
                checked += 1
    assert checked >= 15  # each HEAN service waits for Redis and its consumers


def test_compose_hean_services_built_from_one_dockerfile_with_their_service():
    services = compose_config()["services"]
    for name, module in SERVICES.items():
        service = services[name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert Path(service["build"]["context"]) == ROOT
        assert service["build"]["args"] == {"SERVICE": name}
        assert service["command"] == ["python", "-m", module]
        assert service["restart"] == "unless-stopped"
        assert service["healthcheck"]["test"] == ["CMD", "python", "/opt/hean/healthcheck.py"]
        env = service["environment"]
        assert env["HEALTH_PORT"] == "8080"
        assert env["REDIS_URL"] == "redis://:ci-only-not-a-secret-redis@redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["api-gateway"]["environment"]["GATEWAY_PORT"] == "8000"
    assert services["api-gateway"]["ports"][0]["published"] == "8000"
    assert services["api-gateway"]["ports"][0]["target"] == 8000


def test_compose_redis_has_password_persistence_and_no_host_port():
    redis = compose_config(["full"])["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--requirepass" in command
    assert "--appendonly yes" in command
    assert redis["environment"]["REDIS_PASSWORD"] == "ci-only-not-a-secret-redis"
    assert not redis.get("ports")
    assert redis["expose"] == ["6379"]
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])
    assert redis["healthcheck"]["test"]


def test_compose_monitoring_ports_and_grafana_login():
    services = compose_config(["full"])["services"]
    assert [p["published"] for p in services["prometheus"]["ports"]] == ["9090"]
    assert [p["published"] for p in services["grafana"]["ports"]] == ["3001"]
    env = services["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] not in {"", "admin"}
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert services["prometheus"]["profiles"] == ["full"]
    assert services["grafana"]["profiles"] == ["full"]


def test_prometheus_scrapes_every_hean_compose_service_by_dns():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for name in SERVICES:
        job = jobs[name]
        [sd] = job["dns_sd_configs"]
        assert sd == {"names": [name], "type": "A", "port": 8080, "refresh_interval": "15s"}
        assert {"target_label": "service", "replacement": name} in job["relabel_configs"]


def test_env_example_lists_every_variable_the_compose_file_reads():
    text = COMPOSE_FILE.read_text()
    wanted = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    assert {"REDIS_PASSWORD", "GF_SECURITY_ADMIN_PASSWORD"} <= wanted
    listed = {
        line.split("=", 1)[0].strip()
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }
    assert sorted(wanted - listed) == []


def test_compose_with_env_example_copied_to_dotenv(tmp_path):
    """The guide's path: `cp .env.example .env`. It renders, or stops only because a
    password is still empty (the stack must not start with a default password)."""
    env = tmp_path / ".env"
    shutil.copy(ROOT / ".env.example", env)
    for profiles in PROFILE_SETS:
        result = compose("config", "-q", env_file=env, profiles=profiles)
        if result.returncode != 0:
            assert re.search(
                r"required variable (REDIS_PASSWORD|GF_SECURITY_ADMIN_PASSWORD) is missing",
                result.stderr,
            ), result.stderr


def test_compose_redis_command_runs_with_password_and_append_only_file(tmp_path):
    """The redis service's command line, run by a local redis-server the way the container's
    shell would (port and directory moved to a free port and a temp dir)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: apt-get install redis-server")
    service = compose_config()["services"]["redis"]
    assert service["command"][:2] == ["sh", "-c"]
    # Compose escapes `$` as `$$` in its output; the container's shell sees `$`.
    script = service["command"][2].replace("$$", "$")
    port = free_port()
    assert "--dir /data" in script
    script = script.replace("--dir /data", f"--dir {tmp_path}")
    script += f" --port {port} --bind 127.0.0.1 --save ''"
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", **service["environment"]}
    process = subprocess.Popen(["sh", "-c", script], env=env)
    try:
        client = redis_py.Redis(port=port, password=env["REDIS_PASSWORD"])
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis_py.ConnectionError:
                assert time.monotonic() < deadline, "redis did not start"
                time.sleep(0.05)
        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(port=port).ping()
        client.set("k", "v")
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        # The healthcheck: redis-cli reads the password from REDISCLI_AUTH.
        check = subprocess.run(
            [
                "sh",
                "-c",
                service["healthcheck"]["test"][1].replace("redis-cli", f"redis-cli -p {port}"),
            ],
            env=env,
            capture_output=True,
        )
        assert check.returncode == 0, check
        client.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert list(tmp_path.glob("appendonly*")), "no append-only file written"
