"""What the apps import: no training tools, no test harness, no data-preparation libraries;
a ClientApp process no model library before it knows its method, and a method only what it
needs; and only the method modules import Flower."""

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, sys
import client_app, server_app
from cmfl_flower.methods import BUILT_IN, resolve_method
for name in BUILT_IN:
    resolve_method(name)
print(json.dumps(sorted(sys.modules)))
"""
NOT_AT_RUN_TIME = (
    "training.builders",  # the tiny backbone's builders
    "training.train_tiny",
    "training.train_fewshot",
    "training.archs",  # full-size architectures as data, for benchmarks
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
    assert _found(loaded, NOT_AT_RUN_TIME) == []


# In a deployment every message starts a fresh ClientApp process (benchmarks/cold_start.py).
CLIENT_PROBE = """
import json, sys
from cmfl_flower.methods import resolve_method
stages = {}
import client_app
stages["client_app"] = sorted(sys.modules)
for stage, methods in json.loads(sys.argv[1]).items():
    for name in methods:
        resolve_method(name)
    stages[stage] = sorted(sys.modules)
print(json.dumps(stages))
"""
# stage -> the methods resolved by then (cumulative) and what must still not be imported
MODEL_LIBRARIES = ("open_clip", "diffusers", "peft", "transformers", "torchvision", "timm")
CLIENT_STAGES = {
    "client_app": (  # a node worker does the work: the ClientApp itself needs no torch
        (),
        (
            *(*MODEL_LIBRARIES, "torch", "safetensors", "matplotlib", "opacus"),
            *("cmfl_flower.encoder", "cmfl_flower.report", "cmfl_flower.client.store"),
        ),
    ),
    "clip methods": (("local-only", "encoder-lora"), ("diffusers", "open_clip")),
    "weight methods": (("diffusion-unet", "diffusion-lora"), ("open_clip",)),
    "token methods": (
        ("cmfl-relay", "local-only-tokens", "names-generation"),
        # open_clip (and its CoCa) when a CLIP is loaded; the rest is the server's
        ("open_clip", "matplotlib", "opacus", "torchmetrics", "cmfl_flower.fed_diffusion_server"),
    ),
}


def _found(loaded: list[str], names: tuple[str, ...]) -> list[str]:
    return [m for m in loaded if any(m == n or m.startswith(n + ".") for n in names)]


def test_a_client_process_imports_only_what_its_method_needs():
    methods = {stage: list(names) for stage, (names, _) in CLIENT_STAGES.items() if names}
    command = [sys.executable, "-c", CLIENT_PROBE, json.dumps(methods)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
    stages = json.loads(out.stdout.strip().splitlines()[-1])
    found = {stage: _found(stages[stage], banned) for stage, (_, banned) in CLIENT_STAGES.items()}
    assert found == {stage: [] for stage in CLIENT_STAGES}


def test_only_the_server_and_method_modules_import_flower():
    package = Path(__file__).resolve().parents[1] / "cmfl_flower"
    offenders = []
    for path in package.rglob("*.py"):
        if {"methods", "server"} & set(path.relative_to(package).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "flwr"]
    assert offenders == []


def test_the_old_path_of_the_routines_types_names_the_new_one():
    with pytest.raises(ImportError, match=r"moved to cmfl_flower\.client\.task"):
        importlib.import_module("cmfl_flower.workspace")


def test_the_old_path_of_the_example_plug_in_names_the_new_one():
    from cmfl_flower.methods import resolve_method

    with pytest.raises(ValueError, match=r"use method = 'examples\.best_peer:BEST_PEER'"):
        resolve_method("tests.example_plugin:BEST_PEER")
    assert resolve_method("examples.best_peer:BEST_PEER").name == "best-peer-relay"
