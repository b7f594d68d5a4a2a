"""Runs one workload for one library, in that library's environment, and prints the figures.

    python -m bench.agent '<json spec>'      # what the harness runs
    python -m bench.agent --versions arq,saq # installed versions, as JSON

The last stdout line is `BENCH-RESULT {"runs": [...], "error": ...}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import sys
import traceback
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

from bench.peers import PEERS, Context, load

PREFIX = "BENCH-RESULT "


def reset_backend(ctx: Context, peer: str, repeat: int) -> Context:
    """An empty backend for one repeat: Redis flushed, a fresh database or SQLite file."""
    import redis

    client = redis.Redis.from_url(ctx.redis_url)
    client.flushall()
    client.close()
    if ctx.backend == "sqlite":
        return dataclasses.replace(
            ctx, db_url=f"sqlite+aiosqlite:///{ctx.workdir}/{peer}-{repeat}.sqlite3"
        )
    if ctx.backend == "mysql":
        import pymysql

        url = urlsplit(ctx.db_url)
        name = url.path.lstrip("/").split("?")[0]
        conn = pymysql.connect(
            host=url.hostname, port=url.port or 3306, user=url.username, password=url.password
        )
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
                cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        finally:
            conn.close()
    return ctx


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    name, workload = spec["peer"], spec["workload"]
    try:
        cls = load(name)
    except ImportError as exc:
        return {"runs": [], "error": f"not installed here ({exc})"}
    if workload == "W6":
        from bench.mqtt_load import w6_mqtt as func
    else:
        from bench.workloads import WORKLOADS

        func = WORKLOADS[workload]
    base = Context(**spec["ctx"])
    runs: list[dict[str, Any]] = []
    for repeat in range(spec["repeats"]):
        peer = cls(reset_backend(base, name, repeat))
        try:
            await peer.open()
            try:
                runs.append(await func(peer, **spec["params"]))
            finally:
                await peer.close()
        except Exception as exc:
            traceback.print_exc()
            return {"runs": runs, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"runs": runs, "error": None}


def versions(names: list[str]) -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in names:
        try:
            cls = load(name)
        except ImportError:
            continue
        found[f"{name}:note"] = cls.note
        dists = cls.dists
        for dist in dists:
            with contextlib.suppress(metadata.PackageNotFoundError):
                found[dist] = metadata.version(dist)
    return found


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    if argv[:1] == ["--versions"]:
        names = [n for n in argv[1].split(",") if n in PEERS] if len(argv) > 1 else list(PEERS)
        print(PREFIX + json.dumps(versions(names)))
        return 0
    result = asyncio.run(run(json.loads(argv[0])))
    print(PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
