"""Reading a run directory back: its config, rounds, clients, status, label counts and grids."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmfl_flower.aliases import Row
from cmfl_flower.paths import (
    CLIENT_ROWS,
    CLIENTS_DIR,
    CONFIG_JSON,
    GRID_NAME,
    LABELS_FILE,
    ROUNDS,
    SAMPLES_DIR,
    STATUS_JSON,
)

if TYPE_CHECKING:
    pass

RECOGNISED = "generated-recognised"  # share of a client's generated images the judge recognises
JUDGED = f"{RECOGNISED}-judge"  # the same share by the independent judge (generation.judge)
SERVER_ACC = "server-global-acc"  # weight methods: the global weights scored by the server
RECOGNISED_TARGET = 0.85  # the share of recognised images the chart marks as the target
SITE_CLASS = "site-class-"  # reply metric: a site's training images of class <id>
FD_METRICS = ("fd-clip", "fid-inception")  # the diffusion methods' scores of the global model
_SERVER_GRID = re.compile(r"^round-(\d+)\.png$")  # the diffusion methods' samples/round-<k>.png


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
