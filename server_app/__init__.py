"""Flower ServerApp: parse the run config once, run the chosen strategy, write results."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cmfl_flower.config import AppConfig
from cmfl_flower.strategies import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of every run."""
    run_federation(grid, AppConfig.from_run_config(context.run_config))
