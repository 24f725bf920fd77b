"""Converters from official training checkpoints to itmatch checkpoints, one module per source;
each model family names its converter where it registers (`itmatch.models.registry`)."""

from __future__ import annotations

import functools
from importlib import import_module
from pathlib import Path

from itmatch.errors import CheckpointError
from itmatch.models.registry import official_sources


def converter(source: str):
    """The conversion function of `source`; options or tensors of unexpected types in the
    checkpoint (a crafted or damaged file) are a CheckpointError naming it."""
    module, function = official_sources()[source].split(":")
    convert = getattr(import_module(module), function)

    @functools.wraps(convert)
    def checked(checkpoint, out, vocab=None):
        try:
            return convert(checkpoint, out, vocab)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            problem = (str(error).strip().splitlines() or [""])[0]
            raise CheckpointError(
                Path(checkpoint), f"is not a well-formed {source} checkpoint ({type(error).__name__}: {problem})"
            ) from None

    return checked
