"""The GPU script (``benchmarks/gpu.sh``) at its CPU dry-run size, and its summary's verdicts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import ROOT
from benchmarks.generation import per_round
from benchmarks.gpu_summary import goal_line, read_steps, summarise

pytestmark = pytest.mark.xdist_group("gpu-script")  # one dry run, on one worker


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every step of the script once, on the tiny preset, into a temporary folder."""
    out = tmp_path_factory.mktemp("gpu")
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_every_step_ran_and_succeeded(dry_run: Path) -> None:
    steps = read_steps(dry_run)
    assert set(steps) == {"generation-bk-sdm-v2-small", "round-cmfl-relay", "round-diffusion-lora"}
    assert all(step["rc"] == 0 for step in steps.values()), steps


def test_generation_figures_are_measured(dry_run: Path) -> None:
    figures = json.loads((dry_run / "generation-bk-sdm-v2-small.json").read_text())
    for key in ("project-images-per-s", "compiled-images-per-s", "reference-images-per-s"):
        assert figures[key] > 0, key
    parts = figures["profile-seconds"]
    assert parts["unet"] > 0 and parts["vae-decoder"] > 0 and parts["text-encoder"] > 0
    assert parts["wall"] >= parts["unet"] + parts["vae-decoder"] + parts["text-encoder"]
    assert figures["ratio-steady"] == pytest.approx(
        figures["project-images-per-s"] / figures["reference-images-per-s"]
    )
    assert figures["reference-load-seconds"] > 0 and figures["load-seconds"] > 0
    images = figures["images"]  # one client's round: its images and one load on each side
    project = per_round(images, figures["project-images-per-s"], figures["load-seconds"])
    reference = per_round(
        images, figures["reference-images-per-s"], figures["reference-load-seconds"]
    )
    assert figures["ratio-per-round"] == pytest.approx(project / reference)


def test_relay_rounds_run_one_worker_per_client(dry_run: Path) -> None:
    result = json.loads((dry_run / "round-cmfl-relay.json").read_text())
    assert len(result["workers"]) == 2
    assert all(len(w["message-seconds"]) >= 2 for w in result["workers"].values())
    first, second = result["rounds"]
    assert first["num-generated"] == 0  # nothing received before round 2
    assert second["seconds-generation"] > 0 and second["num-generated"] > 0
    assert all(row["wall"] > 0 and row["bytes-sent"] > 0 for row in result["rounds"])


def test_diffusion_lora_round_reports_bytes(dry_run: Path) -> None:
    result = json.loads((dry_run / "round-diffusion-lora.json").read_text())
    (row,) = result["rounds"]
    assert row["bytes-sent"] > 0 and row["bytes-received"] > 0


def test_summary_names_a_step_that_wrote_nothing(dry_run: Path, tmp_path: Path) -> None:
    (tmp_path / "steps.txt").write_text(
        (dry_run / "steps.txt").read_text() + "round-cmfl-relay rc=124 seconds=200\n"
    )
    lines, summary = summarise(tmp_path)
    assert "cmfl-relay: no figures (ran past its time limit)" in lines
    assert "diffusion-lora: no figures (exit status 0)" in lines
    assert "bk-sdm-small: no figures (the step did not run)" in lines
    assert summary["round-cmfl-relay"] is None


@pytest.mark.parametrize(
    ("eager", "compiled", "verdict"),
    [
        (13.0, 0.0, "goal met"),
        (2.0, 12.5, "first bar missed"),  # compiled: not the app's path
        (5.0, 14.0, "first bar met, goal missed"),
        (1.0, 2.9, "first bar missed"),
    ],
)
def test_the_goal_is_judged_on_the_eager_rate_the_app_runs(
    eager: float, compiled: float, verdict: str
) -> None:
    figures = {"project-images-per-s": eager}
    if compiled:
        figures["compiled-images-per-s"] = compiled
    line = goal_line(figures)
    assert f": {verdict}" in line and line.startswith(f"goal: {eager:.2f} images/s eager")
    assert ("not the app's path" in line) == bool(compiled)


@pytest.mark.parametrize("folder", ["gpu", "gpu-h100"])
def test_the_gpu_page_shows_what_the_stored_gpu_results_print(folder: str) -> None:
    root = Path(__file__).resolve().parents[1]
    lines, _ = summarise(root / "benchmarks" / "results" / folder)
    page = (root / "docs" / "gpu.md").read_text()
    assert lines and [line for line in lines if line not in page] == []
