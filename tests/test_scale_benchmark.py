"""The scaling benchmark's arguments (one round count per N, room for the measured rounds), and
its page: the stored results, as ``--show`` prints them."""

from pathlib import Path

import pytest

from benchmarks import scale

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--clients", "10", "30", "--rounds", "5"], "one value per --clients"),
        (["--clients", "10", "--rounds", "3", "--measure-rounds", "3"], "in [1, 3)"),
        (["--clients", "10", "--rounds", "3", "--measure-rounds", "0"], "got 0"),
    ],
)
def test_bad_round_settings_are_refused_before_any_run(argv, message, capsys):
    with pytest.raises(SystemExit):
        scale.main(argv)
    err = capsys.readouterr().err
    assert message in err, err


def test_the_table_prints_counts_as_integers_and_missing_figures_as_dashes():
    row = {"arm": "cmfl-relay", "clients": 10, "rounds": 12, "senders-known": 10, "sampled": 2.0}
    line = scale.table([row]).splitlines()[-1]
    assert line.startswith("| cmfl-relay | 10 | 12 | 10 | 2.00 | - |")


def test_the_performance_page_shows_what_the_results_file_holds(capsys):
    """``python -m benchmarks.scale --show`` prints lines that docs/performance.md holds."""
    scale.main(["--show"])
    page = (ROOT / "docs" / "performance.md").read_text()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines and [line for line in lines if line not in page] == []
