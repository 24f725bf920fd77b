"""Architecture registry: a new method is one module that registers its Matcher class."""

from __future__ import annotations

from itmatch.errors import ConfigError

_ARCHITECTURES: dict[str, type] = {}


def register(cls: type) -> type:
    _ARCHITECTURES[cls.architecture] = cls
    return cls


def architecture_class(name: str) -> type:
    import itmatch.models  # noqa: F401  (importing the package registers every architecture)

    if name not in _ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; available: {', '.join(sorted(_ARCHITECTURES))}")
    return _ARCHITECTURES[name]


def config_class(name: str) -> type:
    return architecture_class(name).config_class


def create_model(architecture: str, model_config):
    return architecture_class(architecture)(model_config)


def build_model(run_config):
    """The untrained model of a RunConfig, remembering the config it was built from."""
    model = create_model(run_config.architecture, run_config.model)
    model.run_config = run_config
    return model
