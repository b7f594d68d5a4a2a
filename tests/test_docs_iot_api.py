"""docs/iot.md, sections "Per-device ordering: groups", "Latest-value coalescing" and "Bounded
queues", runs as written: each section's example lives in docs/examples/iot_<name>.py, the
guide shows it verbatim, and the output the guide prints under it is what the example returns
(on the memory connection)."""

from __future__ import annotations

import pytest

from core.mqtt import Router
from tests.conftest import ROOT, docs_example, guide_section

pytestmark = [pytest.mark.timeout(60)]

EXAMPLES = ("groups", "coalescing", "bounded")
GUIDE = ROOT / "docs" / "iot.md"
SECTIONS = {
    "groups": "Per-device ordering: groups",
    "coalescing": "Latest-value coalescing",
    "bounded": "Bounded queues",
}


def section(name: str) -> str:
    """The guide's text between the section's markers."""
    return guide_section("iot.md", name)


def shown_output(name: str) -> list[str]:
    """The lines the guide prints under the example (the ```text block after it)."""
    after = section(name).split(f"# docs/examples/iot_{name}.py", 1)[1]
    return after.split("```text\n", 1)[1].split("\n```", 1)[0].splitlines()


def test_each_section_shows_its_example_verbatim_and_says_where_it_is() -> None:
    for name in EXAMPLES:
        path = f"docs/examples/iot_{name}.py"
        body = (ROOT / path).read_text().split('"""', 2)[2].strip()
        text = section(name)
        assert f"\n## {SECTIONS[name]}\n" in text
        assert body in text, f"docs/iot.md does not show {path} as it is"
        assert f"`{path}`" in text or f"# {path}" in text


@pytest.mark.parametrize("name", EXAMPLES)
async def test_the_example_prints_what_the_guide_shows(name: str) -> None:
    module = docs_example(f"iot_{name}")
    assert await module.main() == shown_output(name)


@pytest.mark.parametrize("name", ["groups", "coalescing"])
def test_the_route_the_example_declares_carries_its_option(name: str) -> None:
    router: Router = docs_example(f"iot_{name}").router
    [route] = router.routes
    group, coalesce, _ = route.job_options({"device_id": "d-7"})
    assert (group if name == "groups" else coalesce) == "d-7"


def test_the_rules_a_user_must_know_are_in_the_guide() -> None:
    groups, coalescing, bounded = (section(name) for name in EXAMPLES)
    for rule in (
        "Retries keep the turn",
        "The turn passes when the job ends",
        "Groups are served fairly",
        "A dead worker does not block its group",
        "`depends_on`",
        "`priority` and `at_front` order the jobs in turn",
    ):
        assert rule in groups
    assert "at most\n  one more waits" in coalescing
    assert "`coalesced`" in coalescing
    for rule in ('"reject"', '"drop_oldest"', "QueueFullError", "QUEUE_MAX_LENGTHS", "`dropped`"):
        assert rule in bounded
