"""Settings from the environment, with the integration guide's variable names.

Each service builds its settings with `load_settings(SomeSettings)`. A bad value raises
`SettingsError` naming the variable (and never echoing a secret), and `main()` turns that
into one clear line and exit status 2.
"""

from __future__ import annotations

import os
import socket
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
PositiveInt = Annotated[int, Field(gt=0)]
Port = Annotated[int, Field(ge=0, le=65535)]


class SettingsError(ValueError):
    """Invalid configuration; the message names every offending variable."""


class CoreSettings(BaseSettings):
    """What every service needs: Redis, the event bus, health, circuit breakers, logging."""

    model_config = SettingsConfigDict(
        env_file=None,
        case_sensitive=False,
        extra="ignore",
        frozen=True,
        validate_default=True,
        # `NAME=` in an env file (as .env.example lists them) means "use the default".
        env_ignore_empty=True,
    )

    # Redis and the event bus
    redis_url: str = Field(default="redis://localhost:6379", alias="REDIS_URL")
    event_max_queue_size: PositiveInt = Field(default=50_000, alias="EVENT_MAX_QUEUE_SIZE")
    event_batch_size: PositiveInt = Field(default=10, alias="EVENT_BATCH_SIZE")
    event_worker_count: PositiveInt = Field(default=4, alias="EVENT_WORKER_COUNT")
    event_block_ms: Annotated[int, Field(ge=10, le=2000)] = Field(
        default=200, alias="EVENT_BLOCK_MS"
    )
    event_claim_idle_ms: PositiveInt = Field(default=30_000, alias="EVENT_CLAIM_IDLE_MS")
    event_claim_interval_ms: PositiveInt = Field(default=5_000, alias="EVENT_CLAIM_INTERVAL_MS")
    event_retry_delay_ms: PositiveInt = Field(default=500, alias="EVENT_RETRY_DELAY_MS")
    event_max_deliveries: PositiveInt = Field(default=5, alias="EVENT_MAX_DELIVERIES")
    event_stream_maxlen: PositiveInt = Field(default=100_000, alias="EVENT_STREAM_MAXLEN")
    event_dlq_maxlen: PositiveInt = Field(default=100_000, alias="EVENT_DLQ_MAXLEN")
    event_reconnect_max_s: Annotated[float, Field(gt=0, le=300)] = Field(
        default=5.0, alias="EVENT_RECONNECT_MAX_S"
    )

    # Service identity, health and metrics endpoint
    service_name: str = Field(default="hean", alias="SERVICE_NAME", min_length=1)
    instance_id: str = Field(default="", alias="INSTANCE_ID")
    health_host: str = Field(default="0.0.0.0", alias="HEALTH_HOST")  # noqa: S104
    health_port: Port = Field(default=8080, alias="HEALTH_PORT")
    health_interval_s: Annotated[float, Field(gt=0, le=300)] = Field(
        default=5.0, alias="HEALTH_INTERVAL_S"
    )
    health_ttl_s: Annotated[float, Field(gt=0, le=3600)] = Field(default=15.0, alias="HEALTH_TTL_S")
    service_lease_ttl_s: Annotated[float, Field(ge=1, le=300)] = Field(
        default=10.0, alias="SERVICE_LEASE_TTL_S"
    )

    # Circuit breakers (the guide's thresholds are the defaults)
    cb_failure_threshold: PositiveInt = Field(default=5, alias="CB_FAILURE_THRESHOLD")
    cb_recovery_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=60.0, alias="CB_RECOVERY_TIMEOUT_S"
    )
    cb_success_threshold: PositiveInt = Field(default=2, alias="CB_SUCCESS_THRESHOLD")

    log_level: LogLevel = Field(default="INFO", alias="LOG_LEVEL")
    log_format: Literal["text", "json"] = Field(default="text", alias="LOG_FORMAT")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        scheme = urlsplit(value).scheme
        if scheme not in {"redis", "rediss", "unix"}:
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def consumer_name(self) -> str:
        """`<service>:<host>:<pid>` (or INSTANCE_ID), unique per running process."""
        if self.instance_id:
            return f"{self.service_name}:{self.instance_id}"
        return f"{self.service_name}:{socket.gethostname()}:{os.getpid()}"

    @property
    def redis_url_redacted(self) -> str:
        return redact_url(self.redis_url)


class ExchangeSettings(BaseSettings):
    model_config = CoreSettings.model_config

    exchange: str = Field(default="paper", alias="EXCHANGE", min_length=1)
    api_key: SecretStr = Field(default=SecretStr(""), alias="API_KEY")
    api_secret: SecretStr = Field(default=SecretStr(""), alias="API_SECRET")
    exchange_testnet: bool = Field(default=True, alias="EXCHANGE_TESTNET")


class RiskSettings(BaseSettings):
    model_config = CoreSettings.model_config

    max_position_size: Annotated[Decimal, Field(gt=0, allow_inf_nan=False)] = Field(
        default=Decimal("10000"), alias="MAX_POSITION_SIZE"
    )
    max_leverage: Annotated[Decimal, Field(gt=0, le=125, allow_inf_nan=False)] = Field(
        default=Decimal("3"), alias="MAX_LEVERAGE"
    )
    daily_drawdown_limit: Annotated[Decimal, Field(gt=0, lt=1, allow_inf_nan=False)] = Field(
        default=Decimal("0.05"), alias="DAILY_DRAWDOWN_LIMIT"
    )


class MLSettings(BaseSettings):
    model_config = CoreSettings.model_config

    ml_model_path: str = Field(default="", alias="ML_MODEL_PATH")
    ml_inference_timeout_ms: Annotated[float, Field(gt=0, le=60_000)] = Field(
        default=100.0, alias="ML_INFERENCE_TIMEOUT"
    )
    feature_batch_size: PositiveInt = Field(default=10, alias="FEATURE_BATCH_SIZE")
    feature_batch_timeout_ms: Annotated[float, Field(ge=0, le=60_000)] = Field(
        default=50.0, alias="FEATURE_BATCH_TIMEOUT"
    )


class MonitoringSettings(BaseSettings):
    model_config = CoreSettings.model_config

    prometheus_port: Port = Field(default=9090, alias="PROMETHEUS_PORT")
    grafana_port: Port = Field(default=3001, alias="GRAFANA_PORT")


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build `cls` from the environment (and keyword overrides, by field name).

    Raises `SettingsError` naming each bad variable; secret values are never echoed.
    """
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            field = str(err["loc"][0]) if err["loc"] else "?"
            info = cls.model_fields.get(field)
            name = (info.alias if info is not None and info.alias else field).upper()
            secret = info is not None and info.annotation is SecretStr
            given = "" if secret or err["type"] == "missing" else f" (got {err['input']!r})"
            problems.append(f"{name}: {err['msg']}{given}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`, safe for logs and health output."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}" if user else f":***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
