"""The dashboard server's settings, from the environment like every HEAN service's."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

from hean.core.settings import CoreSettings, Port, redact_url


class UiSettings(BaseSettings):
    """UI_HOST, UI_PORT, GATEWAY_URL and the few knobs of the dashboard server.

    The server talks to the gateway only, so it needs no Redis settings.
    """

    model_config = CoreSettings.model_config

    ui_host: str = Field(default="0.0.0.0", alias="UI_HOST", min_length=1)  # noqa: S104
    ui_port: Port = Field(default=3000, alias="UI_PORT")
    gateway_url: str = Field(default="http://localhost:8000", alias="GATEWAY_URL")
    gateway_timeout_s: Annotated[float, Field(gt=0, le=300)] = Field(
        default=30.0, alias="UI_GATEWAY_TIMEOUT_S"
    )
    poll_interval_s: Annotated[float, Field(ge=0.2, le=60)] = Field(
        default=2.0, alias="UI_POLL_INTERVAL_S"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", alias="LOG_LEVEL"
    )
    log_format: Literal["text", "json"] = Field(default="text", alias="LOG_FORMAT")

    @field_validator("gateway_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return value.rstrip("/")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def gateway_url_redacted(self) -> str:
        return redact_url(self.gateway_url)
