"""One directory per run: resolved config, per-round and per-client metrics, final status.

Everything is rewritten atomically after each round, so a run that dies keeps what it had.
The layout is :mod:`cmfl_flower.paths`'s.

The report files (:mod:`cmfl_flower.report`) are rewritten after a round when their last
rewrite is at least :data:`REPORT_INTERVAL_S` old (every round of a run with rounds of seconds;
a run of many sub-second rounds does not spend its time drawing charts), and always at the end.
``output.resume = true`` reopens an existing directory: the config must match the one it was
started with (apart from :data:`RESUMABLE_KEYS`) and rows after the checkpoint are dropped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from pathlib import Path

from cmfl_flower import report
from cmfl_flower.aliases import Row
from cmfl_flower.config import AppConfig
from cmfl_flower.paths import CLIENT_ROWS, CONFIG_JSON, ROUNDS, STATUS_JSON, output_root

REPORT_INTERVAL_S = 5.0  # at most one report rewrite per this many seconds, until the end
RESUMABLE_KEYS = frozenset(
    {"output.resume", "federation.rounds", "federation.round-timeout", "federation.wait-for-nodes"}
)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _csv_text(rows: list[Row]) -> str:
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


class RunRecorder:
    """Collects a run's metrics and keeps its directory up to date."""

    def __init__(
        self,
        cfg: AppConfig,
        run_dir: Path,
        rounds: list[Row] | None = None,
        clients: list[Row] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.rounds: list[Row] = rounds or []
        self.clients: list[Row] = clients or []
        self.tensorboard = report.TensorBoardLog(run_dir) if cfg.output.tensorboard else None
        self.report_written = -math.inf  # time.monotonic() of the last report rewrite
        config = {"config": cfg.model_dump(), "run_config": cfg.to_run_config()}
        _write_atomic(run_dir / CONFIG_JSON, json.dumps(config, indent=2))
        self._status("running")

    @classmethod
    def open(cls, cfg: AppConfig) -> RunRecorder:
        """A fresh run directory, or the existing one when ``output.resume`` is set."""
        return cls.reopen(cfg) if cfg.output.resume else cls.create(cfg)

    @classmethod
    def create(cls, cfg: AppConfig) -> RunRecorder:
        """Make a fresh run directory under the configured output root."""
        method = re.sub(r"[^\w.-]", "-", cfg.method)
        name = cfg.output.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{method}"
        run_dir = output_root(cfg.output) / name
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise ValueError(
                f"run directory {run_dir} already exists: choose another output.run-name"
            ) from None
        # the resolved name travels to the clients, which write under <root>/<name>/clients/
        resolved = cfg.output.model_copy(update={"run_name": name})
        return cls(cfg.model_copy(update={"output": resolved}), run_dir)

    @classmethod
    def reopen(cls, cfg: AppConfig) -> RunRecorder:
        """Reopen run ``output.run-name`` with its recorded rows, checking the config."""
        run_dir = output_root(cfg.output) / cfg.output.run_name
        if not (run_dir / CONFIG_JSON).is_file():
            raise ValueError(
                f"output.resume = true but {run_dir} holds no run (no config.json): "
                "check output.run-name and output.dir"
            )
        before = json.loads((run_dir / CONFIG_JSON).read_text())["run_config"]
        now = cfg.to_run_config()
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if changed := [key for key in changed if key not in RESUMABLE_KEYS]:
            raise ValueError(
                f"output.resume: the run config differs from {run_dir}'s in {', '.join(changed)}; "
                f"only {', '.join(sorted(RESUMABLE_KEYS))} may change"
            )
        rows = {n: json.loads((run_dir / f"{n}.json").read_text()) for n in (ROUNDS, CLIENT_ROWS)}
        return cls(cfg, run_dir, rows[ROUNDS], rows[CLIENT_ROWS])

    def truncate(self, last_round: int) -> None:
        """Forget rows recorded after ``last_round`` (they are redone on resume)."""
        self.rounds = [row for row in self.rounds if row["round"] <= last_round]
        self.clients = [row for row in self.clients if row["round"] <= last_round]
        self.flush()

    def add_clients(self, server_round: int, rows: list[Row]) -> None:
        """Record every replying client's metrics for ``server_round``."""
        self.clients.extend({"round": server_round, **row} for row in rows)

    def add_round(self, server_round: int, metrics: Row) -> None:
        """Record the round's aggregates and rewrite the metric files."""
        self.rounds.append({"round": server_round, **metrics})
        self.flush()
        if time.monotonic() - self.report_written >= REPORT_INTERVAL_S:
            self.write_report()
        if self.tensorboard is not None:
            self.tensorboard.log_round(server_round, self.rounds[-1])

    def flush(self) -> None:
        """Rewrite the metric files (JSON and CSV) from memory."""
        for name, rows in ((ROUNDS, self.rounds), (CLIENT_ROWS, self.clients)):
            _write_atomic(self.run_dir / f"{name}.json", json.dumps(rows, indent=2))
            _write_atomic(self.run_dir / f"{name}.csv", _csv_text(rows))

    def finish(self, error: BaseException | None = None) -> None:
        """Write the final status: ``completed``, or ``failed`` with the error."""
        self.flush()
        self._status("failed" if error else "completed", repr(error) if error else None)
        self.write_report()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def write_report(self) -> None:
        """Rewrite ``report.html`` and its charts from the run directory."""
        report.write_report(self.run_dir)
        self.report_written = time.monotonic()

    def _status(self, status: str, error: str | None = None) -> None:
        payload = {"status": status, "error": error, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _write_atomic(self.run_dir / STATUS_JSON, json.dumps(payload, indent=2))
