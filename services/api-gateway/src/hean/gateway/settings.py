"""The gateway's settings (environment variables, as every service's)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator

from hean.core.settings import CoreSettings, Port

#: The eight services of a complete system; `/health` reports any of them without a live
#: snapshot as down (and the system as unhealthy).
DEFAULT_EXPECTED_SERVICES = (
    "market-data,features,ml-service,strategy,risk,execution,portfolio,api-gateway"
)


class GatewaySettings(CoreSettings):
    gateway_host: str = Field(default="0.0.0.0", alias="GATEWAY_HOST")  # noqa: S104
    gateway_port: Port = Field(default=8000, alias="GATEWAY_PORT")
    api_token: SecretStr = Field(default=SecretStr(""), alias="API_TOKEN")
    gateway_read_token_required: bool = Field(default=False, alias="GATEWAY_READ_TOKEN_REQUIRED")
    gateway_expected_services: str = Field(
        default=DEFAULT_EXPECTED_SERVICES, alias="GATEWAY_EXPECTED_SERVICES"
    )
    gateway_snapshot_max_age_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=60.0, alias="GATEWAY_SNAPSHOT_MAX_AGE_S"
    )
    gateway_command_timeout_s: Annotated[float, Field(ge=0, le=60)] = Field(
        default=5.0, alias="GATEWAY_COMMAND_TIMEOUT_S"
    )
    gateway_max_count: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=1000, alias="GATEWAY_MAX_COUNT"
    )
    gateway_open_orders_window: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=5000, alias="GATEWAY_OPEN_ORDERS_WINDOW"
    )
    gateway_ws_block_ms: Annotated[int, Field(ge=10, le=2000)] = Field(
        default=500, alias="GATEWAY_WS_BLOCK_MS"
    )

    @field_validator("gateway_expected_services")
    @classmethod
    def _services(cls, value: str) -> str:
        names = [s.strip() for s in value.split(",") if s.strip()]
        if len(set(names)) != len(names):
            raise ValueError("lists a service twice")
        return ",".join(names)

    @model_validator(mode="after")
    def _read_token_needs_token(self) -> GatewaySettings:
        if self.gateway_read_token_required and not self.api_token.get_secret_value():
            raise ValueError("GATEWAY_READ_TOKEN_REQUIRED=true needs API_TOKEN to be set")
        return self

    @property
    def expected_services(self) -> tuple[str, ...]:
        return tuple(s for s in self.gateway_expected_services.split(",") if s)
