"""The methods: one module each, holding its server side and its client routine.

``method = "cmfl-relay"`` picks a built-in; ``method = "pkg.module:NAME"`` imports a plug-in,
a :class:`~cmfl_flower.methods.base.Method` object that must be importable wherever the
ServerApp and the ClientApps run. Built-ins load on first use, so a client imports only the
method it runs.

| method | module | what clients send |
| --- | --- | --- |
| ``cmfl-relay`` | :mod:`.relay` | learned class-token vectors (the method) |
| ``local-only``, ``local-only-tokens``, ``names-generation`` | :mod:`.local` | metrics only |
| ``encoder-lora`` | :mod:`.encoder_lora` | the vision LoRA (combined by ``strategy``) |
| ``diffusion-unet``, ``diffusion-lora`` | :mod:`.fed_diffusion` | the UNet or its LoRA |
"""

from __future__ import annotations

import importlib

from cmfl_flower.methods.base import Method

BUILT_IN: dict[str, str] = {
    "cmfl-relay": "cmfl_flower.methods.relay:RELAY",
    "local-only": "cmfl_flower.methods.local:LOCAL_ONLY",
    "local-only-tokens": "cmfl_flower.methods.local:LOCAL_ONLY_TOKENS",
    "names-generation": "cmfl_flower.methods.local:NAMES_GENERATION",
    "encoder-lora": "cmfl_flower.methods.encoder_lora:ENCODER_LORA",
    "diffusion-unet": "cmfl_flower.methods.fed_diffusion:DIFFUSION_UNET",
    "diffusion-lora": "cmfl_flower.methods.fed_diffusion:DIFFUSION_LORA",
}

__all__ = ["BUILT_IN", "Method", "action", "resolve_method"]


def action(method: str) -> str:
    """The message-type action of a built-in method: ``train.<action>`` (an identifier)."""
    return method.replace("-", "_")


def resolve_method(name: str) -> Method:
    """The method ``name`` designates: a built-in's name or ``package.module:NAME``."""
    if ":" not in name and name not in BUILT_IN:
        raise ValueError(
            f"method = {name!r} is unknown; built in: {', '.join(BUILT_IN)} "
            "(or give 'package.module:NAME' of a plug-in)"
        )
    path = BUILT_IN.get(name, name)
    module_name, _, attr = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"method = {name!r} cannot be imported: {err}") from None
    if not isinstance(found, Method):
        raise ValueError(
            f"method = {name!r} is a {type(found).__name__}, not a cmfl_flower.methods.Method"
        )
    return found
