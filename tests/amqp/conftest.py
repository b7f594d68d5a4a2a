"""The amqp driver tests run on the session's own RabbitMQ node (tests/conftest.py `amqp_url`:
a private node, or the broker TOPIQ_TEST_AMQP_URL names), like every other amqp test.

`tests/amqp/support.py` falls back to a broker at 127.0.0.1:5699 that nothing starts (neither
`scripts/services`, on 5672, nor the suite), so without this most of these tests skipped in
every run."""

from __future__ import annotations

import pytest

from tests.amqp import support


@pytest.fixture(autouse=True)
def session_broker(amqp_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(support, "AMQP_URL", amqp_url)
    return amqp_url
