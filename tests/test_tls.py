"""TLS that a setting asks for is TLS, or the program stops (issue 10, point 11).

Real servers with a throwaway CA (tests/tls.py): a job is dispatched and run over TLS on Redis
and MariaDB, and an app receives a device's message over TLS from Mosquitto; TLS asked of a
server without it stops a worker at start with a line naming the variable (the MQTT app says so
and never connects in plaintext); a certificate that the configured CA (by default the system's)
did not sign is refused unless verification is explicitly turned off.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
from sqlalchemy import text

from core.errors import ConfigurationError
from core.queue.drivers.database import DatabaseDriver
from core.queue.drivers.redis import RedisDriver
from core.queue.drivers.sql_migrations import create_engine
from core.queue.queue_manager import QueueManager
from tests.conftest import ON_CI, make_settings
from tests.jobs import RecordJob, events
from tests.mqtt.conftest import AppProcess, Broker, MosquittoSub, mosquitto_pub
from tests.processes import WorkerProcess
from tests.tls import TlsServers, missing_tools, tls_servers

pytestmark = [pytest.mark.process, pytest.mark.timeout(90)]

DATABASE = "topiq_tls"


@pytest.fixture(scope="module")
def servers() -> TlsServers:
    """Redis, Mosquitto and MariaDB with TLS, and their plaintext counterparts."""
    missing = missing_tools()
    if missing:
        message = f"TLS tests need {', '.join(missing)}; `scripts/services up` installs them"
        if ON_CI:
            pytest.fail(message)
        pytest.skip(message)
    found = tls_servers()
    for port in (found.mysql_tls, found.mysql_plain):
        conn = pymysql.connect(host="127.0.0.1", port=port, user="root", autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE IF NOT EXISTS `{DATABASE}`")
        finally:
            conn.close()
    return found


def _env(**values: str) -> dict[str, str]:
    """A worker's environment: this one without any Topiq setting, plus `values`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MQTT_", "QUEUE_", "DB_", "REDIS_", "WORKER_", "ENABLE_"))
    }
    env.update(
        PYTHONUNBUFFERED="1",
        QUEUE_ALLOWED_MODULES="app.,tests.",
        WORKER_SLEEP="0.05",
        LOG_LEVEL="INFO",
    )
    env.update(values)
    return env


@pytest.fixture(autouse=True)
def _collected() -> Iterator[None]:
    """A socket or transport a test leaves open warns (an error here) in that test, not later."""
    yield
    gc.collect()


@pytest.fixture
def queue() -> str:
    return f"tls-{uuid.uuid4().hex[:10]}"


def _redis_url(port: int, query: str = "") -> str:
    return f"rediss://127.0.0.1:{port}/0" + (f"?{query}" if query else "")


def _mysql_url(port: int, query: str) -> str:
    return f"mysql+aiomysql://topiq@127.0.0.1:{port}/{DATABASE}?{query}"


async def _dispatch_and_work(env: dict[str, str], queue: str, tmp_path: Path) -> list[Any]:
    """Dispatch two jobs with these settings, then run a worker process until the queue is
    empty; returns what the jobs recorded."""
    log = str(tmp_path / "jobs.log")
    overrides = {key.lower(): value for key, value in env.items() if key in _SETTINGS}
    settings = make_settings(**overrides, queue_default=queue)
    async with QueueManager(settings) as manager:
        await manager.bulk([RecordJob(log, n=1), RecordJob(log, n=2)])
    worker = WorkerProcess(["--stop-when-empty"], env, tmp_path / "worker.log")
    try:
        code = worker.wait(60)
    finally:
        worker.stop()
    assert code == 0, worker.output
    return sorted(event["n"] for event in events(log, "run"))


_SETTINGS = ("QUEUE_CONNECTION", "REDIS_URL", "DB_URL")


def _refused_at_start(env: dict[str, str], tmp_path: Path) -> tuple[str, float]:
    """Start a worker that must stop at once: its output and how long it took."""
    started = time.monotonic()
    worker = WorkerProcess([], env, tmp_path / "worker.log")
    try:
        code = worker.wait(30)
    finally:
        worker.stop()
    assert code == 2, worker.output
    return worker.output, time.monotonic() - started


# -- Redis --------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_a_job_is_dispatched_and_run_over_tls_on_redis(
    servers: TlsServers, queue: str, tmp_path: Path
) -> None:
    # The TLS port speaks only TLS: the jobs went through it encrypted or not at all.
    url = _redis_url(servers.redis_tls, f"ssl_ca_certs={servers.certs.ca}")
    env = _env(QUEUE_CONNECTION="redis", REDIS_URL=url, QUEUE_DEFAULT=queue)
    assert await _dispatch_and_work(env, queue, tmp_path) == [1, 2]


@pytest.mark.redis
def test_rediss_against_a_plaintext_redis_stops_the_worker_naming_redis_url(
    servers: TlsServers, tmp_path: Path
) -> None:
    url = _redis_url(servers.redis_plain, f"ssl_ca_certs={servers.certs.ca}")
    output, took = _refused_at_start(_env(QUEUE_CONNECTION="redis", REDIS_URL=url), tmp_path)
    assert (
        f"topiq: REDIS_URL asks for TLS (rediss://), but the Redis server at "
        f"127.0.0.1:{servers.redis_plain} answers in plaintext"
    ) in output
    assert took < 20  # the handshake times out after redis-py's 5 s, then one probe


@pytest.mark.redis
@pytest.mark.parametrize("trusted", ["system", "other"])
async def test_redis_tls_verifies_the_certificate_unless_told_not_to(
    servers: TlsServers, trusted: str
) -> None:
    query = "" if trusted == "system" else f"ssl_ca_certs={servers.certs.other_ca}"
    driver = RedisDriver("redis", make_settings(redis_url=_redis_url(servers.redis_tls, query)))
    with pytest.raises(ConfigurationError) as refused:
        await driver.open()
    assert str(refused.value).startswith(
        f"REDIS_URL: the TLS certificate of the Redis server at 127.0.0.1:{servers.redis_tls} "
        "was refused: self-signed certificate in certificate chain"
    )
    # Only an explicit choice skips the check.
    insecure = _redis_url(servers.redis_tls, "ssl_cert_reqs=none")
    driver = RedisDriver("redis", make_settings(redis_url=insecure))
    await driver.open()
    try:
        assert await driver.client.ping()
    finally:
        await driver.close()


async def test_tls_options_on_a_redis_url_without_tls_are_refused() -> None:
    settings = make_settings(redis_url="redis://127.0.0.1:1/0?ssl_ca_certs=/tmp/ca.pem")
    with pytest.raises(ConfigurationError, match=r"^REDIS_URL: ssl_ca_certs is a TLS option"):
        await RedisDriver("redis", settings).open()


# -- MariaDB ------------------------------------------------------------------------------------


async def _ssl_cipher(url: str) -> str:
    """The cipher of a connection made the way the database driver makes them ('' = none)."""
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(text("SHOW SESSION STATUS LIKE 'Ssl_cipher'"))).one()
            stream = (await conn.get_raw_connection()).driver_connection._reader
    finally:
        await engine.dispose()
    # A TLS connection is closed for good only once both sides said so (close_notify), a moment
    # after `dispose` returns: see it through, or the test's loop may end with the socket open.
    with contextlib.suppress(ConnectionResetError):  # the server may reset instead
        await asyncio.wait_for(stream.read(), 10)
    return str(row[1])


@pytest.mark.mysql
async def test_a_job_is_dispatched_and_run_over_tls_on_mariadb(
    servers: TlsServers, queue: str, tmp_path: Path
) -> None:
    url = _mysql_url(servers.mysql_tls, f"ssl_ca={servers.certs.ca}")
    # A MariaDB with TLS also takes plaintext logins: see that ours are encrypted.
    assert await _ssl_cipher(url) != ""
    assert await _ssl_cipher(_mysql_url(servers.mysql_tls, "charset=utf8mb4")) == ""
    env = _env(QUEUE_CONNECTION="database", DB_URL=url, QUEUE_DEFAULT=queue)
    assert await _dispatch_and_work(env, queue, tmp_path) == [1, 2]


@pytest.mark.mysql
def test_ssl_ca_against_a_mariadb_without_tls_stops_the_worker_naming_db_url(
    servers: TlsServers, tmp_path: Path
) -> None:
    url = _mysql_url(servers.mysql_plain, f"ssl_ca={servers.certs.ca}")
    output, took = _refused_at_start(_env(QUEUE_CONNECTION="database", DB_URL=url), tmp_path)
    assert (
        "topiq: DB_URL asks for TLS (ssl options), but the database server at "
        f"127.0.0.1:{servers.mysql_plain} does not offer TLS"
    ) in output
    assert took < 15


@pytest.mark.mysql
@pytest.mark.parametrize("trusted", ["system", "other"])
async def test_mariadb_tls_verifies_the_certificate_unless_told_not_to(
    servers: TlsServers, trusted: str
) -> None:
    query = "ssl=true" if trusted == "system" else f"ssl_ca={servers.certs.other_ca}"
    url = _mysql_url(servers.mysql_tls, query)
    driver = DatabaseDriver("database", make_settings(db_url=url))
    with pytest.raises(ConfigurationError) as refused:
        await driver.open()
    assert str(refused.value).startswith(
        f"DB_URL: the TLS certificate of the database server at 127.0.0.1:{servers.mysql_tls} "
        "was refused: self-signed certificate in certificate chain"
    )
    # Only an explicit choice skips the check; the connection is still encrypted.
    assert await _ssl_cipher(_mysql_url(servers.mysql_tls, "ssl_verify_cert=false")) != ""


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("ssl_cafile=/x.pem", r"^DB_URL: unknown TLS option 'ssl_cafile'; the options are ssl, "),
        ("ssl_ca=/nonexistent/ca.pem", r"^DB_URL: ssl_ca: no such file: /nonexistent/ca.pem$"),
        ("ssl=maybe", r"^DB_URL: ssl must be true or false \(got 'maybe'\)$"),
        ("ssl_cert=/etc/hostname", r"^DB_URL: a client certificate needs both ssl_cert and"),
    ],
)
def test_wrong_tls_options_in_db_url_are_refused(query: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        create_engine(f"mysql+aiomysql://u:secret@127.0.0.1:1/db?{query}")


# -- Mosquitto ----------------------------------------------------------------------------------


@pytest.fixture
def tls_broker(servers: TlsServers) -> Broker:
    return Broker("127.0.0.1", servers.mqtt_tls)


@pytest.mark.mqtt
async def test_the_app_receives_over_tls_and_the_job_publishes_over_tls(
    servers: TlsServers, tls_broker: Broker, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:10]
    device = ["--cafile", str(servers.certs.ca)]
    env = _env(
        MQTT_URL=f"mqtts://127.0.0.1:{servers.mqtt_tls}",
        MQTT_TLS_CA=str(servers.certs.ca),
        MQTT_CLEAN_SESSION="true",
        MQTT_CLIENT_ID=f"topiq-test-tls-{run}",
        QUEUE_CONNECTION="database",
        DB_URL=f"sqlite+aiosqlite:///{tmp_path}/queue.sqlite3",
    )
    app = await AppProcess(["serve", "--app", "tests.mqtt.apps:flow"], env).start()
    worker = await AppProcess(["queue:work"], env).start()  # publishes on its own connection
    try:
        await app.wait_for_line(f"connected to the MQTT broker at 127.0.0.1:{servers.mqtt_tls}")
        async with MosquittoSub(tls_broker, f"topiq-test/{run}/results/+", extra=device) as sub:
            await mosquitto_pub(
                tls_broker, f"topiq-test/{run}/devices/d-1/reading", '{"celsius": 19}', extra=device
            )
            try:
                [(topic, payload)] = await sub.receive(1, timeout=30)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\napp:\n{app.log}\nworker:\n{worker.log}") from None
    finally:
        app_code = await app.stop()
        worker_code = await worker.stop()
    assert topic == f"topiq-test/{run}/results/d-1"
    assert json.loads(payload)["reading"] == {"celsius": 19}
    assert (app_code, worker_code) == (0, 0), app.log + worker.log


@pytest.mark.mqtt
@pytest.mark.parametrize("broker_side", ["plaintext port", "certificate from another CA"])
async def test_mqtt_tls_that_cannot_be_had_never_connects_and_says_why(
    servers: TlsServers, broker_side: str
) -> None:
    plaintext = broker_side == "plaintext port"
    port = servers.mqtt_plain if plaintext else servers.mqtt_tls
    ca = servers.certs.ca if plaintext else servers.certs.other_ca
    env = _env(MQTT_URL=f"mqtts://127.0.0.1:{port}", MQTT_TLS_CA=str(ca), QUEUE_CONNECTION="memory")
    app = await AppProcess(["serve", "--app", "tests.mqtt.apps:flow"], env).start()
    try:
        line = await app.wait_for_line("cannot reach the MQTT broker")
    finally:
        code = await app.stop()
    assert f"at 127.0.0.1:{port} (" in line
    assert "check MQTT_URL" in line
    assert "TLS is on (mqtts:// or MQTT_TLS)" in line
    if not plaintext:
        assert "CERTIFICATE_VERIFY_FAILED" in line
    assert "connected to the MQTT broker" not in app.log
    assert code == 0, app.log
