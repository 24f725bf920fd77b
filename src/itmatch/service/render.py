"""The pictures the search page shows: a reduced copy of each indexed photo, a picture that the
data folder's picture source draws (`itmatch.data.pictures`), or a blank canvas."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from itmatch.data.raw import photo_file
from itmatch.errors import DataError
from itmatch.files import atomic_write

# Longest side of a stored picture: sharp in the page's detail view, small enough for its grid.
PICTURE_SIZE = 384
BLANK = (206, 214, 200)


def picture_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) scaled so that the longest side is PICTURE_SIZE."""
    scale = PICTURE_SIZE / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def read_photo(path: Path) -> Image.Image:
    """A photo reduced to the picture size; an unreadable file is a DataError naming it."""
    try:
        with warnings.catch_warnings():
            # Past Image.MAX_IMAGE_PIXELS Pillow only warns (an error past twice that): refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(photo_file(path)) as photo:
                photo = photo.convert("RGB")
    except FileNotFoundError:
        raise DataError(path, "image file not found") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise DataError(path, f"is too large to decode safely ({error})") from None
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(path, f"is not a readable image ({error})") from None
    return photo.resize(picture_size(*photo.size), Image.Resampling.LANCZOS)


def blank_picture(width: int, height: int) -> Image.Image:
    """For images with neither a photo nor a scene description: the page still shows their boxes."""
    return Image.new("RGB", picture_size(width, height), BLANK)


def save_picture(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda file: image.save(file, "JPEG", quality=85))
