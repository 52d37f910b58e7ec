"""Pictures a client writes of its own data: sample grids of generated images, label counts.

Clients write into ``<run dir>/clients/partition-<i>/`` on *their* filesystem; in a simulation
that is the server's run directory, in a deployment the SuperNode machine's output root.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cmfl_flower.paths import (
    LABELS_FILE,
    grid_name,
)

CELL = 96  # pixels of one image in a sample grid
PAD = 4  # pixels between grid cells
LABEL_WIDTH = 120  # pixels of the class-name column of a sample grid
MAX_COLUMNS = 8  # images shown per class in a sample grid
TITLE_HEIGHT = 28  # pixels of the title line above a sample grid
MIN_WIDTH = 420  # pixels: room for the title
_UP, _DOWN = Image.Resampling.NEAREST, Image.Resampling.LANCZOS  # keep pixels honest


# ----- what a client writes ---------------------------------------------------------------


def grid_size(rows: int, columns: int) -> tuple[int, int]:
    """(width, height) in pixels of a sample grid with ``rows`` classes, ``columns`` images.

    A title longer than that width widens the grid to fit it (:func:`sample_grid`).
    """
    width = max(LABEL_WIDTH + columns * (CELL + PAD) + PAD, MIN_WIDTH)
    return width, TITLE_HEIGHT + rows * (CELL + PAD) + PAD


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def sample_grid(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    title: str,
    columns: int = MAX_COLUMNS,
    screened: np.ndarray | None = None,
) -> Image.Image:
    """One row per class in ``labels`` (sorted), up to ``columns`` of its images per row.

    images: (N, H, W, 3) uint8; labels: (N,) class ids into ``class_names``; screened: (N,)
    bool, the images the receiver's screening left out of training, crossed out in red.
    """
    if len(images) == 0:
        raise ValueError("a sample grid needs at least one image")
    crossed = np.zeros(len(images), bool) if screened is None else np.asarray(screened, bool)
    classes = sorted({int(c) for c in labels})
    width = min(columns, max(int((labels == c).sum()) for c in classes))
    font = _font(16)
    size = grid_size(len(classes), width)
    title_width = int(font.getlength(title)) + 2 * PAD  # a long title widens the grid
    canvas = Image.new("RGB", (max(size[0], title_width), size[1]), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, TITLE_HEIGHT // 2), title, fill="black", font=font, anchor="lm")
    for row, class_id in enumerate(classes):
        top = TITLE_HEIGHT + row * (CELL + PAD)
        name = class_names[class_id] if class_id < len(class_names) else str(class_id)
        draw.text((PAD, top + CELL // 2), name, fill="black", font=font, anchor="lm")
        rows = labels == class_id
        for col, (image, out) in enumerate(zip(images[rows][:width], crossed[rows], strict=False)):
            tile = Image.fromarray(image)
            smaller = tile.width < CELL
            tile = tile.resize((CELL, CELL), _UP if smaller else _DOWN)
            left = LABEL_WIDTH + col * (CELL + PAD)
            canvas.paste(tile, (left, top))
            if out:
                _cross(draw, left, top)
    return canvas


def _cross(draw: ImageDraw.ImageDraw, left: int, top: int) -> None:
    """A red frame and cross over the cell at (left, top): screened out."""
    box = (left, top, left + CELL - 1, top + CELL - 1)
    draw.rectangle(box, outline="red", width=3)
    draw.line(box, fill="red", width=3)
    draw.line((box[0], box[3], box[2], box[1]), fill="red", width=3)


def write_sample_grid(
    directory: Path,
    partition_id: int,
    server_round: int,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    screened: np.ndarray | None = None,
    from_names: np.ndarray | None = None,
) -> Path:
    """Save the round's sample grid into a client's artifact directory.

    ``screened``: (N,) bool, images left out of training by screening (crossed out);
    ``from_names``: (N,) bool, images generated from a class's pretrained name, not from a
    peer's vectors (:func:`grid_labels`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / grid_name(server_round)
    named = np.zeros(len(labels), bool) if from_names is None else np.asarray(from_names, bool)
    title, names = grid_labels(partition_id, server_round, labels, class_names, named)
    if screened is not None and screened.any():
        title += " (crossed out: screened out)"
    grid = sample_grid(images, labels, names, title, screened=screened)
    grid.save(path, optimize=True)
    return path


def grid_labels(
    partition_id: int,
    server_round: int,
    labels: np.ndarray,
    class_names: Sequence[str],
    named: np.ndarray,
) -> tuple[str, list[str]]:
    """A client's sample grid's title and row names: where its images came from.

    ``named``: (N,) bool, the images generated from class names. All of them: the title says
    so; some: their classes' rows are marked "(name)", the rest came from peers' vectors.
    """
    head = f"client {partition_id}, round {server_round}: generated from"
    if len(named) and named.all():
        return f"{head} class names", list(class_names)
    by_name = set(labels[named].tolist())
    names = [f"{n} (name)" if c in by_name else n for c, n in enumerate(class_names)]
    title = f"{head} received tokens" + ("; (name): from its name" if by_name else "")
    return title, names


def write_label_counts(
    directory: Path,
    partition_id: int,
    class_names: Sequence[str],
    train: np.ndarray,
    test: np.ndarray,
) -> Path:
    """Save a client's per-class counts (train and test labels) as JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    size = len(class_names)
    payload = {
        "partition-id": partition_id,
        "class-names": list(class_names),
        "train": np.bincount(train, minlength=size).tolist(),
        "test": np.bincount(test, minlength=size).tolist(),
    }
    path = directory / LABELS_FILE
    path.write_text(json.dumps(payload, indent=1))
    return path
