from __future__ import annotations

import logging
from decimal import Decimal

import pytest

from hean.core.logs import RedactingFilter, secret_values
from hean.core.settings import (
    CoreSettings,
    ExchangeSettings,
    MLSettings,
    RiskSettings,
    SettingsError,
    load_settings,
    redact_url,
)


def test_settings_defaults_match_the_guide(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "EVENT_MAX_QUEUE_SIZE", "MAX_POSITION_SIZE", "ML_INFERENCE_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    core = load_settings(CoreSettings)
    assert core.redis_url == "redis://localhost:6379"
    assert core.event_max_queue_size == 50_000
    risk = load_settings(RiskSettings)
    assert risk.max_position_size == Decimal("10000")
    assert risk.max_leverage == Decimal("3")
    assert risk.daily_drawdown_limit == Decimal("0.05")
    assert load_settings(MLSettings).ml_inference_timeout_ms == 100


def test_settings_read_guide_variable_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENT_MAX_QUEUE_SIZE", "100000")
    monkeypatch.setenv("DAILY_DRAWDOWN_LIMIT", "0.02")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    assert load_settings(CoreSettings).event_max_queue_size == 100_000
    assert load_settings(CoreSettings).log_level == "DEBUG"
    assert load_settings(RiskSettings).daily_drawdown_limit == Decimal("0.02")


@pytest.mark.parametrize(
    ("cls", "variable", "value"),
    [
        (CoreSettings, "EVENT_MAX_QUEUE_SIZE", "lots"),
        (CoreSettings, "EVENT_MAX_QUEUE_SIZE", "0"),
        (CoreSettings, "REDIS_URL", "http://localhost:6379"),
        (CoreSettings, "LOG_LEVEL", "LOUD"),
        (RiskSettings, "DAILY_DRAWDOWN_LIMIT", "1.5"),
        (RiskSettings, "MAX_LEVERAGE", "-3"),
        (RiskSettings, "MAX_POSITION_SIZE", "NaN"),
        (MLSettings, "ML_INFERENCE_TIMEOUT", "0"),
    ],
)
def test_settings_bad_value_error_names_variable(
    monkeypatch: pytest.MonkeyPatch, cls: type[CoreSettings], variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings(cls)


def test_settings_error_never_echoes_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_SECRET", "s3cr3t-value")
    monkeypatch.setenv("EXCHANGE_TESTNET", "maybe")
    with pytest.raises(SettingsError) as info:
        load_settings(ExchangeSettings)
    assert "EXCHANGE_TESTNET" in str(info.value)
    assert "s3cr3t-value" not in str(info.value)


def test_redact_url_hides_password() -> None:
    assert redact_url("redis://:hunter22@redis:6379/0") == "redis://:***@redis:6379/0"
    assert redact_url("redis://app:hunter22@redis:6379") == "redis://app:***@redis:6379"
    assert redact_url("redis://localhost:6379") == "redis://localhost:6379"


def test_logging_filter_redacts_secrets_and_url_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEY", "AKIA-very-secret")
    settings = load_settings(ExchangeSettings)
    flt = RedactingFilter(secret_values(settings))
    record = logging.LogRecord(
        "x",
        logging.INFO,
        __file__,
        1,
        "key=%s url=%s",
        ("AKIA-very-secret", "redis://:pw1234@h:1"),
        None,
    )
    flt.filter(record)
    text = record.getMessage()
    assert "AKIA-very-secret" not in text and "pw1234" not in text
    assert text == "key=*** url=redis://:***@h:1"
