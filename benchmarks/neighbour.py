"""The default run's wall time on a quiet machine and beside one CPU-bound process.

``python -m benchmarks.neighbour`` runs the README's first command (``flwr run . --stream
--federation-config "num-supernodes=4"``: the default ``cmfl-relay`` run, 4 simulated clients,
3 rounds) with its own ``FLWR_HOME`` and ports, once on the quiet machine and once while a
neighbour process spins on one CPU, and prints both wall times and their ratio. With
``--threads N`` the clients are pinned to N torch threads (``backbone.threads``) instead of
choosing them (the CPUs they were given, fewer when some are busy): ``--threads 2`` on the
2-core machine is what a client did before it looked at idle CPUs. ``--results`` keeps the
figures (default ``benchmarks/results/neighbour.json``, by thread setting) with the command,
commit and machine.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks import ROOT, commit, show_records, store
from benchmarks.flower_procs import BIN, flower_env, stop

RESULTS = Path(__file__).resolve().parent / "results" / "neighbour.json"


def spin() -> None:
    """A CPU-bound neighbour: one core, busy until killed."""
    while True:
        pass


def default_run(home: Path, threads: int) -> float:
    """Wall seconds of the README's default run (its own Flower home and run directory)."""
    overrides = f"output.dir='{home / 'runs'}' output.progress=false backbone.threads={threads}"
    command = [str(BIN / "flwr"), "run", str(ROOT), "--stream", "--federation-config",
               "num-supernodes=4", "--run-config", overrides]  # fmt: skip
    home.mkdir(parents=True)
    env = flower_env(home)
    start = time.perf_counter()
    with (home / "flwr-run.log").open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        try:
            process.wait(timeout=3600)
        finally:
            stop(process)
            _stop_local_superlink(env)
    seconds = time.perf_counter() - start
    status = next((home / "runs").glob("*/status.json")).read_text()
    if '"completed"' not in status:
        raise RuntimeError(f"the default run did not complete: {status}")
    return seconds


def _stop_local_superlink(env: dict[str, str]) -> None:
    """`flwr run` started a local SuperLink for this FLWR_HOME: stop it and its children."""
    for process in psutil.process_iter(["cmdline", "environ"]):
        with contextlib.suppress(psutil.Error):
            if "flower-superlink" not in " ".join(process.info["cmdline"] or []):
                continue
            if (process.info["environ"] or {}).get("FLWR_HOME") != env["FLWR_HOME"]:
                continue
            family = [process, *process.children(recursive=True)]
            for member in family:
                member.kill()
            psutil.wait_procs(family, timeout=15)


def main(argv: list[str] | None = None) -> None:
    """Run the default quietly, then beside a spinning process; print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="backbone.threads (0: choose)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="keep the figures here")
    parser.add_argument(
        "--show", action="store_true", help="instead: print what --results holds, running nothing"
    )
    args = parser.parse_args(argv)
    if args.show:
        show_records(args.results, lambda tag, figures: [render(tag, figures)])
        return
    code = commit()  # the code that runs
    with tempfile.TemporaryDirectory(prefix="cmfl-neighbour-") as tmp:
        quiet = default_run(Path(tmp) / "quiet", args.threads)
        neighbour = multiprocessing.Process(target=spin, daemon=True)
        neighbour.start()
        try:
            busy = default_run(Path(tmp) / "busy", args.threads)
        finally:
            neighbour.kill()
    figures = {"quiet-s": quiet, "beside-a-busy-core-s": busy, "ratio": busy / quiet}
    tag = f"backbone.threads={args.threads}"
    print(render(tag, figures))
    store(args.results, tag, figures, code)


def render(tag: str, figures: dict[str, Any]) -> str:
    """The line a run prints: both wall times and their ratio."""
    return (
        f"{tag}: quiet {figures['quiet-s']:.0f} s, beside one CPU-bound process "
        f"{figures['beside-a-busy-core-s']:.0f} s, ratio {figures['ratio']:.2f}"
    )


if __name__ == "__main__":
    main()
