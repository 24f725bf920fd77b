"""Errors that tell the user which file is wrong and how."""

from __future__ import annotations

from pathlib import Path


class ItmatchError(Exception):
    """Base class: the CLI prints these as one clear line instead of a traceback."""


class DataError(ItmatchError):
    """A data file is missing, corrupt, or inconsistent with the others."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class CheckpointError(ItmatchError):
    """A checkpoint cannot be read, or belongs to another model or preset."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class ConfigError(ItmatchError):
    """An unknown preset, an unknown config key, or a value of the wrong type."""


class InputError(ItmatchError):
    """Tensors passed to the Python API have the wrong shape, dtype or values."""
