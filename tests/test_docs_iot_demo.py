"""docs/iot.md, section "The demo": the route it shows is app/routes.py's as it is, and the
log lines it shows have the form `python main.py --demo` writes (tests/mqtt/test_serve.py runs
the demo and checks its counts)."""

from __future__ import annotations

import re

from tests.conftest import ROOT, guide_section

GUIDE = ROOT / "docs" / "iot.md"


def section() -> str:
    return guide_section("iot.md", "demo")


def test_the_demo_section_shows_the_example_app_s_routes_verbatim() -> None:
    [code] = re.findall(r"```python\n(.*?)```", section(), re.S)
    routes = (ROOT / "app" / "routes.py").read_text()
    chunks = [chunk.strip() for chunk in code.split("\n\n\n")]
    assert len(chunks) == 2
    for chunk in chunks:
        assert chunk in routes, f"app/routes.py no longer has:\n{chunk}"


def test_the_demo_section_s_log_lines_have_the_demo_s_form() -> None:
    [shown] = re.findall(r"```\n(INFO .*?)```", section(), re.S)
    lines = shown.strip().splitlines()
    assert len(lines) == 2
    form = re.compile(
        r"INFO topiq\.serve devices/sim-\d/status: job UpdateDeviceStateJob succeeded, "
        r"state #\d+( \(#\d+\.\.#\d+ coalesced into it\))?$"
    )
    for line in lines:
        assert form.match(line), line
