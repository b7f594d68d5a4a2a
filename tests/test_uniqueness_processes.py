"""Job ids and unique keys hold under competing dispatcher processes, on every server driver.

Four real processes push the same job id and the same unique key in each of 50 rounds, released
together at the start of each round (a barrier over their stdin/stdout). Per round, exactly one
job is stored per id and per key; the other pushes name it (duplicate, kept or replaced).

Run as `python -m tests.test_uniqueness_processes QUEUE NAME ROUNDS`, this module is one of
those dispatchers: it talks to the driver directly, settings from the environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.conftest import Backend

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 4
ROUNDS = 50
KEY_RULES = ("reject", "keep", "replace")  # the key job's on_duplicate, by round
ID_RULES = ("reject", "keep")  # the id job's on_duplicate, by round
DISPATCHER = [sys.executable, "-m", "tests.test_uniqueness_processes"]

pytestmark = pytest.mark.timeout(240)


# -- the dispatcher process ---------------------------------------------------------------


async def _dispatch(queue: str, name: str, rounds: int) -> None:
    import orjson

    from core.queue.drivers import OutgoingJob, create_driver
    from core.settings import Settings

    settings = Settings.load(env_file=None)
    async with create_driver(settings.queue_connection, settings) as driver:
        for n in range(rounds):
            print(f"ready {n}", flush=True)
            go = await asyncio.to_thread(sys.stdin.readline)
            if go.strip() != "go":
                raise SystemExit(f"{name}: expected 'go' for round {n}, got {go!r}")
            payload = orjson.dumps({"round": n, "by": name})
            by_id = OutgoingJob(
                f"id-{n}",
                queue,
                payload,
                job="tests.jobs:RecordJob",
                check_id=True,
                on_duplicate=ID_RULES[n % len(ID_RULES)],  # type: ignore[arg-type]
            )
            by_key = OutgoingJob(
                uuid.uuid4().hex,
                queue,
                payload,
                job="tests.jobs:RecordJob",
                unique_key=f"key-{n}",
                on_duplicate=KEY_RULES[n % len(KEY_RULES)],  # type: ignore[arg-type]
            )
            began = time.time()
            pushed_id, pushed_key = await driver.push([by_id, by_key])
            result = {
                "round": n,
                "push": [began, time.time()],
                "id": [pushed_id.id, pushed_id.outcome],
                "key": [pushed_key.id, pushed_key.outcome, by_key.id],
            }
            print(json.dumps(result), flush=True)


# -- the test ------------------------------------------------------------------------------


def _line(out: IO[str], proc: subprocess.Popen[str], log: Path) -> str:
    line = out.readline()
    if not line:
        proc.wait(10)
        raise AssertionError(f"dispatcher exited ({proc.returncode}): {log.read_text()}")
    return line.strip()


def _race(backend: Backend, queue: str, logs: Path) -> list[list[dict[str, Any]]]:
    """Run the dispatchers; per round, what each of them was told."""
    env = {**os.environ, **backend.env(), "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[str]] = []
    paths = [logs / f"dispatcher-{i}.log" for i in range(PROCESSES)]
    try:
        for i, path in enumerate(paths):
            with open(path, "w") as err:
                procs.append(
                    subprocess.Popen(
                        [*DISPATCHER, queue, f"d{i}", str(ROUNDS)],
                        cwd=ROOT,
                        env=env,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=err,
                        text=True,
                    )
                )
        rounds: list[list[dict[str, Any]]] = []
        for n in range(ROUNDS):
            for proc, path in zip(procs, paths, strict=True):
                assert proc.stdout is not None
                assert _line(proc.stdout, proc, path) == f"ready {n}"
            for proc in procs:  # every dispatcher is waiting: release them together
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            told = []
            for proc, path in zip(procs, paths, strict=True):
                assert proc.stdout is not None
                told.append(json.loads(_line(proc.stdout, proc, path)))
            rounds.append(told)
        for proc in procs:
            assert proc.wait(30) == 0
        return rounds
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()


def _overlap(spans: list[list[float]]) -> bool:
    """Whether at least two of these pushes ran at the same time."""
    ended = -1.0
    for began, end in sorted(spans):
        if began < ended:
            return True
        ended = max(ended, end)
    return False


async def test_one_job_per_id_and_per_key_under_four_dispatchers(
    server_backend: Backend, tmp_path: Path
) -> None:
    from core.queue.drivers import create_driver

    queue = str(server_backend.overrides["queue_default"])
    rounds = await asyncio.to_thread(_race, server_backend, queue, tmp_path)

    overlapping = sum(1 for told in rounds if _overlap([entry["push"] for entry in told]))
    # The test means something only if the dispatchers did race.
    assert overlapping >= ROUNDS // 2, f"pushes overlapped in only {overlapping}/{ROUNDS} rounds"
    for n, told in enumerate(rounds):
        # The id: one dispatcher created it, the others were told it is there.
        ids = [entry["id"] for entry in told]
        assert all(job_id == f"id-{n}" for job_id, _ in ids), (n, ids)
        outcomes = sorted(outcome for _, outcome in ids)
        expected_dup = "duplicate" if ID_RULES[n % len(ID_RULES)] == "reject" else "kept"
        assert outcomes == sorted(["created"] + [expected_dup] * (PROCESSES - 1)), (n, ids)
        # The key: one dispatcher's job holds it, the others name that holder.
        keys = [entry["key"] for entry in told]
        created = [own for holder, outcome, own in keys if outcome == "created"]
        assert len(created) == 1, (n, keys)
        [holder] = created
        rule = KEY_RULES[n % len(KEY_RULES)]
        expected = {"reject": "duplicate", "keep": "kept", "replace": "replaced"}[rule]
        for named, outcome, own in keys:
            assert named == holder, (n, keys)
            if own != holder:
                assert outcome == expected, (n, keys)

    async with create_driver(server_backend.connection, server_backend.settings()) as driver:
        assert await driver.size(queue) == 2 * ROUNDS
        stored = await driver.reserve([queue], 10 * ROUNDS, lease=60)
    assert len(stored) == 2 * ROUNDS
    stored_ids = [job.id for job in stored]
    assert len(set(stored_ids)) == 2 * ROUNDS
    holders = {
        entry["key"][0]: n for n, told in enumerate(rounds) for entry in told
    }  # key holder -> its round
    assert sorted(i for i in stored_ids if i.startswith("id-")) == sorted(
        f"id-{n}" for n in range(ROUNDS)
    )
    assert sorted(i for i in stored_ids if not i.startswith("id-")) == sorted(holders)
    for job in stored:
        payload = json.loads(job.payload)
        expected_round = int(job.id[3:]) if job.id.startswith("id-") else holders[job.id]
        assert payload["round"] == expected_round, (job.id, payload)


if __name__ == "__main__":
    asyncio.run(_dispatch(sys.argv[1], sys.argv[2], int(sys.argv[3])))
