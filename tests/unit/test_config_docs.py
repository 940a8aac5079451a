"""The configuration documents stay true: every setting of every service is in .env.example
(with its real default) and in the README's configuration table, and .env.example as shipped
is a valid configuration for every service."""

from __future__ import annotations

import importlib
import os
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from hean.core.settings import SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = [
    ("hean.core.settings", "CoreSettings"),
    ("hean.core.settings", "ExchangeSettings"),
    ("hean.core.settings", "RiskSettings"),
    ("hean.core.settings", "MLSettings"),
    ("hean.core.settings", "MonitoringSettings"),
    ("hean.market_data.service", "MarketDataSettings"),
    ("hean.features.service", "FeaturesSettings"),
    ("hean.ml.service", "MLServiceSettings"),
    ("hean.strategy.service", "StrategySettings"),
    ("hean.risk.service", "RiskServiceSettings"),
    ("hean.execution.service", "ExecutionSettings"),
    ("hean.portfolio.service", "PortfolioSettings"),
    ("hean.gateway.settings", "GatewaySettings"),
    ("hean.ui.settings", "UiSettings"),
]


def settings_classes() -> list[type[BaseSettings]]:
    classes = []
    for module, name in SETTINGS:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, BaseSettings)
        classes.append(cls)
    return classes


def settings_fields() -> list[tuple[str, object]]:
    fields: dict[str, object] = {}
    for cls in settings_classes():
        for info in cls.model_fields.values():
            assert info.alias, info
            default = info.default
            if isinstance(default, SecretStr):
                default = ""
            elif info.default_factory is not None:
                default = info.default_factory()  # type: ignore[call-arg]
            fields.setdefault(info.alias, default)
    return sorted(fields.items())


def env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


@pytest.mark.parametrize(("name", "default"), settings_fields())
def test_env_example_lists_every_setting_with_its_default(name: str, default: object) -> None:
    values = env_example()
    assert name in values, f"{name} missing from .env.example"
    given = values[name]
    if name == "SERVICE_NAME" or given == "":
        return  # empty means "the default" (each service's own name for SERVICE_NAME)
    if isinstance(default, bool):
        assert given.lower() == str(default).lower(), name
    elif isinstance(default, int | float | Decimal):
        assert Decimal(given) == Decimal(str(default)), name
    elif isinstance(default, dict):
        assert given == "{}" and not default, name
    else:
        assert given == str(default), name


@pytest.mark.parametrize(("name", "default"), settings_fields())
def test_readme_configuration_table_documents_every_setting(name: str, default: object) -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"| `{name}` |" in readme, f"{name} missing from the README's configuration table"


@pytest.mark.parametrize("cls", settings_classes(), ids=lambda c: c.__name__)
def test_env_example_as_shipped_is_valid_for_every_service(
    cls: type[BaseSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(os.environ):
        monkeypatch.delenv(key)
    for key, value in env_example().items():
        monkeypatch.setenv(key, value)
    try:
        load_settings(cls)
    except SettingsError as exc:
        pytest.fail(f".env.example does not configure {cls.__name__}: {exc}")
