"""The run's own page: reading a run directory, its figures, ``report.html``, TensorBoard.

The server renders the run-level views from whatever the run directory holds
(:func:`write_report`, rewritten after rounds and at the end) and, optionally, logs the same to
TensorBoard. Rendering uses matplotlib's Agg canvas (no display, no pyplot state) and Pillow;
matplotlib is imported when a figure is drawn, not with the package, whose pictures
(:mod:`.pictures`) every client draws.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from cmfl_flower.aliases import Row
from cmfl_flower.config import class_list
from cmfl_flower.paths import (
    ACCURACY_PNG,
    CLIENT_ROWS,
    CLIENTS_DIR,
    CONFIG_JSON,
    GRID_NAME,
    LABELS_FILE,
    LABELS_PNG,
    REPORT_HTML,
    ROUNDS,
    SAMPLES_DIR,
    STATUS_JSON,
    TENSORBOARD_DIR,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


RECOGNISED = "generated-recognised"  # share of a client's generated images the judge recognises
SERVER_ACC = "server-global-acc"  # weight methods: the global weights scored by the server
RECOGNISED_TARGET = 0.85  # the share of recognised images the chart marks as the target
SITE_CLASS = "site-class-"  # reply metric: a site's training images of class <id>
FD_METRICS = ("fd-clip", "fid-inception")  # the diffusion methods' scores of the global model
_SERVER_GRID = re.compile(r"^round-(\d+)\.png$")  # the diffusion methods' samples/round-<k>.png


# ----- reading a run directory ------------------------------------------------------------
@dataclass(frozen=True)
class RunView:
    """What a run directory holds, read back."""

    run_dir: Path
    run_config: dict[str, Any]
    rounds: list[Row]
    clients: list[Row]
    status: str

    @property
    def name(self) -> str:
        """The run directory's name."""
        return self.run_dir.name

    @property
    def method(self) -> str:
        """The method the run used, with its strategy when that is not the default FedAvg."""
        method = str(self.run_config.get("method", "?"))
        strategy = str(self.run_config.get("strategy", "fedavg"))
        return method if strategy == "fedavg" else f"{method} ({strategy})"

    def final(self) -> Row:
        """Headline figures: last round's accuracies and scores, summed bytes and seconds.

        With generated images, also the lowest per-round mean share the judge recognised.
        """
        last = self.rounds[-1] if self.rounds else {}
        out: Row = {"rounds": len(self.rounds), "status": self.status}
        headline = ("global-acc-mean", "global-acc-min", "global-acc-max", "local-acc-mean")
        for key in (*headline, f"{RECOGNISED}-mean", "fd-clip", "fid-inception"):
            if key in last:
                out[key] = float(last[key])
        means = [float(r[f"{RECOGNISED}-mean"]) for r in self.rounds if f"{RECOGNISED}-mean" in r]
        if means:
            out[f"{RECOGNISED}-min-over-rounds"] = min(means)
        for key in ("bytes-sent", "bytes-received", "round-seconds"):
            out[key] = sum(row.get(key, 0) for row in self.rounds)
        return out


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def load_run(run_dir: Path) -> RunView:
    """Read a run directory written by :class:`cmfl_flower.results.RunRecorder`."""
    run_dir = Path(run_dir).expanduser().resolve()
    if not (run_dir / CONFIG_JSON).is_file():
        raise ValueError(f"{run_dir} is not a cmfl-flower run directory (no config.json)")
    return RunView(
        run_dir=run_dir,
        run_config=_read_json(run_dir / CONFIG_JSON, {}).get("run_config", {}),
        rounds=_read_json(run_dir / f"{ROUNDS}.json", []),
        clients=_read_json(run_dir / f"{CLIENT_ROWS}.json", []),
        status=str(_read_json(run_dir / STATUS_JSON, {}).get("status", "unknown")),
    )


def client_label_counts(run_dir: Path) -> dict[int, Row]:
    """Every client's label counts found in the run directory, by partition id."""
    found = {}
    for path in sorted((run_dir / CLIENTS_DIR).glob(f"partition-*/{LABELS_FILE}")):
        payload = json.loads(path.read_text())
        found[int(payload["partition-id"])] = payload
    return dict(sorted(found.items()))


def latest_grids(run_dir: Path) -> dict[int, tuple[int, Path]]:
    """Per partition, its latest sample grid: (round, path)."""
    latest: dict[int, tuple[int, Path]] = {}
    for directory in sorted((run_dir / CLIENTS_DIR).glob("partition-*")):
        partition = int(directory.name.removeprefix("partition-"))
        for path in directory.iterdir():
            match = GRID_NAME.match(path.name)
            if match and int(match.group(1)) >= latest.get(partition, (0, path))[0]:
                latest[partition] = (int(match.group(1)), path)
    return dict(sorted(latest.items()))


def latest_server_samples(run_dir: Path) -> tuple[int, Path] | None:
    """The diffusion methods' latest grid of the global model: (round, path)."""
    found = [
        (int(match.group(1)), path)
        for path in (run_dir / SAMPLES_DIR).glob("round-*.png")
        if (match := _SERVER_GRID.match(path.name))
    ]
    return max(found) if found else None


def fd_metric(run: RunView) -> str | None:
    """The Fréchet distance a diffusion run measured, if any."""
    return next((k for k in FD_METRICS if any(k in row for row in run.rounds)), None)


# ----- figures ----------------------------------------------------------------------------
def _png(figure: Figure, path: Path) -> None:
    figure.savefig(path, format="png", dpi=100, bbox_inches="tight")


def _label(run: RunView, runs: Sequence[RunView], what: str) -> str:
    """A curve's legend entry: ``what``, prefixed by the run's name when comparing runs."""
    return f"{run.name} ({what})" if len(runs) > 1 else what


def _band(axes: Axes, rows: Sequence[Row], metric: str, color: str, label: str) -> None:
    """``<metric>-mean`` per round as a solid line over its ``-min``..``-max`` band."""
    rounds = [row["round"] for row in rows]
    mean = [row[f"{metric}-mean"] for row in rows]
    axes.plot(rounds, mean, "o-", color=color, label=label)
    low = [row.get(f"{metric}-min", m) for row, m in zip(rows, mean, strict=True)]
    high = [row.get(f"{metric}-max", m) for row, m in zip(rows, mean, strict=True)]
    axes.fill_between(rounds, low, high, color=color, alpha=0.15, linewidth=0)


def _legend(axes: Axes, runs: Sequence[RunView]) -> None:
    """Inside the axes for one run; below them when comparing runs (it would hide the curves)."""
    if len(runs) == 1:
        axes.legend(fontsize=8)
    else:  # the saved PNG grows to hold it (bbox_inches="tight"); one column, as wide as the
        # axes at most: two columns of long run names ran into the next panel's legend
        axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1)


def _round_axes(axes: Axes, ylabel: str, title: str) -> None:
    """Integer rounds on x, a light grid, the label and title."""
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.set_title(title, fontsize=10)


def _plot_accuracy(axes: Axes, runs: Sequence[RunView]) -> None:
    """Global test accuracy with its band, local test dashed; a note when there is none."""
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        rows = [row for row in run.rounds if "global-acc-mean" in row]
        if not rows:
            continue
        _band(axes, rows, "global-acc", color, _label(run, runs, "global test"))
        rounds = [row["round"] for row in rows]
        local = [row.get("local-acc-mean", np.nan) for row in rows]
        label = _label(run, runs, "local test")
        axes.plot(rounds, local, "s--", color=color, alpha=0.6, label=label)
        if any(SERVER_ACC in row for row in rows):  # weight methods: the global model itself
            server = [row.get(SERVER_ACC, np.nan) for row in rows]
            label = _label(run, runs, "global model, global test")
            axes.plot(rounds, server, "D:", color=color, label=label)
    title = runs[0].method + " — " + runs[0].name if len(runs) == 1 else "accuracy per round"
    _round_axes(axes, "mean client accuracy", title + "\n(band: min–max over clients, global test)")
    if axes.has_data():
        _legend(axes, runs)
    else:
        finished = any(run.rounds for run in runs)
        note = "no client accuracy in these rounds" if finished else "no round finished yet"
        axes.text(0.5, 0.5, note, ha="center", transform=axes.transAxes)


def _plot_recognised(axes: Axes, runs: Sequence[RunView]) -> None:
    """Per round, the share of generated images the judge recognises, against the target."""
    for index, run in enumerate(runs):
        rows = [row for row in run.rounds if f"{RECOGNISED}-mean" in row]
        if rows:
            _band(axes, rows, RECOGNISED, f"C{index % 10}", _label(run, runs, "mean over clients"))
    target = f"target {RECOGNISED_TARGET:.2f}"
    axes.axhline(RECOGNISED_TARGET, color="grey", linestyle=":", label=target)
    axes.set_ylim(0, 1.05)
    title = "generated images the judge recognises\n(band: min–max over clients)"
    _round_axes(axes, "share recognised as their class", title)
    _legend(axes, runs)


def accuracy_figure(runs: Sequence[RunView]) -> Figure:
    """Mean client accuracy per round (global test solid with min-max band, local dashed).

    When a run generated images, a second axes to the right shows the share of them the judge
    recognises as their class, per round, against :data:`RECOGNISED_TARGET`.
    """
    from matplotlib.figure import Figure

    generated = any(f"{RECOGNISED}-mean" in row for run in runs for row in run.rounds)
    figure = Figure(figsize=(12.0, 4.0) if generated else (6.4, 4.0))
    columns = 2 if generated else 1
    _plot_accuracy(figure.add_subplot(1, columns, 1), runs)
    if generated:
        _plot_recognised(figure.add_subplot(1, columns, 2), runs)
    return figure


def fd_figure(run: RunView, metric: str) -> Figure:
    """The global model's Fréchet distance to the test split, per measured round."""
    from matplotlib.figure import Figure

    rows = [row for row in run.rounds if metric in row]
    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.add_subplot()
    axes.plot([row["round"] for row in rows], [row[metric] for row in rows], "o-")
    title = f"{run.method} — {run.name}\n(the global model's samples against the test split)"
    _round_axes(axes, f"{metric} (lower is better)", title)
    return figure


LABELLED_ROWS = 30  # the label chart's height stops growing here


def labels_figure(counts: dict[int, Row]) -> Figure:
    """Heatmap of training images per (partition, class), annotated when small."""
    from matplotlib.figure import Figure

    names = next(iter(counts.values()))["class-names"]
    matrix = np.array([counts[p]["train"] for p in counts])  # (P, C)
    # one labelled row per client up to LABELLED_ROWS; beyond, the same height and every k-th
    # client named (a figure that grows with the clients grows the server's memory with them)
    shown = min(len(counts), LABELLED_ROWS)
    step = -(-len(counts) // LABELLED_ROWS)
    figure = Figure(figsize=(min(2 + 0.55 * len(names), 16), 1.2 + 0.4 * shown))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", aspect="auto")
    axes.set_xticks(range(len(names)), names, rotation=45 if len(names) > 10 else 0, ha="right")
    rows = range(0, len(counts), step)
    partitions = list(counts)
    axes.set_yticks(rows, [f"client {partitions[i]} ({matrix[i].sum()})" for i in rows])
    if matrix.size <= 400:
        for (i, j), value in np.ndenumerate(matrix):
            dark = value > matrix.max() / 2
            axes.text(
                j,
                i,
                str(value),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if dark else "black",
            )
    axes.set_title(
        "training images per client and class (partition label distribution)", fontsize=10
    )
    figure.colorbar(image, ax=axes, fraction=0.03)
    return figure


def png_bytes(figure: Figure) -> bytes:
    """``figure`` as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """PNG bytes as a data URI to embed in HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ----- the run's report -------------------------------------------------------------------
def human_bytes(count: float) -> str:
    """``812 B``, ``48.2 kB``, ``1.2 MB`` (decimal units)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def accepted_share(accepted: int, sampled: int) -> float:
    """The share of sampled nodes whose replies were accepted (0 when none was sampled)."""
    return accepted / sampled if sampled else 0.0


def round_line(server_round: int, rounds: int, sampled: int, summary: Row) -> str:
    """The one line the server logs per round."""
    acc, replies = summary.get("global-acc-mean"), summary.get("replies", 0)
    parts = [
        f"round {server_round}/{rounds}: {replies}/{sampled} replied",
        f"accepted-share {accepted_share(replies, sampled):.2f}",
        f"acc {acc:.3f}" if acc is not None else "acc n/a",
        f"{human_bytes(summary.get('bytes-sent', 0))} sent / "
        f"{human_bytes(summary.get('bytes-received', 0))} received",
        f"{summary.get('round-seconds', 0.0):.1f} s",
    ]
    counted = ("errors", "refused", "screened-out", "dropped")
    problems = [f"{summary[k]} {k}" for k in counted if summary.get(k)]
    if summary.get("quarantined"):
        problems.append(f"quarantined {summary['quarantined']}")
    return ", ".join(parts + problems)


def cell(value: Any, key: str = "") -> str:
    """A table cell: bytes in kB/MB, seconds to 0.1, other floats to 0.001."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "bytes" in key:
            return human_bytes(value)
        if "seconds" in key:
            return f"{value:.1f}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def html_table(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """``rows`` as an HTML table of ``columns``."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(cell(row.get(c, ''), c))}</td>" for c in columns)
        + "</tr>"
        for row in rows
    )
    return f'<div class="wide"><table><tr>{head}</tr>{body}</table></div>'  # scrolls sideways


ROUND_COLUMNS = (
    "round",
    "replies",
    "errors",
    "refused",
    "accepted-share",
    "screened-out",
    "quarantined",
    "global-acc-mean",
    "global-acc-min",
    "global-acc-max",
    "local-acc-mean",
    SERVER_ACC,
    "val-acc-mean",
    "partitions-missing",
    "num-generated",
    f"{RECOGNISED}-mean",
    f"{RECOGNISED}-min",
    f"{RECOGNISED}-max",
    "bytes-sent",
    "bytes-received",
    "round-seconds",
    "model-bytes",
    "fd-clip",
    "fid-inception",
    "dp-epsilon-total",
)
STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
    "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
    "th{background:#f3f3f3}img{max-width:100%}figure{display:inline-block;margin:0 1em 1em 0}"
    ".wide{overflow-x:auto}.flags{background:#fff4e5;border-left:4px solid #e8a33d;"
    "padding:0.5em 1em}"
)
LOW_ACCEPTED_SHARE = 0.5  # rounds whose accepted share is below this are flagged


def round_flags(row: Row) -> list[str]:
    """Why a round's summary needs a second look: few accepted replies, screening, quarantine.

    A round that kept under :data:`LOW_ACCEPTED_SHARE` of its sampled clients' replies reports
    the survivors' means, not the federation's; screening and quarantine mean that some
    client sent what others would not train on.
    """
    flags = []
    share = row.get("accepted-share")
    if isinstance(share, int | float) and share < LOW_ACCEPTED_SHARE:
        flags.append(
            f"accepted-share {share:.2f}: {row.get('replies', '?')} of {row.get('sampled', '?')}"
            " sampled clients' replies were accepted; the round's figures are the survivors'"
        )
    if isinstance(screened := row.get("screened-out"), int | float) and screened > 0:
        flags.append(f"screened-out {screened}: receivers left received sets out of training")
    if quarantined := str(row.get("quarantined", "")):
        flags.append(f"quarantined: the server stopped relaying partition(s) {quarantined}")
    return flags


def flags_section(rounds: Sequence[Row]) -> list[str]:
    """The report's list of flagged rounds (:func:`round_flags`); nothing when none is."""
    items = [
        f"<li>round {html.escape(str(row.get('round', '?')))}: {html.escape(flag)}</li>"
        for row in rounds
        for flag in round_flags(row)
    ]
    if not items:
        return []
    return ["<h2>Rounds to check</h2>", f'<div class="flags"><ul>{"".join(items)}</ul></div>']


def write_labels(run_dir: Path) -> dict[int, Row]:
    """Combine the clients' label counts into ``labels.json`` and ``labels.png``.

    The chart is redrawn only when the counts changed (a partition seen for the first time):
    the report is rewritten after rounds, and the labels stay put.
    """
    counts = client_label_counts(run_dir)
    if counts:
        names = next(iter(counts.values()))["class-names"]
        partitions = {p: {"train": c["train"], "test": c["test"]} for p, c in counts.items()}
        text = json.dumps({"class-names": names, "partitions": partitions}, indent=1)
        labels, chart = run_dir / LABELS_FILE, run_dir / LABELS_PNG
        if not chart.is_file() or not labels.is_file() or labels.read_text() != text:
            _png(labels_figure(counts), chart)  # first: the JSON says the chart is current
            labels.write_text(text)
    return counts


def site_classes(run: RunView) -> dict[int, dict[str, int]]:
    """Per partition, the classes its site's own folder holds: name -> training images.

    From the latest reply of each site with ``site-class-<id>`` metrics (sites that brought
    their own folder, node config ``data-path``); names from ``data.classes``.
    """
    listed = str(run.run_config.get("data.classes", ""))
    names = class_list(listed) if listed else ()
    found: dict[int, dict[str, int]] = {}
    for row in sorted(run.clients, key=lambda r: r.get("round", 0)):
        counts = {
            int(k.removeprefix(SITE_CLASS)): int(v)
            for k, v in row.items()
            if k.startswith(SITE_CLASS)
        }
        if counts and "partition-id" in row:
            found[int(row["partition-id"])] = {
                names[c] if c < len(names) else str(c): n for c, n in sorted(counts.items()) if n
            }
    return dict(sorted(found.items()))


def sites_section(run: RunView) -> list[str]:
    """A table of each site's classes, when sites brought their own folders."""
    sites = site_classes(run)
    if not sites:
        return []
    rows = [
        {
            "partition-id": p,
            "classes": len(held),
            "training images": sum(held.values()),
            "held (images)": ", ".join(f"{name} ({n})" for name, n in held.items()),
        }
        for p, held in sites.items()
    ]
    return ["<h2>Sites and their classes</h2>", html_table(rows, list(rows[0]))]


def _round_sections(run: RunView, accuracy: bytes) -> list[str]:
    """The per-round chart: accuracy, or a diffusion run's Fréchet distance and samples."""
    metric = fd_metric(run)
    if metric is None or any("global-acc-mean" in row for row in run.rounds):
        return ["<h2>Accuracy per round</h2>", f'<img alt="accuracy" src="{data_uri(accuracy)}">']
    chart = png_bytes(fd_figure(run, metric))
    sections = [
        "<h2>Fréchet distance per round</h2>",
        f'<img alt="{metric}" src="{data_uri(chart)}">',
    ]
    if (latest := latest_server_samples(run.run_dir)) is not None:
        k, path = latest
        sections.append(
            f'<figure><img alt="samples of round {k}" src="{path.relative_to(run.run_dir)}">'
            f"<figcaption>the global model's samples after round {k}</figcaption></figure>"
        )
    return sections


def write_report(run_dir: Path) -> Path:
    """(Re)write ``accuracy.png``, the label files and ``report.html`` of a run directory."""
    run = load_run(run_dir)
    accuracy = png_bytes(accuracy_figure([run]))
    (run.run_dir / ACCURACY_PNG).write_bytes(accuracy)
    sections = [
        f"<h1>{html.escape(run.name)}</h1>",
        f"<p>method <b>{html.escape(run.method)}</b>, status <b>{html.escape(run.status)}"
        f"</b>, {len(run.rounds)} of {run.run_config.get('federation.rounds', '?')} rounds. "
        f"Directory: <code>{html.escape(str(run.run_dir))}</code></p>",
        *flags_section(run.rounds),
        "<h2>Final figures</h2>",
        html_table([run.final()], list(run.final())),
        *_round_sections(run, accuracy),
        html_table(run.rounds, [c for c in ROUND_COLUMNS if any(c in r for r in run.rounds)]),
    ]
    sections += sites_section(run)
    if write_labels(run.run_dir):
        png = (run.run_dir / LABELS_PNG).read_bytes()
        sections += ["<h2>Label distribution</h2>", f'<img alt="labels" src="{data_uri(png)}">']
    grids = latest_grids(run.run_dir)
    if grids:
        sections.append("<h2>Generated samples (latest round of each client)</h2>")
        sections += [
            f'<figure><img alt="samples of client {p}" src="{path.relative_to(run.run_dir)}">'
            f"<figcaption>client {p}, round {k}: one row per received class</figcaption></figure>"
            for p, (k, path) in grids.items()
        ]
    config = json.dumps(run.run_config, indent=1)
    sections += ["<h2>Run config</h2>", f"<pre>{html.escape(config)}</pre>"]
    page = f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(run.name)}'
    page += f"</title><style>{STYLE}</style></head><body>{''.join(sections)}</body></html>"
    path = run.run_dir / REPORT_HTML
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path


# ----- TensorBoard ------------------------------------------------------------------------
class TensorBoardLog:
    """Round scalars and the run's pictures as TensorBoard events in ``<run dir>/tensorboard``."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError(
                "output.tensorboard = true needs the tensorboard package: "
                "pip install 'cmfl-flower[tensorboard]'"
            ) from None
        self.run_dir = run_dir
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def log_round(self, server_round: int, summary: Row) -> None:
        """Every numeric summary value, each client's grid of the round, the label chart."""
        for key, value in summary.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"round/{key}", value, server_round)
        for partition, (k, path) in latest_grids(self.run_dir).items():
            if k == server_round:
                self._image(f"samples/client-{partition}", path, server_round)
        labels = self.run_dir / LABELS_PNG
        if server_round == 1 and labels.is_file():
            self._image("labels", labels, server_round)
        self.writer.flush()

    def _image(self, tag: str, path: Path, step: int) -> None:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
