"""The benchmark harness in smoke mode (tiny sizes, one run), so it cannot rot unnoticed.

It never downloads: Topiq runs from bench/.venv/topiq or this environment, and the peers of
W8's result round trip (SAQ and arq) join only when their environments were already built by
a full `bench/run`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import envs

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_smoke(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        pytest.skip("redis-server is not installed (scripts/services up installs it)")
    peers = [name for name in ("saq", "arq") if envs.ready(name)]
    report = tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--peers",
            ",".join(peers),
            "--output",
            str(report),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = report.read_text()
    assert "bench:begin" in text
    assert "bench:end" in text
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if "|" in line}
    for workload in ("W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "W9"):
        assert any(label.startswith(workload) for label in rows), f"no {workload} row"
    number = re.compile(r"^[\d,.]+$")
    # Topiq's own Redis figures must be measured, not n/a (its column comes first).
    for label in (
        "W1 enqueue, bulk API",
        "W2 no-op jobs",
        "W3 sleep",
        "W4 dispatch",
        "W6 MQTT publish",  # the probe wraps the worker: a changed signature must show here
        "W2 no-op jobs, results not kept",  # result_ttl=0
        "W2 results kept (default) / not kept",
        "W2g no-op jobs, 1,000 device groups",  # `group` through a real worker
        "W8 dispatch → await result, p50",  # `await handle.result()` across processes
        "W8 dispatch → await result, p99",
        "W2x2 no-op jobs, 2 worker processes",  # `queue:work --processes 2`, a real pool
        "W8p dispatch → await result",  # W8 with the peers polling every 10 ms
        "W7 worker RSS growth",  # its own budget: measured, not cut short
        # Recovery: a worker killed with SIGKILL, a Redis (AOF) killed with SIGKILL.
        "W9 worker SIGKILL mid-run: jobs in flight",
        "W9 worker SIGKILL: kill → every in-flight job running again",
        "W9 worker SIGKILL: jobs lost",
        "W9 worker SIGKILL: jobs run twice",
        "W9r Redis kill -9: kill → restarted server answering",
        "W9r Redis kill -9: kill → in-flight jobs settled, queue moving",
        "W9r Redis kill -9: jobs lost",
        "W9r Redis kill -9: jobs run twice",
    ):
        row = next(line for name, line in rows.items() if name.startswith(label))
        topiq = row.split(" | ")[2].strip()
        assert number.match(topiq), row
    # Nothing is lost when a worker or the Redis under it is killed (Topiq's column).
    for label in ("W9 worker SIGKILL: jobs lost", "W9r Redis kill -9: jobs lost"):
        row = next(line for name, line in rows.items() if name.startswith(label))
        assert row.split(" | ")[2].strip() == "0", row
    # The peers' round trips are measured too (their columns follow Topiq's, in order).
    head = next(line for name, line in rows.items() if name == "Workload").split(" | ")
    w8 = next(line for name, line in rows.items() if name.startswith("W8 dispatch")).split(" | ")
    for name, shown in (("saq", "SAQ"), ("arq", "arq")):
        if name in peers:
            cell = w8[head.index(shown)].strip()
            assert number.match(cell.split("[")[0]), f"{shown}'s W8: {cell}"


@pytest.mark.slow
@pytest.mark.timeout(170)
def test_bench_scaling_smoke(tmp_path: Path) -> None:
    """`bench/run --only scaling --smoke`: W2 with 1, 2 and 4 worker processes on one Redis,
    on a private Redis Cluster with one queue and with three queues on three primaries, every
    figure measured, the core count in the header, written as its own section."""
    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        pytest.skip("redis-server is not installed (scripts/services up installs it)")
    report = tmp_path / "BENCHMARKS.md"
    report.write_text("# Benchmarks\n\nkept as it is\n")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "scaling", "--smoke", "--output", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=160,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = report.read_text()
    assert text.startswith("# Benchmarks\n\nkept as it is\n")
    assert "<!-- bench:begin:scaling:" in text
    assert "<!-- bench:end:scaling -->" in text
    assert f"**Machine: {os.cpu_count()} cores**" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")][1:]
    seen = {(row[0].lstrip("| ").split(" (")[0], row[1]) for row in rows}
    for where in ("single Redis", "cluster, 1 queue", "cluster, 3 queues"):
        for processes in ("1", "2", "4"):
            assert (where, processes) in seen, f"no row for {where} with {processes} processes"
    number = re.compile(r"^[\d,]+$")
    for row in rows:
        assert number.match(row[2].strip()), row  # jobs/s measured, no run failed
        assert re.fullmatch(r"[\d.]+ x", row[3].strip(" |")), row
    base = next(row for row in rows if row[0] == "| single Redis (`bench`)" and row[1] == "1")
    assert base[3].strip(" |") == "1.00 x"
    # The 3 queues are named, and land on 3 different primaries (bench/scaling.py picks them).
    assert re.search(r"Cluster, 3 queues: bench-\d+, bench-\d+, bench-\d+ hash to slots", text)
