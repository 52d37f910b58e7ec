"""Where cmfl-flower keeps things by default: one cache root, absolute."""

import os
from pathlib import Path


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/cmfl-flower`` (default ``~/.cache/cmfl-flower``), absolute."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().resolve() / "cmfl-flower"
