"""The cold-start benchmark: its child imports nothing before it times ``import client_app``,
and a message answered in a fresh process comes back with its four timings."""

import subprocess
import sys

from benchmarks import ROOT, cold_start
from benchmarks.cold_start import STEPS, measure_method, table

PROBE = "import sys, benchmarks.cold_start_child; print(sorted(sys.modules))"


def test_the_child_driver_imports_only_the_standard_library_before_timing():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT)
    loaded = out.stdout
    assert "'torch'" not in loaded and "'flwr'" not in loaded and "'cmfl_flower'" not in loaded


def test_a_message_in_a_fresh_process_is_timed_step_by_step(tmp_path):
    args = cold_start._parser().parse_args(["--clients", "1", "--rounds", "1"])
    rows = measure_method("local-only", ROOT, "after", args, tmp_path)
    assert [(row["method"], row["round"]) for row in rows] == [("local-only", 1)]
    assert set(rows[0]["timings"]) == set(STEPS) and rows[0]["threads"] == 1
    assert all(seconds > 0 for seconds in rows[0]["timings"].values())
    assert "| local-only | 1 | " in table({"after": rows})
