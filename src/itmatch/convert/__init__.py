"""Converters from official training checkpoints to itmatch checkpoints, one module per source."""

from __future__ import annotations

import functools
from importlib import import_module
from pathlib import Path

from itmatch.errors import CheckpointError

# source name (as in `itmatch convert SOURCE`) -> "module:function(checkpoint, out, vocab=None)"
CONVERTERS = {
    "official-cmcan": "itmatch.convert.cmcan:convert_official_cmcan",
    "official-scan": "itmatch.convert.scan:convert_official_scan",
    "official-sgraf": "itmatch.convert.sgraf:convert_official_sgraf",
}


def converter(source: str):
    """The conversion function of `source`; options or tensors of unexpected types in the
    checkpoint (a crafted or damaged file) are a CheckpointError naming it."""
    module, function = CONVERTERS[source].split(":")
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
