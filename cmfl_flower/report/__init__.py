"""What a run shows a user, split by job.

:mod:`.pictures` (what a client draws of its data), :mod:`.run` (a run directory read back),
:mod:`.charts` (the run's curves), :mod:`.page` (``report.html`` and TensorBoard) and
:mod:`.cli` (``cmfl-report``, runs compared).
"""

from cmfl_flower.report.charts import accuracy_figure, labels_figure
from cmfl_flower.report.cli import comparison_rows, comparison_table, main, write_comparison
from cmfl_flower.report.page import (
    TensorBoardLog,
    accepted_share,
    human_bytes,
    round_line,
    write_report,
)
from cmfl_flower.report.pictures import (
    CELL,
    LABEL_WIDTH,
    MAX_COLUMNS,
    TITLE_HEIGHT,
    grid_size,
    sample_grid,
    write_label_counts,
    write_sample_grid,
)
from cmfl_flower.report.run import RECOGNISED, RECOGNISED_TARGET, SITE_CLASS, RunView, load_run

__all__ = [
    "CELL",
    "LABEL_WIDTH",
    "MAX_COLUMNS",
    "RECOGNISED",
    "RECOGNISED_TARGET",
    "SITE_CLASS",
    "TITLE_HEIGHT",
    "RunView",
    "TensorBoardLog",
    "accepted_share",
    "accuracy_figure",
    "comparison_rows",
    "comparison_table",
    "grid_size",
    "human_bytes",
    "labels_figure",
    "load_run",
    "main",
    "round_line",
    "sample_grid",
    "write_comparison",
    "write_label_counts",
    "write_report",
    "write_sample_grid",
]
