"""The scaling benchmark's arguments: one round count per N, and room for the measured rounds."""

import pytest

from benchmarks import scale


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
