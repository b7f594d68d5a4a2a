"""TLS that a URL asks for is TLS, or the connection fails: never a quiet fall back to plaintext.

MySQL/MariaDB (`DB_URL` query options, see docs/configuration.md): any `ssl` or `ssl_*` option
turns TLS on. The server's certificate is verified against `ssl_ca`/`ssl_capath` or the system's
CAs, host name included, unless `ssl_verify_cert=false` (or `ssl_verify_identity=false` for the
host name only) says otherwise. aiomysql upgrades a connection to TLS only when the server offers
it and would otherwise log in in plaintext; here a connection whose server does not offer TLS is
refused before any credentials are sent (`_tls_only_connection`), and one that did not end up
encrypted is closed (a check that fails closed should aiomysql's internals change).

Redis (`rediss://`): redis-py verifies the certificate by default and never falls back to
plaintext; but a plaintext server just waits for the TLS handshake to end and the client times
out with "Timeout connecting to server". `redis_tls_failure` turns such failures at start into a
`ConfigurationError` that says what is wrong, and `check_redis_url` refuses TLS options on a
`redis://` URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from core.errors import ConfigurationError, ServerMismatchError

if TYPE_CHECKING:  # a Redis process never loads the MySQL client (it starts faster)
    from sqlalchemy.engine import URL

__all__ = ["check_redis_url", "mysql_tls", "redis_plaintext_refusal", "redis_tls_failure"]

# -- MySQL/MariaDB ----------------------------------------------------------------------------

_MYSQL_FLAGS = ("ssl", "ssl_verify_cert", "ssl_verify_identity", "ssl_check_hostname")
_MYSQL_FILES = ("ssl_ca", "ssl_capath", "ssl_cert", "ssl_key")
_MYSQL_OPTIONS = (*_MYSQL_FLAGS, *_MYSQL_FILES, "ssl_cipher")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def mysql_tls(url: URL) -> tuple[URL, dict[str, Any]]:
    """The URL without its TLS options, and the connect arguments that enforce them.

    No TLS option: the URL as it is and no arguments. Raises `ConfigurationError` (naming
    `DB_URL`) for an unknown option, a value that is not a yes/no, or a file that is missing.
    """
    given = {key: value for key, value in url.query.items() if key == "ssl" or key[:4] == "ssl_"}
    if not given:
        return url, {}
    options: dict[str, str] = {}
    for key, value in given.items():
        if key not in _MYSQL_OPTIONS:
            raise ConfigurationError(
                f"DB_URL: unknown TLS option {key!r}; the options are {', '.join(_MYSQL_OPTIONS)}"
            )
        if not isinstance(value, str):
            raise ConfigurationError(f"DB_URL: the TLS option {key} is given more than once")
        options[key] = value
    flags = {key: _flag(key, options[key]) for key in _MYSQL_FLAGS if key in options}
    plain = url.difference_update_query(list(given))
    if not flags.get("ssl", True):
        if len(options) > 1:
            raise ConfigurationError("DB_URL: ssl=false turns TLS off; drop the other ssl_ options")
        return plain, {}
    for key in _MYSQL_FILES:
        if key in options and not Path(options[key]).exists():
            raise ConfigurationError(f"DB_URL: {key}: no such file: {options[key]}")
    if ("ssl_key" in options) != ("ssl_cert" in options):
        raise ConfigurationError("DB_URL: a client certificate needs both ssl_cert and ssl_key")
    context = _mysql_context(options, flags)
    where = f"{url.host or 'localhost'}:{url.port or 3306}"
    return plain, {"ssl": context, "async_creator_fn": _tls_only(where)}


def _flag(key: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigurationError(f"DB_URL: {key} must be true or false (got {value!r})")


def _mysql_context(options: dict[str, str], flags: dict[str, bool]) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(
            cafile=options.get("ssl_ca"), capath=options.get("ssl_capath")
        )
        if not flags.get("ssl_verify_cert", True):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif not flags.get("ssl_verify_identity", flags.get("ssl_check_hostname", True)):
            context.check_hostname = False
        if "ssl_cert" in options:
            context.load_cert_chain(options["ssl_cert"], options["ssl_key"])
        if "ssl_cipher" in options:
            context.set_ciphers(options["ssl_cipher"])
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(f"DB_URL: the TLS options cannot be used: {exc}") from None
    return context


class _NotEncrypted(ConfigurationError):
    """The server did not offer TLS: nothing was sent to it."""


@functools.cache
def _tls_only_connection() -> type[Any]:
    """The aiomysql connection class that will not log in unless the server offers TLS, made
    on first use so that importing this module loads no MySQL client.

    aiomysql calls `_request_authentication` once the server's greeting is read; without this
    check it would send the login in plaintext to a server that does not advertise TLS.
    """
    import aiomysql
    from pymysql.constants import CLIENT  # type: ignore[import-untyped]

    class TlsOnlyConnection(aiomysql.Connection):  # type: ignore[misc]  # aiomysql is untyped
        async def _request_authentication(self) -> None:
            if not self.server_capabilities & CLIENT.SSL:
                raise _NotEncrypted("the server does not offer TLS")
            await super()._request_authentication()

    return TlsOnlyConnection


def _tls_only(where: str) -> Callable[..., Awaitable[Any]]:
    """The function SQLAlchemy's aiomysql dialect calls instead of `aiomysql.connect`."""

    async def connect(**kwargs: Any) -> Any:
        conn = _tls_only_connection()(**kwargs)
        try:
            await conn._connect()
        except _NotEncrypted:
            raise ConfigurationError(
                f"DB_URL asks for TLS (ssl options), but the database server at {where} does "
                "not offer TLS: enable TLS on the server or remove the ssl options"
            ) from None
        except Exception as exc:
            failure = _tls_error(exc)
            if isinstance(failure, ssl.SSLCertVerificationError):
                raise ConfigurationError(
                    f"DB_URL: the TLS certificate of the database server at {where} was "
                    f"refused: {failure.verify_message}; give the CA that signed it with "
                    "?ssl_ca=/path/to/ca.pem (or ssl_verify_cert=false to skip the check)"
                ) from None
            raise
        if getattr(conn, "_secure", False) is not True:
            conn.close()
            raise ConfigurationError(
                f"DB_URL asks for TLS, but the connection to {where} is not encrypted"
            )
        return conn

    return connect


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind `exc`, if there is one."""
    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLError):
            return cause
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# -- Redis ------------------------------------------------------------------------------------

_PROBE_TIMEOUT = 2.0  # seconds for a plaintext server to answer PING


def check_redis_url(dsn: str) -> None:
    """Refuse TLS options (`ssl_*`) on a `redis://` URL: TLS needs `rediss://`."""
    parts = urlsplit(dsn)
    if parts.scheme != "redis":
        return
    for key, _ in parse_qsl(parts.query):
        if key.startswith("ssl"):
            raise ConfigurationError(
                f"REDIS_URL: {key} is a TLS option, but redis:// connects without TLS; "
                "use rediss:// for TLS"
            )


async def redis_tls_failure(
    dsn: str, host: str, port: int, exc: BaseException
) -> ConfigurationError | None:
    """Why connecting to `rediss://` `host:port` failed, when the reason is TLS itself.

    A certificate that does not verify is named as such. When the handshake failed or timed
    out, the server is asked PING in plaintext (no credentials): if it answers, it is a
    plaintext Redis. `None` when neither is the case (the failure may be worth retrying).
    """
    if urlsplit(dsn).scheme != "rediss":
        return None
    where = f"{host}:{port}"
    failure = _tls_error(exc)
    if isinstance(failure, ssl.SSLCertVerificationError):
        return ServerMismatchError(
            f"REDIS_URL: the TLS certificate of the Redis server at {where} was refused: "
            f"{failure.verify_message}; give the CA that signed it with "
            "?ssl_ca_certs=/path/to/ca.pem (or ssl_cert_reqs=none to skip the check)"
        )
    return await redis_plaintext_refusal(dsn, host, port)


async def redis_plaintext_refusal(dsn: str, host: str, port: int) -> ConfigurationError | None:
    """With `rediss://`: the error to stop with when `host:port` answers PING in plaintext (a
    Redis without TLS there), else `None`. Asks without credentials, at most 2 s."""
    if urlsplit(dsn).scheme != "rediss" or not await _speaks_plain_redis(host, port):
        return None
    return ServerMismatchError(
        f"REDIS_URL asks for TLS (rediss://), but the Redis server at {host}:{port} answers in "
        "plaintext: enable TLS on the server (tls-port) or use redis://"
    )


async def _speaks_plain_redis(host: str, port: int) -> bool:
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"PING\r\n")
                await writer.drain()
                reply = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return False
    return reply[:1] in (b"+", b"-")
