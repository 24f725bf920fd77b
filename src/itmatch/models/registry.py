"""Architecture registry: a new method is one module in itmatch.models that registers its Matcher
class, plus a preset JSON; it is found without editing any other file."""

from __future__ import annotations

import importlib
import pkgutil

from itmatch.errors import ConfigError
from itmatch.models.backbones import build_backbone

_ARCHITECTURES: dict[str, type] = {}


def register(cls: type) -> type:
    _ARCHITECTURES[cls.architecture] = cls
    return cls


def _discover() -> None:
    """Imports every module of itmatch.models once (each registers its classes)."""
    import itmatch.models as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def architectures() -> list[str]:
    _discover()
    return sorted(_ARCHITECTURES)


def architecture_class(name: str) -> type:
    if name not in _ARCHITECTURES:
        _discover()
    if name not in _ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; available: {', '.join(sorted(_ARCHITECTURES))}")
    return _ARCHITECTURES[name]


def config_class(name: str) -> type:
    return architecture_class(name).config_class


def create_model(architecture: str, model_config):
    return architecture_class(architecture)(model_config)


def build_model(run_config):
    """The untrained model of a RunConfig (with its image backbone, if any), remembering the
    config it was built from. Settings no layer accepts (a size of 0, a dropout above 1) are a
    ConfigError with torch's reason."""
    try:
        model = create_model(run_config.architecture, run_config.model)
        if run_config.backbone is not None:
            model.backbone = build_backbone(run_config.backbone)
    except (ValueError, RuntimeError, ZeroDivisionError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"the settings of {run_config.preset} do not make a model: {reason}") from None
    model.run_config = run_config
    return model
