"""The tests whose amqp run is not a pass/fail of the driver, by test function name.

AMQP_EXEMPTIONS: a behaviour RabbitMQ 3.10 quorum queues (or the amqp design built on them,
docs/rabbitmq.md) cannot give; the amqp run is skipped and the reason printed. Each reason
says what RabbitMQ lacks, never "fails for now".

AMQP_DEFECTS: a behaviour the driver should give and does not yet; the amqp run is a strict
xfail, so the run fails once it is fixed and the entry must go. Each entry says what goes
wrong.

Applied in tests/conftest.py (pytest_collection_modifyitems) to the items whose `backend` or
`server_backend` parameter is amqp, and to no other.
"""

from __future__ import annotations

AMQP_EXEMPTIONS: dict[str, str] = {}

AMQP_DEFECTS: dict[str, str] = {}
