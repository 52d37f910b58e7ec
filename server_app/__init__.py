"""Flower ServerApp: parse the run config once, run the chosen method, write results.

A user mistake (a bad config key, missing data or weights) or a failed run is logged as one
line and re-raised as :class:`RunFailedError` without its chain, so that Flower marks the run failed
without a wall of traceback.
"""

from logging import ERROR

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from cmfl_flower.config import AppConfig
from cmfl_flower.server.rounds import run_federation

app = ServerApp()


class RunFailedError(RuntimeError):
    """The run stopped; the message says why and what to change."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of every run."""
    try:
        run_federation(grid, AppConfig.from_run_config(context.run_config))
    except (ValueError, RuntimeError) as err:
        log(ERROR, "cmfl-flower: %s", err)
        raise RunFailedError(str(err)) from None
