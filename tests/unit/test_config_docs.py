"""The configuration documents stay true: every setting is in .env.example and in the
README's configuration table, with its real default."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr
from pydantic_settings import BaseSettings

from hean.core.settings import (
    CoreSettings,
    ExchangeSettings,
    MLSettings,
    MonitoringSettings,
    RiskSettings,
)

ROOT = Path(__file__).resolve().parents[2]
CLASSES: list[type[BaseSettings]] = [
    CoreSettings, ExchangeSettings, RiskSettings, MLSettings, MonitoringSettings,
]  # fmt: skip


def settings_fields() -> list[tuple[str, object]]:
    fields = []
    for cls in CLASSES:
        for info in cls.model_fields.values():
            assert info.alias, info
            default = info.default
            fields.append((info.alias, "" if isinstance(default, SecretStr) else default))
    return fields


@pytest.mark.parametrize(("name", "default"), settings_fields())
def test_env_example_lists_every_setting_with_its_default(name: str, default: object) -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert name in values, f"{name} missing from .env.example"
    if name in {"SERVICE_NAME"}:
        return  # each service's own name is its default
    given = values[name]
    if isinstance(default, bool):
        assert given.lower() == str(default).lower()
    elif isinstance(default, int | float) or hasattr(default, "as_tuple"):
        assert float(given) == float(str(default)), name
    else:
        assert given == str(default), name


@pytest.mark.parametrize(("name", "default"), settings_fields())
def test_readme_configuration_table_documents_every_setting(name: str, default: object) -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"| `{name}` |" in readme, f"{name} missing from the README's configuration table"
