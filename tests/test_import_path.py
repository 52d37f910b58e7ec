"""What the apps import: no training tools, no test harness, no data-preparation libraries;
and only the method modules import Flower."""

import ast
import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys
import client_app, server_app
from cmfl_flower.methods import BUILT_IN, resolve_method
for name in BUILT_IN:
    resolve_method(name)
print(json.dumps(sorted(sys.modules)))
"""
NOT_AT_RUN_TIME = (
    "cmfl_flower.zoo.builders",  # the tiny backbone's builders
    "cmfl_flower.zoo.train_tiny",
    "cmfl_flower.zoo.train_fewshot",
    "cmfl_flower.archs",  # full-size architectures as data, for benchmarks
    "benchmarks",  # the loopback grid lives there
    "flwr_datasets",  # partitioning: only when data is prepared
    "datasets",
    "sklearn",
)


def test_the_apps_import_no_tools():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=300
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    found = [m for m in loaded if any(m == n or m.startswith(n + ".") for n in NOT_AT_RUN_TIME)]
    assert found == []


def test_only_the_method_modules_import_flower():
    package = Path(__file__).resolve().parents[1] / "cmfl_flower"
    offenders = []
    for path in package.rglob("*.py"):
        if "methods" in path.relative_to(package).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "flwr"]
    assert offenders == []
