"""benchmarks/method_defaults.py: values read as the config reads them, validation runs only,
and a default displaced only by a lead larger than the seeds' spread."""

import json

import pytest

from benchmarks import method_defaults as defaults
from benchmarks.method import ROUNDS, VALIDATION


def test_values_are_read_as_the_config_reads_them_and_bad_ones_are_named():
    assert defaults.parse_check("encoder.distill=0,0.5,1") == ("encoder.distill", [0.0, 0.5, 1.0])
    assert defaults.parse_check("relay.max-senders-per-class=0,2")[1] == [0, 2]
    with pytest.raises(SystemExit, match="unknown run-config key 'encoder.distil'"):
        defaults.parse_check("encoder.distil=0")
    with pytest.raises(SystemExit, match="(?s)--check encoder.distill-on: .*'all' or 'local'"):
        defaults.parse_check("encoder.distill-on=some")
    with pytest.raises(SystemExit, match=r"--check encoder.distill: a value is named twice"):
        defaults.parse_check("encoder.distill=1,1.0")


def test_every_run_holds_out_validation_for_the_full_rounds_with_the_tuned_setting():
    tuned = {"encoder.lr": 0.003, "encoder.epochs": 1}
    runs = defaults.jobs("P1", "encoder.distill", [0.0, 0.5], 2, tuned)
    assert [(job.seed, dict(job.extra)["encoder.distill"]) for job in runs] == [
        (0, 0.0),
        (1, 0.0),
        (0, 0.5),
        (1, 0.5),
    ]
    for job in runs:
        assert job.arm == "cmfl-relay" and job.rounds == ROUNDS
        assert dict(job.extra).items() >= (tuned | VALIDATION).items()


def test_a_default_is_displaced_only_by_a_lead_beyond_the_seeds_spread():
    close = defaults.verdict(1.0, {"0.0": [0.75, 0.77], "1.0": [0.74, 0.76]})
    assert close["best"] == "0.0" and not close["change"]  # 1 point ahead, 2 points of spread
    clear = defaults.verdict(1.0, {"0.0": [0.80, 0.81], "1.0": [0.74, 0.76]})
    assert clear["change"] and clear["lead"] == pytest.approx(0.055)
    kept = defaults.verdict("all", {'"all"': [0.8], '"local"': [0.7]})
    assert kept["best"] == '"all"' and not kept["change"]


def test_show_prints_each_stored_key_and_needs_a_check_to_run(tmp_path, capsys):
    entry = {
        "default": 1.0,
        "validation": {"0.0": [0.80, 0.81], "1.0": [0.74, 0.76]},
        "verdict": defaults.verdict(1.0, {"0.0": [0.80, 0.81], "1.0": [0.74, 0.76]}),
        "command": "python -m benchmarks.method_defaults --check encoder.distill=0,1",
        "commit": "0123456789abcdef",
        "date": "2026-12-07",
    }
    path = tmp_path / "defaults.json"
    path.write_text(json.dumps({"P1": {"encoder.distill": entry}}))
    defaults.main(["--show", "--results", str(path)])
    out = capsys.readouterr().out
    assert "| 1.0 (default) | 2 | 0.750 | 0.740 | 0.760 |" in out
    assert "best on validation 0.0, +5.5 points over the default (seeds' spread 2.0)" in out
    assert "change the default to 0.0" in out and "at 0123456789ab on 2026-12-07" in out
    with pytest.raises(SystemExit):
        defaults.main(["--protocol", "P1"])


def test_the_default_is_one_run_per_seed_shared_by_every_checked_key():
    distill = defaults.jobs("P1", "encoder.distill", [0.0, 1.0], 2, {})
    cap = defaults.jobs("P1", "relay.max-senders-per-class", [0, 2], 2, {})
    default_cap = defaults.AppConfig.from_run_config({}).relay.max_senders_per_class
    shared = set(distill) & set(cap)
    assert len(shared) == 2 and {job.seed for job in shared} == {0, 1}
    for job in shared:
        assert job.tag == "-default"
        assert "relay.max-senders-per-class" not in dict(job.extra)
    others = [job for job in cap if job not in shared]
    assert {dict(job.extra)["relay.max-senders-per-class"] for job in others} == (
        {0, 2} - {default_cap}
    )


def test_the_page_shows_what_the_results_file_holds(capsys):
    """Every line ``--show`` prints from the stored verdicts is on docs/benchmark-method.md."""
    defaults.main(["--show"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    page = (defaults.RESULTS.parents[1] / "docs" / "benchmark-method.md").read_text()
    assert len(lines) > 10 and [line for line in lines if line not in page] == []


def test_a_default_that_is_best_is_shown_with_its_lead_over_the_runner_up():
    scores = {"0.0": [0.70, 0.72], "0.5": [0.73, 0.74], "1.0": [0.74, 0.76]}
    entry = {"default": 1.0, "validation": scores, "verdict": defaults.verdict(1.0, scores)}
    entry |= {"command": "python -m benchmarks.method_defaults", "commit": "0" * 40, "date": "d"}
    lines = defaults.render("P1", "encoder.distill", entry)
    assert (
        "- the default is best on validation, 1.5 points over 0.5 (seeds' spread 2.0): "
        "keep the default" in lines
    )
