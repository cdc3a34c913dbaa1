"""Front-end settings: the worker's, plus the database, the chat platforms and user-facing limits."""

from functools import lru_cache
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from worker.settings import WorkerSettings, load


class Settings(WorkerSettings):
    database_url: str | None = None
    admin_user_ids: Annotated[list[str], NoDecode] = []
    max_input_chars: int = Field(4000, ge=1)
    rate_limit_per_minute: int = Field(20, ge=1)
    system_prompt: str = "You are Pioneer, a friendly and helpful chat assistant."
    history_token_budget: int = Field(0, ge=0)  # 0: what the model's positions leave after the reply
    reply_timeout_s: float = Field(120.0, gt=0)

    discord_token: SecretStr | None = None
    discord_api_base: str | None = None
    discord_gateway_url: str | None = None
    slack_bot_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_host: str = "127.0.0.1"
    slack_port: int = Field(3000, ge=1, le=65535)
    slack_api_url: str | None = None
    metrics_port: int = Field(0, ge=0, le=65535)  # 0: no /metrics and /healthz server
    drain_timeout_s: float = Field(20.0, gt=0)  # on shutdown, how long to wait for replies in flight

    @field_validator("admin_user_ids", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("database_url", "discord_api_base", "discord_gateway_url", "slack_api_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.pioneer_data_dir / 'pioneer.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load(Settings)
