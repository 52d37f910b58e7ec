"""Weights are fetched once, before any round: hub presets load from the host's cache only.

The "hub" here is a Hugging Face cache laid out as the hub writes it (``models--org--name/
refs/main`` and ``snapshots/<commit>/``), holding the package's tiny CLIP and pipeline under
hub ids; the hub itself is never reached (``HF_HUB_OFFLINE``).
"""

import shutil
from pathlib import Path

import huggingface_hub.constants as hub
import pytest
import torch

from cmfl_flower.backbones import ZOO_DIR, load_clip, load_pipeline, resolve_preset
from cmfl_flower.client.task import ClientState, ClientTask
from cmfl_flower.config import AppConfig, BackboneConfig
from cmfl_flower.fetch_weights import fetch, main
from cmfl_flower.methods.relay import relay_round
from tests.test_strategies import make_cfg

COMMIT = "0" * 40


def _cached(cache: Path, repo: str, source: Path) -> Path:
    """``source`` as the hub cache holds repository ``repo``; the repository's folder."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    shutil.copytree(source, folder / "snapshots" / COMMIT)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache for this test, offline: nothing can be downloaded."""
    directory = tmp_path / "hub"
    directory.mkdir()
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(directory))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return directory


def _hub_backbone(name: str) -> BackboneConfig:
    """The tiny preset with its CLIP and pipeline named by hub ids (unique per test)."""
    return BackboneConfig(clip=f"hf-hub:cmfl-test/clip-{name}", diffusion=f"cmfl-test/sd-{name}")


def _fill(cache: Path, name: str) -> None:
    _cached(cache, f"cmfl-test/clip-{name}", ZOO_DIR / "tiny" / "clip")
    _cached(cache, f"cmfl-test/sd-{name}", ZOO_DIR / "tiny" / "diffusion")


def test_downloads_are_off_by_default():
    assert BackboneConfig().download is False
    assert resolve_preset(BackboneConfig(preset="bk-sdm-small")).download is False


def test_a_hub_preset_loads_from_the_cache_with_the_same_weights(cache):
    _fill(cache, "a")
    preset = resolve_preset(_hub_backbone("a"))
    tiny = resolve_preset(BackboneConfig())
    loaded, shipped = load_clip(preset, "cpu", 0).model, load_clip(tiny, "cpu", 0).model
    assert torch.equal(loaded.token_embedding.weight, shipped.token_embedding.weight)
    pipeline = load_pipeline(preset.diffusion, torch.device("cpu"))
    reference = load_pipeline(tiny.diffusion, torch.device("cpu"))
    for ours, theirs in zip(pipeline.unet.parameters(), reference.unet.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_a_missing_weight_fails_naming_the_command_that_fetches_it(cache):
    preset = resolve_preset(_hub_backbone("absent"))
    fix = "cmfl-fetch-weights --preset tiny --clip hf-hub:cmfl-test/clip-absent"
    with pytest.raises(ValueError, match=f"backbone.download is off: run `{fix} --diffusion"):
        load_clip(preset, "cpu", 0)
    sd_fix = "cmfl-fetch-weights --diffusion cmfl-test/sd-absent"
    with pytest.raises(ValueError, match=f"run `{sd_fix}`"):
        load_pipeline(preset.diffusion, torch.device("cpu"))


def test_a_client_without_its_weights_fails_at_its_first_message(cache, tmp_path):
    cfg = make_cfg(tmp_path, "cmfl-relay", 1)
    flat = cfg.to_run_config() | {"backbone.clip": "hf-hub:cmfl-test/clip-first"}
    with pytest.raises(ValueError, match="cmfl-fetch-weights --preset tiny --clip"):
        relay_round(AppConfig.from_run_config(flat), ClientTask(0, 2, 1), ClientState(), {})


def test_fetch_reports_what_each_part_takes_in_the_cache(cache, capsys):
    clip = _cached(cache, "cmfl-test/clip-f", ZOO_DIR / "tiny" / "clip")
    sd = _cached(cache, "cmfl-test/sd-f", ZOO_DIR / "tiny" / "diffusion")
    sizes = fetch(_hub_backbone("f"))
    on_disk = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in (clip, sd)}
    assert sizes == {"clip": on_disk[clip], "pipeline": on_disk[sd]}
    printed = capsys.readouterr().out
    assert f"MB in {clip}" in printed and f"MB in {sd}" in printed


def test_the_shipped_preset_needs_nothing_and_a_bad_preset_is_refused(cache, capsys):
    main(["--preset", "tiny"])
    assert "a local directory, nothing to fetch" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="preset"):
        main(["--preset", "huge"])
