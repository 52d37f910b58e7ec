"""Run configuration: one pydantic model, parsed once from Flower's flat run config.

Flower hands an app a flat mapping with dotted, hyphenated keys (``data.min-partition-size``).
:func:`AppConfig.from_run_config` turns it into a frozen, validated :class:`AppConfig`;
:meth:`AppConfig.to_run_config` goes the other way. Unknown keys, wrong types and out-of-range
values raise ``ValueError`` naming the key, the value and what is allowed.

``python -m cmfl_flower.config --toml`` prints the ``[tool.flwr.app.config]`` block of
``pyproject.toml``; ``--markdown`` prints the config reference of ``docs/configuration.md``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from cmfl_flower.config.base import (
    NAME_PATTERN,
    DatasetName,
    PartitionerName,
    Scalar,
    SchedulerName,
    Section,
)
from cmfl_flower.config.learning import (
    BackboneConfig,
    DataConfig,
    EncoderConfig,
    GenerationConfig,
    RelayConfig,
    ScreeningConfig,
    TokensConfig,
    class_list,
)
from cmfl_flower.config.run import DiffusionConfig, FederationConfig, OutputConfig, PrivacyConfig

__all__ = [
    "AppConfig",
    "BackboneConfig",
    "DataConfig",
    "DatasetName",
    "DiffusionConfig",
    "EncoderConfig",
    "FederationConfig",
    "GenerationConfig",
    "OutputConfig",
    "PartitionerName",
    "PrivacyConfig",
    "RelayConfig",
    "Scalar",
    "SchedulerName",
    "ScreeningConfig",
    "TokensConfig",
    "all_keys",
    "class_list",
    "render_markdown",
    "render_toml",
]


class AppConfig(Section):
    """The whole run configuration; the single source of truth for server and clients."""

    method: str = Field(
        "cmfl-relay",
        description="What clients train and send: a built-in method (`docs/methods.md`) or"
        " `package.module:Name` of a plug-in.",
    )
    strategy: str = Field(
        "fedavg",
        description="How the server combines weights (weight methods): a Flower strategy's short"
        " name (`fedavg`, `fedadam`, `krum`, ...) or `package.module:Class`.",
    )
    strategy_args: str = Field(
        "",
        description="Keyword arguments of the strategy, `name=value` separated by spaces"
        " (e.g. `eta=0.01 beta_1=0.9`); checked against its signature.",
    )
    seed: int = Field(0, ge=0, description="Seed of training, sampling and generation.")
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    tokens: TokensConfig = TokensConfig()
    relay: RelayConfig = RelayConfig()
    screening: ScreeningConfig = ScreeningConfig()
    generation: GenerationConfig = GenerationConfig()
    encoder: EncoderConfig = EncoderConfig()
    federation: FederationConfig = FederationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    output: OutputConfig = OutputConfig()
    diffusion: DiffusionConfig = DiffusionConfig()

    @field_validator("method", "strategy")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(f"must be a short name or 'package.module:Name', got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_relay(self) -> AppConfig:
        if self.relay.combine == "mean" and self.tokens.relay == "unlabelled":
            raise ValueError(
                "relay.combine = 'mean' needs class ids: set tokens.relay = 'labelled' "
                "or relay.combine = 'select'"
            )
        if self.tokens.clusters > 1:
            needs = {
                "tokens.objective in ('diffusion', 'both')": self.tokens.objective != "clip",
                "tokens.relay = 'labelled'": self.tokens.relay == "labelled",
                "relay.combine = 'select'": self.relay.combine == "select",
                "privacy.enabled = false": not self.privacy.enabled,
            }
            if missing := [rule for rule, met in needs.items() if not met]:
                raise ValueError(
                    f"tokens.clusters = {self.tokens.clusters} needs {', '.join(missing)} "
                    "(or tokens.clusters = 1)"
                )
        return self

    @classmethod
    def from_run_config(cls, flat: Mapping[str, Any]) -> AppConfig:
        """Parse Flower's flat run config; raise ``ValueError`` naming any bad key."""
        nested: dict[str, Any] = {}
        for key, value in flat.items():
            section, attr = _split_key(key)
            if section:
                nested.setdefault(section, {})[attr] = value
            else:
                nested[attr] = value
        try:
            return cls.model_validate(nested)
        except ValidationError as err:
            raise ValueError(_describe(err)) from None

    def to_run_config(self) -> dict[str, Scalar]:
        """The flat run config (dotted, hyphenated keys) equal to this model."""
        flat: dict[str, Scalar] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, dict):
                for attr, inner in value.items():
                    flat[f"{name}.{_to_key(attr)}"] = inner
            else:
                flat[_to_key(name)] = value
        return flat


def _to_key(attr: str) -> str:
    return attr.replace("_", "-")


def _sections() -> dict[str, type[Section]]:
    sections: dict[str, type[Section]] = {}
    for name, info in AppConfig.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            sections[name] = annotation
    return sections


def all_keys() -> list[str]:
    """Every valid flat key, in declaration order."""
    return list(AppConfig().to_run_config())


def _split_key(key: str) -> tuple[str, str]:
    """Map ``data.min-partition-size`` to ``("data", "min_partition_size")``."""
    section, sep, name = key.partition(".")
    sections = _sections()
    if sep:
        fields = sections[section].model_fields if section in sections else {}
        attr = name.replace("-", "_")
        if attr in fields and "_" not in name:
            return section, attr
    elif key not in sections and "_" not in key:
        attr = key.replace("-", "_")
        if attr in AppConfig.model_fields:
            return "", attr
    close = difflib.get_close_matches(key, all_keys(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"Unknown run config key {key!r}.{hint} Valid keys: {', '.join(all_keys())}.")


def _describe(err: ValidationError) -> str:
    """One line per problem, naming the flat key, the value and what is allowed."""
    lines = []
    for problem in err.errors():
        loc = [str(part) for part in problem["loc"]]
        message = str(problem["msg"]).removeprefix("Value error, ")
        if not loc:  # a rule across keys: its message names them
            lines.append(message)
            continue
        key = ".".join([loc[0], *(_to_key(part) for part in loc[1:])])
        lines.append(f"run config key {key!r} = {problem.get('input')!r}: {message}")
    return "Invalid run config:\n  " + "\n  ".join(lines)


def _toml_value(value: Scalar) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def render_toml() -> str:
    """The ``[tool.flwr.app.config]`` body for pyproject.toml (every key with its default)."""
    return "\n".join(f"{key} = {_toml_value(v)}" for key, v in AppConfig().to_run_config().items())


def render_markdown() -> str:
    """A Markdown table of every key: type, default and description."""
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    models: list[tuple[str, type[Section]]] = [("", AppConfig), *_sections().items()]
    for prefix, model in models:
        for attr, info in model.model_fields.items():
            if attr in _sections() and not prefix:
                continue
            key = f"{prefix}.{_to_key(attr)}" if prefix else _to_key(attr)
            kind = getattr(info.annotation, "__name__", str(info.annotation))
            kind = str(info.annotation).replace("typing.", "") if kind == "Literal" else kind
            default = _toml_value(info.default)
            rows.append(f"| `{key}` | {kind} | `{default}` | {info.description or ''} |")
    return "\n".join(rows)
