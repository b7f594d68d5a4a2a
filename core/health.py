"""Whether a connection is healthy: its backend answers and live workers exist.

One check shared by the `health` command, the dashboard's `/health` and the `/health` of the
workers' and the MQTT app's metrics endpoints, so a load balancer or a supervisor gets the
same answer from each of them (docs/observing.md, "Health").
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Any

from core.queue.drivers.base import Driver

__all__ = ["Health", "check_health"]


@dataclass(frozen=True, slots=True)
class Health:
    """The answer of `check_health` for one connection."""

    ok: bool
    connection: str
    backend: bool  # the backend answered
    workers: int  # live workers on this connection (heartbeat not expired)
    error: str = ""  # why not ok, one line ("" when ok)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (reveals no setting, only counts and the reason)."""
        return asdict(self)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def check_health(
    driver: Driver, *, need_workers: bool = True, timeout: float = 5.0
) -> Health:
    """Ask `driver`'s backend for its live workers within `timeout` seconds.

    Healthy when the backend answered and, with `need_workers`, at least one worker is alive;
    not when a Redis primary has fewer replicas than REDIS_WAIT_REPLICAS (every push would
    fail).
    Never raises (but for the cancellation of the caller): a backend that fails or does not
    answer in time is reported in `Health.error`.
    """
    name = driver.name
    try:
        async with asyncio.timeout(timeout):
            workers = await driver.workers()
            shortfall = getattr(driver, "replica_shortfall", None)  # Redis: REDIS_WAIT_REPLICAS
            problem: str | None = None if shortfall is None else await shortfall()
    except TimeoutError:
        return Health(
            False, name, False, 0, f"backend {name!r} did not answer within {timeout:g} s"
        )
    except Exception as exc:  # a health check reports, never raises
        return Health(False, name, False, 0, f"backend {name!r} failed: {_one_line(exc)}")
    live = len(workers)
    if problem is not None:
        return Health(False, name, True, live, f"backend {name!r}: {problem}")
    if need_workers and live < 1:
        return Health(False, name, True, 0, f"no live worker on connection {name!r}")
    return Health(True, name, True, live)
