"""Typed settings, read once from the environment and `.env` (the environment wins).

Build them at the edge with `Settings.load()` and pass them down; no other module reads
`os.environ`. A wrong value raises `ConfigurationError` with one line naming the variable.
"""

from __future__ import annotations

import difflib
import enum
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from core.errors import ConfigurationError

__all__ = [
    "LogFormat",
    "QueueConnection",
    "Settings",
    "project_home",
    "queue_location",
    "redact_url",
    "settings_warnings",
]


class QueueConnection(enum.StrEnum):
    """The queue drivers a connection name can select."""

    REDIS = "redis"
    DATABASE = "database"
    MEMORY = "memory"
    SYNC = "sync"
    AMQP = "amqp"


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


class EventLoop(enum.StrEnum):
    """The event loop Topiq's processes run on (core/loop.py)."""

    AUTO = "auto"  # uvloop when it is installed, else asyncio's own
    UVLOOP = "uvloop"  # uvloop, or a configuration error when it is not installed
    ASYNCIO = "asyncio"  # asyncio's own loop, uvloop or not


def _csv(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _parse_bound(entry: str) -> tuple[str, int, str]:
    """`name=N[:policy]` as (name, N, policy), or `ValueError` saying what is wrong."""
    name, sep, rest = entry.partition("=")
    name = name.strip()
    length, _, overflow = rest.partition(":")
    overflow = overflow.strip() or "reject"
    if not sep or not name:
        raise ValueError(f"{entry!r} must be 'queue=N' or 'queue=N:drop_oldest'")
    try:
        count = int(length.strip())
    except ValueError:
        raise ValueError(f"{entry!r}: the length must be a whole number, got {length!r}") from None
    if count < 0:
        raise ValueError(f"{entry!r}: the length must be 0 or more")
    if overflow not in ("reject", "drop_oldest"):
        raise ValueError(f"{entry!r}: the overflow policy must be reject or drop_oldest")
    return name, count, overflow


def _filter_problem(value: str) -> str:
    """Why `value` is not a valid MQTT topic filter ("" when it is)."""
    if not value:
        return "it is empty"
    levels = value.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return ""


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
    event_loop: EventLoop = EventLoop.AUTO

    # -- queue ---------------------------------------------------------------------------
    queue_connection: QueueConnection = QueueConnection.DATABASE
    queue_default: str = "default"
    queue_allowed_modules: Annotated[tuple[str, ...], NoDecode] = ("app.",)
    queue_max_payload_bytes: int = Field(default=1024 * 1024, gt=0)
    queue_lease_margin: float = Field(default=10.0, gt=0)
    queue_failed_connection: QueueConnection | None = None
    # Seconds a job's status record (and result) is kept after success / failure, cancel or
    # expiry, unless the job says otherwise (`result_ttl`, `failure_ttl`); 0 keeps nothing.
    queue_result_ttl: float = Field(default=500.0, ge=0)
    queue_failure_ttl: float = Field(default=604800.0, ge=0)
    # Bounded queues: `name=N` or `name=N:drop_oldest` entries, comma-separated (a job's
    # `max_queue_length` / `overflow` override them). Read with `queue_bound(name)`.
    queue_max_lengths: Annotated[tuple[str, ...], NoDecode] = ()

    # -- worker defaults (the CLI flags override them) ------------------------------------
    worker_sleep: float = Field(default=0.25, ge=0)
    worker_concurrency: int = Field(default=1, ge=1)
    worker_grace: float = Field(default=30.0, ge=0)
    # The module declaring the schedules (`schedule:run`, `queue:work --with-scheduler`).
    schedule_module: str = "app.schedule"

    # -- redis -------------------------------------------------------------------------
    enable_redis: bool = False
    redis_url: str | None = None
    redis_host: str = "localhost"
    redis_port: int = Field(default=6379, ge=1, le=65535)
    redis_db: int = Field(default=0, ge=0)
    redis_username: str | None = None
    redis_password: SecretStr | None = None
    redis_prefix: str = "topiq"
    # Past one machine (docs/scaling.md). REDIS_CLUSTER_NODES="host:port,host:port" connects
    # to a Redis Cluster (any reachable nodes; the rest are discovered); REDIS_SENTINELS=
    # "host:port,..." with REDIS_SENTINEL_MASTER asks Sentinel for the primary. Either way
    # the credentials, TLS (rediss://) and options come from REDIS_URL (or the split
    # variables); its host and port are not used. The two are exclusive.
    redis_cluster_nodes: str | None = None
    redis_sentinels: str | None = None
    redis_sentinel_master: str | None = None
    redis_sentinel_password: SecretStr | None = None
    # After each dispatch, wait until this many replicas have the job (Redis WAIT), at most
    # REDIS_WAIT_TIMEOUT seconds; a dispatch that is not replicated in time raises. 0: off.
    redis_wait_replicas: int = Field(default=0, ge=0)
    redis_wait_timeout: float = Field(default=1.0, gt=0)

    # -- RabbitMQ (QUEUE_CONNECTION=amqp; docs/rabbitmq.md) ---------------------------------
    # amqp://user:pass@host:5672/vhost, or amqps:// for TLS (the certificate is verified;
    # AMQP_TLS_CA / AMQP_TLS_CERT / AMQP_TLS_KEY name the files when not the system's).
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    amqp_tls_ca: Path | None = None
    amqp_tls_cert: Path | None = None
    amqp_tls_key: Path | None = None
    # Where the amqp connection keeps what RabbitMQ cannot: status records and results, the
    # failed store, workers' heartbeats, pauses. `database` (DB_URL / SQLite) or `redis`.
    amqp_store: QueueConnection = QueueConnection.DATABASE
    # The broker's consumer_timeout (seconds; RabbitMQ's default is 1800). A job whose lease
    # would outlast it is parked instead of held unacknowledged (docs/rabbitmq.md).
    amqp_consumer_timeout: float = Field(default=1800.0, gt=0)
    # Names of everything Topiq declares on the broker start with this.
    amqp_prefix: str = "topiq"

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
    # Appended to the client id: one stable id per process of a pool (supervisor sets it).
    mqtt_client_id_suffix: str = ""
    mqtt_keepalive: int = Field(default=60, ge=1)
    mqtt_clean_session: bool = False
    mqtt_tls: bool = False
    mqtt_tls_ca: Path | None = None
    mqtt_tls_cert: Path | None = None
    mqtt_tls_key: Path | None = None
    mqtt_tls_insecure: bool = False
    mqtt_handler_concurrency: int = Field(default=100, ge=1)
    mqtt_receive_maximum: int = Field(default=100, ge=1, le=65535)
    mqtt_handler_retries: int = Field(default=2, ge=0)
    mqtt_grace: float = Field(default=10.0, ge=0)
    mqtt_embedded_port: int = Field(default=1883, ge=1, le=65535)
    # MQTT filters a message's Response Topic must match for a job's outcome to be published
    # there (comma-separated); empty: never.
    mqtt_response_topics: Annotated[tuple[str, ...], NoDecode] = ()
    # Where `Job.request` asks devices to reply: `<prefix>/<worker client id>/<random>`.
    mqtt_reply_prefix: str = "topiq/replies"
    # The offline spool: jobs dispatched while the queue backend cannot be reached.
    mqtt_spool_path: Path = Path("storage/spool.sqlite3")
    mqtt_spool_max: int = Field(default=100_000, ge=0)  # jobs; 0: no spool
    # The handlers' pushes made while one is on its way go together in the next (mqtt.md).
    mqtt_group_commit: bool = True

    # -- dashboard ---------------------------------------------------------------------
    # The token `python main.py dashboard` asks for (required when bound off loopback; on
    # loopback, asked for only when set). Never shown by any page or log line.
    dashboard_token: SecretStr = SecretStr("")

    _csv_fields = field_validator(
        "queue_allowed_modules", "queue_max_lengths", "mqtt_response_topics", mode="before"
    )(_csv)

    @field_validator("queue_max_lengths")
    @classmethod
    def _check_bounds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for entry in value:
            name = _parse_bound(entry)[0]
            if name in seen:
                raise ValueError(f"queue {name!r} is listed twice")
            seen.add(name)
        return value

    @field_validator("mqtt_response_topics")
    @classmethod
    def _check_filters(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            problem = _filter_problem(entry)
            if problem:
                raise ValueError(f"{entry!r} is not an MQTT topic filter: {problem}")
        return value

    @field_validator("mqtt_reply_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        value = value.strip().strip("/")
        if not value or any(c in value for c in "+#") or value.startswith("$"):
            raise ValueError("must be topic levels without '+', '#' or a leading '$'")
        return value

    def queue_bound(self, queue: str) -> tuple[int, str]:
        """The `QUEUE_MAX_LENGTHS` entry of `queue`: (max length, overflow); (0, "reject")
        when it has none."""
        for entry in self.queue_max_lengths:
            name, length, overflow = _parse_bound(entry)
            if name == queue:
                return length, overflow
        return 0, "reject"

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("queue_result_ttl", "queue_failure_ttl", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        # "10 minutes" as well as 600; the `ge=0` bound and the float type are checked after.
        if isinstance(value, str) and value.strip() and not _is_float(value):
            from core.delays import parse_duration

            try:
                return parse_duration(value, "duration")
            except ValueError:
                raise ValueError(
                    "must be seconds or a duration such as '90s', '10 minutes' or '1h'"
                ) from None
        return value

    @field_validator("queue_failed_connection", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    # -- URLs: checked at start, and never shown with their password ------------------------

    @field_validator(
        "redis_url",
        "mqtt_url",
        "mqtt_tls_ca",
        "mqtt_tls_cert",
        "mqtt_tls_key",
        "amqp_tls_ca",
        "amqp_tls_cert",
        "amqp_tls_key",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `MQTT_TLS_CA=` as .env.example has it means no file, not the current directory.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            _check_redis_url(value)
        return value

    @field_validator(
        "redis_cluster_nodes", "redis_sentinels", "redis_sentinel_master", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_cluster_nodes", "redis_sentinels")
    @classmethod
    def _check_redis_nodes(cls, value: str | None) -> str | None:
        if value is not None:
            redis_nodes(value)
        return value

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp_url(cls, value: SecretStr) -> SecretStr:
        scheme = value.get_secret_value().partition("://")[0].lower()
        if scheme not in ("amqp", "amqps"):
            raise ValueError(
                f"must be an amqp:// or amqps:// URL (got a {scheme or 'missing'} scheme), "
                "e.g. amqp://guest:guest@127.0.0.1:5672/"
            )
        return value

    @field_validator("amqp_store")
    @classmethod
    def _check_amqp_store(cls, value: QueueConnection) -> QueueConnection:
        if value not in (QueueConnection.DATABASE, QueueConnection.REDIS):
            raise ValueError(f"must be database or redis (got {value.value})")
        return value

    @model_validator(mode="after")
    def _check_redis_topology(self) -> Settings:
        if self.redis_cluster_nodes and self.redis_sentinels:
            raise ValueError(
                "REDIS_CLUSTER_NODES and REDIS_SENTINELS are both set: a Redis is either a "
                "cluster or watched by Sentinel; unset one"
            )
        if self.redis_sentinels and not self.redis_sentinel_master:
            raise ValueError(
                "REDIS_SENTINELS is set but REDIS_SENTINEL_MASTER is not: name the primary "
                "the sentinels watch (its name in `sentinel monitor <name> ...`)"
            )
        return self

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str | None) -> str | None:
        if value is not None:
            _check_mqtt_url(value)
        return value

    @field_validator("db_url")
    @classmethod
    def _check_db_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().strip():
            _check_db_url(value.get_secret_value())
        return value

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """What `repr()` and `str()` show: URLs with their password replaced by `***`."""
        for name, value in super().__repr_args__():
            yield name, (redact_url(value) if name in _URL_FIELDS and value else value)

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
        # RabbitMQ keeps no records: its failed jobs go to the amqp connection's store.
        mapping[QueueConnection.AMQP] = self.amqp_store
        return mapping


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _describe(exc: ValidationError) -> str:
    """One line naming each wrong variable, what it must be and (for non-secrets) what it got."""
    parts = []
    for error in exc.errors():
        name = "_".join(str(p) for p in error["loc"]).upper()
        message = error["msg"]
        if not name:  # a rule between settings: its message names them; the input is them all
            parts.append(message.removeprefix("Value error, "))
            continue
        ctx = error.get("ctx") or {}
        if "expected" in ctx:
            message = f"must be one of {ctx['expected']}"
        value = error.get("input")
        if name.lower() in _URL_FIELDS and isinstance(value, str):
            value = redact_url(value)
        got = "" if _is_secret(name) else f" (got {value!r})"
        parts.append(f"{name}: {message}{got}")
    return "invalid configuration: " + "; ".join(parts)


def _is_secret(name: str) -> bool:
    return any(word in name for word in ("PASS", "SECRET", "TOKEN", "DB_URL"))


# -- URLs ------------------------------------------------------------------------------------

#: Plain-text settings holding URLs that may carry a password (`DB_URL` is a secret as a whole).
_URL_FIELDS = frozenset({"redis_url", "mqtt_url"})

_REDIS_FORM = (
    "expected redis://[[user]:password@]host[:port][/db] "
    "(rediss:// for TLS, unix:///path/to/redis.sock?db=N)"
)
_MQTT_FORM = "expected mqtt://[user[:password]@]host[:port] (or mqtts:// for TLS)"
_DB_FORM = (
    "expected mysql+aiomysql://user:pass@host:3306/name or sqlite+aiosqlite:///path/to/file.sqlite3"
)


def redact_url(url: str) -> str:
    """`url` with its password (if any) replaced by `***`, for logs, errors and `repr`."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        return url
    user, colon, _password = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{hostport}{slash}{tail}"


def _scheme(url: str) -> str:
    scheme = urlsplit(url).scheme
    return f"{scheme}://" if scheme else "no scheme"


def _check_port(url: str) -> None:
    try:
        port = urlsplit(url).port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ValueError("the port must be a number from 1 to 65535")


def redis_nodes(value: str) -> list[tuple[str, int]]:
    """`host:port,host:port` (REDIS_CLUSTER_NODES, REDIS_SENTINELS) as (host, port) pairs;
    an IPv6 host is written in brackets (`[::1]:7000`). Raises ValueError naming the entry."""
    out: list[tuple[str, int]] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"expected host:port entries separated by commas, got {entry!r}")
        out.append((host, int(port)))
    if not out:
        raise ValueError(f"expected host:port entries separated by commas, got {value!r}")
    return out


def _check_redis_url(url: str) -> None:
    """Raise `ValueError` saying what is wrong with a `REDIS_URL`, before any connection."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"unknown scheme ({_scheme(url)}); {_REDIS_FORM}")
    databases = parse_qs(parts.query).get("db", [])
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"no socket path; {_REDIS_FORM}")
    else:
        if not parts.hostname:
            raise ValueError(f"no host; {_REDIS_FORM}")
        _check_port(url)
        if parts.path.strip("/"):
            databases.append(parts.path.strip("/"))
    for db in databases:
        if not (db.isascii() and db.isdigit()):
            raise ValueError(f"the database must be a number (0, 1, ...), not {db!r}")
    for reqs in parse_qs(parts.query).get("ssl_cert_reqs", []):
        if reqs.lower() not in ("none", "optional", "required"):
            raise ValueError(f"ssl_cert_reqs must be none, optional or required, not {reqs!r}")


def _check_mqtt_url(url: str) -> None:
    """Raise `ValueError` saying what is wrong with an `MQTT_URL`."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl", "tls"):
        raise ValueError(f"unknown scheme ({_scheme(url)}); {_MQTT_FORM}")
    if not parts.hostname:
        raise ValueError(f"no host; {_MQTT_FORM}")
    _check_port(url)


def _check_db_url(url: str) -> None:
    """Raise `ValueError` saying what is wrong with a `DB_URL` (never repeating it)."""
    parts = urlsplit(url)
    backend, _, driver = parts.scheme.partition("+")
    wanted = {"mysql": "aiomysql", "mariadb": "aiomysql", "sqlite": "aiosqlite"}.get(backend)
    if wanted is None or driver not in ("", wanted):
        raise ValueError(f"unknown scheme ({_scheme(url)}); {_DB_FORM}")
    if backend != "sqlite":
        _check_port(url)


def queue_location(settings: Settings, connection: str) -> str:
    """Where connection `connection` keeps its jobs, for a start line (never a password)."""
    if connection == QueueConnection.REDIS:
        if settings.redis_cluster_nodes:
            nodes = ",".join(f"{h}:{p}" for h, p in redis_nodes(settings.redis_cluster_nodes))
            return f"the Redis Cluster at {nodes} (key prefix {settings.redis_prefix})"
        if settings.redis_sentinels:
            nodes = ",".join(f"{h}:{p}" for h, p in redis_nodes(settings.redis_sentinels))
            return (
                f"the primary {settings.redis_sentinel_master!r} of the Sentinels at {nodes} "
                f"(key prefix {settings.redis_prefix})"
            )
        return f"{redact_url(settings.redis_dsn)} (key prefix {settings.redis_prefix})"
    if connection == QueueConnection.DATABASE:
        dsn = settings.database_dsn
        if not dsn.startswith("sqlite"):
            return redact_url(dsn)
        path = dsn.partition("://")[2].partition("?")[0][1:]
        if not path or path == ":memory:":
            return "an in-memory SQLite database"
        return f"SQLite file {Path(path).resolve()}"
    if connection == QueueConnection.MEMORY:
        return "this process's memory"
    if connection == QueueConnection.SYNC:
        return "inline, inside dispatch()"
    if connection == QueueConnection.AMQP:
        store = queue_location(settings, settings.amqp_store)
        return (
            f"RabbitMQ at {redact_url(settings.amqp_url.get_secret_value())} "
            f"(prefix {settings.amqp_prefix}; records in {store})"
        )
    return connection


# -- where the project is ---------------------------------------------------------------------


def project_home(environ: Mapping[str, str] | None = None) -> Path | None:
    """The project directory `TOPIQ_HOME` names (its `.env` is read), or `None` when unset.

    Raises:
        ConfigurationError: `TOPIQ_HOME` is set but is not a directory.
    """
    home = (os.environ if environ is None else environ).get("TOPIQ_HOME", "").strip()
    if not home:
        return None
    path = Path(home).expanduser()
    if not path.is_dir():
        raise ConfigurationError(f"TOPIQ_HOME={home}: no such directory")
    return path


# -- settings that are set but not used ------------------------------------------------------

#: Environment variables with these prefixes are checked for misspelt setting names.
_PREFIXES = ("APP_", "LOG_", "QUEUE_", "WORKER_", "REDIS_", "ENABLE_", "DB_", "MQTT_")


def settings_warnings(
    settings: Settings,
    env_file: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """One line per setting that is ignored: misspelt, or replaced by another setting.

    Names in `env_file` and Topiq-prefixed names in the environment that are not settings
    but are close to one get "did you mean"; values that a URL or a switch makes unused are
    named with what is used instead.
    """
    environ = os.environ if environ is None else environ
    lines: list[str] = []
    known = sorted(name.upper() for name in type(settings).model_fields)
    names: list[tuple[str, str]] = []
    if env_file is not None and Path(env_file).is_file():
        from dotenv import dotenv_values

        names += [(key, str(env_file)) for key in dotenv_values(env_file)]
    names += [(key, "environment") for key in environ if key.upper().startswith(_PREFIXES)]
    cutoff = 0.75
    for key, source in names:
        if key.upper() in known:
            continue
        # A name of the same family first: DB_PASSWORD means DB_PASS, not REDIS_PASSWORD.
        family = [name for name in known if name.split("_")[0] == key.upper().split("_")[0]]
        close = difflib.get_close_matches(key.upper(), family, n=1, cutoff=cutoff)
        close = close or difflib.get_close_matches(key.upper(), known, n=1, cutoff=cutoff)
        if close:
            lines.append(
                f"{key} ({source}) is not a setting and is ignored; did you mean {close[0]}?"
            )

    def changed(*fields: str) -> str:
        defaults = type(settings).model_fields
        return ", ".join(
            name.upper()
            for name in fields
            if name in settings.model_fields_set
            and getattr(settings, name) != defaults[name].default
        )

    db_split = ("db_host", "db_port", "db_name", "db_user", "db_pass")
    if settings.db_url is not None and settings.db_url.get_secret_value():
        if names_set := changed(*db_split, "db_sqlite_path"):
            lines.append(f"{names_set} ignored: DB_URL is set and replaces them")
    elif not settings.enable_mysql:
        if names_set := changed(*db_split):
            lines.append(
                f"{names_set} ignored: ENABLE_MYSQL is not true, so the database connection "
                f"uses {queue_location(settings, QueueConnection.DATABASE)}; set "
                "ENABLE_MYSQL=true to use MySQL/MariaDB"
            )
    elif names_set := changed("db_sqlite_path"):
        lines.append(f"{names_set} ignored: ENABLE_MYSQL=true uses MySQL/MariaDB")
    if settings.redis_url and (
        names_set := changed(
            "redis_host", "redis_port", "redis_db", "redis_username", "redis_password"
        )
    ):
        lines.append(f"{names_set} ignored: REDIS_URL is set and replaces them")
    topology = (
        "REDIS_CLUSTER_NODES"
        if settings.redis_cluster_nodes
        else "REDIS_SENTINELS"
        if settings.redis_sentinels
        else ""
    )
    if topology:
        if names_set := changed("redis_host", "redis_port"):
            lines.append(f"{names_set} ignored: {topology} names the servers")
    elif names_set := changed("redis_sentinel_master", "redis_sentinel_password"):
        lines.append(f"{names_set} ignored: REDIS_SENTINELS is not set")
    if settings.mqtt_url:
        parts = urlsplit(settings.mqtt_url)
        replaced = ["mqtt_host", "mqtt_port", "mqtt_tls"]
        if parts.username:
            replaced += ["mqtt_username", "mqtt_password"]
        if names_set := changed(*replaced):
            lines.append(f"{names_set} ignored: MQTT_URL is set and replaces them")
    elif not settings.mqtt_host and (names_set := changed("mqtt_port", "mqtt_tls")):
        lines.append(
            f"{names_set} ignored: MQTT_HOST is empty, so the app starts the embedded broker "
            "on MQTT_EMBEDDED_PORT; set MQTT_HOST to use another broker"
        )
    tls = (
        urlsplit(settings.mqtt_url).scheme in ("mqtts", "ssl", "tls")
        if settings.mqtt_url
        else settings.mqtt_tls
    )
    if not tls and (
        names_set := changed("mqtt_tls_ca", "mqtt_tls_cert", "mqtt_tls_key", "mqtt_tls_insecure")
    ):
        lines.append(f"{names_set} ignored: MQTT TLS is off (set MQTT_TLS=true or use mqtts://)")
    return lines
