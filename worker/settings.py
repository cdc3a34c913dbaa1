"""Settings for the worker and the model, read from the environment and a .env file (spec names verbatim)."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(SystemExit):
    """Start-up stops with one clear line naming the variable."""


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # The model (spec defaults; `pioneer train --preset small` overrides those not set explicitly).
    attention_heads: int = Field(8, ge=1)
    embedding_dim: int = Field(512, ge=8)
    sequence_length: int = Field(1024, ge=8)
    dropout_rate: float = Field(0.1, ge=0.0, lt=1.0)
    learning_rate: float = Field(1e-4, gt=0.0)
    num_encoder_layers: int = Field(6, ge=0)
    num_decoder_layers: int = Field(6, ge=1)
    pre_trained_embeddings: str | None = None
    positional_encoding_type: Literal["fixed", "learnable"] = "fixed"

    # Routing and caching.
    attention_mode: Literal["local", "openai", "hybrid"] = "hybrid"
    hybrid_mode_threshold: float = Field(0.8, ge=0.0, le=1.0)
    cache_size: int = Field(1000, ge=1)
    attention_cache_enabled: bool = True

    # Where things are.
    redis_url: str | None = None
    model_path: str | None = None
    pioneer_data_dir: Path = Path.home() / ".local" / "share" / "pioneer"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model_precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    max_new_tokens: int = Field(96, ge=1, le=4096)

    # Serving many users from one model: continuous batching, prefix reuse through the cache.
    max_batch_size: int = Field(16, ge=1, le=256)
    max_tokens_in_flight: int | None = Field(None, ge=1)  # KV positions; unset: MAX_BATCH_SIZE x SEQUENCE_LENGTH
    prefix_cache_enabled: bool = True

    # OpenAI or any compatible server (Ollama, vLLM).
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_model: str = "gpt-4o-mini"
    openai_timeout_s: float = Field(30.0, gt=0)
    openai_max_retries: int = Field(1, ge=0, le=10)

    # The queue.
    task_expires_s: int = Field(300, ge=5)
    visibility_timeout_s: int = Field(10, ge=2)
    worker_concurrency: int = Field(4, ge=1, le=256)

    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    # Operations: /metrics and /healthz (0: no server). Front-ends default to 0 (bots/settings.py).
    metrics_port: int = Field(9100, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 in a container, so Prometheus can scrape it

    @field_validator("redis_url", "openai_base_url", "model_path", "pre_trained_embeddings", "max_tokens_in_flight",
                     mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("openai_api_key", mode="before")
    @classmethod
    def _empty_key_is_unset(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def embedded(self) -> bool:
        """No REDIS_URL: queue, stream and cache live in this process."""
        return self.redis_url is None

    @property
    def default_model_dir(self) -> Path:
        return self.pioneer_data_dir / "models" / "default"

    def model_overrides(self) -> dict:
        """Model settings given explicitly in the environment, as ModelConfig keyword arguments."""
        names = ("attention_heads", "embedding_dim", "sequence_length", "dropout_rate", "learning_rate",
                 "num_encoder_layers", "num_decoder_layers", "pre_trained_embeddings", "positional_encoding_type")
        return {name: getattr(self, name) for name in names if name in self.model_fields_set}


def describe_error(error: ValidationError) -> str:
    """One line naming the variable(s) at fault."""
    parts = []
    for item in error.errors():
        name = str(item["loc"][0]).upper() if item["loc"] else "settings"
        got = item.get("input")
        shown = "" if "key" in name.lower() or "token" in name.lower() or "secret" in name.lower() else f" (got {got!r})"
        parts.append(f"{name}: {item['msg']}{shown}")
    return "Invalid setting " + "; ".join(parts)


def load(cls=WorkerSettings, **overrides):
    try:
        return cls(**overrides)
    except ValidationError as error:
        raise SettingsError(describe_error(error)) from None


@lru_cache(maxsize=1)
def get_worker_settings() -> WorkerSettings:
    return load(WorkerSettings)
