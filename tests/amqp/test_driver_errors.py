"""The amqp driver's errors: each names what is wrong, and the password never shows."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from core.errors import ConfigurationError, ConnectionLostError, DriverError
from core.queue.drivers.amqp import AmqpDriver
from core.queue.drivers.base import Limit, OutgoingJob
from tests.amqp import support
from tests.amqp.support import amqp_settings, new_queue, opened, require_broker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_password(url: str, password: str) -> str:
    scheme, _, rest = url.partition("://")
    user = rest.partition("@")[0].partition(":")[0]
    return f"{scheme}://{user}:{password}@{rest.partition('@')[2]}"


async def test_wrong_credentials_are_a_configuration_error(tmp_path: Path) -> None:
    require_broker()
    url = with_password(support.AMQP_URL, "not-the-password")
    driver = AmqpDriver("amqp", amqp_settings(tmp_path, amqp_url=url))
    with pytest.raises(ConfigurationError, match="AMQP_URL") as caught:
        await driver.open()
    assert "not-the-password" not in str(caught.value)
    assert "user name or password" in str(caught.value)


async def test_nothing_listening_is_a_lost_connection_naming_the_url(tmp_path: Path) -> None:
    port = free_port()
    url = f"amqp://guest:s3cret@127.0.0.1:{port}/"
    driver = AmqpDriver("amqp", amqp_settings(tmp_path, amqp_url=url))
    with pytest.raises(ConnectionLostError, match=f"127.0.0.1:{port}") as caught:
        await driver.open()
    assert "s3cret" not in str(caught.value)


async def test_amqps_to_a_plaintext_broker_never_falls_back(tmp_path: Path) -> None:
    require_broker()
    url = support.AMQP_URL.replace("amqp://", "amqps://", 1)
    driver = AmqpDriver("amqp", amqp_settings(tmp_path, amqp_url=url))
    with pytest.raises(ConnectionLostError, match="unreachable"):
        await driver.open()


async def test_tls_files_with_a_plaintext_url_are_refused(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate")
    driver = AmqpDriver("amqp", amqp_settings(tmp_path, amqp_tls_ca=ca))
    with pytest.raises(ConfigurationError, match="amqps://"):
        await driver.open()


async def test_what_quorum_queues_cannot_give_is_refused_by_name(tmp_path: Path) -> None:
    queue = new_queue()
    async with opened(tmp_path) as driver:
        with pytest.raises(DriverError, match="group"):
            await driver.push([OutgoingJob("g1", queue, b"x", group="g")])
        with pytest.raises(DriverError, match="rate and concurrency limits"):
            await driver.push([OutgoingJob("l1", queue, b"x", limit=Limit("k", concurrency=1))])
        assert await driver.job_status("g1") is None  # nothing stored


async def test_an_unopened_driver_says_so(tmp_path: Path) -> None:
    driver = AmqpDriver("amqp", amqp_settings(tmp_path))
    with pytest.raises(DriverError, match="not open"):
        await driver.push([OutgoingJob("u1", new_queue(), b"x")])
