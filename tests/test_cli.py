"""The command line: help lists everything, flags are checked, the seed's form works."""

from __future__ import annotations

import pytest

from core.cli import COMMANDS, _normalise, main

pytestmark = pytest.mark.timeout(60)


def test_help_lists_every_command_and_worker_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    for flag in (
        "--queue",
        "--connection",
        "--max-jobs",
        "--max-time",
        "--sleep",
        "--max-tries",
        "--timeout",
        "--concurrency",
        "--grace",
        "--stop-when-empty",
    ):
        assert flag in out


def test_seed_flag_form_is_queue_work() -> None:
    assert _normalise(["--queue-work", "--queue", "emails"]) == ["queue:work", "--queue", "emails"]
    assert _normalise(["--env-file", "x", "--queue-work"]) == ["--env-file", "x", "queue:work"]


def test_no_command_means_serve() -> None:
    assert _normalise([]) == ["serve"]
    assert _normalise(["--demo"]) == ["serve", "--demo"]
    assert _normalise(["--env-file", "x", "--demo"]) == ["--env-file", "x", "serve", "--demo"]
    assert _normalise(["queue:stats"]) == ["queue:stats"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-jobs", "0"], "--max-jobs: must be at least 1"),
        (["--sleep", "soon"], "--sleep: expected a number of seconds"),
        (["--concurrency", "-2"], "--concurrency: must be at least 1"),
    ],
)
def test_bad_worker_flags_are_named(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--queue-work", *flags])
    assert done.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_connection_flag_is_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")
    assert main(["queue:work", "--connection", "kafka"]) == 2
    assert "unknown queue connection 'kafka'" in capsys.readouterr().err
