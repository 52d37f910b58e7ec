"""How a round's time, bytes and memory grow with the number of clients N.

``python -m benchmarks.scale`` runs the relay (``cmfl-relay``, its cap at the default) and
``fedavg-encoder`` (``encoder-lora`` + FedAvg) for N = 10, 30 and 100 clients on the ``tiny``
preset, through the real strategy and ClientApp code on an in-process grid (one process
serves the sampled clients one after another). A fixed fraction of the clients is sampled
every round. Each client holds 3 digit classes (pathological partition; at least 5 images a
client, as the digits' split for 100 clients cannot give each 10); with so few images
``tokens.min-images`` is 2, so that clients learn and relay their classes.

Per run it reports the means over the last ``--measure-rounds`` rounds (default 2), in the
steady state: round 1 relays nothing yet, and with few clients sampled per round the server
knows fewer than the cap's senders of some classes for many rounds (at N = 10 with 2 sampled, a
client is still unheard after 10 rounds with probability 0.8^10 = 0.11). ``--rounds`` takes one
value per N so that the small federations run long enough; ``senders-known`` (how many clients
the server had heard from, at the last round) shows whether they did. It reports the round's
wall time, each phase's mean seconds per client, images generated per sampled client, bytes sent
and received per sampled client (``bytes-to-client`` is what the server sent it), and the
server's peak memory above its set-up (see :class:`MemoryGrid`), traced with ``tracemalloc``
while the server works, between client calls. It prints a Markdown table and the growth from
the smallest N to the largest, writes ``benchmarks/results/scale.json`` and draws
``docs/scale.png``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from flwr.app import Context, Message

from benchmarks import ROOT, settings_record, stored_results
from benchmarks.loopback import LoopbackGrid
from client_app import app as client_app
from cmfl_flower.config import AppConfig
from cmfl_flower.server.rounds import run_federation

ARMS = {
    "cmfl-relay": {"method": "cmfl-relay"},
    "fedavg-encoder": {"method": "encoder-lora", "strategy": "fedavg"},
}
PHASES = ("tokens", "generation", "encoder", "eval")
FIGURES = ("wall-s", "num-generated", "bytes-to-client", "bytes-from-client", "server-peak-bytes")
# the round loop's row names are the server's view: it sent `bytes-sent` to the client
CLIENT_VIEW = {"bytes-sent": "bytes-to-client", "bytes-received": "bytes-from-client"}


class MemoryGrid(LoopbackGrid):
    """A loopback grid that traces the server's memory apart from the clients'.

    What is traced when the first client is called (imports, data, the strategy's setup, the
    first round's messages) is the server's set-up. After that, the traced peak between two
    client calls, less the set-up and what the clients hold, is the server's; what a client
    call adds to the traced memory (models, caches, its reply) is counted as the clients'.
    """

    def __init__(self, cfg: AppConfig, num_nodes: int) -> None:
        # no message log (the default): a real grid keeps none, and it would count as the
        # server's memory
        super().__init__(self._client, cfg, num_nodes)
        self.setup: int | None = None
        self.client_held = 0
        self.server_peak = 0

    def server_interval(self) -> int:
        """Traced memory now; the peak since the last client call goes to the server."""
        current, peak = tracemalloc.get_traced_memory()
        if self.setup is None:
            self.setup = current
        self.server_peak = max(self.server_peak, peak - self.client_held - self.setup)
        return current

    def _client(self, message: Message, context: Context) -> Message:
        before = self.server_interval()
        try:
            return client_app(message, context)
        finally:
            self.client_held += tracemalloc.get_traced_memory()[0] - before
            tracemalloc.reset_peak()


def run_arm(arm: str, clients: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """One run of ``arm`` with ``clients`` clients; the means over the rounds measured."""
    rounds = dict(zip(args.clients, args.rounds, strict=True))[clients]
    cfg = AppConfig.from_run_config(
        ARMS[arm]
        | {
            "federation.rounds": rounds,
            "federation.fraction": args.fraction,
            "federation.min-nodes": clients,
            "backbone.threads": args.threads,  # as pinned; not re-chosen by the machine's load
            "data.partitioner": "pathological",
            "data.classes-per-client": 3,
            "data.min-partition-size": 5,
            "tokens.min-images": 2,
            "relay.max-senders-per-class": args.cap,
            "data.dir": str(root / "data"),
            "output.dir": str(root / "runs"),
            "output.run-name": f"{arm}-{clients}",
            "output.progress": False,
        }
    )
    grid = MemoryGrid(cfg, clients)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        run_dir = run_federation(grid, cfg)
        grid.server_interval()  # the last round's aggregation, records and report
    finally:
        tracemalloc.stop()
    first = rounds - args.measure_rounds + 1
    measured = json.loads((run_dir / "rounds.json").read_text())[first - 1 :]
    rows = [r for r in json.loads((run_dir / "clients.json").read_text()) if r["round"] >= first]
    return {
        "arm": arm,
        "clients": clients,
        "rounds": rounds,
        "measured-from": first,
        "senders-known": measured[-1].get("senders-known"),
        "sampled": sum(r["sampled"] for r in measured) / len(measured),
        "wall-s": sum(r["round-seconds"] for r in measured) / len(measured),
        "run-s": time.perf_counter() - start,
        "server-setup-bytes": grid.setup,
        "server-peak-bytes": grid.server_peak,
        "global-acc": measured[-1].get("global-acc-mean", measured[-1].get("server-global-acc")),
    } | {CLIENT_VIEW.get(key, key): _mean(rows, key) for key in _client_keys()}


def _client_keys() -> list[str]:
    return ["num-generated", *CLIENT_VIEW, *(f"seconds-{p}" for p in PHASES)]


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if key in row]
    return sum(values) / len(values) if values else None


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def table(results: list[dict[str, Any]]) -> str:
    """The results as a Markdown table, one row per (arm, N)."""
    keys = ["rounds", "senders-known", "sampled", "wall-s", *(f"seconds-{p}" for p in PHASES),
            "num-generated", "bytes-to-client", "bytes-from-client", "server-peak-bytes",
            "global-acc"]  # fmt: skip
    lines = [
        "| arm | N | " + " | ".join(keys) + " |",
        "| --- | --- |" + " --- |" * len(keys),
    ]
    for row in results:
        cells = " | ".join(_cell(row.get(key)) for key in keys)
        lines.append(f"| {row['arm']} | {row['clients']} | {cells} |")
    return "\n".join(lines)


def growth(results: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per arm and figure: the value at the largest N over the value at the smallest."""
    out: dict[str, dict[str, float | None]] = {}
    for arm in ARMS:
        own = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["clients"])
        if len(own) < 2:
            continue
        small, large = own[0], own[-1]
        out[arm] = {key: (large[key] / small[key]) if small.get(key) else None for key in FIGURES}
    return out


def draw(results: list[dict[str, Any]], path: Path, measured: int) -> None:
    """One panel per figure against N, one line per arm."""
    fig, axes = plt.subplots(1, len(FIGURES), figsize=(4 * len(FIGURES), 3.4))
    for ax, key in zip(axes, FIGURES, strict=True):
        for arm in ARMS:
            own = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["clients"])
            points = [(r["clients"], r[key]) for r in own if r.get(key) is not None]
            if points:  # fedavg-encoder generates nothing: no line
                ax.plot(*zip(*points, strict=True), "o-", label=arm)
        ax.set_ylim(bottom=0)
        ax.set_xscale("log")
        ax.set_xlabel("clients N")
        ax.set_title(key.replace("-", " "))
    axes[0].legend()
    fig.suptitle(
        f"means over each run's last {measured} rounds: wall per round; images and bytes per "
        "sampled client; server peak per run (tiny preset, 2-core CPU)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_rounds(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One ``--rounds`` value per ``--clients``, each above ``--measure-rounds``.

    Round 1 relays nothing, so it is never measured.
    """
    if len(args.rounds) != len(args.clients):
        parser.error(f"--rounds needs one value per --clients {args.clients}, got {args.rounds}")
    if not 1 <= args.measure_rounds < min(args.rounds):
        parser.error(
            f"--measure-rounds must be in [1, {min(args.rounds)}) (the fewest --rounds), "
            f"got {args.measure_rounds}"
        )


def print_results(results: list[dict[str, Any]], ratios: dict[str, Any]) -> None:
    """The table, then each arm's growth from the smallest N to the largest."""
    print(table(results))
    sizes = [row["clients"] for row in results]
    for arm, figures in ratios.items():
        text = ", ".join(f"{k} {v:.2f}x" if v else f"{k} -" for k, v in figures.items())
        print(f"{arm}, N={max(sizes)} over N={min(sizes)}: {text}")


def show(path: Path) -> None:
    """Print the stored results of ``path`` as a run prints them."""
    stored = stored_results(path)
    print_results(stored["results"], stored["growth"])


def main(argv: list[str] | None = None) -> None:
    """Run every arm at every N; print the table and the growth; save JSON and curves."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--fraction", type=float, default=0.2, help="share sampled per round")
    parser.add_argument(
        "--rounds", type=int, nargs="+", default=[12, 5, 5], help="rounds, one value per --clients"
    )
    parser.add_argument(
        "--measure-rounds", type=int, default=2, help="last rounds of each run in the means"
    )
    parser.add_argument("--cap", type=int, default=2, help="relay.max-senders-per-class")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "scale.png")
    parser.add_argument(
        "--show", action="store_true", help="instead: print what --out holds, running nothing"
    )
    args = parser.parse_args(argv)
    if args.show:
        show(args.out)
        return
    check_rounds(parser, args)
    torch.set_num_threads(args.threads)
    print(
        f"N={args.clients} fraction={args.fraction} rounds={args.rounds} "
        f"measured over the last {args.measure_rounds} cap={args.cap} "
        f"torch threads={torch.get_num_threads()}"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="cmfl-scale-") as tmp:
        for clients in args.clients:
            for arm in args.arms:
                results.append(run_arm(arm, clients, args, Path(tmp)))
                print(table(results[-1:]).splitlines()[-1], flush=True)
    ratios = growth(results)
    print_results(results, ratios)
    settings = settings_record(args)
    payload = {"settings": settings, "results": results, "growth": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    draw(results, args.plot, args.measure_rounds)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
