"""A Redis server that refuses commands for a while (a replica after a failover, a cluster
with a slot not served) is a connection that is away, not a broken driver: callers get
`ConnectionLostError`, which workers back off on and the MQTT app's spool keeps."""

from __future__ import annotations

import asyncio

import pytest

from core.errors import ConnectionLostError
from core.queue.drivers import create_driver
from core.queue.drivers.base import OutgoingJob
from tests.conftest import make_settings
from tests.servers import free_port, start_redis_cluster

pytestmark = pytest.mark.timeout(90)


def _job(queue: str) -> OutgoingJob:
    return OutgoingJob(id="j1", queue=queue, payload=b'{"job": "x"}', job="x")


async def test_a_primary_turned_replica_refuses_writes_as_a_lost_connection(
    redis_url: str,
) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    # A replica of a primary that does not answer: read-only, as a demoted primary is.
    client.replicaof("127.0.0.1", free_port())
    try:
        settings = make_settings(queue_connection="redis", redis_url=redis_url)
        async with create_driver("redis", settings) as driver:
            with pytest.raises(ConnectionLostError, match=r"READONLY|read only"):
                await driver.push([_job("q-readonly")])
    finally:
        client.replicaof("NO", "ONE")
        client.close()


async def test_a_cluster_with_a_slot_not_served_refuses_as_a_lost_connection() -> None:
    cluster = start_redis_cluster(masters=3, replicas=0)
    if cluster is None:
        pytest.skip("redis-server is not installed")
    try:
        settings = make_settings(
            queue_connection="redis",
            redis_cluster_nodes=cluster.nodes,
            redis_url="redis://127.0.0.1:6379/0",
        )
        async with create_driver("redis", settings) as driver:
            # Take every slot of one primary away: the cluster is down for those slots.
            victim = cluster.primaries()[0]
            lines = cluster.cli(victim, "cluster", "nodes").splitlines()
            mine = next(line for line in lines if "myself" in line)
            ranges = mine.split()[8:]
            for span in ranges:
                first, _, last = span.partition("-")
                cluster.cli(victim, "cluster", "delslotsrange", first, last or first)
            await asyncio.sleep(0)
            refused = 0
            for n in range(40):
                try:
                    await driver.push([_job(f"q-{n}")])
                except ConnectionLostError:
                    refused += 1
            assert refused > 0
    finally:
        cluster.stop()
