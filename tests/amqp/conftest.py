"""The amqp driver tests run on the session's own RabbitMQ node (tests/conftest.py `amqp_url`:
a private node, or the broker TOPIQ_TEST_AMQP_URL names), like every other amqp test.

`tests/amqp/support.py` reads the broker from here: it names none of its own."""

from __future__ import annotations

import pytest

from tests.amqp import support


@pytest.fixture(autouse=True)
def session_broker(amqp_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(support, "AMQP_URL", amqp_url)
    return amqp_url
