"""benchmarks/robustness.py: its attacks change replies as documented; its figures add up."""

import json

import numpy as np
import pytest

from benchmarks.robustness import attack, draw, drawn, figures, reference, table

REPLY = {
    "vectors": np.arange(12, dtype=np.float32).reshape(3, 4) / 10,  # 3 tokens of D = 4
    "index": np.array([[2, 1], [5, 2]], np.int32),  # class 2: 1 token, class 5: 2 tokens
}


def test_label_flip_moves_every_class_to_the_next_and_keeps_the_vectors():
    out = attack("label-flip", 10)(REPLY)
    assert out["index"].tolist() == [[3, 1], [6, 2]]
    assert np.array_equal(out["vectors"], REPLY["vectors"])
    last = {"vectors": REPLY["vectors"][:1], "index": np.array([[9, 1]], np.int32)}
    assert attack("label-flip", 10)(last)["index"].tolist() == [[0, 1]]


def test_targeted_flip_sends_the_first_class_under_the_next_id():
    out = attack("targeted-flip", 10)(REPLY)
    assert out["index"].tolist() == [[3, 1], [5, 2]]
    clash = {"vectors": REPLY["vectors"], "index": np.array([[2, 1], [3, 2]], np.int32)}
    out = attack("targeted-flip", 10)(clash)  # its own class 3 gives way to the lie
    assert out["index"].tolist() == [[3, 1]] and np.array_equal(
        out["vectors"], REPLY["vectors"][:1]
    )


def test_huge_and_noise_vectors():
    huge = attack("huge-norm", 10)(REPLY)["vectors"]
    assert np.isfinite(huge).all() and np.abs(huge).max() > 1e29
    noise = attack("noise", 10)(REPLY)["vectors"]
    norms = np.linalg.norm(REPLY["vectors"], axis=1)
    assert np.allclose(np.linalg.norm(noise, axis=1), norms, rtol=1e-5)
    assert not np.allclose(noise, REPLY["vectors"])
    with pytest.raises(ValueError, match="unknown attack 'x'; choose from label-flip"):
        attack("x", 10)


def _run_dir(tmp_path, name, final):
    """A run directory whose last round gave partition p the accuracy final[p]."""
    rows = [{"round": 1, "partition-id": p, "global-acc": 0.5} for p in final]
    rows += [
        {"round": 2, "partition-id": p, "global-acc": acc, "kept-s3": 1, "rejected-s3": 2,
         "kept-s0": 3, "rejected-s0": 1, "seconds-generation": 9.0, "seconds-screening": 1.0}
        for p, acc in final.items()
    ]  # fmt: skip
    run = tmp_path / name
    run.mkdir()
    (run / "clients.json").write_text(json.dumps(rows))
    rounds = [{"refused": 0}, {"refused": 1, "refused-norm": 1, "quarantined": "3"}]
    (run / "rounds.json").write_text(json.dumps(rounds))
    return run


def test_figures_reference_table_and_chart(tmp_path):
    attacked = figures(_run_dir(tmp_path, "a", {0: 0.9, 1: 0.8, 2: 0.7}), {0, 1, 2}, {3})
    assert attacked["honest-acc"] == pytest.approx(0.8) and attacked["honest-acc-min"] == 0.7
    assert attacked["attacker-sets-through"] == 3 and attacked["attacker-sets-screened-out"] == 6
    assert (attacked["honest-sets"], attacked["honest-screened-out"]) == (12, 3)
    assert attacked["refused"] == 1 and attacked["refusal-kinds"] == ["refused-norm"]
    assert attacked["screening-share"] == pytest.approx(0.1)
    stopped = figures(tmp_path / "a", {0, 1, 2}, {3}, failed=True)
    assert np.isnan(stopped["honest-acc"]) and stopped["refused"] == 1
    clean = figures(_run_dir(tmp_path, "c", {0: 1.0, 1: 0.9, 2: 0.8, 3: 0.1}), {0, 1, 2, 3}, set())
    where = {"setting": "default", "seed": 0, "defended": True, "hostile": 1}
    results = [where | {"attack": None} | clean, where | {"attack": "label-flip"} | attacked]
    assert reference(results, results[1]) == pytest.approx(0.9)  # over partitions 0-2 only
    text = table(results)
    assert "| default | 0 | label-flip | " in text and "-10.0 pt" in text and "| 3/12 |" in text
    stored = {"default-k1": {"results": results}}
    draw(stored, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 0


def test_the_chart_draws_the_default_records_and_leaves_overrides_and_old_ones_to_the_tables():
    run = {"setting": "P1", "seed": 0, "attack": "silent", "hostile": 2, "defended": True}
    stored = {
        "P1-on": {"overrides": {}, "results": [run | {"honest-acc": 0.725}]},
        "P1-fedavg": {"overrides": {"method": "encoder-lora"}, "results": [run]},
        "P1-lever-off": {"overrides": {"generation.uncovered": "none"}, "results": [run]},
        "P1-old": {"overrides": {}, "superseded-by": "P1-on", "results": [run]},
        "P1-seed-1": {"results": [run | {"seed": 1}]},
    }
    assert drawn(stored) == {"P1": [run | {"honest-acc": 0.725}]}


def test_the_docs_tables_are_the_stored_records():
    """Every stored robustness record's table appears in docs/robustness.md, row for row."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "docs" / "robustness.md").read_text()
    stored = json.loads((root / "benchmarks" / "results" / "robustness.json").read_text())
    for key, record in stored.items():
        assert record["command"] in readme, f"{key}: the page lacks its command"
        for row in table(record["results"]).splitlines()[2:]:
            assert row in readme, f"{key}: the page lacks {row}"
