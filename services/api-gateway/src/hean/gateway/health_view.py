"""System health from the services' snapshots: a pure function, no I/O, no clock reads.

`merge_health(snapshots, expected=..., now=...)` turns the live snapshots that
`hean.core.health.read_snapshots` returns into the integration guide's "Health Status
Response" for the whole system. The rules are written for users in docs/GATEWAY.md:

* an instance's state is its own `overall_state`; an instance that is not running, or
  whose snapshot is older than `max_age_s`, counts as unhealthy / absent;
* a service is healthy when every instance is healthy, unhealthy when no instance is
  healthy or degraded, degraded otherwise (one bad replica out of three degrades it);
* the system is unhealthy when any expected service has no live instance or is
  unhealthy, degraded when any service (expected or not) is degraded or an unexpected
  one is unhealthy, healthy otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from hean.core.health import ComponentState

#: Names the integration guide uses that are not a component's own name.
GUIDE_ALIASES: Final[Mapping[str, str]] = {"execution_router": "execution"}

#: The main component of each service, so `/health/ml_engine` answers (as down) even when
#: ml-service has no live snapshot at all.
PRIMARY_COMPONENTS: Final[Mapping[str, str]] = {
    "market-data": "market_data",
    "features": "features",
    "ml-service": "ml_engine",
    "strategy": "strategy",
    "risk": "risk_governor",
    "execution": "execution",
    "portfolio": "portfolio",
    "api-gateway": "http_api",
}

#: Components every process has; keyed `<service>.<name>` in the merged view.
PER_PROCESS_COMPONENTS: Final = frozenset({"event_bus"})

ORCHESTRATOR: Final = "orchestrator"

_SEVERITY: Final[Mapping[ComponentState, int]] = {
    ComponentState.HEALTHY: 0,
    ComponentState.DEGRADED: 1,
    ComponentState.UNHEALTHY: 2,
}
_BREAKER_SEVERITY: Final[Mapping[str, int]] = {"closed": 0, "half_open": 1, "open": 2}


def parse_state(value: object) -> ComponentState:
    """A state from a snapshot; anything unknown reads as unhealthy (never as healthy)."""
    try:
        return ComponentState(str(value).lower())
    except ValueError:
        return ComponentState.UNHEALTHY


def combine(states: Sequence[ComponentState]) -> ComponentState:
    """Replicas of one thing: all healthy -> healthy; none usable -> unhealthy; else degraded."""
    if not states:
        return ComponentState.UNHEALTHY
    if all(s is ComponentState.HEALTHY for s in states):
        return ComponentState.HEALTHY
    if all(s is ComponentState.UNHEALTHY for s in states):
        return ComponentState.UNHEALTHY
    return ComponentState.DEGRADED


def _valid(snapshot: Mapping[str, Any]) -> bool:
    health = snapshot.get("health")
    return (
        isinstance(snapshot.get("service"), str)
        and isinstance(snapshot.get("instance"), str)
        and isinstance(health, Mapping)
        and isinstance(health.get("orchestrator"), Mapping)
        and isinstance(health.get("components"), Mapping)
    )


def _instance_view(snapshot: Mapping[str, Any], now: float) -> dict[str, Any]:
    health = snapshot["health"]
    orch = health["orchestrator"]
    running = bool(orch.get("running"))
    state = parse_state(orch.get("overall_state")) if running else ComponentState.UNHEALTHY
    written_at = float(snapshot.get("written_at") or 0.0)
    return {
        "state": state.value,
        "running": running,
        "uptime_seconds": int(orch.get("uptime_seconds") or 0),
        "written_at": written_at,
        "age_seconds": round(max(0.0, now - written_at), 3),
        "components": {str(k): dict(v) for k, v in health["components"].items()},
    }


def _merge_component(
    service: str, per_instance: Mapping[str, Mapping[str, Any]], now: float
) -> dict[str, Any]:
    """One component over a service's instances, in the guide's shape plus `service`/`instances`."""
    states = [parse_state(e.get("state")) for e in per_instance.values()]
    state = combine(states)
    breakers = [str(e.get("circuit_breaker", "closed")) for e in per_instance.values()]
    entry: dict[str, Any] = {
        "state": state.value,
        "last_check": max(int(e.get("last_check") or 0) for e in per_instance.values()) or int(now),
        "failure_count": max(int(e.get("failure_count") or 0) for e in per_instance.values()),
        "circuit_breaker": max(breakers, key=lambda b: _BREAKER_SEVERITY.get(b, 2)),
    }
    # The message of the worst instance, naming the instance when there are replicas.
    worst = sorted(
        per_instance.items(),
        key=lambda kv: -_SEVERITY[parse_state(kv[1].get("state"))],
    )
    for instance, e in worst:
        message = e.get("error_message")
        if message:
            entry["error_message"] = (
                f"{instance}: {message}" if len(per_instance) > 1 else str(message)
            )
            break
    entry["service"] = service
    entry["instances"] = len(per_instance)
    return entry


def _down_component(service: str, now: float) -> dict[str, Any]:
    return {
        "state": ComponentState.UNHEALTHY.value,
        "last_check": int(now),
        "failure_count": 0,
        # A service that is down refuses everything, which is what an open breaker means.
        "circuit_breaker": "open",
        "error_message": f"{service} is down: no live health snapshot in Redis",
        "service": service,
        "instances": 0,
    }


def merge_health(
    snapshots: Iterable[Mapping[str, Any]],
    *,
    expected: Sequence[str],
    now: float,
    max_age_s: float = 60.0,
) -> dict[str, Any]:
    """The system-wide health JSON (see the module docstring for the rules)."""
    instances: dict[str, dict[str, dict[str, Any]]] = {}
    for snapshot in snapshots:
        if not _valid(snapshot):
            continue
        view = _instance_view(snapshot, now)
        if view["age_seconds"] > max_age_s:
            continue  # a stale snapshot is as good as none: the service shows as down
        instances.setdefault(snapshot["service"], {})[snapshot["instance"]] = view

    services: dict[str, dict[str, Any]] = {}
    for service in sorted(instances):
        insts = dict(sorted(instances[service].items()))
        state = combine([ComponentState(v["state"]) for v in insts.values()])
        services[service] = {"state": state.value, "replicas": len(insts), "instances": insts}
    missing = [s for s in expected if s not in services]
    for service in missing:
        services[service] = {
            "state": ComponentState.UNHEALTHY.value,
            "replicas": 0,
            "instances": {},
            "error_message": f"{service} is down: no live health snapshot in Redis",
        }

    # Component keys: the component's own name, `<service>.<name>` for per-process ones and
    # for names two services share.
    owners: dict[str, set[str]] = {}
    for service, insts in instances.items():
        for view in insts.values():
            for name in view["components"]:
                owners.setdefault(name, set()).add(service)
    components: dict[str, dict[str, Any]] = {}
    for service in sorted(instances):
        names = sorted({n for v in instances[service].values() for n in v["components"]})
        for name in names:
            per_instance = {
                inst: v["components"][name]
                for inst, v in instances[service].items()
                if name in v["components"]
            }
            shared = name in PER_PROCESS_COMPONENTS or len(owners[name]) > 1
            key = f"{service}.{name}" if shared else name
            components[key] = _merge_component(service, per_instance, now)
    for service in missing:
        primary = PRIMARY_COMPONENTS.get(service)
        if primary is not None and primary not in components:
            components[primary] = _down_component(service, now)

    expected_set = set(expected)
    overall = ComponentState.HEALTHY
    for service, entry in services.items():
        state = ComponentState(entry["state"])
        if state is ComponentState.HEALTHY:
            continue
        if state is ComponentState.UNHEALTHY and service in expected_set:
            overall = ComponentState.UNHEALTHY
        elif overall is ComponentState.HEALTHY:
            overall = ComponentState.DEGRADED
    if not instances:
        overall = ComponentState.UNHEALTHY
    running_views = [v for insts in instances.values() for v in insts.values() if v["running"]]
    return {
        ORCHESTRATOR: {
            "running": bool(running_views),
            "uptime_seconds": max((v["uptime_seconds"] for v in running_views), default=0),
            "overall_state": overall.value,
        },
        "components": components,
        "services": services,
        "missing_services": missing,
    }


def lookup(merged: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """`/health/{name}`: the orchestrator block, a component (or guide alias), or a service."""
    if name == ORCHESTRATOR:
        return dict(merged[ORCHESTRATOR])
    components = merged["components"]
    key = GUIDE_ALIASES.get(name, name)
    if key in components:
        return dict(components[key])
    if name in merged["services"]:
        return {"service": name, **merged["services"][name]}
    return None


def known_names(merged: Mapping[str, Any]) -> list[str]:
    """Every name `lookup` answers for, for the 404 message."""
    names = {ORCHESTRATOR, *merged["components"], *merged["services"]}
    names |= {alias for alias, target in GUIDE_ALIASES.items() if target in merged["components"]}
    return sorted(names)


def state_of(entry: Mapping[str, Any]) -> ComponentState:
    """The state of a `lookup` result (the orchestrator block keeps it in `overall_state`)."""
    return parse_state(entry.get("state", entry.get("overall_state")))
