"""What a user sees: the run directory, its pictures, cmfl-report, progress, TensorBoard."""

import base64
import json
import logging
import re
import sys

import numpy as np
import pytest
from PIL import Image

from benchmarks.loopback import LoopbackGrid
from client_app import app as client_app
from cmfl_flower import paths, report
from cmfl_flower.client.task import ClientState, ClientTask
from cmfl_flower.config import AppConfig, TokensConfig
from cmfl_flower.methods.local import local_only_round
from cmfl_flower.report import page as page_module
from cmfl_flower.report.pictures import grid_labels, grid_size, sample_grid
from cmfl_flower.results import RunRecorder
from cmfl_flower.server.rounds import run_federation

# session-scoped runs on one xdist worker: each federation below runs once per test session
# (a module-scoped fixture is torn down whenever the worker turns to another module)
pytestmark = pytest.mark.xdist_group("report-runs")

IMAGES_PER_CLASS = 2
NODES = 3
MIN_IMAGES = TokensConfig().min_images


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One prepared copy of the offline data for every run of this module."""
    return tmp_path_factory.mktemp("data")


def _cfg(root, data, method, rounds, **extra):
    flat = {
        "method": method,
        "federation.rounds": rounds,
        "federation.min-nodes": 2,
        "data.dir": str(data),
        "output.dir": str(root / "runs"),
        "generation.images-per-class": IMAGES_PER_CLASS,
        "generation.steps": 2,
        "tokens.epochs": 1,
        "tokens.objective": "clip",  # the cheaper objective; what is drawn does not depend on it
        "output.progress": False,
    }
    return AppConfig.from_run_config(flat | extra)


@pytest.fixture(scope="session")
def relay_run(tmp_path_factory, data_dir):
    """A 2-round cmfl-relay run of 3 clients, with TensorBoard on; its grid and run dir."""
    root = tmp_path_factory.mktemp("relay")
    cfg = _cfg(root, data_dir, "cmfl-relay", 2, **{"output.tensorboard": True})
    grid = LoopbackGrid(client_app, cfg, NODES, keep_messages=True)
    flwr_logger = logging.getLogger("flwr")
    handler = _Collect()
    flwr_logger.addHandler(handler)
    try:
        run_dir = run_federation(grid, cfg)
    finally:
        flwr_logger.removeHandler(handler)
    return grid, run_dir, handler.messages


class _Collect(logging.Handler):
    """Keeps the messages the server logs."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="session")
def local_run(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("local")
    cfg = _cfg(root, data_dir, "local-only", 1)
    return run_federation(LoopbackGrid(client_app, cfg, 2), cfg)


def _labels(run_dir, partition):
    return json.loads((paths.client_dir(run_dir, partition) / "labels.json").read_text())


def test_run_directory_holds_every_promised_file(relay_run):
    _, run_dir, _ = relay_run
    for name in (
        "config.json",
        "rounds.json",
        "rounds.csv",
        "clients.json",
        "clients.csv",
        "status.json",
        "accuracy.png",
        "labels.json",
        "labels.png",
        "report.html",
    ):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    for partition in range(NODES):
        folder = paths.client_dir(run_dir, partition)
        # round 1 receives nothing, so generates nothing: only round 2 has a grid (no latent
        # cache: the tokens train on CLIP's loss here; tests/test_strategies.py checks it)
        assert sorted(p.name for p in folder.iterdir()) == [
            "labels.json",
            "samples-round-002.png",
            "state",
        ]
    for name in ("accuracy.png", "labels.png"):
        with Image.open(run_dir / name) as image:
            assert image.width >= 400 and image.height >= 200
            assert np.asarray(image.convert("L")).std() > 10  # not a blank canvas


def test_clients_learn_the_resolved_run_name_from_each_message(relay_run):
    grid, run_dir, _ = relay_run
    assert re.fullmatch(r"\d{8}-\d{6}-cmfl-relay", run_dir.name)
    for message in grid.sent:
        assert message.content.config_records["config"]["run-name"] == run_dir.name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run_config"]["output.run-name"] == run_dir.name


def test_sample_grid_has_one_row_per_received_class(relay_run):
    _, run_dir, _ = relay_run
    per_partition = {
        p: {c for c, n in enumerate(_labels(run_dir, p)["train"]) if n >= MIN_IMAGES}
        for p in range(NODES)
    }  # the classes each client relays
    for partition in range(NODES):
        senders = [per_partition[p] for p in range(NODES) if p != partition]
        received = set().union(*senders)
        columns = max(IMAGES_PER_CLASS * sum(c in s for s in senders) for c in received)
        path = paths.client_dir(run_dir, partition) / "samples-round-002.png"
        with Image.open(path) as image:
            assert image.size == report.grid_size(len(received), min(columns, report.MAX_COLUMNS))
            pixels = np.asarray(image.convert("RGB"))
        first = pixels[report.TITLE_HEIGHT : report.TITLE_HEIGHT + report.CELL]
        first = first[:, report.LABEL_WIDTH : report.LABEL_WIDTH + report.CELL]
        assert first.std() > 5  # a generated image, not background


def test_label_distribution_sums_to_the_partition_size(relay_run):
    _, run_dir, _ = relay_run
    rows = json.loads((run_dir / "clients.json").read_text())
    combined = json.loads((run_dir / "labels.json").read_text())
    assert len(combined["class-names"]) == 10
    for row in rows:
        counts = _labels(run_dir, row["partition-id"])
        assert sum(counts["train"]) == row["num-train"]
        assert sum(counts["test"]) == row["num-test"]
        assert combined["partitions"][str(row["partition-id"])]["train"] == counts["train"]


def test_report_html_embeds_the_curves_and_links_the_grids(relay_run):
    _, run_dir, _ = relay_run
    page = (run_dir / "report.html").read_text()
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert base64.b64decode(uris[0]) == (run_dir / "accuracy.png").read_bytes()
    assert base64.b64decode(uris[1]) == (run_dir / "labels.png").read_bytes()
    assert "Final figures" in page and "completed" in page
    linked = re.findall(r'src="(clients/[^"]+\.png)"', page)
    assert len(linked) == NODES and all((run_dir / path).is_file() for path in linked)
    final = json.loads((run_dir / "rounds.json").read_text())[-1]
    assert f"{final['global-acc-mean']:.3f}" in page


def test_server_logs_one_summary_line_per_round(relay_run):
    _, run_dir, records = relay_run
    lines = [r for r in records if re.match(r"round \d+/2: ", r)]
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert len(lines) == 2
    for line, row in zip(lines, rounds, strict=True):
        assert line.startswith(f"round {row['round']}/2: {NODES}/{NODES} replied, ")
        assert row["accepted-share"] == 1.0 and ", accepted-share 1.00, " in line
        assert f"acc {row['global-acc-mean']:.3f}" in line
        assert re.search(r", [\d.]+ [kM]?B sent / [\d.]+ [kM]?B received, [\d.]+ s$", line)
    assert any(f"run directory: {run_dir}" in r for r in records)
    assert any(f"results written to: {run_dir}" in r for r in records)


def test_round_line_format():
    summary = {
        "replies": 3,
        "errors": 1,
        "global-acc-mean": 0.97249,
        "bytes-sent": 1_234_567,
        "bytes-received": 312,
        "round-seconds": 14.06,
    }
    assert report.round_line(2, 3, 4, summary) == (
        "round 2/3: 3/4 replied, accepted-share 0.75, acc 0.972, 1.2 MB sent / 312 B received, "
        "14.1 s, 1 errors"
    )
    assert report.round_line(1, 1, 2, {"replies": 0}).startswith(
        "round 1/1: 0/2 replied, accepted-share 0.00, acc n/a"
    )
    screened = {"replies": 4, "screened-out": 5, "dropped": 2, "quarantined": "3"}
    assert report.round_line(3, 3, 4, screened).endswith(
        "0.0 s, 5 screened-out, 2 dropped, quarantined 3"
    )


def test_cmfl_report_compares_two_runs(relay_run, local_run, tmp_path, capsys):
    _, relay_dir, _ = relay_run
    report.main([str(relay_dir), str(local_run), "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 3  # header + two runs
    for run_dir, strategy in ((relay_dir, "cmfl-relay"), (local_run, "local-only")):
        row = next(line for line in table if run_dir.name in line)
        final = json.loads((run_dir / "rounds.json").read_text())[-1]
        assert strategy in row and f"{final['global-acc-mean']:.3f}" in row
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert relay_dir.name in page and local_run.name in page
    with Image.open(tmp_path / "cmp" / "compare.png") as image:
        assert image.width >= 400 and np.asarray(image.convert("L")).std() > 10


def test_cmfl_report_refuses_a_directory_that_is_no_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path)])
    assert "not a cmfl-flower run directory" in capsys.readouterr().err


def test_tensorboard_holds_the_round_scalars_and_grids(relay_run):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    _, run_dir, _ = relay_run
    events = event_accumulator.EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0}
    )
    events.Reload()
    rounds = json.loads((run_dir / "rounds.json").read_text())
    scalars = events.Scalars("round/global-acc-mean")
    assert [s.step for s in scalars] == [1, 2]
    assert [s.value for s in scalars] == pytest.approx([r["global-acc-mean"] for r in rounds])
    assert [s.value for s in events.Scalars("round/replies")] == [NODES, NODES]
    tags = events.Tags()["images"]
    assert {f"samples/client-{p}" for p in range(NODES)} <= set(tags) and "labels" in tags
    assert [i.step for i in events.Images("samples/client-0")] == [2]


def test_tensorboard_missing_names_the_extra(tmp_path, data_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = _cfg(tmp_path, data_dir, "local-only", 1, **{"output.tensorboard": True})
    with pytest.raises(RuntimeError, match=r"pip install 'cmfl-flower\[tensorboard\]'"):
        RunRecorder.create(cfg)


@pytest.mark.parametrize("enabled", [False, True])
def test_progress_switch(tmp_path, data_dir, capsys, enabled):
    cfg = _cfg(tmp_path, data_dir, "local-only", 1, **{"output.progress": enabled})
    local_only_round(cfg, ClientTask(0, NODES, 1), ClientState(), {})
    err = capsys.readouterr().err
    if enabled:
        # stderr is not a terminal here: plain lines, the finished bar, no carriage returns
        assert re.search(r"^client 0 round 1 encoder: 100%.*batch", err, re.M)
        assert "\r" not in err
    else:
        assert "client 0" not in err and "%|" not in err


def test_a_client_that_cannot_write_its_pictures_still_finishes_the_round(tmp_path, data_dir):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the output root should be")
    cfg = _cfg(tmp_path, data_dir, "local-only", 1, **{"output.run-name": "r"})
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": str(blocker)})})
    output = local_only_round(cfg, ClientTask(0, NODES, 1), ClientState(), {})
    assert 0.0 <= output.metrics["global-acc"] <= 1.0
    assert blocker.is_file()


def test_accuracy_chart_says_why_it_is_empty(tmp_path):
    def note(rounds):
        view = report.RunView(tmp_path, {"method": "diffusion-lora"}, rounds, [], "running")
        return [text.get_text() for text in report.accuracy_figure([view]).axes[0].texts]

    assert note([]) == ["no round finished yet"]
    assert note([{"round": 1, "fd-clip": 11.1}]) == ["no client accuracy in these rounds"]


def _written_run(tmp_path, name, rounds, method="cmfl-relay"):
    """A finished run directory holding just what :func:`report.load_run` reads."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    config = {"run_config": {"method": method, "federation.rounds": len(rounds)}}
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "rounds.json").write_text(json.dumps(rounds))
    (run_dir / "status.json").write_text(json.dumps({"status": "completed"}))
    return run_dir


def _acc(server_round, mean):
    return {
        "round": server_round,
        "global-acc-mean": mean,
        "global-acc-min": mean - 0.1,
        "global-acc-max": mean + 0.1,
        "local-acc-mean": mean + 0.05,
    }


def _recognised(mean, low, high):
    return {
        "generated-recognised-mean": mean,
        "generated-recognised-min": low,
        "generated-recognised-max": high,
    }


# round 1 receives nothing, so generates nothing: no generated-recognised there
GENERATING = [
    _acc(1, 0.41) | {"val-acc-mean": 0.39},
    _acc(2, 0.52) | {"val-acc-mean": 0.48} | _recognised(0.61666, 0.25, 0.875),
    _acc(3, 0.63) | {"val-acc-mean": 0.58} | _recognised(0.93333, 0.8, 1.0),
]


def _table(page, index):
    """The ``index``-th HTML table of a page: one {column: cell text} per body row."""
    table = re.findall(r"<table>(.*?)</table>", page)[index]
    head = re.findall(r"<th>(.*?)</th>", table)
    rows = re.findall(r"<tr>((?:<td>.*?</td>)+)</tr>", table)
    return [dict(zip(head, re.findall(r"<td>(.*?)</td>", row), strict=True)) for row in rows]


def test_accuracy_chart_adds_the_recognised_share_only_when_images_were_generated(tmp_path):
    generating = report.load_run(_written_run(tmp_path, "gen", GENERATING))
    plain = report.load_run(_written_run(tmp_path, "plain", [_acc(1, 0.4), _acc(2, 0.5)]))
    figure = report.accuracy_figure([generating])
    assert len(figure.axes) == 2
    accuracy, recognised = figure.axes
    assert [line.get_ydata()[-1] for line in accuracy.lines] == pytest.approx([0.63, 0.68])
    assert "judge recognises" in recognised.get_title()
    assert recognised.get_ylim() == (0.0, 1.05)
    curve, target = recognised.lines
    assert list(curve.get_xdata()) == [2, 3] and list(curve.get_ydata()) == [0.61666, 0.93333]
    assert target.get_label() == "target 0.85" and target.get_linestyle() == ":"
    assert list(target.get_ydata()) == [0.85, 0.85]
    assert len(recognised.collections) == 1  # the min-max band
    assert figure.get_size_inches()[0] > report.accuracy_figure([plain]).get_size_inches()[0]
    assert len(report.accuracy_figure([plain]).axes) == 1
    # comparing runs: two axes as soon as one of them generated, one curve per such run
    both = report.accuracy_figure([plain, generating])
    assert len(both.axes) == 2
    assert [line.get_label() for line in both.axes[1].lines] == [
        "gen (CLIP, mean over clients)",
        "target 0.85",
    ]


def test_the_independent_judges_share_is_a_dashed_line_and_a_column(tmp_path):
    judged = [row | {"generated-recognised-judge-mean": 0.7} for row in GENERATING[1:]]
    run_dir = _written_run(tmp_path, "judged", [GENERATING[0], *judged])
    figure = report.accuracy_figure([report.load_run(run_dir)])
    clip, judge, _ = figure.axes[1].lines
    assert clip.get_label() == "CLIP, mean over clients"
    assert judge.get_label() == "independent judge, mean" and judge.get_linestyle() == "--"
    assert list(judge.get_xdata()) == [2, 3] and list(judge.get_ydata()) == [0.7, 0.7]
    rounds = _table(report.write_report(run_dir).read_text(), 1)
    assert [row["generated-recognised-judge-mean"] for row in rounds] == ["", "0.700", "0.700"]


def test_accuracy_chart_keeps_its_note_beside_the_recognised_share(tmp_path):
    rounds = [{"round": 1, "fd-clip": 11.1} | _recognised(0.5, 0.25, 0.75)]
    view = report.RunView(tmp_path, {"method": "diffusion-lora"}, rounds, [], "running")
    figure = report.accuracy_figure([view])
    assert len(figure.axes) == 2
    assert [text.get_text() for text in figure.axes[0].texts] == [
        "no client accuracy in these rounds"
    ]


def test_report_html_tables_show_the_recognised_share(tmp_path):
    run_dir = _written_run(tmp_path, "gen", GENERATING)
    page = report.write_report(run_dir).read_text()
    (final,) = _table(page, 0)
    assert final["generated-recognised-mean"] == "0.933"  # the last round's
    assert final["generated-recognised-min-over-rounds"] == "0.617"  # the worst round's
    rounds = _table(page, 1)
    assert [row["generated-recognised-mean"] for row in rounds] == ["", "0.617", "0.933"]
    assert [row["generated-recognised-min"] for row in rounds] == ["", "0.250", "0.800"]
    assert [row["generated-recognised-max"] for row in rounds] == ["", "0.875", "1.000"]
    assert [row["val-acc-mean"] for row in rounds] == ["0.390", "0.480", "0.580"]
    columns = list(rounds[0])
    assert columns.index("local-acc-mean") < columns.index("generated-recognised-mean")
    with Image.open(run_dir / "accuracy.png") as image:
        assert image.width > image.height * 2  # the two axes side by side


def test_report_html_of_a_run_that_generates_nothing_has_no_recognised_column(tmp_path):
    run_dir = _written_run(tmp_path, "plain", [_acc(1, 0.4)], method="local-only")
    page = report.write_report(run_dir).read_text()
    assert "generated-recognised" not in page
    assert _table(page, 1)[0]["global-acc-mean"] == "0.400"


def test_report_html_flags_rounds_that_kept_few_replies_or_screened_or_quarantined(tmp_path):
    healthy = {"replies": 4, "sampled": 4, "accepted-share": 1.0, "screened-out": 0}
    rounds = [
        _acc(1, 0.9) | healthy | {"replies": 1, "accepted-share": 0.25},
        _acc(2, 0.9) | healthy | {"replies": 2, "accepted-share": 0.5},  # half: not flagged
        _acc(3, 0.9) | healthy | {"screened-out": 3},
        _acc(4, 0.9) | healthy | {"quarantined": "1,3"},
        _acc(5, 0.9) | healthy | {"quarantined": ""},  # nobody quarantined
    ]
    page = report.write_report(_written_run(tmp_path, "flagged", rounds)).read_text()
    flagged = re.findall(r"<li>(round \d+): (.*?)</li>", page)
    assert [(where, what.split(":")[0]) for where, what in flagged] == [
        ("round 1", "accepted-share 0.25"),
        ("round 3", "screened-out 3"),
        ("round 4", "quarantined"),
    ]
    assert "1 of 4 sampled clients&#x27; replies were accepted" in flagged[0][1]
    assert "partition(s) 1,3" in flagged[2][1]
    assert page.index("Rounds to check") < page.index("Final figures")
    table = _table(page, 1)
    assert [row["accepted-share"] for row in table] == ["0.250", "0.500", "1.000", "1.000", "1.000"]
    assert [row["quarantined"] for row in table] == ["", "", "", "1,3", ""]
    calm = report.write_report(_written_run(tmp_path, "calm", [_acc(1, 0.9) | healthy]))
    assert "Rounds to check" not in calm.read_text()


def _cells(line):
    """The cells of one line of a Markdown table."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_cmfl_report_table_has_the_recognised_share(tmp_path, capsys):
    generating = _written_run(tmp_path, "gen", GENERATING)
    plain = _written_run(tmp_path, "plain", [_acc(1, 0.4)], method="local-only")
    report.main([str(generating), str(plain)])
    header, _, *rows = capsys.readouterr().out.splitlines()
    columns = _cells(header)
    column = columns.index("generated-recognised-mean")
    assert column == columns.index("local-acc-mean") + 1
    cells = {_cells(row)[0]: _cells(row) for row in rows}
    assert cells["gen"][column] == "0.933"
    assert cells["plain"][column] == ""


def test_a_diffusion_report_draws_the_frechet_distance_and_the_latest_global_samples(tmp_path):
    rounds = [{"round": 1}, {"round": 2, "fd-clip": 90.5}, {"round": 3, "fd-clip": 40.25}]
    run_dir = _written_run(tmp_path, "diffusion", rounds, method="diffusion-unet")
    (run_dir / "samples").mkdir()
    for k in (2, 3, 10):  # round 10 sorts before 3 as text
        Image.new("RGB", (4, 4)).save(run_dir / "samples" / f"round-{k}.png")
    page = report.write_report(run_dir).read_text()
    assert "Fréchet distance per round" in page and "Accuracy per round" not in page
    assert 'src="samples/round-10.png"' in page and "after round 10" in page
    view = report.load_run(run_dir)
    (line,) = page_module.fd_figure(view, "fd-clip").axes[0].lines
    assert list(line.get_xdata()) == [2, 3] and list(line.get_ydata()) == [90.5, 40.25]
    relay = _written_run(tmp_path, "relay", [_acc(1, 0.5) | {"fd-clip": 3.0}])
    assert "Accuracy per round" in report.write_report(relay).read_text()


def test_accuracy_chart_draws_the_global_model_of_a_weight_method(tmp_path):
    rounds = [
        {"round": r, "global-acc-mean": 0.8, "global-acc-min": 0.7, "global-acc-max": 0.9}
        | {"server-global-acc": acc}
        for r, acc in ((1, 0.85), (2, 0.9))
    ]
    view = report.RunView(tmp_path, {"method": "encoder-lora"}, rounds, [], "completed")
    lines = {line.get_label(): line for line in report.accuracy_figure([view]).axes[0].lines}
    assert list(lines["global model, global test"].get_ydata()) == [0.85, 0.9]


def _counts(partitions):
    names = [f"c{i}" for i in range(10)]
    return {p: {"class-names": names, "train": [p % 7] * 10, "test": [1] * 10} for p in partitions}


def test_label_chart_stops_growing_with_the_clients():
    # a chart a row per client tall would grow the server's memory with the federation
    small, large = (page_module.labels_figure(_counts(range(n))) for n in (30, 100))
    assert tuple(large.get_size_inches()) == tuple(small.get_size_inches())
    ticks = [t.get_text() for t in large.axes[0].get_yticklabels()]
    assert ticks[:2] == ["client 0 (0)", "client 4 (40)"] and len(ticks) == 25
    assert large.axes[0].images[0].get_array().shape == (100, 10)  # every client still drawn


def test_report_rewritten_at_most_every_interval_and_at_the_end(tmp_path, data_dir, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("cmfl_flower.results.time.monotonic", lambda: clock[0])
    written: list[float] = []
    monkeypatch.setattr(report, "write_report", lambda run_dir: written.append(clock[0]))
    recorder = RunRecorder.create(_cfg(tmp_path, data_dir, "local-only", 4))
    for server_round, at in enumerate([100.0, 101.0, 104.9, 105.0], start=1):
        clock[0] = at
        recorder.add_round(server_round, {"replies": 1})
    clock[0] = 105.5
    recorder.finish()
    # round 1 (no report yet), round 4 (5 s after it), and the end, whatever the interval
    assert written == [100.0, 105.0, 105.5]
    rows = json.loads((recorder.run_dir / "rounds.json").read_text())
    assert [row["round"] for row in rows] == [1, 2, 3, 4]  # the metric files every round


def test_the_sample_grid_says_which_rows_came_from_names():
    names = ("zero", "one", "two")
    labels = np.array([0, 0, 2, 2])
    title, rows = grid_labels(1, 3, labels, names, np.array([False, False, True, True]))
    assert title == "client 1, round 3: generated from received tokens; (name): from its name"
    assert rows == ["zero", "one", "two (name)"]
    title, rows = grid_labels(1, 3, labels, names, np.ones(4, bool))  # names-generation
    assert title.endswith("generated from class names") and rows == list(names)
    title, rows = grid_labels(1, 3, labels, names, np.zeros(4, bool))
    assert title.endswith("generated from received tokens") and rows == list(names)


def test_a_grid_is_wide_enough_for_its_title():
    images = np.zeros((1, 8, 8, 3), np.uint8)
    title = "client 0, round 3: generated from received tokens; (name): from its name" * 2
    grid = sample_grid(images, np.array([0]), ("zero",), title)
    assert grid.size[0] > grid_size(1, 1)[0]
    assert sample_grid(images, np.array([0]), ("zero",), "short").size == grid_size(1, 1)
