"""The settings that take Redis past one machine: REDIS_CLUSTER_NODES, REDIS_SENTINELS with
REDIS_SENTINEL_MASTER, REDIS_WAIT_REPLICAS. Checked at start, with errors naming the variable,
and never showing a password."""

from __future__ import annotations

import pytest

from core.errors import ConfigurationError
from core.settings import QueueConnection, Settings, queue_location, redis_nodes, settings_warnings


def test_nodes_are_host_port_pairs_ipv6_in_brackets() -> None:
    assert redis_nodes("a:7000, b:7001,[::1]:7002,") == [("a", 7000), ("b", 7001), ("::1", 7002)]


@pytest.mark.parametrize("value", ["a", "a:", ":7000", "a:x", "a:0", "a:70000", " , "])
def test_a_wrong_node_list_stops_the_program_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigurationError, match=r"REDIS_CLUSTER_NODES: .*host:port"):
        Settings.load(None, redis_cluster_nodes=value)
    with pytest.raises(ConfigurationError, match=r"REDIS_SENTINELS: .*host:port"):
        Settings.load(None, redis_sentinels=value, redis_sentinel_master="topiq")


def test_cluster_and_sentinels_are_exclusive_and_sentinels_need_the_master_name() -> None:
    with pytest.raises(ConfigurationError, match="REDIS_CLUSTER_NODES and REDIS_SENTINELS"):
        Settings.load(None, redis_cluster_nodes="a:1", redis_sentinels="b:2")
    with pytest.raises(ConfigurationError, match="REDIS_SENTINEL_MASTER is not"):
        Settings.load(None, redis_sentinels="b:2")


def test_an_error_between_settings_never_shows_their_values() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.load(None, redis_sentinels="b:2", redis_password="hunter2", redis_url=None)
    assert "hunter2" not in str(caught.value)
    assert "got" not in str(caught.value)


def test_blank_values_mean_unset() -> None:
    settings = Settings.load(None, redis_cluster_nodes=" ", redis_sentinels="")
    assert settings.redis_cluster_nodes is None and settings.redis_sentinels is None


def test_wait_replicas_must_be_a_count_and_its_timeout_positive() -> None:
    with pytest.raises(ConfigurationError, match="REDIS_WAIT_REPLICAS"):
        Settings.load(None, redis_wait_replicas=-1)
    with pytest.raises(ConfigurationError, match="REDIS_WAIT_TIMEOUT"):
        Settings.load(None, redis_wait_timeout=0)


def test_the_start_line_names_the_cluster_or_the_sentinels_never_a_password() -> None:
    cluster = Settings.load(
        None, redis_cluster_nodes="n1:7000,n2:7001", redis_url="redis://:pw@x:6379/0"
    )
    assert queue_location(cluster, QueueConnection.REDIS) == (
        "the Redis Cluster at n1:7000,n2:7001 (key prefix topiq)"
    )
    sentinel = Settings.load(
        None, redis_sentinels="s1:26379", redis_sentinel_master="topiq", redis_password="pw"
    )
    where = queue_location(sentinel, QueueConnection.REDIS)
    assert where == "the primary 'topiq' of the Sentinels at s1:26379 (key prefix topiq)"


def test_values_the_topology_makes_unused_are_named() -> None:
    cluster = Settings.load(None, redis_cluster_nodes="n1:7000", redis_host="cache")
    assert any(
        "REDIS_HOST" in line and "REDIS_CLUSTER_NODES names the servers" in line
        for line in settings_warnings(cluster, None, environ={})
    )
    single = Settings.load(None, redis_sentinel_master="topiq")
    assert any(
        "REDIS_SENTINEL_MASTER" in line and "REDIS_SENTINELS is not set" in line
        for line in settings_warnings(single, None, environ={})
    )
