"""Throwaway TLS for the tests: a CA and a server certificate made with the `openssl` command,
and private Redis, Mosquitto and MariaDB servers that speak TLS with it.

Each server of `tls_servers()` also has a plaintext counterpart, the "server without TLS" that a
client asking for TLS must refuse: Redis and Mosquitto listen on a plaintext port beside the TLS
one, and MariaDB runs twice (a MariaDB with TLS configured also accepts plaintext connections,
so the plaintext one is a second server started with `--skip-ssl`).

Every server runs with `tests.servers.PrivateServer`: on free loopback ports, in a temporary
folder, ended with the test session (or with its process). MariaDB runs with
`--skip-grant-tables` on an empty data folder, which starts in about a second: any user name
connects and may do anything, which is all these tests need of it.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.servers import PrivateServer, free_port

__all__ = ["Certificates", "TlsServers", "make_certificates", "missing_tools", "tls_servers"]

_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"
_TOOLS = ("openssl", "redis-server", "mosquitto", "mariadbd")


def _binary(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{_SBIN}")


def missing_tools() -> list[str]:
    """The programs these servers need that are not installed."""
    return [name for name in _TOOLS if _binary(name) is None]


@dataclass(frozen=True)
class Certificates:
    """PEM files: `ca` signed `cert` (for 127.0.0.1 and localhost); `other_ca` signed nothing
    these servers present, so a client trusting only it must refuse them."""

    ca: Path
    cert: Path
    key: Path
    other_ca: Path


def _openssl(*args: str) -> None:
    binary = _binary("openssl")
    assert binary is not None, "openssl is not installed"
    done = subprocess.run([binary, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{done.stderr}")


def _new_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=Topiq test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def make_certificates(folder: Path) -> Certificates:
    """A new CA, a server certificate it signed, and an unrelated second CA, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _new_ca(folder, "ca")
    other_ca, _ = _new_ca(folder, "other-ca")
    cert, key, request = folder / "server.pem", folder / "server.key", folder / "server.csr"
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(request), "-subj", "/CN=localhost",
    )  # fmt: skip
    extensions = folder / "server.ext"
    extensions.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key),
        "-set_serial", "1", "-days", "2", "-out", str(cert), "-extfile", str(extensions),
    )  # fmt: skip
    for path in (key, ca_key):
        path.chmod(0o600)
    return Certificates(ca=ca, cert=cert, key=key, other_ca=other_ca)


@dataclass(frozen=True)
class TlsServers:
    """Ports of the running servers: `*_tls` speak only TLS, `*_plain` only plaintext."""

    certs: Certificates
    redis_tls: int
    redis_plain: int
    mqtt_tls: int
    mqtt_plain: int
    mysql_tls: int
    mysql_plain: int


def _redis(certs: Certificates, workdir: Path) -> tuple[int, int]:
    binary = _binary("redis-server")
    assert binary is not None
    plain, tls = free_port(), free_port()
    # The TLS port does not ask clients for certificates (`tls-auth-clients no`).
    argv = [
        binary, "--bind", "127.0.0.1", "--port", str(plain), "--tls-port", str(tls),
        "--tls-cert-file", str(certs.cert), "--tls-key-file", str(certs.key),
        "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no",
        "--dir", str(workdir), "--save", "", "--appendonly", "no",
    ]  # fmt: skip
    server = PrivateServer("redis-server-tls", argv, tls, workdir)
    server.wait_listening()
    return tls, plain


def _mosquitto(certs: Certificates, workdir: Path) -> tuple[int, int]:
    binary = _binary("mosquitto")
    assert binary is not None
    plain, tls = free_port(), free_port()
    config = workdir / "mosquitto-tls.conf"
    config.write_text(
        "per_listener_settings false\n"
        "allow_anonymous true\n"
        "persistence false\n"
        f"listener {plain} 127.0.0.1\n"
        f"listener {tls} 127.0.0.1\n"
        f"cafile {certs.ca}\n"
        f"certfile {certs.cert}\n"
        f"keyfile {certs.key}\n"
        "require_certificate false\n"
        "log_dest stdout\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
        f"user {getpass.getuser()}\n"  # as root, Mosquitto would switch to its own user
    )
    server = PrivateServer("mosquitto-tls", [binary, "-c", str(config)], tls, workdir)
    server.wait_listening()
    _wait_listening(plain, server)
    return tls, plain


def _wait_listening(port: int, server: PrivateServer, timeout: float = 20.0) -> None:
    """Wait for a second port of `server` (it opens its listeners one after the other)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.02)
    server.stop()
    raise RuntimeError(f"{server.name} did not listen on {port}:\n{server.log.read_text()}")


def _mariadb(workdir: Path, certs: Certificates | None) -> int:
    binary = _binary("mariadbd")
    assert binary is not None
    port = free_port()
    data = workdir / "data"
    data.mkdir(parents=True)
    tls = (
        [f"--ssl-ca={certs.ca}", f"--ssl-cert={certs.cert}", f"--ssl-key={certs.key}"]
        if certs is not None
        else ["--skip-ssl"]
    )
    argv = [
        binary, "--no-defaults", f"--user={getpass.getuser()}", f"--datadir={data}",
        f"--socket={workdir}/mysqld.sock", f"--pid-file={workdir}/mysqld.pid",
        "--bind-address=127.0.0.1", f"--port={port}", "--skip-grant-tables",
        "--skip-log-bin", "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M",
        *tls,
    ]  # fmt: skip
    server = PrivateServer("mariadbd-tls" if certs else "mariadbd-plain", argv, port, workdir)
    server.wait_listening(timeout=60)
    return port


_servers: TlsServers | None = None


def tls_servers() -> TlsServers:
    """The session's TLS servers and their plaintext counterparts, started on first use."""
    global _servers
    if _servers is None:
        root = Path(tempfile.mkdtemp(prefix="topiq-test-tls-"))
        certs = make_certificates(root / "certs")
        folders = {name: root / name for name in ("redis", "mqtt", "mysql-tls", "mysql-plain")}
        for folder in folders.values():
            folder.mkdir()
        redis_tls, redis_plain = _redis(certs, folders["redis"])
        mqtt_tls, mqtt_plain = _mosquitto(certs, folders["mqtt"])
        _servers = TlsServers(
            certs=certs,
            redis_tls=redis_tls,
            redis_plain=redis_plain,
            mqtt_tls=mqtt_tls,
            mqtt_plain=mqtt_plain,
            mysql_tls=_mariadb(folders["mysql-tls"], certs),
            mysql_plain=_mariadb(folders["mysql-plain"], None),
        )
    return _servers
