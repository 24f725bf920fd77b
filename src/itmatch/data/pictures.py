"""Picture sources: what a data folder can show of an image that has no photo (a drawing of a
synthetic scene, say). The search index asks `picture_reader(split)`; a data module registers a
source with `@picture_source`, so the service never knows which data set it shows.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from PIL import Image

# source(split) -> None, or draw(row, (width, height)) -> picture
PictureReader = Callable[[int, tuple[int, int]], Image.Image]
_SOURCES: list[Callable] = []


def picture_source(source: Callable) -> Callable:
    _SOURCES.append(source)
    return source


def picture_reader(split) -> PictureReader | None:
    """The first registered source that has pictures of `split`'s images (None if none has)."""
    import itmatch.data as package

    for module in pkgutil.iter_modules(package.__path__):  # each data module registers its sources
        importlib.import_module(f"{package.__name__}.{module.name}")
    for source in _SOURCES:
        reader = source(split)
        if reader is not None:
            return reader
    return None
