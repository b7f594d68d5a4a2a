"""The one small interface every queue library is measured through."""

from __future__ import annotations

import abc
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

REPO = Path(__file__).resolve().parents[2]
QUEUE = "bench"

#: noop_unkept: a no-op whose result is not kept (Topiq `result_ttl = 0`; W2n only).
#: noop_prio: a no-op with a random priority 0..9 (Topiq `priority`; W2p only).
#: noop_grouped: a no-op of one of `DEVICES` devices, round robin (Topiq `group`; W2g only).
JobKind = Literal["noop", "sleep", "latency", "noop_unkept", "noop_prio", "noop_grouped"]
#: W2g's devices: each job's group is the next of them in turn.
DEVICES = 1_000


class Unsupported(Exception):
    """The library has no such feature; the message says why (shown as n/a)."""


@dataclass(frozen=True)
class Context:
    """Where a run happens; built by the harness and handed to the agent as JSON."""

    redis_url: str  # the private Redis: the queue of Redis peers and the harness's marks
    workdir: str  # a scratch directory: worker cwd, logs, SQLite files
    backend: str = "redis"  # redis, mysql or sqlite
    db_url: str = ""  # SQLAlchemy URL of the mysql/sqlite backend
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def redis_port(self) -> int:
        return int(self.redis_url.rsplit(":", 1)[1].split("/")[0])


class Peer(abc.ABC):
    """A queue library as the benchmark drives it.

    Enqueueing runs in the agent process; the worker runs as the library's own worker process
    (its CLI, or its documented programmatic entry where the CLI cannot be made quiet).
    """

    name: ClassVar[str]
    #: Distributions whose versions the report lists.
    dists: ClassVar[tuple[str, ...]]
    #: Backends this library can be measured on.
    backends: ClassVar[tuple[str, ...]] = ("redis",)
    #: Its enqueue call blocks (a synchronous client): enqueue one at a time, not 32 in flight.
    blocking: ClassVar[bool] = False
    #: Jobs run at once in its one worker process (the library's own limit if below 32).
    concurrency: ClassVar[int] = 32
    #: The worker runs each job in a new process: count jobs in Redis (see marks.py).
    shared_marks: ClassVar[bool] = False
    #: What the reader should know about how this library was run.
    note: ClassVar[str] = ""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        #: W8p: seconds between the reads of a library that polls for the result (and whose
        #: worker polls for jobs), set before its worker starts; None: the library's default.
        self.poll: float | None = None
        #: W9 smoke runs only: a job timeout (seconds) for the libraries whose recovery waits
        #: for it; 0: the library's default (what the full run measures).
        self.job_timeout = 0.0

    async def open(self) -> None:
        """Connect the enqueueing side."""

    async def close(self) -> None:
        """Disconnect the enqueueing side."""

    @abc.abstractmethod
    async def enqueue(self, kind: JobKind, sent: float = 0.0) -> None:
        """Enqueue one job of `kind` (a latency job carries `sent`)."""

    async def enqueue_bulk(self, kind: JobKind, n: int) -> None:
        """Enqueue `n` jobs with the library's bulk API."""
        raise Unsupported(f"{self.name} has no bulk enqueue API")

    async def enqueue_numbered(self, index: int) -> None:
        """Enqueue W9's job number `index` (bench/marks.py `numbered`)."""
        raise Unsupported(f"{self.name}: no numbered job in this benchmark")

    async def round_trip(self, value: int, timeout: float) -> object:
        """Dispatch the echo job with `value` and wait for its result the way the library
        documents (W8); TimeoutError after `timeout` seconds."""
        raise Unsupported(f"{self.name}: no result round trip in this benchmark")

    @abc.abstractmethod
    def worker_command(self) -> list[str]:
        """The worker process's argv (its queue, concurrency and log level WARNING set)."""

    def worker_env(self) -> dict[str, str]:
        """Extra environment for the worker process."""
        return {}

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def python() -> str:
        return sys.executable

    @staticmethod
    def pythonpath() -> str:
        return os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
