"""The independent judge: trained on public digits, it reads real digits, saves and loads, and
a generating client reports its verdict when ``generation.judge`` names its file."""

import json

import numpy as np
import pytest

from benchmarks.loopback import LoopbackGrid
from client_app import app as client_app
from cmfl_flower.data.sources import load_source
from cmfl_flower.judge import JUDGED, fit, judge_for, load_judge, main
from cmfl_flower.server.rounds import run_federation
from tests.test_strategies import make_cfg


@pytest.fixture(scope="module")
def judge_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("judge") / "digits.safetensors"
    main(["--out", str(path)])
    return path


def test_a_judge_trained_on_public_digits_reads_the_test_digits_and_not_wrong_labels():
    public, test = load_source("digits", "public"), load_source("digits", "test")
    judge = fit(public.images, public.labels, public.class_names, (test.images, test.labels))
    assert judge.test_accuracy > 0.9
    shifted = (test.labels + 1) % 10  # every image under the next class's label
    assert judge.recognised(test.images, shifted) < 0.1
    big = np.repeat(np.repeat(test.images, 4, axis=1), 4, axis=2)  # (N, 32, 32, 3)
    assert judge.recognised(big, test.labels) == judge.test_accuracy  # averaged back to 8x8


def test_the_saved_judge_loads_with_its_classes_and_accuracy(judge_file):
    judge = load_judge(str(judge_file))
    test = load_source("digits", "test")
    assert judge.class_names == test.class_names and judge.side == 8
    assert judge.recognised(test.images, test.labels) == pytest.approx(judge.test_accuracy)


def test_a_missing_or_foreign_judge_file_and_other_classes_are_refused(judge_file, tmp_path):
    with pytest.raises(ValueError, match="generation.judge: no judge file"):
        load_judge(str(tmp_path / "none.safetensors"))
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(b"not a judge")
    with pytest.raises(ValueError, match="is not a judge file"):
        load_judge(str(foreign))
    with pytest.raises(ValueError, match=r"judges classes \['zero'.*the run's are \['cat'"):
        judge_for(str(judge_file), ("cat", "dog"))


def test_generating_clients_report_the_independent_judges_share(judge_file, tmp_path):
    cfg = make_cfg(tmp_path, "cmfl-relay", 2, **{"generation.judge": str(judge_file)})
    run_dir = run_federation(LoopbackGrid(client_app, cfg, 2), cfg)
    clients = json.loads((run_dir / "clients.json").read_text())
    second = [row for row in clients if row["round"] == 2]
    assert len(second) == 2 and all(0.0 <= row[JUDGED] <= 1.0 for row in second)
    assert all(JUDGED not in row for row in clients if row["round"] == 1)  # nothing generated
    last = json.loads((run_dir / "rounds.json").read_text())[-1]
    assert last[f"{JUDGED}-mean"] == pytest.approx(np.mean([row[JUDGED] for row in second]))
