"""Typed settings, read once from the environment and `.env` (the environment wins).

Build them at the edge with `Settings.load()` and pass them down; no other module reads
`os.environ`. A wrong value raises `ConfigurationError` with one line naming the variable.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from core.errors import ConfigurationError

__all__ = ["LogFormat", "QueueConnection", "Settings"]


class QueueConnection(enum.StrEnum):
    """The queue drivers a connection name can select."""

    REDIS = "redis"
    DATABASE = "database"
    MEMORY = "memory"
    SYNC = "sync"


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


def _csv(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class Settings(BaseSettings):
    """Every setting Topiq reads; `.env.example` documents each one."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
        case_sensitive=False,
        hide_input_in_errors=True,
    )

    # -- application -------------------------------------------------------------------
    app_name: str = "topiq"
    log_level: str = "INFO"
    log_format: LogFormat = LogFormat.TEXT

    # -- queue ---------------------------------------------------------------------------
    queue_connection: QueueConnection = QueueConnection.DATABASE
    queue_default: str = "default"
    queue_allowed_modules: Annotated[tuple[str, ...], NoDecode] = ("app.",)
    queue_max_payload_bytes: int = Field(default=1024 * 1024, gt=0)
    queue_lease_margin: float = Field(default=10.0, gt=0)
    queue_failed_connection: QueueConnection | None = None

    # -- worker defaults (the CLI flags override them) ------------------------------------
    worker_sleep: float = Field(default=0.25, ge=0)
    worker_concurrency: int = Field(default=1, ge=1)
    worker_grace: float = Field(default=30.0, ge=0)

    # -- redis -------------------------------------------------------------------------
    enable_redis: bool = False
    redis_url: str | None = None
    redis_host: str = "localhost"
    redis_port: int = Field(default=6379, ge=1, le=65535)
    redis_db: int = Field(default=0, ge=0)
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_prefix: str = "topiq"

    # -- database (MySQL/MariaDB, or SQLite when MySQL is off) -----------------------------
    enable_mysql: bool = False
    db_url: SecretStr | None = None
    db_host: str = "localhost"
    db_port: int = Field(default=3306, ge=1, le=65535)
    db_name: str = "topiq"
    db_user: str = "root"
    db_pass: SecretStr = SecretStr("")
    db_sqlite_path: Path = Path("storage/topiq.sqlite3")
    db_auto_migrate: bool = True
    db_pool_size: int = Field(default=10, ge=1)

    # -- mqtt --------------------------------------------------------------------------
    mqtt_url: str | None = None
    mqtt_host: str | None = None
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    mqtt_client_id: str | None = None
    mqtt_keepalive: int = Field(default=60, ge=1)
    mqtt_clean_session: bool = False
    mqtt_tls: bool = False
    mqtt_tls_ca: Path | None = None
    mqtt_tls_cert: Path | None = None
    mqtt_tls_key: Path | None = None
    mqtt_tls_insecure: bool = False
    mqtt_handler_concurrency: int = Field(default=100, ge=1)
    mqtt_embedded_port: int = Field(default=1883, ge=1, le=65535)

    _csv_fields = field_validator("queue_allowed_modules", mode="before")(_csv)

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("queue_failed_connection", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    # -- construction ------------------------------------------------------------------

    @classmethod
    def load(cls, env_file: str | os.PathLike[str] | None = ".env", **overrides: Any) -> Settings:
        """Read the settings, turning a validation error into one `ConfigurationError` line."""
        try:
            return cls(_env_file=env_file, **overrides)  # type: ignore[call-arg]
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from None
        except SettingsError as exc:  # a value the environment source could not even parse
            raise ConfigurationError(f"invalid configuration: {exc}") from None

    # -- derived values ----------------------------------------------------------------

    @property
    def redis_dsn(self) -> str:
        """The Redis URL: `REDIS_URL` if set, else built from the split variables."""
        if self.redis_url:
            return self.redis_url
        auth = ""
        if self.redis_password is not None:
            user = quote(self.redis_username or "", safe="")
            auth = f"{user}:{quote(self.redis_password.get_secret_value(), safe='')}@"
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/{self.redis_db}"

    @property
    def database_dsn(self) -> str:
        """The SQLAlchemy URL: `DB_URL`, else MySQL from `DB_*` when enabled, else SQLite."""
        if self.db_url is not None and self.db_url.get_secret_value():
            return self.db_url.get_secret_value()
        if self.enable_mysql:
            user = quote(self.db_user, safe="")
            password = quote(self.db_pass.get_secret_value(), safe="")
            return (
                f"mysql+aiomysql://{user}:{password}@{self.db_host}:{self.db_port}/"
                f"{self.db_name}?charset=utf8mb4"
            )
        return f"sqlite+aiosqlite:///{self.db_sqlite_path}"

    @property
    def failed_connection_for(self) -> dict[QueueConnection, QueueConnection]:
        """Where each connection records its failed jobs.

        As the seed documents: with MySQL enabled, jobs failing on Redis go to the
        `queue_failed_jobs` table; otherwise each connection keeps its own failed store.
        `QUEUE_FAILED_CONNECTION` overrides the choice for every connection.
        """
        mapping = {conn: conn for conn in QueueConnection}
        if self.queue_failed_connection is not None:
            return {conn: self.queue_failed_connection for conn in QueueConnection}
        if self.enable_mysql:
            mapping[QueueConnection.REDIS] = QueueConnection.DATABASE
        return mapping


def _describe(exc: ValidationError) -> str:
    """One line naming each wrong variable, what it must be and (for non-secrets) what it got."""
    parts = []
    for error in exc.errors():
        name = "_".join(str(p) for p in error["loc"]).upper() or "settings"
        message = error["msg"]
        ctx = error.get("ctx") or {}
        if "expected" in ctx:
            message = f"must be one of {ctx['expected']}"
        got = "" if _is_secret(name) else f" (got {error.get('input')!r})"
        parts.append(f"{name}: {message}{got}")
    return "invalid configuration: " + "; ".join(parts)


def _is_secret(name: str) -> bool:
    return any(word in name for word in ("PASS", "SECRET", "TOKEN", "DB_URL"))
