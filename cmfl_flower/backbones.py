"""Backbone presets: a CLIP (open_clip) and a diffusion pipeline (diffusers) in one token space.

Both load through the libraries' own loaders, imported when a model is loaded: resolving a
preset or a device costs no import of open_clip or diffusers.
A preset is data (:class:`Preset`); every field can be overridden from the run config with a
hub id or a local directory. Models are loaded once per process and cached
(:func:`cmfl_flower.encoder.load_encoder`): the clients one simulation worker serves share them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cmfl_flower.config import BackboneConfig
from cmfl_flower.zoo import locate

if TYPE_CHECKING:
    import open_clip

LOGGER = logging.getLogger(__name__)

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
LOCAL_DIR = "local-dir:"
CLIP_CONFIG_FILE = "open_clip_config.json"
CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
TINY_COMPONENTS_FILE = ZOO_DIR / "tiny" / "diffusion" / "components.json"


@dataclass(frozen=True)
class Preset:
    """A CLIP model and a diffusion pipeline that share one token space."""

    name: str
    clip: str  # open_clip model name, "hf-hub:org/repo" or "local-dir:/abs/dir"
    clip_pretrained: str  # open_clip pretrained tag or checkpoint file ("" = none)
    diffusion: str  # diffusers hub id or local directory ("" = build from configs)
    token_dim: int  # width of the shared token embeddings
    download: bool = False  # may loading download hub weights (``backbone.download``)?


ZOO = "zoo:"  # a path inside the project's own zoo (see cmfl_flower.zoo.locate)
PRESETS: dict[str, Preset] = {
    # Trained by `python -m training.train_tiny` on public digits; ships with the package.
    "tiny": Preset("tiny", f"{ZOO}tiny/clip", "", f"{ZOO}tiny/diffusion", 64),
    # tiny's text tower and pipeline, a vision tower trained on a few public images per class
    # (`python -m training.train_fewshot`): weak zero-shot, for federated benchmarks.
    "tiny-fewshot": Preset(
        "tiny-fewshot", f"{ZOO}tiny-fewshot/clip", "", f"{ZOO}tiny/diffusion", 64
    ),
    "bk-sdm-small": Preset("bk-sdm-small", "ViT-L-14", "openai", "nota-ai/bk-sdm-small", 768),
    "bk-sdm-v2-small": Preset(
        "bk-sdm-v2-small", "ViT-H-14", "laion2b_s32b_b79k", "nota-ai/bk-sdm-v2-small", 1024
    ),
}


@dataclass(frozen=True)
class ClipBundle:
    """A loaded open_clip model with what it needs around it."""

    model: open_clip.CLIP
    tokenizer: Any  # open_clip tokenizer: list[str] -> (B, context_length) int64
    image_size: int
    mean: tuple[float, ...]  # per RGB channel
    std: tuple[float, ...]
    device: torch.device


def resolve_preset(cfg: BackboneConfig) -> Preset:
    """The preset named in ``cfg`` with its overrides applied."""
    preset = PRESETS[cfg.preset]
    if cfg.clip:
        clip = cfg.clip
        if Path(clip).expanduser().is_absolute():
            clip = f"{LOCAL_DIR}{Path(clip).expanduser()}"
        preset = replace(preset, clip=clip, clip_pretrained=cfg.clip_pretrained)
    elif cfg.clip_pretrained:
        preset = replace(preset, clip_pretrained=cfg.clip_pretrained)
    if cfg.diffusion:
        preset = replace(preset, diffusion=cfg.diffusion)
    preset = replace(preset, download=cfg.download)
    if preset.clip.startswith(ZOO):
        preset = replace(preset, clip=f"{LOCAL_DIR}{locate(preset.clip.removeprefix(ZOO))}")
    if preset.diffusion.startswith(ZOO):
        preset = replace(preset, diffusion=str(locate(preset.diffusion.removeprefix(ZOO))))
    return preset


def resolve_device(name: str) -> torch.device:
    """Map the config's device name to a torch device (``auto`` prefers CUDA)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"backbone.device = {name!r}, but CUDA is not available here")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Map ``backbone.dtype`` to a torch dtype for ``device`` (``auto``: bf16/fp16 on CUDA)."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise ValueError(
            f"backbone.dtype = {name!r} is unknown; allowed: auto, {', '.join(DTYPES)}"
        )
    if name == "float16" and device.type == "cpu":
        raise ValueError("backbone.dtype = 'float16' needs a GPU; use float32 or bfloat16 on CPU")
    return DTYPES[name]


FETCH_COMMAND = "cmfl-fetch-weights"


@contextmanager
def hub_access(source: Preset | str, what: str, allowed: bool) -> Iterator[None]:
    """While active, the Hugging Face Hub is offline unless ``allowed``.

    Offline, a weight missing from the host's cache fails with a ``ValueError`` that names
    ``source`` (a preset or a hub id) and the command that fetches it.
    """
    if allowed:
        yield
        return
    import huggingface_hub.constants as hub

    before, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    try:
        yield
    except (OSError, RuntimeError) as err:
        if isinstance(source, Preset):
            name, fetch = f"preset {source.name!r}", fetch_command(source)
        else:
            name, fetch = f"{source!r}", f"{FETCH_COMMAND} --diffusion {source}"
        raise ValueError(
            f"the {what} weights of {name} are not in this host's Hugging Face cache "
            f"({hub_cache()}), and backbone.download is off: run `{fetch}` on a host with "
            "network access (and copy the cache here), or set backbone.download = true"
        ) from err
    finally:
        hub.HF_HUB_OFFLINE = before


def fetch_command(preset: Preset) -> str:
    """The ``cmfl-fetch-weights`` command line that fetches ``preset`` as it is configured."""
    named = PRESETS[preset.name]
    parts = [FETCH_COMMAND, "--preset", preset.name]
    if preset.clip != named.clip and not preset.clip.startswith(LOCAL_DIR):
        parts += ["--clip", preset.clip]
    if preset.clip_pretrained != named.clip_pretrained:
        parts += ["--clip-pretrained", preset.clip_pretrained]
    if preset.diffusion != named.diffusion and not Path(preset.diffusion).is_absolute():
        parts += ["--diffusion", preset.diffusion]
    return " ".join(parts)


def hub_cache() -> Path:
    """The Hugging Face Hub cache of this process: ``HF_HUB_CACHE``, else ``HF_HOME``/hub."""
    import huggingface_hub.constants as hub

    return Path(hub.HF_HUB_CACHE)


def _check_local_clip(preset: Preset) -> None:
    """Fail early and precisely on a local CLIP directory that cannot load."""
    directory = Path(preset.clip.removeprefix(LOCAL_DIR))
    fix = "set backbone.clip to a directory with open_clip_config.json and weights, or a name"
    if not directory.is_dir():
        raise ValueError(f"CLIP directory {directory} does not exist: {fix}")
    if not (directory / CLIP_CONFIG_FILE).is_file():
        raise ValueError(f"CLIP directory {directory} has no {CLIP_CONFIG_FILE}: {fix}")
    has_weights = any(directory.glob("*.safetensors")) or any(directory.glob("*.bin"))
    if not has_weights:
        raise ValueError(
            f"CLIP directory {directory} holds no weights (*.safetensors, *.bin): {fix}"
        )


@cache
def clip_tokenizer(clip: str) -> Any:
    """open_clip's tokenizer of the CLIP ``clip``, built once per process (it parses its BPE)."""
    import open_clip

    return open_clip.get_tokenizer(clip)


def preset_tokenizer(preset: Preset) -> Any:
    """:func:`clip_tokenizer` of ``preset``'s CLIP; an ``hf-hub:`` CLIP reads its cached config."""
    with hub_access(preset, "CLIP", preset.download or preset.clip.startswith(LOCAL_DIR)):
        return clip_tokenizer(preset.clip)


def _skipped_init(skip: bool) -> AbstractContextManager[Any]:
    """While active (``skip``), modules built skip their random initialisation."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:  # older transformers: initialised, then overwritten
        return nullcontext()
    return no_init_weights() if skip else nullcontext()


def load_clip(preset: Preset, device_name: str, seed: int) -> ClipBundle:
    """Load the preset's CLIP (eval mode, frozen, on ``device_name``) with open_clip's loader.

    The model is built on ``device_name``; when a checkpoint holds every weight (a local
    directory, which must have weights, or a pretrained tag; open_clip loads strictly), its
    random initialisation is skipped. ``seed`` fixes the initialisation otherwise. Callers that
    run per message cache the result (see :func:`cmfl_flower.encoder.load_encoder`).
    """
    import open_clip

    local = preset.clip.startswith(LOCAL_DIR)
    if local:
        _check_local_clip(preset)
    torch.manual_seed(seed)
    checkpoint = local or bool(preset.clip_pretrained)
    with (
        warnings.catch_warnings(),
        torch.device(device_name),
        _skipped_init(checkpoint),
        hub_access(preset, "CLIP", preset.download or local),
    ):
        warnings.simplefilter("ignore", UserWarning)
        model = open_clip.create_model(
            preset.clip, pretrained=preset.clip_pretrained or None, device=device_name
        )
    model.eval().requires_grad_(False)
    size = model.visual.image_size
    image_size = int(size[0] if isinstance(size, tuple) else size)
    return ClipBundle(
        model=model,
        tokenizer=preset_tokenizer(preset),
        image_size=image_size,
        mean=tuple(model.visual.image_mean),
        std=tuple(model.visual.image_std),
        device=torch.device(device_name),
    )


def largest_token_norm(bundle: ClipBundle) -> float:
    """The largest L2 norm of a row of the CLIP's pretrained token-embedding table."""
    table = bundle.model.token_embedding.weight  # (vocabulary, D)
    return float(table.detach().float().norm(dim=1).max())


@cache
def pretrained_token_norm(preset: Preset) -> float:
    """:func:`largest_token_norm` of ``preset``'s CLIP, loaded once per process on the CPU.

    The ``cmfl-relay`` server's norm bound needs it (the clients take it from their own CLIP).
    """
    return largest_token_norm(load_clip(preset, "cpu", 0))


def load_pipeline(
    source: str, device: torch.device, dtype: torch.dtype = torch.float32, download: bool = False
) -> Any:
    """Load a Stable Diffusion pipeline from a hub id or a local directory (diffusers' loader).

    Weights are read in ``dtype`` and straight onto the device where diffusers can (its
    ``device_map``: ``cpu`` and the accelerator, no index, in recent versions); elsewhere the
    pipeline moves there after loading. A hub id is read from the host's Hugging Face cache
    only, unless ``download`` (``backbone.download``).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.pipeline_utils import SUPPORTED_DEVICE_MAP

    path = Path(source).expanduser()
    if path.is_absolute() and not (path / "model_index.json").is_file():
        state = "does not exist" if not path.is_dir() else "has no model_index.json"
        raise ValueError(
            f"diffusion directory {path} {state}: set backbone.diffusion to a diffusers "
            "pipeline directory or a hub id"
        )
    direct = device.type in SUPPORTED_DEVICE_MAP and device.index is None
    online = download or path.is_absolute()
    with hub_access(source, "diffusion pipeline", online):
        pipeline = StableDiffusionPipeline.from_pretrained(
            str(path) if path.is_absolute() else source,
            dtype=dtype,
            device_map=device.type if direct else None,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=not online,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)  # no copy where it was loaded in place
