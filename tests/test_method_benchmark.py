"""The method benchmark's bookkeeping: targets, tuning choice, DP noise for a target epsilon."""

import json
import math
import platform

import pytest

import benchmarks
from benchmarks import method
from cmfl_flower.config import PrivacyConfig
from cmfl_flower.privacy import epsilon


@pytest.mark.parametrize("target", [1.0, 4.0, 16.0])
def test_noise_for_reaches_the_target_epsilon(target):
    sigma = method.noise_for(target, clip_norm=0.2)
    cfg = PrivacyConfig(enabled=True, clip_norm=0.2, noise_multiplier=sigma)
    assert math.isclose(epsilon(cfg, method.ROUNDS), target, rel_tol=1e-3)


def test_checks_state_each_target_with_its_margin():
    rows = {
        "centralised": {"mean": 0.82, "bytes_per_round": 0.0},
        "centralised-tokens": {"mean": 0.90, "bytes_per_round": 0.0},
        "cmfl-relay": {"mean": 0.80, "bytes_per_round": 1_000.0},
        "cmfl-relay-no-cap": {"mean": 0.95, "bytes_per_round": 1_000.0},  # no rival: a variant
        "local-only": {"mean": 0.60, "bytes_per_round": 0.0},
        "names-generation": {"mean": 0.78, "bytes_per_round": 0.0},
        "fedavg-encoder": {"mean": 0.75, "bytes_per_round": 10_000.0},
    }
    p1 = method.checks("P1", rows)
    assert p1[0] == "cmfl-relay - best rival (names-generation): +2.0 points (target >= +3): missed"
    assert p1[1] == "centralised - cmfl-relay: +2.0 points (target <= 3): met"
    assert p1[2] == "relay bytes / fedavg-encoder bytes: 0.100 (target <= 0.2): met"
    p3 = method.checks("P3", rows)
    assert p3[0].endswith("(target > 0): met")
    assert p3[1] == "centralised-tokens - cmfl-relay: +10.0 points (target <= 5): missed"


def test_the_held_classes_decision_and_the_provenance_are_printed_from_the_rows():
    details = {
        "cmfl-relay": {"validation": [0.70, 0.74, float("nan")]},
        "cmfl-relay-lacking-only": {"validation": [0.75, 0.72, 0.71]},
    }
    assert method.held_classes(details) == [
        "held classes: best validation 0.740 generating for them, 0.750 for lacking classes "
        "only: generation.held-classes = false"
    ]
    assert method.held_classes({"cmfl-relay": details["cmfl-relay"]}) == []
    stamp = {"commit": "0123456789abcdef", "command": "python -m benchmarks.method", "date": "d"}
    rows = {"local-only": stamp, "cmfl-relay": stamp, "zero-shot": {}}
    assert method.provenance(rows) == [
        "local-only, cmfl-relay: `python -m benchmarks.method` at 0123456789ab on d",
        "zero-shot: measured before rows recorded their provenance",
    ]


def test_best_setting_is_chosen_on_validation_accuracy():
    results = [{"val": 0.5}, {"val": 0.9}, {"val": float("nan")}]
    assert method.best_setting(results) == method.TUNING_GRID[1]
    assert method.best_setting([]) == {}
    jobs = method.tuning_jobs("local-only", "P1", {"encoder.distill": 1.0})
    assert len(jobs) == len(method.TUNING_GRID) and method.tuning_jobs("zero-shot", "P1", {}) == []
    assert all(dict(j.extra)["encoder.distill"] == 1.0 for j in jobs)  # --set reaches tuning
    assert all(dict(j.extra)["data.validation-fraction"] > 0 and j.seed == 0 for j in jobs)
    assert all(dict(j.extra)["data.validation-scope"] == "pooled" for j in jobs)


def test_results_of_some_arms_keep_the_others_on_disk(tmp_path):
    path = tmp_path / "method.json"
    method.write_merged(path, {"P1": {"local-only": {"mean": 0.4}, "cmfl-relay": {"mean": 0.5}}})
    method.write_merged(path, {"P3": {"local-only": {"mean": float("nan")}}})
    method.write_merged(path, {"P1": {"cmfl-relay": {"mean": 0.7}}})
    assert path.read_text().count("null") == 1  # strict JSON: NaN is written as null
    assert json.loads(path.read_text()) == {
        "P1": {"local-only": {"mean": 0.4}, "cmfl-relay": {"mean": 0.7}},
        "P3": {"local-only": {"mean": None}},
    }


def test_reused_tuning_takes_each_arms_chosen_setting_and_names_a_missing_arm(tmp_path):
    path = tmp_path / "method-details.json"
    chosen = {"encoder.lr": 0.001, "encoder.epochs": 2}
    path.write_text(json.dumps({"P1": {"local-only": {"chosen": chosen, "per_seed": []}}}))
    assert method.reused_settings(path, "P1", ("local-only",)) == {"local-only": chosen}
    with pytest.raises(ValueError, match=r"P1 setting for arms \['cmfl-relay'\]"):
        method.reused_settings(path, "P1", ("local-only", "cmfl-relay"))


def test_show_prints_the_stored_tables_in_arm_order_and_names_a_missing_file(tmp_path, capsys):
    row = {"seeds": 3, "mean": 0.7, "min": 0.6, "max": 0.8, "bytes_per_round": 2048.0}
    stored = {"P1": {"cmfl-relay": row, "local-only": row | {"mean": 0.5}}}
    method.write_merged(tmp_path / "method.json", stored)
    chosen = {"local-only": {"chosen": {"encoder.lr": 0.001}, "per_seed": []}}
    method.write_merged(tmp_path / "method-details.json", {"P1": chosen})
    method.main(["--show", "--results", str(tmp_path), "--protocol", "P1", "P3"])
    out = capsys.readouterr().out
    assert out.index("| local-only | 3 | 0.500") < out.index("| cmfl-relay | 3 | 0.700")
    assert "| local-only | 3 | 0.500 | 0.600 | 0.800 | 2.0 kB | lr 0.001 |" in out
    assert "cmfl-relay - best rival (local-only): +20.0 points (target >= +3): met" in out
    assert "P3" not in out  # nothing stored for it
    with pytest.raises(SystemExit, match="method-details.json"):
        method.main(["--show", "--results", str(tmp_path / "empty")])


def test_the_default_arms_and_the_optional_ones_run_when_named(tmp_path, monkeypatch):
    ran: list[tuple[str, ...]] = []

    def fake_protocol(protocol, seeds, arms, root, args):
        ran.append(arms)
        return {}, {}

    monkeypatch.setattr(method, "run_protocol", fake_protocol)
    common = ["--protocol", "P1", "--results", str(tmp_path), "--out", str(tmp_path)]
    method.main(common)
    method.main([*common, "--arms", "cmfl-relay", "cmfl-relay-no-cap"])
    assert ran[0] == (
        "zero-shot",
        "centralised",
        "centralised-tokens",
        "local-only",
        "local-only-tokens",
        "names-generation",
        "fedavg-encoder",
        "cmfl-relay",
        "cmfl-relay-lacking-only",
        "cmfl-relay-no-generation",
    )
    assert ran[1] == ("cmfl-relay", "cmfl-relay-no-cap")


def test_the_page_shows_what_the_results_files_hold(capsys):
    """Every line ``--show`` prints from the stored results is on docs/benchmark-method.md."""
    method.main(["--show"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    page = (method.RESULTS.parents[1] / "docs" / "benchmark-method.md").read_text()
    assert len(lines) > 30 and [line for line in lines if line not in page] == []


def test_an_out_folder_holding_this_runs_directories_is_refused_before_any_run(tmp_path):
    parsed = type("Args", (), {"no_tune": False, "reuse_tuning": None, "seeds": 2})()
    names = [method.run_name(job) for job in method.planned("P2", ("cmfl-relay",), parsed)]
    assert names == [
        "P2-cmfl-relay-s0-tune0",
        "P2-cmfl-relay-s0-tune1",
        "P2-cmfl-relay-s0-tune2",
        "P2-cmfl-relay-s0",
        "P2-cmfl-relay-s1",
    ]
    (tmp_path / "runs" / "P2-cmfl-relay-s0-tune2").mkdir(parents=True)
    jobs = method.planned("P2", ("cmfl-relay",), parsed)
    with pytest.raises(SystemExit, match="already holds run directories .*P2-cmfl-relay-s0-tune2"):
        method.check_fresh(jobs, tmp_path)
    parsed.no_tune = True
    method.check_fresh(method.planned("P2", ("cmfl-relay",), parsed), tmp_path)  # no tuning runs


ORPHAN = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from benchmarks import pinned_worker
if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), pinned_worker, (1,))
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 120)
    time.sleep(0.5)
    os._exit(0)  # the benchmark is killed: no shutdown of its pool
"""


def test_a_pool_worker_exits_once_its_benchmark_process_is_gone(tmp_path):
    import os
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    env = os.environ | {"PYTHONPATH": str(method.RESULTS.parents[1])}  # this checkout's
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.stdout.strip(), done.stderr
    worker = int(done.stdout.split()[0])
    deadline = time.monotonic() + 30
    while psutil.pid_exists(worker) and psutil.Process(worker).status() != "zombie":
        assert time.monotonic() < deadline, "the orphaned worker still runs"
        time.sleep(0.5)


def test_the_privacy_sweep_runs_without_dp_beside_the_dp_runs_at_a_public_clip_norm(
    tmp_path, monkeypatch
):
    batches: list[list[method.Job]] = []

    def fake_run_all(jobs, root, workers, threads):
        batches.append(jobs)
        for job in jobs:
            (tmp_path / method.run_name(job)).mkdir()
            last = {"dp-epsilon-total": 4.0, "dp-epsilon-client-total": 6.0}
            (tmp_path / method.run_name(job) / "rounds.json").write_text(json.dumps([last]))
        return [
            {
                "run-dir": str(tmp_path / method.run_name(job)),
                "acc": 0.7,
                "generated-recognised": 0.5,
            }
            for job in jobs
        ]

    monkeypatch.setattr(method, "run_all", fake_run_all)
    monkeypatch.setattr(method, "public_clip_norm", lambda cfg: 0.25)
    monkeypatch.setattr(method, "drift_norms", lambda run_dir, cfg: [0.1, 0.2, 0.3, 0.4])
    rows = method.privacy_sweep("P1", tmp_path, [16.0, 4.0], 2, 1, control=False)
    assert len(batches) == 1  # one pool batch: no worker idles while the run without DP goes
    assert [job.tag for job in batches[0]] == ["-dp-off", "-dp-eps16", "-dp-eps4"]
    assert rows[0]["epsilon"] is None and rows[0]["clipped-share"] == 0.5
    assert {row["clip-norm"] for row in rows} == {0.25}
    assert dict(batches[0][2].extra)["privacy.noise-multiplier"] == method.noise_for(4.0, 0.25)


def test_the_table_names_the_rounds_its_rows_ran():
    row = {"seeds": 1, "mean": 0.7, "min": 0.7, "max": 0.7, "bytes_per_round": 0.0}
    same = method.table("P1", {"cmfl-relay": row | {"rounds": 3}}, {})
    assert "after round 3)" in same and "| cmfl-relay | 1 |" in same
    mixed = method.table("P1", {"zero-shot": row, "cmfl-relay": row | {"rounds": 3}}, {})
    assert "after each row's last round" in mixed
    assert "| zero-shot (10 rounds) | 1 |" in mixed and "| cmfl-relay (3 rounds) | 1 |" in mixed


def test_the_privacy_lines_say_where_the_clip_norm_came_from_and_what_it_clips():
    plain = {"epsilon": None, "noise-multiplier": 0.0, "clip-norm": 0.462, "acc": 0.75}
    plain |= {"clipped-share": 0.25, "largest-drift": 0.657}
    sweep = {"protocol": "P1", "rows": [plain], "command": "c", "commit": "a" * 40, "date": "d"}
    lines = method.privacy_lines(sweep)
    assert (
        "- clip norm 0.462 from public information (the backbone's longest pretrained "
        "token): it would clip 25% of the vectors of the run without DP (their largest drift "
        "from the name: 0.657)" in lines
    )
    assert lines[-1] == f"- `c` at {'a' * 12} on d"
    before = {key: value for key, value in plain.items() if key != "clipped-share"}
    old = method.privacy_lines({"protocol": "P1", "rows": [before]})
    assert old[-2:] == ["", "- measured before the sweep recorded its provenance"]


def test_results_record_the_versions_of_the_packages_that_compute(monkeypatch):
    import torch

    found = benchmarks.versions()
    assert found["python"] == platform.python_version()
    assert found["torch"].split("+")[0] == torch.__version__.split("+")[0]
    monkeypatch.setattr(benchmarks, "PACKAGES", ("torch", "no-such-package-here"))
    assert benchmarks.versions()["no-such-package-here"] == "missing"
