"""The one registry of model families: a new method is one module in itmatch.models that registers
its Matcher class (with, optionally, its official-checkpoint converter and a check that recognises
those checkpoints), plus a preset JSON; it is found without editing any other file, and no code
outside `models/` and `convert/` names a family.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass

from itmatch.errors import ConfigError
from itmatch.models.backbones import build_backbone


@dataclass(frozen=True)
class Family:
    """A registered model family: its class, the "module:function(checkpoint, out, vocab=None)"
    converting its official training checkpoints, and a test `recognizes(payload)` telling whether
    a loaded official checkpoint is one of them (0 or False: no; a larger number: more specific)."""

    model_class: type
    converter: str | None = None
    recognizes: Callable[[dict], int] | None = None


_FAMILIES: dict[str, Family] = {}


def register(cls: type | None = None, *, converter: str | None = None, recognizes=None):
    """Class decorator registering a model family: `@register`, or `@register(converter=...,
    recognizes=...)` for a family whose official checkpoints `itmatch convert` reads."""

    def add(model_class: type) -> type:
        _FAMILIES[model_class.architecture] = Family(model_class, converter, recognizes)
        return model_class

    return add(cls) if cls is not None else add


def official_parts(n_parts: int, marker: str | None = None) -> Callable[[dict], int]:
    """Recognises the official training scripts' {"model": [n_parts state dicts], "opt": ...}.

    With `marker`, a regular expression that some key of the first state dict must match: such a
    recognizer is more specific (it answers 2) than the layout alone (1), so a family whose
    checkpoints share another's layout (VSRN's [img_enc, txt_enc] is SCAN's) is told apart.
    """

    def recognizes(payload: dict) -> int:
        parts = payload.get("model")
        if not isinstance(parts, list) or len(parts) != n_parts or "opt" not in payload:
            return 0
        if marker is None:
            return 1
        first = parts[0] if isinstance(parts[0], dict) else {}
        return 2 if any(isinstance(key, str) and re.fullmatch(marker, key) for key in first) else 0

    return recognizes


def _discover() -> None:
    """Imports every module of itmatch.models once (each registers its classes)."""
    import itmatch.models as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def architectures() -> list[str]:
    _discover()
    return sorted(_FAMILIES)


def family(name: str) -> Family:
    if name not in _FAMILIES:
        _discover()
    if name not in _FAMILIES:
        raise ConfigError(f"unknown architecture {name!r}; available: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def architecture_class(name: str) -> type:
    return family(name).model_class


def config_class(name: str) -> type:
    return architecture_class(name).config_class


def official_sources() -> dict[str, str]:
    """`itmatch convert` sources ("official-{architecture}") -> their converter."""
    _discover()
    return {f"official-{name}": entry.converter for name, entry in _FAMILIES.items() if entry.converter}


def recognize_official(payload: dict) -> str | None:
    """The architecture whose official training checkpoint `payload` is, if one recognises it (the
    most specific recognizer wins: see `official_parts`)."""
    _discover()
    answers = [(int(entry.recognizes(payload)), name) for name, entry in _FAMILIES.items() if entry.recognizes]
    specificity, name = max(answers, default=(0, None), key=lambda answer: answer[0])
    return name if specificity > 0 else None


def create_model(architecture: str, model_config):
    return architecture_class(architecture)(model_config)


def build_model(run_config):
    """The untrained model of a RunConfig (with its image backbone and the parameters of its loss
    terms, if any), remembering the config it was built from. Settings no layer accepts (a size
    of 0, a dropout above 1) are a ConfigError with torch's reason."""
    try:
        model = create_model(run_config.architecture, run_config.model)
        if run_config.backbone is not None:
            model.backbone = build_backbone(run_config.backbone)
    except (ValueError, RuntimeError, ZeroDivisionError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"the settings of {run_config.preset} do not make a model: {reason}") from None
    model.attach_loss_heads(run_config.loss)
    model.run_config = run_config
    return model
