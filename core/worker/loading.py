"""Loading a reserved job for its try: the job, its max_tries and timeout, and its record
keep times, or the error that keeps it from running."""

from __future__ import annotations

import contextlib
import math

from core.errors import PayloadError
from core.execution import describe
from core.job import Job
from core.queue.payload import JobLoader, decode_envelope
from core.worker.options import WorkerOptions
from core.worker.state import DEFAULT_MAX_TRIES, DEFAULT_TIMEOUT, Running, keep_time

__all__ = ["load"]


def load(
    run: Running,
    loader: JobLoader,
    opts: WorkerOptions,
    result_ttl: float,
    failure_ttl: float,
) -> tuple[Job | None, int, float, BaseException | None]:
    """The job, its max_tries and timeout, and the error if it cannot be loaded; sets the
    run's record keep times.

    Whatever goes wrong is returned, never raised; max_tries then comes from the raw payload
    when it says (else the default), so the tries check never depends on a good load.
    """
    reserved = run.reserved
    run.result_ttl = result_ttl
    run.failure_ttl = failure_ttl
    try:
        decoded = loader.load(reserved.payload, job_id=reserved.id, attempts=reserved.attempts)
        max_tries, timeout = decoded.max_tries, decoded.timeout
        if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
            raise PayloadError(f"max_tries must be a whole number ≥ 1, got {max_tries!r}")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout < 0
        ):
            raise PayloadError(f"timeout must be a number of seconds ≥ 0, got {timeout!r}")
        # Payloads from before result keeping carry neither: the settings then apply.
        if decoded.result_ttl is not None:
            run.result_ttl = decoded.result_ttl
        if decoded.failure_ttl is not None:
            run.failure_ttl = decoded.failure_ttl
        run.since = decoded.since
        return decoded.job, opts.max_tries or max_tries, opts.timeout or float(timeout), None
    except Exception as exc:
        error = exc
        if not isinstance(exc, PayloadError):
            error = PayloadError(f"the job cannot be loaded from its payload: {describe(exc)}")
            error.__cause__ = exc
    max_tries = DEFAULT_MAX_TRIES
    with contextlib.suppress(Exception):
        envelope = decode_envelope(reserved.payload)
        raw = envelope.get("max_tries")
        if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
            max_tries = raw
        run.failure_ttl = keep_time(envelope.get("failure_ttl"), failure_ttl)
    return None, opts.max_tries or max_tries, opts.timeout or DEFAULT_TIMEOUT, error
