"""End to end in a real deployment: one SuperLink and three SuperNodes as separate processes.

Each process has its own ports and `FLWR_HOME`; the app runs a relay on the tiny preset. Success
is proven from the run status (`flwr ls`) and the results the ServerApp wrote, which must hold
the metrics of every SuperNode. Variants: plain HTTP on loopback, with an operator's faults (a
SuperNode killed and restarted, a second SuperNode claiming a partition id another holds: it is
refused as ``partition-claim``); TLS with SuperNode authentication, where a SuperNode with an
unregistered key gets no work;
and (where permitted) every SuperNode in its own network namespace with its own address.
The Docker files under `docker/` and the commands of its guide are checked statically (no
Docker engine is needed).
"""

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import tomllib
from collections.abc import Sequence
from contextlib import ExitStack
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from benchmarks.flower_procs import (
    BIN,
    SuperLink,
    SuperNodeProcess,
    deployment_superlink,
    flwr,
    free_port,
    interrupt,
    make_node_key,
    make_tls,
    netns_lan,
    netns_unavailable,
    node_workers,
    run_status,
    start_run,
    supernode,
    wait_finished,
)
from cmfl_flower.data.sources import DIGIT_NAMES
from tests.site_folders import SITES, held_classes, report_lists, write_site

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
NUM_NODES = 3
# the plug-in relay, sized for a 2-core CI machine; every round is one message per node. The
# plain deployment runs 2 rounds (round 2 relays); TLS and namespaces, about connections, 1.
OVERRIDES = (
    "method='examples.best_peer:BEST_PEER' generation.steps=2 "
    "generation.images-per-class=1 tokens.epochs=1 tokens.objective='clip' "
    f"federation.min-nodes={NUM_NODES} federation.wait-for-nodes=90"
)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # three SuperNodes share two cores
FLEET_REQUEST = re.compile(r"([0-9.]+):\d+ - \"POST /v1/fleet/")


def _json(text: str) -> dict[str, Any]:
    payload = re.search(r"\{.*\}", text, re.S)
    assert payload, text
    return json.loads(payload.group(0))


def _node_config(partition: int, partitions: int = NUM_NODES) -> str:
    return f"partition-id={partition} num-partitions={partitions}"


def _start_run(link: SuperLink, tmp_path: Path, rounds: int, overrides: str = OVERRIDES) -> int:
    """`flwr run` the app (run name ``e2e`` under ``tmp_path/runs``); return its run id."""
    overrides = (
        f"{overrides} federation.rounds={rounds} output.dir='{tmp_path / 'runs'}' "
        f"output.run-name='e2e' data.dir='{tmp_path / 'data'}'"
    )
    return start_run(link, ROOT, overrides)


def _fail_with_logs(link: SuperLink, run_id: int, status: str) -> None:
    logs = flwr(link, "log", str(run_id), link.connection, "--show").stdout
    pytest.fail(f"run {run_id} is {status}\n{logs[-4000:]}")


def _wait_done(link: SuperLink, run_id: int, timeout: float = 300) -> None:
    """Wait until run ``run_id`` has finished; fail with its log unless it completed."""
    status = wait_finished(link, run_id, timeout)
    if status != "finished:completed":
        _fail_with_logs(link, run_id, status)


def _wait_rounds(link: SuperLink, run_id: int, run_dir: Path, count: int) -> None:
    """Wait until the server has recorded ``count`` rounds in ``run_dir/rounds.json``."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, json.JSONDecodeError):
            if len(json.loads((run_dir / "rounds.json").read_text())) >= count:
                return
        status = run_status(link, run_id)
        if status.startswith("finished"):
            _fail_with_logs(link, run_id, status)
        time.sleep(1)
    pytest.fail(f"round {count} was not recorded within 240 s")


def _run(link: SuperLink, tmp_path: Path, rounds: int) -> Path:
    """`flwr run` the app; wait until its status is completed; return its run directory."""
    _wait_done(link, _start_run(link, tmp_path, rounds))
    return tmp_path / "runs" / "e2e"


def _assert_results(
    run_dir: Path, partitions: list[int], rounds: int, node_ids: set[int] | None = None
):
    """Completed, and each round holds the metrics of exactly ``partitions``."""
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    clients = json.loads((run_dir / "clients.json").read_text())
    assert sorted({row["round"] for row in clients}) == list(range(1, rounds + 1))
    for server_round in range(1, rounds + 1):
        rows = [row for row in clients if row["round"] == server_round]
        assert sorted(row["partition-id"] for row in rows) == partitions, rows
        for row in rows:
            assert "error" not in row and "refused" not in row, row
            assert 0.0 <= row["local-acc"] <= 1.0 and 0.0 <= row["global-acc"] <= 1.0
        if node_ids is not None:
            assert {row["node-id"] for row in rows} == node_ids
    if rounds >= 2:
        generated = [row["num-generated"] for row in clients if row["round"] == 2]
        assert all(n > 0 for n in generated), generated  # round 2 used the relayed tokens


def _register(link: SuperLink, public_key: Path) -> int:
    """Register a SuperNode's public key with the SuperLink; returns its node id."""
    result = flwr(
        link, "supernode", "register", str(public_key), link.connection, "--format", "json"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return int(_json(result.stdout)["node-id"])


def _listed_nodes(link: SuperLink) -> dict[int, str]:
    """Node id -> status of every SuperNode the SuperLink knows (`flwr supernode ls`)."""
    listing = flwr(link, "supernode", "ls", link.connection, "--format", "json")
    assert listing.returncode == 0, listing.stdout + listing.stderr
    return {int(node["node-id"]): node["status"] for node in _json(listing.stdout)["nodes"]}


def _start_nodes(
    stack: ExitStack,
    tmp_path: Path,
    link: SuperLink,
    partitions: Sequence[int] = range(NUM_NODES),
    **per_node: Sequence[Any],
) -> list[SuperNodeProcess]:
    """Start one SuperNode per entry of ``partitions`` (of ``NUM_NODES``), each on its own port.

    ``per_node`` maps a keyword of `supernode()` to one value per node (``private_key``,
    ``netns``, ...). On exit all of them are interrupted at once, then stopped one by one.
    """
    nodes: list[SuperNodeProcess] = []
    for index, partition in enumerate(partitions):
        options = {key: values[index] for key, values in per_node.items()}
        options.setdefault("port", free_port())
        node = supernode(
            tmp_path,
            f"supernode-{index}",
            link.address,
            _node_config(partition),
            extra_env=ONE_THREAD,
            **options,
        )
        nodes.append(stack.enter_context(node))
    stack.callback(interrupt, [node.process for node in nodes])
    return nodes


# the default relay, sized as OVERRIDES; the partitions are the NUM_NODES nodes connected at
# the start, and the two nodes that never fail are enough
FAULTS = (
    "method='cmfl-relay' generation.steps=2 generation.images-per-class=1 tokens.epochs=1 "
    f"tokens.objective='clip' federation.min-nodes={NUM_NODES} federation.wait-for-nodes=90 "
    "federation.min-replies=2"
)


@pytest.mark.e2e
def test_deployment_survives_a_lost_node_its_restart_and_a_partition_claim(tmp_path):
    """Partitions 0, 1, 2 on one host, 4 rounds, and an operator's faults.

    Once round 1 is recorded, partition 2's SuperNode is killed (SIGKILL, with its ClientApp)
    and a fourth SuperNode starts claiming partition 1, which the second node holds; once
    round 2 is recorded, partition 2's SuperNode starts again, under a new node id.
    """
    rounds, run_dir = 4, tmp_path / "runs" / "e2e"
    with ExitStack() as stack:
        link = stack.enter_context(deployment_superlink(tmp_path))
        nodes = _start_nodes(stack, tmp_path, link)
        run_id = _start_run(link, tmp_path, rounds, FAULTS)
        _wait_rounds(link, run_id, run_dir, 1)
        os.killpg(nodes[2].process.pid, signal.SIGKILL)
        _start_late_node(stack, tmp_path, link, "supernode-claiming-1", 1)
        _wait_rounds(link, run_id, run_dir, 2)
        _start_late_node(stack, tmp_path, link, "supernode-2-restarted", 2)
        _wait_done(link, run_id)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    summary = json.loads((run_dir / "rounds.json").read_text())
    rows = json.loads((run_dir / "clients.json").read_text())
    by_round = [[row for row in rows if row["round"] == r] for r in range(1, rounds + 1)]
    # the claim: refused, naming both nodes, whenever it came; the holder's replies are used
    holder = next(row["node-id"] for row in by_round[0] if row.get("partition-id") == 1)
    assert [row["node-id"] for row in rows if row.get("partition-id") == 1] == [holder] * rounds
    claims = [row for row in rows if "partition-id 1 is bound" in row.get("refused", "")]
    claimer = claims[0]["node-id"]
    assert [row["round"] for row in rows if row["node-id"] == claimer][-2:] == [3, 4]
    for row in (row for row in rows if row["node-id"] == claimer):
        assert row["refused"] == (
            f"partition-claim: partition-id 1 is bound to live node {holder}; node {claimer}'s "
            "claim refused"
        )
    assert all(s.get("refused-partition-claim", 0) >= 1 for s in summary[2:])
    # the lost node: round 2 names partition 2 missing, and the run goes on without it
    assert summary[1]["partitions-missing"] == "2" and summary[1]["replies"] == 2
    used = [sorted(row["partition-id"] for row in r if not _failed(row)) for r in by_round]
    assert used[0] == used[-1] == [0, 1, 2]
    # the restarted node: a new node id for partition 2, starting from what round 1 saved
    back = [row for row in rows if row.get("partition-id") == 2 and row["round"] > 2]
    first = min(back, key=lambda row: row["round"])
    lost = next(row["node-id"] for row in by_round[0] if row.get("partition-id") == 2)
    assert first["state-round"] == 1 and first["node-id"] != lost
    unavailable = [row for row in by_round[1] if "error" in row]
    assert [row["node-id"] for row in unavailable] == [lost]  # the SuperLink's error, for it
    moved = [s.get("partitions-moved", "") for s in summary]
    assert sum(m.startswith("2:") for m in moved) == 1
    assert all("global-acc" in row for r in by_round for row in r if not _failed(row))


def _start_late_node(
    stack: ExitStack, tmp_path: Path, link: SuperLink, name: str, partition: int
) -> None:
    """One more SuperNode, for ``partition``, started while a run is under way."""
    node = supernode(
        tmp_path, name, link.address, _node_config(partition), port=free_port(),
        extra_env=ONE_THREAD,
    )  # fmt: skip
    stack.enter_context(node)


def _failed(row: dict[str, Any]) -> bool:
    return "error" in row or "refused" in row


def _guide_commands(title: str) -> list[str]:
    """The shell commands of the deployment guide's section ``title``, continuations joined."""
    section = (ROOT / "docs" / "deployment.md").read_text().split(title, 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip()]


def _option(command: str, name: str) -> str:
    args = shlex.split(command)
    return args[args.index(name) + 1]


@pytest.mark.e2e
def test_deployment_of_three_sites_with_their_own_folders_as_the_guide_says(tmp_path):
    """The guide's "three sites, three folders" steps, as written, on one host."""
    prep, start_node, run = _guide_commands("### Three sites, three folders")
    local = {
        "/srv/cmfl/eval": str(write_site(tmp_path / "eval", dict.fromkeys(DIGIT_NAMES, 2), 100)),
        "/srv/cmfl/data": str(tmp_path / "data"),
        "/srv/cmfl/runs": str(tmp_path / "runs"),
    }

    def here(command: str, site: int) -> str:
        for path, there in {"/srv/cmfl/images": str(tmp_path / f"images-{site}"), **local}.items():
            command = command.replace(path, there)
        return command.replace("partition-id=0", f"partition-id={site}")

    for site, counts in enumerate(SITES):
        write_site(tmp_path / f"images-{site}", counts, 20 * site)
        args = shlex.split(here(prep, site))
        checked = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
        assert all(f" {name} " in checked.stdout for name in counts), checked.stdout
    sizing = (
        "method='cmfl-relay' generation.steps=2 generation.images-per-class=1 tokens.epochs=1 "
        "tokens.objective='clip' federation.wait-for-nodes=90 federation.rounds=2 "
        "output.run-name='e2e'"
    )
    with ExitStack() as stack:
        cache = stack.enter_context(node_workers())
        link = stack.enter_context(deployment_superlink(tmp_path))
        for site in range(len(SITES)):
            node_config = _option(here(start_node, site), "--node-config")
            node = supernode(
                tmp_path, f"site-{site}", link.address, node_config, port=free_port(),
                extra_env=ONE_THREAD | {"XDG_CACHE_HOME": str(cache)},
            )  # fmt: skip
            stack.enter_context(node)
        run_config = f"{_option(here(run, 0), '--run-config')} {sizing}"
        _wait_done(link, start_run(link, ROOT, run_config))
        logs = [log.read_text() for log in (cache / "cmfl-flower" / "workers").glob("*.log")]
    run_dir = tmp_path / "runs" / "e2e"
    _assert_results(run_dir, list(range(len(SITES))), rounds=2)
    rows = json.loads((run_dir / "clients.json").read_text())
    for row in rows:
        assert held_classes(row) == set(SITES[row["partition-id"]]), row  # ids agree
    # the guide's worker-idle-seconds: one worker per node served both rounds
    assert len(logs) == len(SITES) and all(
        log.count("serving") == 1 and "train round 1" in log and "train round 2" in log
        for log in logs
    ), logs
    page = (run_dir / "report.html").read_text()
    assert all(report_lists(page, counts) for counts in SITES)


@pytest.mark.e2e
def test_deployment_tls_and_supernode_auth_refuses_unregistered_node(tmp_path):
    tls = make_tls(tmp_path / "certs", ["127.0.0.1", "localhost"])
    keys = [make_node_key(tmp_path / "keys", f"supernode-{i}") for i in range(NUM_NODES)]
    rogue_key, _ = make_node_key(tmp_path / "keys", "rogue")  # never registered
    with ExitStack() as stack:
        link = stack.enter_context(deployment_superlink(tmp_path, tls=tls, node_auth=True))
        registered = {_register(link, public) for _, public in keys}
        assert len(registered) == NUM_NODES
        rogue = stack.enter_context(
            supernode(
                tmp_path,
                "rogue",
                link.address,
                _node_config(NUM_NODES, NUM_NODES + 1),  # a partition no registered node has
                port=free_port(),
                ca_cert=tls.ca_cert,
                private_key=rogue_key,
            )
        )
        _start_nodes(
            stack,
            tmp_path,
            link,
            ca_cert=[tls.ca_cert] * NUM_NODES,
            private_key=[private for private, _ in keys],
        )
        run_dir = _run(link, tmp_path, rounds=1)
        listed = _listed_nodes(link)
        # the SuperLink refused to activate the unregistered SuperNode, which gave up
        assert rogue.process.wait(timeout=30) != 0
    refused = rogue.log.read_text()
    assert "Failed to initialize the connection to the SuperLink" in refused
    assert "Failed to activate SuperNode" in refused
    assert listed == dict.fromkeys(registered, "online")  # the rogue is not even listed
    # the round went to the registered nodes only: the rogue's partition never ran
    _assert_results(run_dir, list(range(NUM_NODES)), rounds=1, node_ids=registered)


@pytest.mark.e2e
def test_deployment_across_network_namespaces(tmp_path):
    if reason := netns_unavailable():
        print(f"test_deployment_across_network_namespaces skipped: {reason}")
        pytest.skip(reason)
    with netns_lan(NUM_NODES) as lan, ExitStack() as stack:
        tls = make_tls(tmp_path / "certs", [lan.hub])
        keys = [make_node_key(tmp_path / "keys", f"supernode-{i}") for i in range(NUM_NODES)]
        link = stack.enter_context(
            deployment_superlink(tmp_path, host=lan.hub, tls=tls, node_auth=True)
        )
        registered = {_register(link, public) for _, public in keys}
        _start_nodes(
            stack,
            tmp_path,
            link,
            port=[9094] * NUM_NODES,  # the default runtime port on every "host"
            ca_cert=[tls.ca_cert] * NUM_NODES,
            private_key=[private for private, _ in keys],
            netns=[namespace for namespace, _ in lan.nodes],
        )
        run_dir = _run(link, tmp_path, rounds=1)
    _assert_results(run_dir, list(range(NUM_NODES)), rounds=1, node_ids=registered)
    # the SuperLink served each SuperNode from that node's own address, and no other
    peers = set(FLEET_REQUEST.findall(link.log.read_text()))
    assert peers == {address for _, address in lan.nodes}


# --- the Docker files, checked without a Docker engine ----------------------------------------


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((DOCKER / name).read_text())


def _merged(*names: str) -> dict[str, Any]:
    """Services of compose files merged as `docker compose -f a -f b` does for these keys."""
    services: dict[str, dict[str, Any]] = {}
    for name in names:
        for service, spec in _load(name)["services"].items():
            merged = services.setdefault(service, {})
            for key, value in spec.items():
                if key == "volumes":  # merged by target path
                    by_target = {v.split(":")[1]: v for v in merged.get("volumes", [])}
                    by_target |= {v.split(":")[1]: v for v in value}
                    merged["volumes"] = list(by_target.values())
                elif isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key] = {**merged[key], **value}
                else:
                    merged[key] = value
    return services


def _flag(command: list[str], name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"--{name}=")]
    assert len(values) == 1, (name, command)
    return values[0]


def _compose_cli() -> list[str] | None:
    """The Compose CLI: the `docker compose` plugin, else `docker-compose`; None if neither."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize(
    "files",
    [("compose.yml",), ("compose.yml", "compose.tls.yml"), ("compose.yml", "compose.cuda.yml")],
)
def test_compose_files_define_one_superlink_and_three_supernodes(files):
    if cli := _compose_cli():  # the authoritative check, where a Compose CLI is installed
        paths = [arg for name in files for arg in ("-f", str(DOCKER / name))]
        checked = subprocess.run([*cli, *paths, "config", "-q"], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
    services = _merged(*files)
    declared = set(_load("compose.yml")["volumes"])
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", (DOCKER / "Dockerfile").read_text(), re.M))
    assert set(services) == {"superlink"} | {f"supernode-{i}" for i in range(NUM_NODES)}
    for spec in services.values():
        assert re.fullmatch(r"cmfl-flower/\w+:\d+\.\d+\.\d+(-\w+)?", spec["image"]), spec
        assert spec["build"]["target"] in targets and spec["build"]["dockerfile"] == (
            "docker/Dockerfile"
        )
        named = {v.split(":")[0] for v in spec["volumes"] if not v.startswith(".")}
        assert named <= declared, named - declared
        for mount in (v.split(":")[0] for v in spec["volumes"] if v.startswith(".")):
            assert mount.startswith(("./certs", "./keys")), mount
    # every command parses with the installed flwr's own argument parsers
    link = services["superlink"]
    _parse_args_run_superlink().parse_args(link["command"])
    assert link["ports"] == ["8000:8000"] and _flag(link["command"], "port") == "8000"
    nodes = [services[f"supernode-{i}"] for i in range(NUM_NODES)]
    for node in nodes:
        _parse_args_run_supernode().parse_args(node["command"])
        assert _flag(node["command"], "superlink") == "superlink:8000"
        assert node["depends_on"] == ["superlink"]
    configs = [_flag(node["command"], "node-config") for node in nodes]
    assert configs == [f"{_node_config(i)} worker-idle-seconds=600" for i in range(NUM_NODES)]
    assert len({_flag(node["command"], "port") for node in nodes}) == NUM_NODES
    data = [next(v for v in node["volumes"] if v.endswith(":/data")) for node in nodes]
    assert len(set(data)) == NUM_NODES  # each node its own data volume
    tls = "compose.tls.yml" in files
    for spec in services.values():
        assert ("--insecure" in spec["command"]) is not tls
    if tls:
        assert "--enable-supernode-auth" in link["command"]
        for flag in ("ssl-ca-certfile", "ssl-certfile", "ssl-keyfile"):
            assert _flag(link["command"], flag).startswith("/certs/")
        assert "./certs:/certs:ro" in link["volumes"]
        for i, node in enumerate(nodes):
            key = _flag(node["command"], "auth-supernode-private-key")
            assert f"./keys/supernode-{i}:{key}:ro" in node["volumes"]
            assert (
                f"./certs/ca.crt:{_flag(node['command'], 'root-certificates')}:ro"
                in (node["volumes"])
            )
    cuda = "compose.cuda.yml" in files
    for node in nodes:
        assert node["build"]["args"]["TORCH_VARIANT"] == ("cuda" if cuda else "cpu")
        assert node["image"].endswith("-cuda" if cuda else "-cpu")
        devices = node.get("deploy", {}).get("resources", {}).get("reservations", {})
        assert bool(devices.get("devices")) is cuda


def test_dockerfile_pins_its_base_image_and_dependencies():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base.group(1))
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == ["${PYTHON_IMAGE}", "base", "base"]
    constraints = (DOCKER / "constraints.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in constraints if line and not line.startswith("#"))
    assert pins["flwr"] == version("flwr")  # the images pin the Flower these tests run on
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = {name.lower().replace("_", "-") for name in pins}
    for requirement in project["dependencies"]:
        name = re.split(r"[\[<>=~! ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pinned, f"{name} has no pin in docker/constraints.txt"
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M)
    assert torch and pins["torch"] == torch.group(1)
    assert "pip install -c /tmp/constraints.txt ." in dockerfile


@pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("ssh-keygen")),
    reason="generate_certs.sh needs openssl and ssh-keygen",
)
def test_generate_certs_script_makes_what_flower_loads(tmp_path):
    script = DOCKER / "generate_certs.sh"
    run = [str(script), "-o", str(tmp_path), "-n", "2", "-s", "IP:10.0.0.5"]
    made = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "certs" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"superlink", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "10.0.0.5"} <= {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    for i in range(2):
        private = load_ssh_private_key((tmp_path / "keys" / f"supernode-{i}").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        try_load_public_key(tmp_path / "keys" / f"supernode-{i}.pub")  # `flwr supernode register`
    assert not (tmp_path / "keys" / "supernode-2").exists()
    again = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "already holds files" in again.stderr  # no silent overwrite


def test_guide_commands_parse_with_flower():
    """Every `flower-superlink` / `flower-supernode` command of the deployment guide is valid."""
    guide = (ROOT / "docs" / "deployment.md").read_text().replace("\\\n", " ")
    parsers = {
        "flower-superlink": _parse_args_run_superlink,
        "flower-supernode": _parse_args_run_supernode,
    }
    commands = [
        shlex.split(line.split(" #")[0])
        for line in guide.splitlines()
        if line.split(" ")[0] in parsers
    ]
    assert {c[0] for c in commands} == set(parsers) and len(commands) >= 6, commands
    for command in commands:
        parsers[command[0]]().parse_args(command[1:])
