"""The federated-diffusion benchmark end to end at toy size: its JSON, tables and pictures agree."""

import json

import pytest

from benchmarks import fed_diffusion

# the tests share one toy run (about a minute): one xdist worker runs them all
pytestmark = pytest.mark.xdist_group("fed-diffusion-benchmark")

TOY = [
    "--rounds", "6", "--fedavg-rounds", "6", "--checkpoints", "6",
    "--sweep-rounds", "1", "--lora-rounds", "1", "--lora-steps", "1",
    "--eval-samples", "4", "--sample-steps", "2", "--workers", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed-diffusion")
    out, docs = root / "result.json", root / "docs"
    fed_diffusion.main([*TOY, "--sweep-seeds", "2", "--out", str(out), "--docs", str(docs)])
    return json.loads(out.read_text()), docs


def test_the_results_file_holds_what_the_issue_names(toy_run):
    result, _ = toy_run
    for key in ("fedavg_fd", "centralised_fd", "fedavg_centralised_ratio", "sweep",
                "lora_fd_base", "lora_fd_tuned", "bytes"):  # fmt: skip
        assert key in result, key
    assert result["fedavg_centralised_ratio"] == pytest.approx(
        result["fedavg_fd"] / result["centralised_fd"]
    )
    fed, central = result["curves"]["fedavg"], result["curves"]["centralised"]
    assert len(fed) == len(central) == 6
    assert [c[0] for c in fed] == [c[0] for c in central]  # the same budget at every checkpoint
    assert fed[-1][0] == 6 * 4 * 4 * 16  # rounds x C x E x batch


def test_the_sweep_runs_the_conf_experiments_and_measures_their_bytes(toy_run):
    result, _ = toy_run
    rows = result["sweep"]
    assert [r["conf"] for r in rows] == fed_diffusion.SWEEP
    assert [(r["C"], r["E"]) for r in rows] == [(2, 2), (4, 2), (8, 2), (4, 1), (4, 4)]
    model = result["bytes"]["ddpm_model"]
    for row in rows:  # the whole UNet to and from every sampled client, plus Flower's framing
        assert 2 * row["C"] * model < row["bytes_per_round"] < 2.1 * row["C"] * model
    assert result["bytes"]["lora_per_round"] < result["bytes"]["lora_full_unet"]


def test_the_chart_and_the_lora_grids_are_written(toy_run):
    _, docs = toy_run
    for name in ("fed-diffusion.png", "fed-lora-base.png", "fed-lora-tuned.png"):
        assert (docs / name).stat().st_size > 1000, name


def test_each_sweep_row_gives_the_mean_over_its_seeds(toy_run):
    result, _ = toy_run
    for row in result["sweep"]:
        assert len(row["fds"]) == 2 and row["fds"][0] != row["fds"][1]  # other seeds, other runs
        assert row["fd"] == pytest.approx(sum(row["fds"]) / 2)


def test_parts_left_out_are_neither_run_nor_reported():
    args = fed_diffusion.parse(["--parts", "sweep", "--sweep-seeds", "2"])
    jobs = fed_diffusion.jobs_for(args)
    assert [(j.name, j.settings["seed"]) for j in jobs[:2]] == [
        ("fedavg-diffusion-c2-seed0", 0),
        ("fedavg-diffusion-c2-seed1", 1),
    ]
    assert len(jobs) == 2 * len(fed_diffusion.SWEEP) and {j.part for j in jobs} == {"sweep"}
    run = {"C": 2, "E": 2, "rounds": 1, "curve": [[64, 9.0]], "bytes_per_round": 1.0, "seconds": 1}
    result = fed_diffusion.report(jobs, [run] * len(jobs), args)
    assert set(result) == {"sweep", "bytes", "seconds", "settings"}
    assert result["sweep"][0]["fds"] == [9.0, 9.0]
    table = fed_diffusion.sweep_table(result["sweep"])
    assert "| FD: mean (range over 2 seeds) |" in table and "| 9.00 (9.00 to 9.00) |" in table


def test_the_page_shows_what_the_stored_results_hold(capsys):
    """Every line ``--show`` prints from the stored results is on docs/fed-diffusion.md."""
    fed_diffusion.main(["--show"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    page = (fed_diffusion.ROOT / "docs" / "fed-diffusion.md").read_text()
    assert len(lines) > 10 and [line for line in lines if line not in page] == []
