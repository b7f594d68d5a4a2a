"""`python -m bench.mqtt_probe queue:work ...`: Topiq's worker, noting when each job starts.

W6 measures from an MQTT publish to the start of the job the app dispatched for it. The demo
route's job (`StoreTelemetryJob(device_id, reading)`) is the app's, not the bench's, so this
wraps `call_handle` (the call that runs `handle()`) to note the wall-clock time
before it, the job's `device_id` and the `ts` its reading carries (the publisher's clock).
Lines go to `BENCH_PROBE_FILE`; the worker pushes to `BENCH_KEY` on the first warm-up job and
when `BENCH_EXPECT` benchmark messages have arrived, so the harness waits without polling.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from typing import Any

import redis

from core.cli import main
from core.job import Job

# The code that runs one try lives in core/execution.py (before issue #12: in the worker).
try:
    runner_module = importlib.import_module("core.execution")
    _handle = runner_module.call_handle
except (ImportError, AttributeError):
    runner_module = importlib.import_module("core.worker.worker")
    _handle = runner_module.call_handle
_out = open(os.environ["BENCH_PROBE_FILE"], "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
_redis = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
_key = os.environ["BENCH_KEY"]
_expect = int(os.environ["BENCH_EXPECT"])
_seen = 0
_warm = False


async def call_handle(job: Job, *args: Any, **kwargs: Any) -> Any:
    global _seen, _warm
    started = time.time()
    device = str(getattr(job, "device_id", ""))
    reading = getattr(job, "reading", None)
    sent = reading.get("ts") if isinstance(reading, dict) else None
    if device.startswith("bench-") and isinstance(sent, int | float):
        _out.write(f"{device[6:]} {sent!r} {started!r}\n")
        _seen += 1
        if _seen == _expect:
            _redis.rpush(_key, json.dumps({"count": _seen, "first": 0, "t": started}))
    elif device.startswith("warm-") and not _warm:
        _warm = True
        _redis.rpush(_key, json.dumps({"count": 0, "first": 0, "t": started}))
    return await _handle(job, *args, **kwargs)  # whatever else the worker passes


runner_module.call_handle = call_handle

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
