"""One ClientApp message in a fresh process, timed part by part (run by :mod:`.cold_start`).

``python -m benchmarks.cold_start_child JOB_DIR`` reads ``JOB_DIR/request.pkl`` (the run config,
torch threads, and the message and its node's ``Context``, or no message: loads only) and times,
in this order:

1. ``import client_app`` (what Flower's runtime does first in a fresh ClientApp process);
2. ``method imports``: :func:`~cmfl_flower.methods.resolve_method` of the run's method (a
   built-in loads on first use, with what it imports);
3. ``loads``: the process-wide loaders the method's client routine calls (:data:`LOADERS`), with
   the message's arguments, so that the message finds its models loaded;
4. ``work``: the ClientApp handling the message.

It writes the timings to ``JOB_DIR/timings.json`` and the reply to ``JOB_DIR/reply.pkl``. A
loader the message calls again with other arguments (a reload, counted as work) fails the run.
The module imports nothing beyond the standard library before step 1, and uses only APIs the
revisions it measures share (:mod:`.cold_start` copies it into an older revision's worktree).
"""

from __future__ import annotations

import copyreg
import io
import json
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cmfl_flower.config import AppConfig

Loader = Callable[["AppConfig"], Any]  # loads once per process; returns the cached function


def _device(cfg: AppConfig) -> str:
    from cmfl_flower.backbones import resolve_device

    return str(resolve_device(cfg.backbone.device))


def _encoder(cfg: AppConfig) -> Any:
    """The CLIP with its vision LoRA, as the round's workspace has it (``open_workspace``)."""
    from cmfl_flower.backbones import resolve_preset
    from cmfl_flower.encoder import LoraSpec, load_encoder

    spec = LoraSpec.from_config(cfg.encoder)
    load_encoder(resolve_preset(cfg.backbone), _device(cfg), cfg.seed, spec)
    return load_encoder


def _generator(cfg: AppConfig) -> Any:
    """The diffusion pipeline and prompt template the token methods generate with."""
    from cmfl_flower.backbones import resolve_preset
    from cmfl_flower.generation import load_generator

    preset = resolve_preset(cfg.backbone)
    load_generator(preset, _device(cfg), cfg.tokens.template, cfg.backbone.dtype)
    return load_generator


def _fed_diffusion() -> Any:
    """The diffusion baselines' training module (``cmfl_flower.diffusion`` in older revisions)."""
    import importlib

    try:
        return importlib.import_module("cmfl_flower.fed_diffusion")
    except ModuleNotFoundError:
        return importlib.import_module("cmfl_flower.diffusion")


def _unet(cfg: AppConfig) -> Any:
    """The UNet ``diffusion-unet`` loads the global weights into."""
    from cmfl_flower.backbones import resolve_preset

    training = _fed_diffusion()
    preset = resolve_preset(cfg.backbone)
    if cfg.diffusion.model == "conditional":
        training.latent_model(preset, _device(cfg), "fedavg")
        return training.latent_model
    training.ddpm_unet(training.ddpm_unet_name(cfg.diffusion, preset.name), _device(cfg))
    return training.ddpm_unet


def _unet_lora(cfg: AppConfig) -> Any:
    """The preset's pipeline with the seeded UNet LoRA of ``diffusion-lora``."""
    from cmfl_flower.backbones import resolve_preset

    attach_lora = _fed_diffusion().attach_lora
    d = cfg.diffusion
    attach_lora(resolve_preset(cfg.backbone), _device(cfg), d.lora_rank, d.lora_alpha, cfg.seed)
    return attach_lora


# what each built-in method's client routine loads (with the default tokens.objective "both",
# the token methods load the pipeline for the denoising loss even when they generate nothing)
LOADERS: dict[str, tuple[Loader, ...]] = {
    "cmfl-relay": (_encoder, _generator),
    "local-only": (_encoder,),
    "local-only-tokens": (_encoder, _generator),
    "names-generation": (_encoder, _generator),
    "encoder-lora": (_encoder,),
    "diffusion-unet": (_unet,),
    "diffusion-lora": (_unet_lora,),
}


def dumps(obj: Any) -> bytes:
    """Pickle ``obj``, memory views as bytes (Flower shares array payloads as views)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer)
    pickler.dispatch_table = copyreg.dispatch_table | {memoryview: _view_as_bytes}
    pickler.dump(obj)
    return buffer.getvalue()


def _view_as_bytes(view: memoryview) -> tuple[type[bytes], tuple[bytes]]:
    return bytes, (view.tobytes(),)


def _timed(timings: dict[str, float], name: str, step: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = step()
    timings[name] = time.perf_counter() - start
    return result


def run(job: Path) -> dict[str, Any]:
    """Time the four steps for the request in ``job``; write the reply; return the timings."""
    timings: dict[str, float] = {}
    client_app = _timed(timings, "import", lambda: __import__("client_app"))
    from cmfl_flower.config import AppConfig
    from cmfl_flower.methods import resolve_method

    request = pickle.loads((job / "request.pkl").read_bytes())
    cfg = AppConfig.from_run_config(request["run_config"])
    _timed(timings, "method-imports", lambda: resolve_method(cfg.method))
    import torch  # imported by now

    torch.set_num_threads(request["threads"])  # as the message will, before the loads
    loaded = _timed(timings, "loads", lambda: [load(cfg) for load in LOADERS[cfg.method]])
    if request["message"] is not None:
        reply = _timed(
            timings, "work", lambda: client_app.app(request["message"], request["context"])
        )
        reloaded = [f.__name__ for f in loaded if f.cache_info().misses != 1]
        if reloaded:
            raise RuntimeError(f"the message loaded again: {reloaded} (other arguments)")
        (job / "reply.pkl").write_bytes(dumps(reply))
    return {"timings": timings, "threads": torch.get_num_threads(), "source": client_app.__file__}


def main(argv: list[str] | None = None) -> None:
    """Run the job directory given on the command line."""
    job = Path((sys.argv[1:] if argv is None else argv)[0])
    (job / "timings.json").write_text(json.dumps(run(job)))


if __name__ == "__main__":
    main()
