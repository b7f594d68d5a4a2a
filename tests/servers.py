"""Private Redis, Mosquitto and RabbitMQ servers for one test session.

The suite never touches a server it did not start: each pytest session starts its own
`redis-server`, `mosquitto` and RabbitMQ node on free loopback ports, in a temporary folder, and
ends them when it ends (or when it dies: the children get SIGTERM with their parent). A
developer's own Redis on 6379, Mosquitto on 1883 or RabbitMQ on 5672 is never flushed, and two
test runs on one machine cannot disturb each other. MariaDB is the exception (too slow to start
per session): tests use a database of their own on the server `scripts/services up` started,
see `mysql_url` in `tests/conftest.py`.

`TOPIQ_TEST_REDIS_URL` / `TOPIQ_TEST_MQTT_HOST` + `TOPIQ_TEST_MQTT_PORT` /
`TOPIQ_TEST_AMQP_URL` point the suite at a server of your choice instead; the Redis database
named there is flushed between tests.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

__all__ = [
    "PrivateCluster",
    "PrivateRabbit",
    "PrivateSentinel",
    "PrivateServer",
    "free_port",
    "private_mosquitto",
    "private_rabbitmq",
    "private_redis",
    "private_redis_cluster",
    "start_rabbitmq",
    "start_redis_cluster",
    "start_redis_sentinel",
]

_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _die_with_us() -> None:
    """In a child before exec: SIGTERM when the test process dies, even if it crashes."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _binary(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{_SBIN}")


class PrivateServer:
    """One server process of the session's own, on a free port."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        workdir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.workdir = workdir
        self.log = workdir / f"{name}.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=_die_with_us,
            )
        atexit.register(self.stop)

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        tail = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the private {self.name} did not start on {self.port}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


_started: dict[str, PrivateServer] = {}


def _workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="topiq-test-servers-"))


def private_redis() -> PrivateServer | None:
    """The session's own redis-server (None when it is not installed)."""
    if "redis" in _started:
        return _started["redis"]
    binary = _binary("redis-server")
    if binary is None:
        return None
    port = free_port()
    workdir = _workdir()
    server = PrivateServer(
        "redis-server",
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--databases",
            "16",
        ],
        port,
        workdir,
    )
    server.wait_listening()
    _started["redis"] = server
    return server


def private_mosquitto() -> PrivateServer | None:
    """The session's own Mosquitto (None when it is not installed)."""
    if "mosquitto" in _started:
        return _started["mosquitto"]
    binary = _binary("mosquitto")
    if binary is None:
        return None
    port = free_port()
    workdir = _workdir()
    config = workdir / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence false\n"
        # The tests hold many unacknowledged messages on purpose; keep them all.
        "max_queued_messages 100000\n"
        "log_dest stdout\n"
        "log_type error\nlog_type warning\n"
        # As root, Mosquitto would switch to its own user.
        f"user {getpass.getuser()}\n"
    )
    server = PrivateServer("mosquitto", [binary, "-c", str(config)], port, workdir)
    server.wait_listening()
    _started["mosquitto"] = server
    return server


class PrivateCluster:
    """A real Redis Cluster of the session's own: `masters` primaries, each with `replicas`
    replicas, on free loopback ports (cluster bus ports chosen free too, not port + 10000).

    `nodes` is the REDIS_CLUSTER_NODES value naming every node. Failover tests kill a primary
    (`kill_node`) and wait for its replica to be promoted (`wait_ok`)."""

    def __init__(self, servers: list[PrivateServer], workdir: Path) -> None:
        self.servers = servers
        self.workdir = workdir

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def nodes(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def cli(self, port: int, *args: str, timeout: float = 10.0) -> str:
        binary = _binary("redis-cli") or "redis-cli"
        done = subprocess.run(
            [binary, "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return done.stdout

    def alive(self) -> list[PrivateServer]:
        return [s for s in self.servers if s.proc.poll() is None]

    def primaries(self) -> list[int]:
        """The ports of the live nodes that are primaries now."""
        out = []
        for server in self.alive():
            role = self.cli(server.port, "role").split("\n", 1)[0].strip()
            if role == "master":
                out.append(server.port)
        return out

    def flush(self) -> None:
        for port in self.primaries():
            self.cli(port, "flushall")

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every live node says cluster_state:ok and agrees all 16384 slots are served."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            states = []
            for server in self.alive():
                try:
                    states.append(self.cli(server.port, "cluster", "info", timeout=3))
                except subprocess.TimeoutExpired:
                    states.append("")
            if states and all(
                "cluster_state:ok" in s and "cluster_slots_ok:16384" in s for s in states
            ):
                return
            last = "\n---\n".join(states)
            time.sleep(0.1)
        raise RuntimeError(f"the private Redis Cluster is not ok after {timeout}s:\n{last}")

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def start_redis_cluster(
    masters: int = 3, replicas: int = 1, node_timeout_ms: int = 2000, appendonly: bool = False
) -> PrivateCluster | None:
    """Start a new private Redis Cluster (None when redis-server is not installed)."""
    binary = _binary("redis-server")
    cli = _binary("redis-cli")
    if binary is None or cli is None:
        return None
    workdir = _workdir()
    servers = []
    for n in range(masters * (1 + replicas)):
        port, bus = free_port(), free_port()
        while bus == port:
            bus = free_port()
        node_dir = workdir / f"node-{n}"
        node_dir.mkdir()
        servers.append(
            PrivateServer(
                f"redis-cluster-{n}",
                [
                    binary,
                    "--port",
                    str(port),
                    "--cluster-port",
                    str(bus),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(node_dir),
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    "--save",
                    "",
                    "--appendonly",
                    "yes" if appendonly else "no",
                ],
                port,
                node_dir,
            )
        )
    cluster = PrivateCluster(servers, workdir)
    try:
        for server in servers:
            server.wait_listening()
        created = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{s.port}" for s in servers),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if created.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed:\n{created.stdout}{created.stderr}"
            )
        cluster.wait_ok()
        # Replicas attach asynchronously: wait until every primary has its replicas online.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            counts = [
                cluster.cli(port, "info", "replication").count("state=online")
                for port in cluster.primaries()
            ]
            if len(counts) == masters and all(c >= replicas for c in counts):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("the private Redis Cluster's replicas did not come online")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def private_redis_cluster() -> PrivateCluster | None:
    """The session's shared private Redis Cluster (3 primaries, 3 replicas), started once.

    Tests that kill nodes start a cluster of their own with `start_redis_cluster`."""
    if "cluster" in _clusters:
        return _clusters["cluster"]
    cluster = start_redis_cluster()
    if cluster is not None:
        _clusters["cluster"] = cluster
    return cluster


_clusters: dict[str, PrivateCluster] = {}


class PrivateSentinel:
    """A real Sentinel setup of the test's own: a primary, its replicas and sentinel processes,
    on free loopback ports, with short down-after/failover timeouts.

    `sentinels` is the REDIS_SENTINELS value, `master_name` the REDIS_SENTINEL_MASTER one.
    `failover()` forces `SENTINEL FAILOVER`, `kill_primary()` kill -9s the primary, and
    `wait_new_primary(old)` waits until every live sentinel names a new primary that says so."""

    def __init__(
        self,
        servers: list[PrivateServer],
        watchers: list[PrivateServer],
        master_name: str,
        workdir: Path,
    ) -> None:
        self.servers = servers
        self.watchers = watchers
        self.master_name = master_name
        self.workdir = workdir

    @property
    def sentinels(self) -> str:
        return ",".join(f"127.0.0.1:{w.port}" for w in self.watchers)

    def cli(self, port: int, *args: str, timeout: float = 10.0) -> str:
        binary = _binary("redis-cli") or "redis-cli"
        done = subprocess.run(
            [binary, "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return done.stdout

    def role(self, port: int) -> str:
        try:
            return self.cli(port, "role", timeout=3).split("\n", 1)[0].strip()
        except subprocess.TimeoutExpired:
            return ""

    def server(self, port: int) -> PrivateServer:
        return next(s for s in self.servers if s.port == port)

    def reported(self) -> list[int | None]:
        """The primary's port as each live sentinel reports it (None: no answer)."""
        out: list[int | None] = []
        for watcher in self.watchers:
            if watcher.proc.poll() is not None:
                continue
            try:
                lines = self.cli(
                    watcher.port,
                    "sentinel",
                    "get-master-addr-by-name",
                    self.master_name,
                    timeout=3,
                ).split()
            except subprocess.TimeoutExpired:
                lines = []
            out.append(int(lines[1]) if len(lines) == 2 and lines[1].isdigit() else None)
        return out

    def primary(self) -> int:
        """The primary's port, as the sentinels agree on it."""
        ports = set(self.reported())
        if len(ports) != 1 or None in ports:
            raise RuntimeError(f"the sentinels do not agree on a primary: {ports}")
        port = ports.pop()
        assert port is not None
        return port

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the sentinels agree on a primary that has every live replica online and each
        sentinel knows the others and the replicas (a failover then needs no discovery)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            ports = set(self.reported())
            if len(ports) == 1 and None not in ports:
                port = ports.pop()
                assert port is not None
                live = [s for s in self.servers if s.proc.poll() is None and s.port != port]
                info = self.cli(port, "info", "replication", timeout=3)
                masters = [
                    self.cli(w.port, "sentinel", "master", self.master_name, timeout=3).split()
                    for w in self.watchers
                    if w.proc.poll() is None
                ]
                known = all(
                    _field(m, "num-other-sentinels") == str(len(self.watchers) - 1)
                    and _field(m, "num-slaves") is not None
                    and int(_field(m, "num-slaves") or 0) >= len(live)
                    for m in masters
                )
                if info.count("state=online") >= len(live) and known:
                    return
                last = info
            time.sleep(0.05)
        raise RuntimeError(f"the private Sentinel setup is not ready after {timeout}s:\n{last}")

    def failover(self) -> int:
        """Force `SENTINEL FAILOVER`; returns the old primary's port (see wait_new_primary)."""
        old = self.primary()
        reply = self.cli(self.watchers[0].port, "sentinel", "failover", self.master_name)
        if "OK" not in reply:
            raise RuntimeError(f"SENTINEL FAILOVER refused: {reply.strip()}")
        return old

    def kill_primary(self) -> int:
        """kill -9 the primary; returns its port."""
        old = self.primary()
        server = self.server(old)
        server.proc.kill()
        server.proc.wait(10)
        return old

    def wait_new_primary(self, old: int, timeout: float = 30.0) -> int:
        """Until every live sentinel names the same primary other than `old`, and it answers
        as a primary; returns its port."""
        deadline = time.monotonic() + timeout
        ports: set[int | None] = set()
        while time.monotonic() < deadline:
            ports = set(self.reported())
            if len(ports) == 1 and None not in ports and old not in ports:
                port = ports.pop()
                assert port is not None
                if self.role(port) == "master":
                    return port
            time.sleep(0.02)
        raise RuntimeError(f"no new primary after {timeout}s (the sentinels say {ports})")

    def stop(self) -> None:
        for server in [*self.watchers, *self.servers]:
            server.stop()


def _field(flat: list[str], name: str) -> str | None:
    """A field of a flat name/value reply (`SENTINEL MASTER`)."""
    for i in range(0, len(flat) - 1, 2):
        if flat[i] == name:
            return flat[i + 1]
    return None


def start_redis_sentinel(
    replicas: int = 1,
    sentinels: int = 3,
    master_name: str = "topiq",
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 5000,
    appendonly: bool = False,
) -> PrivateSentinel | None:
    """Start a new private primary + `replicas` replicas + `sentinels` sentinels (quorum: a
    majority); None when redis-server is not installed."""
    binary = _binary("redis-server")
    if binary is None or _binary("redis-cli") is None:
        return None
    workdir = _workdir()
    servers: list[PrivateServer] = []
    watchers: list[PrivateServer] = []
    setup = PrivateSentinel(servers, watchers, master_name, workdir)
    try:
        primary_port = 0
        for n in range(1 + replicas):
            port = free_port()
            node_dir = workdir / f"node-{n}"
            node_dir.mkdir()
            argv = [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(node_dir),
                "--save",
                "",
                "--appendonly",
                "yes" if appendonly else "no",
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
            ]
            if n == 0:
                primary_port = port
            else:
                argv += ["--replicaof", "127.0.0.1", str(primary_port)]
            server = PrivateServer(f"redis-data-{n}", argv, port, node_dir)
            servers.append(server)
            server.wait_listening()
        quorum = sentinels // 2 + 1
        for n in range(sentinels):
            port = free_port()
            node_dir = workdir / f"sentinel-{n}"
            node_dir.mkdir()
            config = node_dir / "sentinel.conf"
            config.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"dir {node_dir}\n"
                f"sentinel monitor {master_name} 127.0.0.1 {primary_port} {quorum}\n"
                f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
                f"sentinel failover-timeout {master_name} {failover_timeout_ms}\n"
                f"sentinel parallel-syncs {master_name} 1\n"
            )
            watcher = PrivateServer(
                f"redis-sentinel-{n}", [binary, str(config), "--sentinel"], port, node_dir
            )
            watchers.append(watcher)
            watcher.wait_listening()
        setup.wait_ready()
    except BaseException:
        setup.stop()
        raise
    return setup


# ---------------------------------------------------------------- RabbitMQ

# Debian's broker scripts. /usr/sbin/rabbitmq-server is a wrapper that switches to the
# `rabbitmq` user and the system's node; the scripts here run a node as whoever calls them,
# wherever the environment says.
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
_rabbit_count = 0


def _started_at(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/<pid>/stat): with the pid, it names one
    process for good, where a pid alone may be reused by a stranger."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _descendants(pid: int) -> list[tuple[int, str]]:
    """Every live process below `pid`, as (pid, start time), read from /proc."""
    found: list[tuple[int, str]] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                started = _started_at(child)
                if started is not None and (child, started) not in found:
                    found.append((child, started))
                    pending.append(child)
    return found


def _speaks_amqp(port: int) -> bool:
    """Whether a broker on the port answers the AMQP 0-9-1 protocol header with its
    connection.start method (frame type 1, class 10, method 10): the node has finished booting
    far enough to take clients, which an open TCP port alone does not prove."""
    try:
        with socket.create_connection(("127.0.0.1", port), 1) as conn:
            conn.settimeout(2)
            conn.sendall(_AMQP_HEADER)
            head = b""
            while len(head) < 11:
                chunk = conn.recv(11 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    return head[0] == 1 and head[7:11] == b"\x00\x0a\x00\x0a"


class PrivateRabbit:
    """A RabbitMQ node of the test session's own: its own HOME (and so its own Erlang cookie),
    node name, data, logs and config in a temporary folder; AMQP on a free loopback port.

    The node shares the machine's epmd (the Erlang port mapper, started by the first node
    that needs it and left running): it is not ours to stop. `stop()` ends the node cleanly,
    `kill()` kill -9s it, and `restart()` starts it again on the same port, node name and data
    folder, so durable queues and their messages come back (chaos tests).

    `consumer_timeout` (ms) goes into its rabbitmq.conf; the channels then check it every
    `tick_ms` (RabbitMQ's default is once a minute, too slow for a test to wait for)."""

    def __init__(self, consumer_timeout: int | None = None, tick_ms: int | None = None) -> None:
        global _rabbit_count
        _rabbit_count += 1
        self.workdir = _workdir()
        self.port = free_port()
        self.dist_port = free_port()
        while self.dist_port == self.port:
            self.dist_port = free_port()
        self.management_port = free_port()
        while self.management_port in (self.port, self.dist_port):
            self.management_port = free_port()
        self.nodename = f"topiq-test-{os.getpid()}-{_rabbit_count}@localhost"
        self.consumer_timeout = consumer_timeout
        if tick_ms is None and consumer_timeout is not None:
            tick_ms = max(100, min(1000, consumer_timeout // 2))
        config = [
            "loopback_users = none",
            f"listeners.tcp.default = 127.0.0.1:{self.port}",
            # A test machine's disk may be nearly full of other things; the broker must not
            # block publishers for that (its own default is 50 MB free).
            "disk_free_limit.absolute = 1MB",
            # The management API lists queues (a test's queues are deleted by their prefix
            # when it ends, see delete_queues); the statistics it would gather are not used.
            "management.tcp.ip = 127.0.0.1",
            f"management.tcp.port = {self.management_port}",
            "management_agent.disable_metrics_collector = true",
        ]
        if consumer_timeout is not None:
            config.append(f"consumer_timeout = {consumer_timeout}")
        (self.workdir / "rabbitmq.conf").write_text("\n".join(config) + "\n")
        advanced = f"{{channel_tick_interval, {tick_ms}}}" if tick_ms is not None else ""
        (self.workdir / "advanced.config").write_text(f"[{{rabbit, [{advanced}]}}].\n")
        (self.workdir / "enabled_plugins").write_text("[rabbitmq_management].\n")
        # Read by the broker's scripts before anything else; the system's one would win over
        # what is set here.
        (self.workdir / "rabbitmq-env.conf").write_text("")
        self.server: PrivateServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        """The environment that names this node, for the broker and its CLI tools."""
        d = self.workdir
        return {
            **os.environ,
            "HOME": str(d),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self) -> None:
        """Start the node (again: same port, name and data) and wait until it takes clients."""
        if self.server is not None and self.server.proc.poll() is None:
            raise RuntimeError(f"the private RabbitMQ {self.nodename} is already running")
        env = self.env()
        # `detached` makes the script exec the VM instead of waiting on it from a shell: the
        # process we hold is the node itself, so kill() hits the node, not a wrapper that
        # would leave it running.
        env["detached"] = "1"
        self.server = PrivateServer(
            "rabbitmq", [str(RABBITMQ_BIN / "rabbitmq-server")], self.port, self.workdir, env
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.server is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.proc.poll() is not None:
                break
            if _speaks_amqp(self.port) and self._api_answers():
                return
            time.sleep(0.1)
        self.kill()
        tail = self.server.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(
            f"the private RabbitMQ {self.nodename} did not start on {self.port}:\n{tail}"
        )

    def _end(self, sig: signal.Signals, wait: float) -> None:
        if self.server is None:
            return
        proc = self.server.proc
        children = _descendants(proc.pid) if proc.poll() is None else []
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        # The node's helpers (erl_child_setup, inet_gethost, the disk monitor's shell) end
        # when the node does; any still there (same pid, same start time) is killed.
        for child, started in children:
            if _started_at(child) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)

    def stop(self) -> None:
        """End the node cleanly (it flushes its queues to disk)."""
        self._end(signal.SIGTERM, 30)

    def kill(self) -> None:
        """kill -9 the node: no clean shutdown (a crash, for chaos tests)."""
        self._end(signal.SIGKILL, 10)

    def restart(self, kill: bool = False) -> None:
        """Stop (or kill -9) and start the node again with the same data."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    def _api(self, method: str, path: str) -> bytes:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.management_port}/api/{path}",
            method=method,
            headers={"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()},
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            body: bytes = reply.read()
            return body

    def _api_answers(self) -> bool:
        try:
            self._api("GET", "overview")
        except (OSError, urllib.error.URLError):
            return False
        return True

    def queues(self) -> list[str]:
        """The names of every queue on the node (default virtual host)."""
        listed = json.loads(self._api("GET", "queues/%2F?columns=name"))
        return sorted(str(q["name"]) for q in listed)

    def delete_queues(self, prefix: str) -> list[str]:
        """Delete every queue whose name starts with `prefix`; returns their names.

        Each test's queues carry a prefix of its own: without this, a long run would leave
        thousands of quorum queues (each a small consensus group with its own processes and
        files) on the session's node and slow everything after."""
        doomed = [name for name in self.queues() if name.startswith(prefix)]
        for name in doomed:
            with contextlib.suppress(urllib.error.HTTPError):  # gone meanwhile
                self._api("DELETE", f"queues/%2F/{urllib.parse.quote(name, safe='')}")
        return doomed

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """`rabbitmqctl <args>` against this node (e.g. `list_queues name messages`)."""
        done = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-q", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout


def rabbitmq_installed() -> bool:
    return (RABBITMQ_BIN / "rabbitmq-server").exists()


def start_rabbitmq(
    consumer_timeout: int | None = None, tick_ms: int | None = None
) -> PrivateRabbit | None:
    """Start a new private RabbitMQ node (None when rabbitmq-server is not installed).

    It is stopped when the session ends; a test that starts one may stop it sooner."""
    if not rabbitmq_installed():
        return None
    rabbit = PrivateRabbit(consumer_timeout, tick_ms)
    atexit.register(rabbit.stop)
    return rabbit


def private_rabbitmq() -> PrivateRabbit | None:
    """The session's shared private RabbitMQ node, started once (None: not installed)."""
    if "rabbitmq" in _rabbits:
        return _rabbits["rabbitmq"]
    rabbit = start_rabbitmq()
    if rabbit is not None:
        _rabbits["rabbitmq"] = rabbit
    return rabbit


_rabbits: dict[str, PrivateRabbit] = {}
