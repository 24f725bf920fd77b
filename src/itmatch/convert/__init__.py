"""Converters from official training checkpoints to itmatch checkpoints, one module per source."""

from __future__ import annotations

from importlib import import_module

# source name (as in `itmatch convert SOURCE`) -> "module:function(checkpoint, out, vocab=None)"
CONVERTERS = {
    "official-cmcan": "itmatch.convert.cmcan:convert_official_cmcan",
    "official-scan": "itmatch.convert.scan:convert_official_scan",
    "official-sgraf": "itmatch.convert.sgraf:convert_official_sgraf",
}


def converter(source: str):
    module, function = CONVERTERS[source].split(":")
    return getattr(import_module(module), function)
