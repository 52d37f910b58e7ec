"""The ``cmfl-data-prep`` CLI: prepares partitions, refuses bad arguments without writing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cmfl_flower.data import load_partition, read_meta
from data_prep import main

ROOT = Path(__file__).resolve().parents[1]


def test_module_entry_point(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "data_prep", "--num-partitions", "4", "--output", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"output: {out.resolve()}" in result.stdout
    assert f"label distribution: {out.resolve() / 'label_distribution.png'}" in result.stdout
    assert read_meta(out)["spec"]["num_partitions"] == 4  # type: ignore[index]


def test_main_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["--num-partitions", "3", "--partitioner", "pathological", "--output", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["client", "train"])
    rows = [line.split() for line in lines[header + 1 : header + 4]]
    for pid, row in enumerate(rows):
        data = load_partition(out, pid)
        assert row == [str(pid), str(len(data.train)), str(len(data.test)), "2"]


def test_default_output_under_data_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CMFL_FLOWER_DATA", str(tmp_path))
    assert main(["--num-partitions", "2", "--partitioner", "iid", "--seed", "5"]) == 0
    expected = tmp_path / "digits-iid-n2-m10-t0.25-s5"
    assert f"output: {expected}" in capsys.readouterr().out
    assert (expected / "meta.json").is_file()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--alpha", "-1"], "--alpha"),
        (["--num-partitions", "0"], "--num-partitions"),
        (["--test-fraction", "1.5"], "--test-fraction"),
        (["--partitioner", "random"], "--partitioner"),
        (["--num-partitions", "four"], "--num-partitions"),
        (["--min-partition-size", "1000"], "min_partition_size"),
        (["--dataset", "folder"], "--path"),
    ],
)
def test_bad_argument_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output", str(tmp_path / "sub" / "out")])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    assert main(["--num-partitions", "2", "--output", out]) == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["--num-partitions", "3", "--output", out])
    assert exit_info.value.code == 2
    assert "--force" in capsys.readouterr().err
    assert main(["--num-partitions", "3", "--output", out, "--force"]) == 0
    assert read_meta(Path(out))["spec"]["num_partitions"] == 3  # type: ignore[index]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
