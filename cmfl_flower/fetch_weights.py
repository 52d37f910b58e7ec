"""``cmfl-fetch-weights``: put a preset's hub weights in the Hugging Face cache, before any round.

A client reads hub weights from its host's Hugging Face cache only (``backbone.download`` is
off by default), so a hub preset's CLIP and pipeline are fetched once, on a host with network
access, with the same loaders the clients use::

    cmfl-fetch-weights --preset bk-sdm-small [--cache-dir DIR]

``--cache-dir`` (default: ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else
``~/.cache/huggingface/hub``) is a directory that can be copied to offline hosts, where
``HF_HUB_CACHE`` points at it. Each weight's size on disk is printed as it arrives. ``--clip``,
``--clip-pretrained`` and ``--diffusion`` override the preset's parts as the ``backbone.*`` keys
of the same names do. Weights already in the cache are not downloaded again; the package's own
presets (``tiny``) and local directories need nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cmfl_flower.config import BackboneConfig

HF_HUB = "hf-hub:"


def _size(path: Path) -> int:
    """Bytes of the files under ``path`` (the hub cache's blobs: symlinks not counted twice)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _repo_dir(cache: Path, repo_id: str) -> Path:
    """The hub cache's folder of model ``repo_id``."""
    return cache / ("models--" + repo_id.replace("/", "--"))


def _clip_repo(clip: str, pretrained: str) -> str | None:
    """The hub repository a CLIP's weights come from, if the hub holds them."""
    if clip.startswith(HF_HUB):
        return clip.removeprefix(HF_HUB)
    if not pretrained:
        return None
    import open_clip

    repo = open_clip.get_pretrained_cfg(clip, pretrained).get("hf_hub", "")
    return str(repo).strip("/") or None


def _human(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def fetch(cfg: BackboneConfig, echo: Callable[[str], None] = print) -> dict[str, int]:
    """Load ``cfg``'s CLIP and pipeline once with downloads allowed; bytes on disk per part.

    Parts read from local directories (or the package) are reported as such and take no room
    in the cache.
    """
    import torch

    from cmfl_flower.backbones import LOCAL_DIR, hub_cache, load_clip, load_pipeline, resolve_preset

    preset = resolve_preset(cfg.model_copy(update={"download": True}))
    cache = hub_cache()
    echo(f"preset {preset.name!r} into {cache}")
    sizes: dict[str, int] = {}
    if preset.clip.startswith(LOCAL_DIR):
        echo(f"  CLIP: a local directory, nothing to fetch ({preset.clip.removeprefix(LOCAL_DIR)})")
    else:
        echo(f"  CLIP {preset.clip} ({preset.clip_pretrained or 'no pretrained tag'}) ...")
        load_clip(preset, "cpu", 0)
        repo = _clip_repo(preset.clip, preset.clip_pretrained)
        if repo is None:
            echo("  CLIP: no hub weights (random initialisation or open_clip's own cache)")
        else:
            sizes["clip"] = _size(_repo_dir(cache, repo))
            echo(f"  CLIP: {_human(sizes['clip'])} in {_repo_dir(cache, repo)}")
    if Path(preset.diffusion).is_absolute():
        echo(f"  pipeline: a local directory, nothing to fetch ({preset.diffusion})")
    else:
        echo(f"  pipeline {preset.diffusion} ...")
        load_pipeline(preset.diffusion, torch.device("cpu"), download=True)
        folder = _repo_dir(cache, preset.diffusion)
        sizes["pipeline"] = _size(folder)
        echo(f"  pipeline: {_human(sizes['pipeline'])} in {folder}")
    echo(f"done: {_human(sum(sizes.values()))} in {cache}; on an offline host, copy it there and")
    echo("point HF_HUB_CACHE at the copy")
    return sizes


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, point the hub cache where asked, fetch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip('`" '))
    parser.add_argument("--preset", default="tiny", help="backbone.preset (default: tiny)")
    parser.add_argument("--clip", default="", help="backbone.clip override")
    parser.add_argument("--clip-pretrained", default="", help="backbone.clip-pretrained override")
    parser.add_argument("--diffusion", default="", help="backbone.diffusion override")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the hub cache to fill")
    args = parser.parse_args(argv)
    if args.cache_dir is not None:
        if "huggingface_hub" in sys.modules:  # its paths are read when it is imported
            raise SystemExit("--cache-dir must be set before huggingface_hub is imported")
        os.environ["HF_HUB_CACHE"] = str(args.cache_dir.expanduser().resolve())
    try:
        cfg = BackboneConfig(
            preset=args.preset,
            clip=args.clip,
            clip_pretrained=args.clip_pretrained,
            diffusion=args.diffusion,
        )
    except ValueError as err:
        raise SystemExit(f"cmfl-fetch-weights: {err}") from err
    fetch(cfg)


if __name__ == "__main__":
    main()
