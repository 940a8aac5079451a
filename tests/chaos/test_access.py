"""Access: gateway tokens, Redis requirepass + an ACL user, schemathesis fuzzing of the
gateway, and a scan for secrets in everything the run produced."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tests.chaos.conftest import LONG, Report
from tests.chaos.harness import System, base_env, snapshot_raw, wait_for
from tests.conftest import RedisServer

TOKEN = "chaos-token-4f9a1c"
API_KEY = "chaos-apikey-77d2e0"
API_SECRET = "chaos-apisecret-b61c3a"
ADMIN_PW = "chaos-admin-pw-5e8d"
USER_PW = "chaos-user-pw-19af"
SECRETS = (TOKEN, API_KEY, API_SECRET, ADMIN_PW, USER_PW)


def _metrics_total(text: str, pattern: str) -> int:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("hean_gateway_requests_total{") and re.search(pattern, line):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


@pytest.mark.timeout(300)
async def test_tokens_redis_acl_fuzzing_and_no_secret_anywhere(
    redis_factory: Callable[..., RedisServer], tmp_path: Path, report: Report
) -> None:
    server = redis_factory(password=ADMIN_PW)
    admin = aioredis.Redis.from_url(server.url)
    await admin.acl_setuser(
        "hean", enabled=True, passwords=[f"+{USER_PW}"], keys=["*"], channels=["*"],
        commands=["+@all"],
    )  # fmt: skip
    user_url = f"redis://hean:{USER_PW}@127.0.0.1:{server.port}/0"
    env = base_env(user_url, API_TOKEN=TOKEN, API_KEY=API_KEY, API_SECRET=API_SECRET)
    system = System(env, tmp_path / "logs")
    base = f"http://127.0.0.1:{system.gateway_port}"
    rows: list[tuple[str, str, int, int]] = []
    try:
        for name in ("risk", "execution", "portfolio", "api-gateway"):
            system.start(name)
        # No credentials, and a wrong password: a clear error, not a hang.
        bad_plain = system.start(
            "risk", "risk-no-auth", REDIS_URL=f"redis://127.0.0.1:{server.port}/0"
        )
        bad_pw = system.start(
            "risk", "risk-bad-pw", REDIS_URL=f"redis://hean:wrong@127.0.0.1:{server.port}/0"
        )

        def answers() -> bool:
            try:
                return httpx.get(f"{base}/killswitch", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_for(answers, timeout=60, message="gateway up")

        async def risk_group() -> bool:
            groups: Any = await admin.xinfo_groups("hean:risk:commands")
            return any(g["name"] == b"risk" for g in groups)

        await wait_for(risk_group, timeout=60, message="risk reads commands")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        wrong = {"Authorization": "Bearer not-the-token"}
        async with httpx.AsyncClient(base_url=base, timeout=15) as http:
            for path, body in (
                ("/killswitch/trigger", {"reason": "chaos"}),
                ("/killswitch/reset", {}),
            ):
                for label, headers, expected in (
                    ("no token", {}, 401),
                    ("wrong token", wrong, 401),
                ):
                    r = await http.post(path, json=body, headers=headers)
                    rows.append((path, label, r.status_code, expected))
                    state = (await http.get("/killswitch")).json()
                    assert state["active"] is (path == "/killswitch/reset"), state
                r = await http.post(path, json=body, headers=auth)
                rows.append((path, "right token", r.status_code, 200))
                state = (await http.get("/killswitch")).json()
                assert state["active"] is (path == "/killswitch/trigger"), state
            r = await http.delete("/dlq/0-1")
            rows.append(("DELETE /dlq/0-1", "no token", r.status_code, 401))

        # Fuzz the OpenAPI schema with the token (commands included).
        before = await asyncio.to_thread(_get, f"{base}/metrics")
        fuzz = await asyncio.to_thread(_fuzz, base, "60" if LONG else "12")
        after = await asyncio.to_thread(_get, f"{base}/metrics")
        fuzzed = _metrics_total(after, "") - _metrics_total(before, "")
        # /health answers 503 by design here (not all eight services run).
        known = r'route="/health'
        all_5xx = _metrics_total(after, r'status="5') - _metrics_total(before, r'status="5')
        known_5xx = _metrics_total(after, known + r'.*status="5') - _metrics_total(
            before, known + r'.*status="5'
        )
        errors_5xx = all_5xx - known_5xx
        # Hostile requests of our own: no traceback in any answer.
        bodies: list[str] = []
        async with httpx.AsyncClient(base_url=base, timeout=15) as http:
            for path in (
                "/events/TICK?count=-1",
                "/events/TICK?start=garbage",
                "/events/%00%ff",
                "/dlq/not-an-id",
                "/orders?count=99999999999999999999",
                "/health/" + "x" * 5000,
                "/fills?count=abc",
            ):
                bodies.append((await http.get(path)).text)
            for path in ("/killswitch/trigger", "/dlq/1-1/retry"):
                r = await http.post(
                    path, content=b"\xff\xfe{not json", headers={**auth, "content-type": "json"}
                )
                bodies.append(r.text)
        no_auth_log = bad_plain.log_path.read_text(errors="replace")
        wrong_pw_log = bad_pw.log_path.read_text(errors="replace")
        # Scan what the run produced for the secrets.
        produced: dict[str, str] = {}
        for proc in list(system.procs.values()):
            for what in ("health", "metrics"):
                with contextlib.suppress(httpx.HTTPError):
                    url = f"http://127.0.0.1:{proc.health_port}/{what}"
                    produced[f"{proc.label} /{what}"] = await asyncio.to_thread(_get, url)
        produced["gateway /health"] = await asyncio.to_thread(_get, f"{base}/health")
        produced["health snapshots"] = b"\n".join(await snapshot_raw(admin)).decode()
        for key in ("hean:events:ERROR", "hean:dlq", "hean:risk:commands"):
            if await admin.exists(key):
                produced[key] = repr(await admin.xrange(key))
    finally:
        system.stop_all()
        await admin.aclose()
    for log_path in system.log_paths():
        produced[f"log {log_path.name}"] = log_path.read_text(errors="replace")
    produced["schemathesis output"] = fuzz.stdout + fuzz.stderr
    leaks = [(where, s) for where, text in produced.items() for s in SECRETS if s in text]
    chars = sum(len(t) for t in produced.values())

    report.table(
        "Access control",
        ("request", "credentials", "status", "expected"),
        [(f"`{p}`", c, s, e) for p, c, s, e in rows],
    )
    report.add(
        "Access control",
        "Kill switch: after each refused request the state was unchanged (a refused reset "
        "left it active). Redis with `requirepass` and an ACL user `hean`: services "
        "connected with `redis://hean:***@...`; a service without credentials logged: "
        f"`{_auth_line(no_auth_log)}`; with a wrong password: `{_auth_line(wrong_pw_log)}`.",
    )
    report.add(
        "API fuzzing",
        f"schemathesis {_version()} against the gateway's /openapi.json (check "
        f"`not_a_server_error`, token given): {fuzzed} requests; {all_5xx} answered 5xx, of "
        f"which {known_5xx} were `/health` (503 by design: not all eight services run), and "
        f"{errors_5xx} anything else; "
        f"exit status {fuzz.returncode}. Nine hand-made hostile requests (invalid ids, "
        "counts, UTF-8, 5000-character names, a body that is not JSON): no traceback in any "
        f"answer. Summary: `{_summary(fuzz.stdout)}`",
    )
    report.add(
        "Secrets",
        f"Scanned {len(produced)} outputs ({chars:,} characters: every process log, "
        "/health and /metrics of every process, the gateway's /health, the health "
        "snapshots in Redis, the ERROR, dead-letter and command streams, schemathesis's "
        f"output) for the API token, exchange key and secret, and both Redis passwords: "
        f"{len(leaks)} found{': ' + str(leaks) if leaks else ''}.",
    )
    assert all(status == expected for _p, _c, status, expected in rows), rows
    assert errors_5xx == 0, fuzz.stdout[-3000:]
    assert fuzzed > 20
    assert not any("Traceback" in b for b in bodies)
    assert _auth_line(no_auth_log) != "(none)", no_auth_log[-2000:]
    assert _auth_line(wrong_pw_log) != "(none)", wrong_pw_log[-2000:]
    assert leaks == []


def _fuzz(base: str, examples: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"{base}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            examples,
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--request-timeout",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _get(url: str) -> str:
    return httpx.get(url, timeout=10).text


def _auth_line(log: str) -> str:
    for line in log.splitlines():
        if re.search(r"auth|password|NOAUTH|WRONGPASS", line, re.IGNORECASE):
            return line.strip()[:200]
    return "(none)"


def _summary(out: str) -> str:
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return " / ".join(lines[-3:])[:300] if lines else "(no output)"


def _version() -> str:
    from importlib.metadata import version

    return version("schemathesis")


@pytest.mark.timeout(120)
async def test_gateway_dlq_id_out_of_range_is_a_client_error(
    system: System, report: Report
) -> None:
    system.env["API_TOKEN"] = TOKEN
    system.start("api-gateway")
    base = f"http://127.0.0.1:{system.gateway_port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{base}/dlq", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    await wait_for(answers, timeout=60, message="gateway up", system=system)
    bad = "317330969464-0062807764810198379230381502729"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        statuses = {
            "GET": (await http.get(f"/dlq/{bad}")).status_code,
            "POST retry": (await http.post(f"/dlq/{bad}/retry", headers=auth)).status_code,
            "DELETE": (await http.delete(f"/dlq/{bad}", headers=auth)).status_code,
        }
    report.add(
        "Access",
        f"- Out-of-range DLQ ids (found by schemathesis as 5xx; fixed: both parts of a stream "
        f"id must fit 64 bits): `/dlq/{bad}` now answers {statuses}. "
        "(`test_access.py::test_gateway_dlq_id_out_of_range_is_a_client_error`)",
    )
    assert all(400 <= s < 500 for s in statuses.values()), statuses
