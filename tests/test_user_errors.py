"""User mistakes end with one line naming the thing and the fix: CLI, ClientApp and ServerApp."""

import json
import shutil
import traceback

import pytest
from flwr.app import Context, RecordDict

from benchmarks.loopback import LoopbackGrid
from client_app import app as client_app
from cmfl_flower.client.workspace import data_dir
from data_prep import main as data_prep
from server_app import RunFailedError
from server_app import main as server_main
from tests.test_data import _folder, _save_dict
from tests.test_strategies import make_cfg


def _serve(cfg_or_flat, num_nodes=2):
    flat = cfg_or_flat if isinstance(cfg_or_flat, dict) else cfg_or_flat.to_run_config()
    grid = LoopbackGrid(client_app, flat, num_nodes, keep_messages=True)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=flat)
    with pytest.raises(RunFailedError) as info:
        server_main(grid, context)
    err = info.value
    # no chained exception and a single frame of our own: Flower prints a short traceback
    assert err.__cause__ is None and err.__suppress_context__
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename != __file__]
    assert [f.name for f in frames] == ["main"]
    return grid, str(err)


def _one_line_client_errors(grid):
    reasons = [r.error.reason for r in grid.replies if r.has_error()]
    assert reasons and all("\n" not in r and "Traceback" not in r for r in reasons)
    return reasons


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as info:
        data_prep(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]  # argparse: usage line, then the error


def test_missing_partition_directory(tmp_path):
    # its own data root: the one make_cfg shares between the tests of a worker must stay whole
    own = {"data.dir": str(tmp_path / "data")}
    cfg = make_cfg(tmp_path, "local-only", 1, **own)
    shutil.rmtree(data_dir(cfg.data, 2) / "partition_0001")
    grid, message = _serve(
        make_cfg(tmp_path, "local-only", 1, **own, **{"federation.min-replies": 2})
    )
    (reason,) = _one_line_client_errors(grid)
    assert "partition_0001/train.npz' is missing; prepare the data again" in reason
    assert "federation.min-replies = 2" in message and reason in message
    status = json.loads((tmp_path / "runs" / "local-only" / "status.json").read_text())
    assert status["status"] == "failed"


def test_weights_path_that_does_not_exist(tmp_path):
    cfg = make_cfg(tmp_path, "local-only", 1, **{"backbone.clip": "/no/such/clip"})
    grid, message = _serve(cfg)
    reasons = _one_line_client_errors(grid)
    expected = "CLIP directory /no/such/clip does not exist: set backbone.clip to a directory"
    assert all(expected in r for r in reasons) and expected in message


def test_unknown_preset(tmp_path):
    _, message = _serve({"backbone.preset": "huge", "output.dir": str(tmp_path)})
    assert "'backbone.preset' = 'huge'" in message and "'tiny'" in message


def test_corrupt_image_file(tmp_path, capsys):
    root = _folder(tmp_path / "imgs")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    argv = ["--dataset", "folder", "--path", str(root), "--num-partitions", "2"]
    line = _cli([*argv, "--output", str(tmp_path / "out")], capsys)
    assert "cannot read image" in line and "broken.png" in line
    assert line.endswith("remove or replace the file")
    assert not (tmp_path / "out").exists()


def test_dataset_without_the_class_column(tmp_path, capsys):
    path = _save_dict(tmp_path / "c100", {"train": 3, "test": 3}, "img", "coarse_label", ["a"])
    argv = ["--dataset", "cifar100", "--path", path, "--output", str(tmp_path / "out")]
    line = _cli(argv, capsys)
    assert "column 'fine_label' missing" in line
    assert "a ClassLabel column 'fine_label'" in line
