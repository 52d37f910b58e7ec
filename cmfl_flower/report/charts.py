"""The run's charts: accuracy and recognised share per round, Fréchet distance, label counts.

Drawn on matplotlib's Agg canvas (no display, no pyplot state); matplotlib is imported when a
figure is drawn, not with the package, whose pictures (:mod:`.pictures`) every client draws.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cmfl_flower.aliases import Row

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

from cmfl_flower.report.run import (
    JUDGED,
    RECOGNISED,
    RECOGNISED_TARGET,
    SERVER_ACC,
    RunView,
)


def write_png(figure: Figure, path: Path) -> None:
    """Save ``figure`` as a PNG file."""
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
    """Per round, the share of generated images the judge recognises, against the target.

    With ``generation.judge`` set, the independent judge's mean share is a dashed line.
    """
    for index, run in enumerate(runs):
        colour = f"C{index % 10}"
        rows = [row for row in run.rounds if f"{RECOGNISED}-mean" in row]
        if rows:
            _band(axes, rows, RECOGNISED, colour, _label(run, runs, "CLIP, mean over clients"))
        judged = [row for row in run.rounds if f"{JUDGED}-mean" in row]
        if judged:
            shares = [row[f"{JUDGED}-mean"] for row in judged]
            label = _label(run, runs, "independent judge, mean")
            axes.plot([row["round"] for row in judged], shares, "s--", color=colour, label=label)
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
