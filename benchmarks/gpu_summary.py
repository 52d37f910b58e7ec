"""The summary of ``benchmarks/gpu.sh``: its JSON files read back, printed, and saved.

``python -m benchmarks.gpu_summary OUT_DIR`` reads what the script's steps wrote into
``OUT_DIR`` (``generation-<arch>.json``, ``round-<method>.json``, ``steps.txt``), prints one
block per step, checks images/s against the goals, and writes ``summary.json``. A step that
wrote nothing is reported as missing, with its exit status from ``steps.txt``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

ARCHS = ("bk-sdm-v2-small", "bk-sdm-small")
METHODS = ("cmfl-relay", "diffusion-lora")
GOAL_IMAGES_PER_S = 12.0  # BK-SDM-v2-small, 512x512, 20 steps, one H100
FIRST_BAR_IMAGES_PER_S = 3.0
GIB = 1024**3
Describe = Callable[[str, dict[str, Any]], list[str]]  # a step's label and JSON -> lines


def read_steps(out: Path) -> dict[str, dict[str, int]]:
    """``steps.txt``: per step, its exit status and seconds."""
    steps: dict[str, dict[str, int]] = {}
    path = out / "steps.txt"
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, *fields = line.split()
        steps[name] = {key: int(value) for key, value in (f.split("=") for f in fields)}
    return steps


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def generation_lines(arch: str, figures: dict[str, Any]) -> list[str]:
    """Rates, ratios and the one-batch profile of one architecture."""
    lines = [
        f"{arch} ({figures['subject']}) at {figures['size'][0]}x{figures['size'][1]}, "
        f"{figures['project']}, {figures['dtype']} on {figures['device']}:"
    ]
    eager = figures["project-images-per-s"]
    lines.append(f"  eager: {eager:.2f} images/s")
    if "compiled-images-per-s" in figures:
        compiled = figures["compiled-images-per-s"]
        lines.append(
            f"  compiled UNet: {compiled:.2f} images/s ({compiled / eager:.2f}x eager; "
            f"compiling took {figures['compile-seconds']:.0f} s)"
        )
    if "ratio-overall" in figures:  # stored before the reference loaded its pipeline once
        lines.append(
            f"  reference loop (reloaded for every image; withdrawn): "
            f"{figures['reference-images-per-s']:.3f} images/s; project / reference "
            f"{figures['ratio-overall']:.1f}x (at equal steps {figures['ratio-equal-steps']:.1f}x)"
        )
    elif "reference-images-per-s" in figures:
        lines.append(
            f"  reference loop (loaded once): {figures['reference-images-per-s']:.3f} images/s; "
            f"project / reference {figures['ratio-steady']:.1f}x (at equal steps "
            f"{figures['ratio-equal-steps']:.1f}x; per round, a load each "
            f"{figures['ratio-per-round']:.1f}x)"
        )
    if "profile-seconds" in figures:
        parts = figures["profile-seconds"]
        wall = parts["wall"]
        shares = ", ".join(f"{k} {v / wall:.0%}" for k, v in parts.items() if k != "wall")
        lines.append(f"  one batch {wall:.2f} s: {shares}")
    if arch == "bk-sdm-v2-small" and figures["subject"] == arch:  # not in a dry run
        lines.append("  " + goal_line(figures))
    return lines


def goal_line(figures: dict[str, Any]) -> str:
    """BK-SDM-v2-small's eager rate, the app's path, against the 12 images/s goal and the bar.

    The app never compiles the UNet (a deployment's every message is a fresh process, which
    would pay the compile again), so a compiled rate is named but does not count.
    """
    eager = figures["project-images-per-s"]
    verdict = (
        "goal met"
        if eager >= GOAL_IMAGES_PER_S
        else "first bar met, goal missed"
        if eager >= FIRST_BAR_IMAGES_PER_S
        else "first bar missed"
    )
    line = (
        f"goal: {eager:.2f} images/s eager, the app's path, against {GOAL_IMAGES_PER_S:g} "
        f"(first bar {FIRST_BAR_IMAGES_PER_S:g}): {verdict}"
    )
    if "compiled-images-per-s" in figures:
        line += f"; compiled UNet {figures['compiled-images-per-s']:.2f}, not the app's path"
    return line


def round_lines(method: str, result: dict[str, Any]) -> list[str]:
    """Per round wall time and bytes; the workers' largest peaks."""
    lines = [f"{method} on {result['arch']}, {result['clients']} clients, one worker each:"]
    for row in result["rounds"]:
        phases = ", ".join(
            f"{k.removeprefix('seconds-')} {v:.1f} s"
            for k, v in row.items()
            if k.startswith("seconds-")
        )
        whole = row.get("round-seconds")
        lines.append(
            f"  round {row['round']}: {row['wall']:.1f} s for the clients' exchange"
            + (f" ({phases}, client means)" if phases else "")
            + ("" if whole is None else f", {whole:.1f} s the whole round")
            + f"; {row.get('bytes-sent', 0):,} B sent, {row.get('bytes-received', 0):,} B received"
        )
    peaks = [worker["peak-gpu-bytes"] for worker in result["workers"].values()]
    lines.append(
        f"  peak GPU memory allocated per worker: {max(peaks) / GIB:.2f} GiB (largest), "
        f"{sum(peaks) / GIB:.2f} GiB summed"
    )
    smi = result.get("nvidia-smi-peak-mib")
    lines.append(f"  nvidia-smi peak in use: {'n/a' if smi is None else f'{smi:,} MiB'}")
    return lines


def summarise(out: Path) -> tuple[list[str], dict[str, Any]]:
    """The printed lines and the ``summary.json`` content of the files in ``out``."""
    steps = read_steps(out)
    lines: list[str] = []
    summary: dict[str, Any] = {"steps": steps}
    sections: list[tuple[str, str, Describe]] = [
        (f"generation-{arch}", arch, generation_lines) for arch in ARCHS
    ]
    sections += [(f"round-{method}", method, round_lines) for method in METHODS]
    for step, label, describe in sections:
        figures = _load(out / f"{step}.json")
        summary[step] = figures
        if figures is None:
            lines.append(f"{label}: no figures ({_status(steps, step)})")
            continue
        lines += describe(label, figures)
    return lines, summary


def _status(steps: dict[str, dict[str, int]], name: str) -> str:
    if name not in steps:
        return "the step did not run"
    rc = steps[name]["rc"]
    return "ran past its time limit" if rc in (124, 137) else f"exit status {rc}"


def main(argv: list[str] | None = None) -> None:
    """Print the summary of ``OUT_DIR`` and write ``OUT_DIR/summary.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    lines, summary = summarise(args.out)
    print("===== summary")
    print("\n".join(lines))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
