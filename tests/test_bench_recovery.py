"""bench/recovery.py's tally: the W9 figures made from the jobs' own start and end notes."""

from __future__ import annotations

from bench.recovery import Event, tally

KILL = 100.0


def run(*jobs: tuple[int, list[tuple[str, float]]]) -> list[Event]:
    """Events of numbered jobs, each a list of ("s" | "e", time), oldest first."""
    return sorted(
        ((kind, index, at) for index, notes in jobs for kind, at in notes), key=lambda e: e[2]
    )


def test_a_worker_kill_recovered_when_every_in_flight_job_ran_again() -> None:
    noted = run(
        (0, [("s", 90), ("e", 91)]),  # done before the kill
        (1, [("s", 99), ("s", 103), ("e", 104)]),  # in flight, ran again 3 s after the kill
        (2, [("s", 99.5), ("s", 101), ("e", 102)]),  # in flight, ran again after 1 s
        (3, [("s", 102), ("e", 102.5)]),  # not started before the kill: the queue moves
    )
    figures = tally(noted, 4, KILL)
    assert figures["in_flight"] == 2
    assert figures["again"] == 2
    assert figures["recovery"] == 3.0
    assert figures["lost"] == 0
    assert figures["twice"] == 0


def test_a_job_that_ended_before_the_kill_and_again_after_it_ran_twice() -> None:
    noted = run(
        (0, [("s", 90), ("e", 91), ("s", 105), ("e", 106)]),  # its ack died with the worker
        (1, [("s", 102), ("e", 103)]),
    )
    figures = tally(noted, 2, KILL)
    assert figures["twice"] == 1
    assert figures["in_flight"] == 0
    assert figures["recovery"] == 2.0  # no job in flight: the first new start


def test_an_in_flight_job_that_never_ran_again_is_lost_and_recovery_is_na() -> None:
    noted = run((0, [("s", 99)]), (1, [("s", 101), ("e", 102)]), (2, []))
    figures = tally(noted, 3, KILL)
    assert figures["lost"] == 2  # the one in flight, and the one that never started
    assert figures["recovery"] is None
    assert figures["recovery_na"] == "1 of 1 jobs in flight at the kill did not run again"


def test_a_redis_kill_counts_no_start_before_the_server_answered_again() -> None:
    noted = run(
        (0, [("s", 99.9), ("e", 100.01)]),  # in flight: ended in the worker after the kill
        (1, [("s", 100.02), ("e", 100.03)]),  # prefetched: started while the server was down
        (2, [("s", 100.5), ("e", 100.51)]),  # reserved from the restarted server
    )
    figures = tally(noted, 3, KILL, up_at=100.2)
    assert figures["in_flight"] == 1
    assert figures["again"] == 0
    assert figures["recovery"] == 0.5
    assert figures["lost"] == 0


def test_no_start_after_the_kill_with_jobs_left_is_no_recovery() -> None:
    noted = run((0, [("s", 90), ("e", 91)]), (1, []))
    figures = tally(noted, 2, KILL)
    assert figures["recovery"] is None
    assert figures["recovery_na"] == "no job started after the kill"
    assert figures["lost"] == 1
