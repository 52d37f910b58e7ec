"""The project's own model zoo: configs and trained weights of the ``tiny`` backbone.

Weights are binary files, which a Flower app bundle (FAB) does not carry: when the app runs
from an unpacked FAB, this module's directory holds the configs but no weights. :func:`locate`
then finds them in the installed ``cmfl-flower`` distribution (regular or editable install),
or under ``$CMFL_FLOWER_ZOO``.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

HERE = Path(__file__).resolve().parent
MARKER = Path("tiny") / "clip" / "open_clip_model.safetensors"


def _installed_roots() -> list[Path]:
    """Zoo directories of the installed distribution, if any."""
    try:
        dist = metadata.distribution("cmfl-flower")
    except metadata.PackageNotFoundError:
        return []
    roots = [Path(str(dist.locate_file("cmfl_flower/zoo")))]
    direct = dist.read_text("direct_url.json")
    if direct:
        url = json.loads(direct).get("url", "")
        if url.startswith("file://"):
            roots.append(Path(unquote(urlparse(url).path)) / "cmfl_flower" / "zoo")
    return roots


def candidates() -> list[Path]:
    """Where the zoo may be, in the order it is searched."""
    found = [Path(os.environ["CMFL_FLOWER_ZOO"])] if os.environ.get("CMFL_FLOWER_ZOO") else []
    return [*found, HERE, *_installed_roots()]


def locate(relative: str) -> Path:
    """The absolute path of ``relative`` (e.g. ``tiny/clip``) in the first zoo with weights."""
    for root in candidates():
        if (root / MARKER).is_file():
            return root / relative
    searched = ", ".join(str(root) for root in candidates())
    raise ValueError(
        f"the tiny backbone's weights were not found (searched {searched}); install the "
        "project with `pip install -e .` or set CMFL_FLOWER_ZOO to its cmfl_flower/zoo directory"
    )
