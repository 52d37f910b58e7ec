"""Each site's own image folder: class ids from the federation's list, refusals, the cache."""

import json

import numpy as np
import pytest

import cmfl_flower.data.sites as sites
from benchmarks.loopback import LoopbackGrid
from client_app import app as client_app
from cmfl_flower.client.task import ClientTask, client_task
from cmfl_flower.client.workspace import client_data
from cmfl_flower.config import AppConfig
from cmfl_flower.data.sites import load_eval_folder, load_site
from cmfl_flower.data.sources import DIGIT_NAMES
from cmfl_flower.server.rounds import run_federation
from data_prep import main as data_prep
from tests.site_folders import CLASSES, SITES, held_classes, report_lists, write_site
from tests.test_strategies import make_cfg

NAMES = DIGIT_NAMES


def test_two_sites_with_different_classes_agree_on_every_class_id(tmp_path):
    a = load_site(write_site(tmp_path / "a", {"two": 6, "seven": 5}), NAMES, 16, tmp_path)
    b = load_site(write_site(tmp_path / "b", {"seven": 5, "nine": 4}, 20), NAMES, 16, tmp_path)
    # "seven" is id 7 at both sites, though it is a's second folder and b's first
    assert set(a.train.labels) | set(a.test.labels) == {2, 7}
    assert set(b.train.labels) | set(b.test.labels) == {7, 9}
    assert a.train.class_names == b.train.class_names == NAMES
    assert a.train.images.shape[1:] == (16, 16, 3)
    assert len(a.train) + len(a.test) == 11 and len(a.test) == 3  # 20 %, stratified


def test_a_folder_outside_the_class_list_is_refused_naming_it_and_the_list(tmp_path):
    site = write_site(tmp_path / "a", {"two": 3})
    (site / "ten").mkdir()
    with pytest.raises(ValueError, match=r"\['ten'\].*not in data.classes \(zero, one, two"):
        load_site(site, NAMES, 16, tmp_path)


def test_a_site_without_any_image_is_told_so(tmp_path):
    (tmp_path / "a" / "two").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no image of any class"):
        load_site(tmp_path / "a", NAMES, 16, tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        load_site(tmp_path / "missing", NAMES, 16, tmp_path)


def test_train_and_test_sub_folders_are_the_splits(tmp_path):
    write_site(tmp_path / "a" / "train", {"one": 4, "five": 3})
    write_site(tmp_path / "a" / "test", {"five": 2}, 10)
    data = load_site(tmp_path / "a", NAMES, 16, tmp_path)
    assert np.bincount(data.train.labels, minlength=10)[[1, 5]].tolist() == [4, 3]
    assert data.test.labels.tolist() == [5, 5]
    write_site(tmp_path / "a" / "test", {"eight": 1})
    with pytest.raises(ValueError, match=r"test classes \['eight'\].*no training images"):
        load_site(tmp_path / "a", NAMES, 16, tmp_path)


def test_a_site_is_decoded_once_and_again_when_its_folder_changes(tmp_path, monkeypatch):
    site = write_site(tmp_path / "a", {"two": 4})
    first = load_site(site, NAMES, 16, tmp_path)
    reads = []
    monkeypatch.setattr(sites, "read_image", lambda f, side: reads.append(f) or 1 / 0)
    again = load_site(site, NAMES, 16, tmp_path)  # from the cache: nothing decoded
    assert np.array_equal(again.train.images, first.train.images) and not reads
    write_site(site, {"three": 1})
    with pytest.raises(ZeroDivisionError):  # a new file: the folder is read again
        load_site(site, NAMES, 16, tmp_path)


def test_an_evaluation_folder_is_one_labelled_set(tmp_path):
    folder = write_site(tmp_path / "eval", {"zero": 2, "nine": 3})
    data = load_eval_folder(folder, NAMES, 16, tmp_path)
    assert data.labels.tolist() == [0, 0, 9, 9, 9]


def _task(**paths):
    config = {"partition-id": 0, "num-partitions": 2, **paths}
    return client_task(config, 1, {})


def test_node_config_paths_reach_the_client_and_need_the_class_list(tmp_path):
    site = str(write_site(tmp_path / "a", {"two": 4}))
    task = _task(**{"data-path": site})
    assert task.data_path == site and task.eval_path == ""
    with pytest.raises(ValueError, match="node config data-path needs the run config's data.cl"):
        client_data(make_cfg(tmp_path, "cmfl-relay").data, task)
    with pytest.raises(ValueError, match="data-path must be a path in quotes, got 3"):
        _task(**{"data-path": 3})
    cfg = make_cfg(tmp_path, "cmfl-relay", **{"data.classes": CLASSES})
    data, evaluation = client_data(cfg.data, task)
    assert evaluation is None and set(data.train.labels) == {2}  # no eval-path: no global-acc


def test_the_class_list_must_match_a_prepared_dataset(tmp_path):
    cfg = make_cfg(tmp_path, "cmfl-relay", **{"data.classes": "a,b,c,d,e,f,g,h,i,j"})
    with pytest.raises(ValueError, match=r"data.classes \(a, b, .*differs from the classes"):
        client_data(cfg.data, ClientTask(0, 2, 1))
    with pytest.raises(ValueError, match=r"data.classes names \['a'\] more than once"):
        AppConfig.from_run_config({"data.classes": "a,b,a"})


def test_data_prep_checks_a_site_and_fills_its_cache(tmp_path, capsys):
    site = write_site(tmp_path / "a", {"two": 5, "seven": 5})
    args = ["--site", str(site), "--classes", CLASSES, "--output", str(tmp_path / "root")]
    assert data_prep([*args, "--image-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "   2 two" in out and "   7 seven" in out and "(8 training, 2 test images)" in out
    assert len(list((tmp_path / "root" / "sites").glob("*/train.npz"))) == 1
    (site / "ten").mkdir()
    with pytest.raises(SystemExit) as exit_:
        data_prep(args)
    assert exit_.value.code == 2 and "['ten']" in capsys.readouterr().err


def test_a_relay_over_three_sites_own_folders_reports_each_sites_classes(tmp_path):
    evaluation = write_site(tmp_path / "eval", dict.fromkeys(NAMES, 3), 100)
    cfg = make_cfg(tmp_path, "cmfl-relay", **{"data.classes": CLASSES, "data.image-size": 16})
    grid = LoopbackGrid(client_app, cfg, len(SITES))
    for (node, context), counts in zip(sorted(grid.contexts.items()), SITES, strict=True):
        site = write_site(tmp_path / f"site-{node}", counts, 20 * (node % 3))
        context.node_config |= {"data-path": str(site), "eval-path": str(evaluation)}
    run_dir = run_federation(grid, cfg)
    rows = json.loads((run_dir / "clients.json").read_text())
    for row in rows:
        assert held_classes(row) == set(SITES[row["partition-id"]]), row
        assert 0 <= row["global-acc"] <= 1 and row["num-train"] < 30
    second = [row for row in rows if row["round"] == 2]
    assert all(row["num-received-classes"] > 0 for row in second)  # relayed between sites
    page = (run_dir / "report.html").read_text()
    assert "Sites and their classes" in page
    assert all(report_lists(page, counts) for counts in SITES)
