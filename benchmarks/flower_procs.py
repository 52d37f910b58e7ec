"""Start and stop Flower processes for end-to-end tests, each with its own ports and home.

A simulation SuperLink, or a deployment: a SuperLink and SuperNodes as separate processes,
optionally with TLS (certificates made here), SuperNode authentication (OpenSSH P-384 keys)
and network namespaces. Every process is started in its own session and stopped by PID (its
whole process group), also when the test fails.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class SuperLink:
    """A running SuperLink: where it listens and how `flwr` reaches it."""

    address: str  # host:port of the SuperLink's HTTP API (Control, Fleet and runtime)
    env: dict[str, str]  # environment for `flwr` commands against this SuperLink
    connection: str  # name of the SuperLink connection in FLWR_HOME/config.toml
    log: Path


def flower_env(home: Path) -> dict[str, str]:
    """The environment of a Flower process with its own ``FLWR_HOME`` ``home``."""
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop ``process``, its process group and every descendant, by PID."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):  # children that outlived the leader
        os.killpg(process.pid, signal.SIGKILL)
    for child in descendants:  # e.g. simulation runtimes started in sessions of their own
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(descendants, timeout=15)


@contextmanager
def node_workers() -> Iterator[Path]:
    """A short cache root for SuperNodes with ``worker-idle-seconds``, removed on exit.

    Short, because a Unix socket's path is limited. On exit the node workers that their
    ClientApps started there are stopped, by the process ids they wrote.
    """
    cache = Path(tempfile.mkdtemp(prefix="cmfl-nodes-", dir="/tmp"))
    try:
        yield cache
    finally:
        for pid_file in (cache / "cmfl-flower" / "workers").glob("*.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
        shutil.rmtree(cache, ignore_errors=True)


def _wait_for_port(address: str, process: subprocess.Popen[bytes], log: Path) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"SuperLink exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"SuperLink did not open {address}:\n{log.read_text()[-3000:]}")


@contextmanager
def simulation_superlink(tmp: Path) -> Iterator[SuperLink]:
    """A SuperLink in simulation mode on free loopback ports, with a Flower config for it."""
    home = tmp / "flwr-home"
    home.mkdir(parents=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    (home / "config.toml").write_text(_connection_toml(address, None))
    flags = ["--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port)]
    with _running_superlink(tmp, flower_env(home), address, flags) as link:
        yield link


@contextmanager
def _running_superlink(
    tmp: Path, env: dict[str, str], address: str, flags: list[str]
) -> Iterator[SuperLink]:
    """Start `flower-superlink` with ``flags``, wait for ``address``, stop it by PID after."""
    log = tmp / "superlink.log"
    command = [
        str(BIN / "flower-superlink"),
        *flags,
        "--isolation", "subprocess",
        "--database", str(tmp / "state.db"),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_for_port(address, process, log)
        yield SuperLink(address, env, "e2e", log)
    finally:
        stop(process)


def flwr(link: SuperLink, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the `flwr` CLI against ``link``."""
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env=link.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_status(link: SuperLink, run_id: int) -> str:
    """The status of ``run_id`` as `flwr ls --format json` reports it."""
    listing = flwr(link, "ls", link.connection, "--run-id", str(run_id), "--format", "json")
    payload = json.loads(listing.stdout)
    runs = payload.get("runs", [])
    if not runs:
        raise AssertionError(f"run {run_id} not listed: {listing.stdout} {listing.stderr}")
    return str(runs[0]["status"])


def start_run(link: SuperLink, app: Path, overrides: str) -> int:
    """`flwr run` ``app`` on ``link`` with the run config ``overrides``; return its run id."""
    started = flwr(
        link, "run", str(app), link.connection, "--run-config", overrides, "--format", "json"
    )
    payload = re.search(r"\{.*\}", started.stdout, re.S)
    if started.returncode != 0 or payload is None:
        raise RuntimeError(f"flwr run failed: {started.stdout}{started.stderr}")
    return int(json.loads(payload.group(0))["run-id"])


def wait_finished(link: SuperLink, run_id: int, timeout: float) -> str:
    """Poll the run's status until it has finished or ``timeout`` s passed; return the status."""
    deadline = time.monotonic() + timeout
    status = "unknown"
    while time.monotonic() < deadline and not status.startswith("finished"):
        time.sleep(1)
        status = run_status(link, run_id)
    return status


# --- deployment: SuperLink and SuperNodes as separate processes (TLS, node auth, netns) ---


@dataclass(frozen=True)
class TlsFiles:
    """The certificates of a TLS deployment."""

    ca_cert: Path  # PEM CA certificate: SuperNodes and `flwr` verify the SuperLink with it
    server_cert: Path  # PEM server certificate of the SuperLink, signed by the CA
    server_key: Path


def make_tls(directory: Path, hosts: Sequence[str]) -> TlsFiles:
    """A CA and a SuperLink certificate valid for ``hosts`` (IP addresses or DNS names)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None
    ) -> x509.CertificateBuilder:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        certificate("cmfl-e2e-ca", ca_key, None)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        certificate(hosts[0], server_key, ca.subject)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return files


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's key pair as Flower expects it: ECDSA P-384 in OpenSSH format."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return private, public


def _connection_toml(address: str, tls: TlsFiles | None) -> str:
    security = f'root-certificates = "{tls.ca_cert}"' if tls else "insecure = true"
    return f'[superlink]\ndefault = "e2e"\n\n[superlink.e2e]\naddress = "{address}"\n{security}\n'


@contextmanager
def deployment_superlink(
    tmp: Path, *, host: str = "127.0.0.1", tls: TlsFiles | None = None, node_auth: bool = False
) -> Iterator[SuperLink]:
    """A deployment SuperLink (no simulation) on ``host`` and a free port.

    With ``tls`` it serves HTTPS and the Flower config trusts its CA; ``node_auth`` accepts
    only SuperNodes whose public key was registered with `flwr supernode register`.
    """
    home = tmp / "superlink-home"
    home.mkdir(parents=True)
    port = free_port()
    address = f"{host}:{port}"
    (home / "config.toml").write_text(_connection_toml(address, tls))
    security = (
        ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
         "--ssl-keyfile", str(tls.server_key)]
        if tls else ["--insecure"]
    )  # fmt: skip
    auth = ["--enable-supernode-auth"] if node_auth else []
    flags = [*security, *auth, "--host", host, "--port", str(port)]
    with _running_superlink(tmp, flower_env(home), address, flags) as link:
        yield link


@dataclass(frozen=True)
class SuperNodeProcess:
    """A started SuperNode and its log file."""

    process: subprocess.Popen[bytes]
    log: Path


@contextmanager
def supernode(
    tmp: Path,
    name: str,
    superlink: str,
    node_config: str,
    *,
    port: int,
    ca_cert: Path | None = None,
    private_key: Path | None = None,
    netns: str | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[SuperNodeProcess]:
    """A SuperNode with its own FLWR_HOME and runtime ``port``, optionally inside ``netns``."""
    home = tmp / name
    home.mkdir(parents=True)
    log = tmp / f"{name}.log"
    security = ["--root-certificates", str(ca_cert)] if ca_cert else ["--insecure"]
    auth = ["--auth-supernode-private-key", str(private_key)] if private_key else []
    command = [
        *(["ip", "netns", "exec", netns] if netns else []),  # execs in place: same PID
        str(BIN / "flower-supernode"),
        *security,
        *auth,
        "--superlink", superlink,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--node-config", node_config,
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            env={**flower_env(home), **(extra_env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield SuperNodeProcess(process, log)
    finally:
        stop(process)


@dataclass(frozen=True)
class NetnsLan:
    """Network namespaces joined by a bridge: one per node."""

    hub: str  # address of the host end (a bridge): the SuperLink listens here
    nodes: tuple[tuple[str, str], ...]  # (namespace, address) of every node


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def netns_unavailable() -> str | None:
    """Why network namespaces with veth pairs cannot be used here, or None if they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    try:
        with netns_lan(1) as lan:
            _ip("netns", "exec", lan.nodes[0][0], "true")  # entering one works too
            return None
    except (subprocess.CalledProcessError, OSError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        return f"network namespaces are not permitted here: {detail.strip()}"


@contextmanager
def netns_lan(count: int) -> Iterator[NetnsLan]:
    """``count`` network namespaces on a private bridge, each with its own address.

    The host end is ``10.<a>.<b>.1`` (random /24), node ``i`` is ``10.<a>.<b>.<i + 2>``
    with its loopback up; everything is deleted on exit.
    """
    tag = secrets.token_hex(3)
    subnet = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
    bridge = f"cmflbr{tag}"
    created: list[tuple[str, ...]] = []  # undo commands, newest last
    try:
        _ip("link", "add", bridge, "type", "bridge")
        created.append(("link", "del", bridge))
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        nodes = []
        for index in range(count):
            namespace, host_end, node_end = f"cmfl{tag}n{index}", f"cmfl{tag}h{index}", "eth0"
            _ip("netns", "add", namespace)
            created.append(("netns", "del", namespace))
            _ip("link", "add", host_end, "type", "veth", "peer", "name", f"cmfl{tag}p{index}")
            created.append(("link", "del", host_end))
            _ip("link", "set", f"cmfl{tag}p{index}", "netns", namespace)
            _ip("-n", namespace, "link", "set", f"cmfl{tag}p{index}", "name", node_end)
            address = f"{subnet}.{index + 2}"
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", node_end)
            _ip("-n", namespace, "link", "set", node_end, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            _ip("link", "set", host_end, "master", bridge)
            _ip("link", "set", host_end, "up")
            nodes.append((namespace, address))
        yield NetnsLan(f"{subnet}.1", tuple(nodes))
    finally:
        for undo in reversed(created):
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip(*undo)


def interrupt(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process group at once, so they shut down in parallel (stop() reaps)."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
