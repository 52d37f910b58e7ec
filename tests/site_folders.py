"""Sites' own image folders for tests: scikit-learn digits written as PNG class sub-folders."""

import re
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from cmfl_flower.data.sources import DIGIT_NAMES
from cmfl_flower.report import SITE_CLASS

CLASSES = ",".join(DIGIT_NAMES)  # data.classes for the digits' names


def write_site(root: Path, counts: dict[str, int], offset: int = 0) -> Path:
    """``root/<class>/<i>.png`` for ``counts`` (class name -> images), digits from ``offset``.

    Each image is a real 8x8 digit of that class, grey on RGB; sites given different offsets
    hold different images.
    """
    digits = load_digits()
    for name, count in counts.items():
        label = DIGIT_NAMES.index(name)
        picked = np.flatnonzero(digits.target == label)[offset : offset + count]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, index in enumerate(picked):
            gray = np.rint(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)  # (8, 8)
            Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(folder / f"{i}.png")
    return root


# three sites' own folders: different classes and sizes (class name -> images)
SITES = ({"zero": 12, "one": 12, "two": 12}, {"two": 8, "three": 8}, {"three": 6, "nine": 10})


def held_classes(row: dict[str, object]) -> set[str]:
    """The class names a site's reply says it holds (``site-class-<id>`` above 0)."""
    return {
        DIGIT_NAMES[int(k.removeprefix(SITE_CLASS))]
        for k, v in row.items()
        if k.startswith(SITE_CLASS) and v
    }


def report_lists(page: str, counts: dict[str, int]) -> bool:
    """Whether ``report.html`` lists a site holding the classes of ``counts``, in id order."""
    return re.search(", ".join(rf"{name} \(\d+\)" for name in counts), page) is not None
