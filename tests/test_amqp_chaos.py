"""RabbitMQ restarted under load (issue #18 §4): durable quorum queues, nothing lost.

Two dispatcher processes push jobs continuously (tests/failover_dispatch.py: one
`QueueManager` each for its whole life) and two worker processes run them, all on a private
RabbitMQ node of the test's own. The node is stopped (cleanly, or with kill -9), left down
until each dispatcher has seen a dispatch refused, and started again on the same data folder.
The same processes carry on by themselves (no restart, no new manager).

Afterwards: every job whose dispatch returned ran at least once (loss: zero, asserted, since a
dispatch returns only once the broker confirmed the message to a quorum queue, which
survives the node's restart); jobs run more than once are counted and reported (a worker's
unacknowledged deliveries come back after the restart: at-least-once). Each dispatch made
while the node was down raised ConnectionLostError naming the broker; none raised anything
else, none returned. Set TOPIQ_FAILOVER_REPORT=<file> to collect the figures.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ON_CI
from tests.failover_dispatch import report
from tests.jobs import events
from tests.processes import ROOT, WorkerProcess, wait_until
from tests.servers import PrivateRabbit, start_rabbitmq

pytestmark = [pytest.mark.process, pytest.mark.timeout(300)]

QUEUE = "chaos"


@pytest.fixture
def rabbit() -> Iterator[PrivateRabbit]:
    started = start_rabbitmq()
    if started is None:
        message = "rabbitmq-server is not installed; `scripts/services up` installs it"
        if ON_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield started
    finally:
        started.stop()


class Dispatcher:
    """`python -m tests.failover_dispatch OUT chaos`: its outcomes in OUT/dispatch.jsonl, its
    jobs' runs in OUT/runs.jsonl."""

    def __init__(self, out: Path, env: dict[str, str]) -> None:
        out.mkdir()
        self.out = out
        self._log = (out / "dispatcher.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.failover_dispatch", str(out), QUEUE, "0.01"],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def events(self, kind: str) -> list[dict[str, object]]:
        return events(self.out / "dispatch.jsonl", kind)

    def acked(self) -> dict[int, float]:
        return {int(str(e["n"])): float(str(e["t"])) for e in self.events("acked")}

    def runs(self) -> Counter[int]:
        return Counter(int(str(e["n"])) for e in events(self.out / "runs.jsonl", "run"))

    def lost(self) -> list[int]:
        return sorted(set(self.acked()) - set(self.runs()))

    def output(self) -> str:
        return (self.out / "dispatcher.log").read_text(errors="replace")

    def stop(self) -> None:
        (self.out / "stop").touch()
        if self.proc.poll() is None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def env_of(rabbit: PrivateRabbit, redis_url: str) -> dict[str, str]:
    return {
        "QUEUE_CONNECTION": "amqp",
        "AMQP_URL": rabbit.url,
        "AMQP_PREFIX": f"chaos{uuid.uuid4().hex[:6]}",
        "AMQP_STORE": "redis",
        "REDIS_URL": redis_url,
        "QUEUE_ALLOWED_MODULES": "app.,tests.",
        "QUEUE_LEASE_MARGIN": "2",
        "WORKER_SLEEP": "0.05",
        "LOG_LEVEL": "INFO",
    }


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_rabbitmq_restarted_under_load_loses_no_dispatched_job(
    rabbit: PrivateRabbit, redis_url: str, how: str, tmp_path: Path
) -> None:
    env = env_of(rabbit, redis_url)
    dispatchers = [Dispatcher(tmp_path / f"d{i}", env) for i in range(2)]
    args = ["--queue", QUEUE, "--concurrency", "4", "--timeout", "10"]
    procs = [WorkerProcess(args, env, tmp_path / f"worker-{i}.log") for i in range(2)]

    def ran() -> int:
        return sum(len(d.runs()) for d in dispatchers)

    try:
        wait_until(lambda: ran() >= 200, 90, "200 jobs to run before the restart")
        down = time.time()
        if how == "kill":
            rabbit.kill()
        else:
            rabbit.stop()
        # Down until each dispatcher has had a dispatch refused (ConnectionLostError).
        wait_until(
            lambda: all(
                any(float(str(e["t"])) > down for e in d.events("failed")) for d in dispatchers
            ),
            60,
            "a dispatch to each dispatcher to be refused while the broker is down",
        )
        rabbit.start()
        up = time.time()
        # The same processes carry on: dispatches are confirmed again, and jobs dispatched
        # after the restart run.
        wait_until(
            lambda: all(sum(t > up for t in d.acked().values()) >= 50 for d in dispatchers),
            60,
            "dispatches to be confirmed again after the restart",
        )
        wait_until(
            lambda: all(
                any(d.acked()[n] > up for n in d.runs() if n in d.acked()) for d in dispatchers
            ),
            60,
            "the workers to run jobs dispatched after the restart",
        )
        for d in dispatchers:
            d.stop()
        with contextlib.suppress(AssertionError):  # the figures below say which were lost
            wait_until(lambda: not any(d.lost() for d in dispatchers), 90, "every job to run")
        for proc in procs:
            assert proc.proc.poll() is None, proc.output[-3000:]
            proc.signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(30) == 0, proc.output[-3000:]
        refused = [e for d in dispatchers for e in d.events("failed")]
        figures: dict[str, object] = {
            "how": how,
            "acked": sum(len(d.acked()) for d in dispatchers),
            "refused": len(refused),
            "errors": [e["error"] for d in dispatchers for e in d.events("error")][:3],
            "ran": ran(),
            "lost": [n for d in dispatchers for n in d.lost()],
            "repeated": sum(c - 1 for d in dispatchers for c in d.runs().values() if c > 1),
            "down_s": round(up - down, 1),
        }
        report(f"rabbitmq {how} under load", figures)
        assert figures["lost"] == [], figures
        assert figures["errors"] == [], figures
        for d in dispatchers:  # each ran to its stop file: no exception escaped a dispatch
            assert d.proc.returncode == 0 and d.events("stopped"), d.output()[-3000:]
            # The outage is told in a line per loss and reconnection, not library tracebacks.
            assert "Traceback" not in d.output(), d.output()[-3000:]
        for proc in procs:
            assert "upkeep failed" not in proc.output, proc.output[-3000:]
        # Refused while down, with an error naming the broker (its password redacted).
        assert refused, figures
        where = f"127.0.0.1:{rabbit.port}"
        assert all(where in str(e["error"]) for e in refused), refused[:3]
        assert all("guest:guest" not in str(e["error"]) for e in refused), refused[:3]
    except BaseException:
        for d in dispatchers:
            print(d.output()[-3000:])
        for proc in procs:
            print(proc.output[-3000:])
        raise
    finally:
        for d in dispatchers:
            d.stop()
        for proc in procs:
            proc.stop()
