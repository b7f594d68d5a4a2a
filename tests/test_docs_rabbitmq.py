"""docs/rabbitmq.md says what the code does: its example (docs/examples/rabbitmq_dispatch.py)
dispatches to a real broker and answers None when there is none, its settings table is the
settings' own (names and defaults), its configuration block loads, and the pages that
should point to it do."""

from __future__ import annotations

import logging
import re
import socket

import pytest

from core.queue.queue_manager import QueueManager, set_default_manager
from core.settings import Settings
from core.status import Status
from tests.conftest import ROOT, Backend, docs_example, guide_section, make_settings

pytestmark = [pytest.mark.timeout(60)]

GUIDE = ROOT / "docs" / "rabbitmq.md"
EXAMPLE = "docs/examples/rabbitmq_dispatch.py"
AMQP_FIELDS = sorted(name for name in Settings.model_fields if name.startswith("amqp_"))


def test_the_guide_shows_the_example_verbatim() -> None:
    body = (ROOT / EXAMPLE).read_text().split('"""', 2)[2].strip()
    assert f"```python\n# {EXAMPLE}\n{body}\n```" in GUIDE.read_text()


def table_rows(text: str) -> dict[str, str]:
    """First cell -> second cell of each row of the markdown tables in `text`."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 2 and not cells[0].startswith("---"):
            rows[cells[0]] = cells[1]
    return rows


def shown_default(name: str) -> str:
    value = Settings.model_fields[name].default
    raw = value.get_secret_value() if hasattr(value, "get_secret_value") else value
    raw = getattr(raw, "value", raw)  # an enum: its value
    if raw is None:
        return "empty"
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    return f"`{raw}`"


def test_the_settings_table_is_the_settings() -> None:
    """Every AMQP_* setting is in the guide's table with its real default, and nothing else."""
    rows = table_rows(guide_section("rabbitmq.md", "settings"))
    listed: dict[str, str] = {}
    for first, default in rows.items():
        for name in re.findall(r"`(AMQP_\w+)`", first):
            listed[name.lower()] = default
    assert sorted(listed) == AMQP_FIELDS
    for name in AMQP_FIELDS:
        assert listed[name] == shown_default(name), name


def test_configuration_md_lists_every_amqp_setting_with_its_default() -> None:
    rows = table_rows((ROOT / "docs" / "configuration.md").read_text())
    listed = {
        name.lower(): default
        for first, default in rows.items()
        for name in re.findall(r"`(AMQP_\w+)`", first)
    }
    assert sorted(listed) == AMQP_FIELDS
    for name in AMQP_FIELDS:
        assert listed[name] == shown_default(name), name


def test_the_setup_block_loads_and_chooses_rabbitmq() -> None:
    [block] = re.findall(r"```dotenv\n(.*?)```", guide_section("rabbitmq.md", "setup"), re.S)
    values = {}
    for line in block.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.lower()] = value
    settings = Settings.load(env_file=None, **values)
    assert settings.queue_connection.value == "amqp"
    assert settings.amqp_store.value == "database"
    assert "rabbit.internal:5672" in settings.amqp_url.get_secret_value()


def test_the_guide_is_linked_from_the_queue_and_configuration_pages() -> None:
    for page in ("queue.md", "configuration.md"):
        assert "(rabbitmq.md" in (ROOT / "docs" / page).read_text(), page


async def test_the_example_queues_a_reminder_confirmed_by_the_broker(
    amqp_url: str, redis_url: str
) -> None:
    backend = Backend(
        "amqp",
        {"amqp_url": amqp_url, "amqp_store": "redis", "redis_url": redis_url},
    )
    settings = make_settings(queue_connection="amqp", **backend.overrides)
    async with QueueManager(settings) as manager:
        set_default_manager(manager)
        try:
            handle = await docs_example("rabbitmq_dispatch").remind(7, "Your trial ends soon")
            assert handle is not None
            status = await handle.status()
            assert status.status is Status.SCHEDULED
        finally:
            await handle.cancel() if handle is not None else None
            set_default_manager(None)


async def test_the_example_answers_none_when_the_broker_is_down(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = make_settings(
        queue_connection="amqp",
        amqp_url=f"amqp://topiq:secret@127.0.0.1:{port}/",
        amqp_store="redis",
        redis_url=redis_url,
    )
    manager = QueueManager(settings)
    set_default_manager(manager)
    try:
        with caplog.at_level(logging.WARNING):
            assert await docs_example("rabbitmq_dispatch").remind(7, "Hello") is None
    finally:
        set_default_manager(None)
        await manager.close()
    [message] = [r.getMessage() for r in caplog.records if "not queued" in r.getMessage()]
    assert f"127.0.0.1:{port}" in message
    assert "secret" not in message


#: Each reason of tests/amqp_exemptions.py, and the words of the guide's table row for it.
DOCUMENTED = {
    "PRIORITY": "`priority`",
    "AT_FRONT": "`at_front=True`",
    "REPLACE": '`on_duplicate="replace"`',
    "REDELIVERY_ORDER": "order after a redelivery",
    "GROUPS": "`group`",
    "LIMITS": "rate and concurrency limits",
    "MAX_LENGTH": "bounded queues",
    "BROWSE": "lists of waiting jobs",
    "FROZEN_HOLDER": "a frozen worker",
    "DELAYED_COUNT": "delayed shows 0",
    "RESERVED_COUNT": "reserved counts only what the asking process holds",
    "DEATH_REDELIVERY": "a dead worker's jobs",
    "PRUNE": "`queue:prune`",
    "CLEAR_DELAYED": "`queue:clear`",
    "CANCEL_COUNT": "a cancelled waiting job",
}


def test_every_exemption_of_the_suite_is_a_row_of_the_guide() -> None:
    """A reason the conformance suite gives for skipping a test on amqp is a behaviour the
    guide's table tells users about: a new reason without its row fails here."""
    from tests import amqp_exemptions

    table = guide_section("rabbitmq.md", "differences")
    # "not applicable" marks a test of another connection's internals, not a behaviour.
    reasons = {
        reason
        for reason in amqp_exemptions.AMQP_EXEMPTIONS.values()
        if not reason.startswith("not applicable")
    }
    named = {getattr(amqp_exemptions, constant): words for constant, words in DOCUMENTED.items()}
    assert reasons <= set(named), sorted(reasons - set(named))
    for words in named.values():
        assert words in table, words
