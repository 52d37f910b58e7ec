"""End to end: a `flwr run` continued by a second `flwr run` with `output.resume=true` ends
like one uninterrupted run. The second is a new Flower run (fresh `context.state`), so the
clients must find their state on disk.

The uninterrupted reference runs in process, on the loopback grid that drives the same
ServerApp and ClientApp code (one `flwr run` fewer; its results equal an uninterrupted
`flwr run`'s to the last bit, which this test therefore also checks)."""

import json
import shutil

import pytest

from benchmarks.loopback import LoopbackGrid
from client_app import app as client_app
from cmfl_flower.config import AppConfig
from cmfl_flower.server.rounds import run_federation
from tests.test_e2e_simulation import flwr_run

pytestmark = pytest.mark.e2e
# CLIP's loss trains the tokens: a resume with the default objective (`both`, which also runs
# the UNet) is checked bit-exact in process (tests/test_resume.py), at a fraction of the cost
SETTINGS = (
    "method='cmfl-relay' generation.steps=2 generation.images-per-class=2 tokens.epochs=1 "
    "tokens.objective='clip'"
)


def _last_round(run_dir):
    rows = json.loads((run_dir / "clients.json").read_text())
    last = max(row["round"] for row in rows)
    return {
        r["partition-id"]: (r["local-acc"], r["global-acc"], r["token-loss"])
        for r in rows
        if r["round"] == last
    }


def _check_relay_run(run_dir):
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    clients = json.loads((run_dir / "clients.json").read_text())
    assert len(clients) == 4 and not any("error" in row or "refused" in row for row in clients)
    for row in clients:
        assert row["num-generated"] > 0 if row["round"] == 2 else row["num-generated"] == 0
        assert row["bytes-sent"] > 0 and row["bytes-received"] > 0
        assert row["seconds-generation"] >= 0 and row["seconds-tokens"] > 0
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert [r["replies"] for r in rounds] == [2, 2]


def _uninterrupted(cut_run_dir, root):
    """The cut run's config, 2 rounds from the start, in process."""
    run_config = json.loads((cut_run_dir / "config.json").read_text())["run_config"]
    cfg = AppConfig.from_run_config(
        run_config | {"output.dir": str(root), "output.resume": False, "output.progress": False}
    )
    return run_federation(LoopbackGrid(client_app, cfg, 2), cfg)


def test_flwr_run_resumed_equals_uninterrupted(tmp_path):
    flwr_run(tmp_path / "cut", 2, f"{SETTINGS} federation.rounds=1")
    shutil.rmtree(tmp_path / "cut" / "flwr-home")  # a fresh SuperLink for the restart
    resumed = flwr_run(tmp_path / "cut", 2, f"{SETTINGS} federation.rounds=2 output.resume=true")
    _check_relay_run(resumed)
    assert [r["round"] for r in json.loads((resumed / "rounds.json").read_text())] == [1, 2]
    whole = _uninterrupted(resumed, tmp_path / "whole")
    assert _last_round(resumed) == _last_round(whole)
    state = tmp_path / "cut" / "runs" / "e2e" / "clients" / "partition-0" / "state"
    saved = sorted(p.name for p in state.glob("node-*/round-*.safetensors"))
    assert saved == ["round-1.safetensors", "round-2.safetensors"]
