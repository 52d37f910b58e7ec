"""The performance page holds every line each benchmark's ``--show`` prints from its results.

The figures on ``docs/performance.md`` are those the results files under
``benchmarks/results/`` keep, with the command and commit that measured them; a re-run that
changes a stored figure fails here until the page shows it.
"""

import importlib

import pytest

from benchmarks import ROOT

PAGE = ROOT / "docs" / "performance.md"
SHOWN = (
    "benchmarks.cold_start",
    "benchmarks.deployment",
    "benchmarks.generation",
    "benchmarks.memory",
    "benchmarks.neighbour",
    "benchmarks.round",
)


@pytest.mark.parametrize("module", SHOWN)
def test_the_performance_page_shows_what_the_results_file_holds(module, capsys):
    importlib.import_module(module).main(["--show"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    missing = [line for line in lines if line not in PAGE.read_text()]
    assert lines and missing == []


@pytest.mark.parametrize("module", SHOWN)
def test_show_names_a_missing_results_file(module, tmp_path):
    option = "--json" if module == "benchmarks.cold_start" else "--results"
    missing = tmp_path / "none.json"
    with pytest.raises(SystemExit, match=f"--show: no {missing}; run the benchmark first"):
        importlib.import_module(module).main(["--show", option, str(missing)])
