"""The run's own page, ``report.html``, and its TensorBoard log.

The server renders the run-level views from whatever the run directory holds
(:func:`write_report`, rewritten after rounds and at the end; read by :mod:`.run`, drawn by
:mod:`.charts`) and, optionally, logs the same to TensorBoard.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from cmfl_flower.aliases import Row
from cmfl_flower.config import class_list
from cmfl_flower.paths import (
    ACCURACY_PNG,
    LABELS_FILE,
    LABELS_PNG,
    REPORT_HTML,
    TENSORBOARD_DIR,
)

if TYPE_CHECKING:
    pass

from cmfl_flower.report.charts import (
    accuracy_figure,
    data_uri,
    fd_figure,
    labels_figure,
    png_bytes,
    write_png,
)
from cmfl_flower.report.run import (
    JUDGED,
    RECOGNISED,
    SERVER_ACC,
    SITE_CLASS,
    RunView,
    client_label_counts,
    fd_metric,
    latest_grids,
    latest_server_samples,
    load_run,
)


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
    f"{JUDGED}-mean",
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
            write_png(labels_figure(counts), chart)  # first: the JSON says the chart is current
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
