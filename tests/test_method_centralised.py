"""The method benchmark's centralised arm trains one vision LoRA on every client's images pooled."""

from pathlib import Path

from benchmarks import method


def test_centralised_arm_pools_the_clients_and_beats_zero_shot(tmp_path: Path) -> None:
    def run(arm: str) -> float:
        job = method.Job(arm, "P1", 0, (("encoder.lr", 1e-2), ("encoder.epochs", 10)), rounds=1)
        return method.run_arm(job, tmp_path)["acc"]

    zero_shot, centralised = run("zero-shot"), run("centralised")
    assert zero_shot < 0.8, zero_shot  # the weak tiny-fewshot CLIP leaves room
    assert centralised > zero_shot + 0.1, (zero_shot, centralised)
