"""The pictures the search page shows: a reduced copy of each indexed photo, or, for synthetic
scenes (which have region features but no photo), a drawing of the scene: each object a shape of
its colour at its box, labelled with its category."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from itmatch.errors import DataError
from itmatch.files import atomic_write

# Longest side of a stored picture: sharp in the page's detail view, small enough for its grid.
PICTURE_SIZE = 384

COLOUR_RGB = {
    "red": (214, 39, 40),
    "blue": (31, 96, 200),
    "green": (44, 160, 44),
    "yellow": (240, 210, 40),
    "white": (250, 250, 250),
    "black": (25, 25, 25),
    "orange": (255, 127, 14),
    "purple": (128, 60, 170),
}
# Shapes tell kinds of objects apart at a glance; the label names the category.
SHAPE_OF_CATEGORY = {
    **dict.fromkeys(("dog", "cat", "horse", "bird", "man", "woman", "child"), "ellipse"),
    **dict.fromkeys(("car", "bus", "boat", "bicycle", "chair", "table", "house"), "rectangle"),
    **dict.fromkeys(("tree", "kite", "umbrella"), "triangle"),
}
BACKGROUND = (206, 214, 200)
OUTLINE = (60, 60, 60)


def picture_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) scaled so that the longest side is PICTURE_SIZE."""
    scale = PICTURE_SIZE / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def draw_scene(objects: list[dict], width: int, height: int) -> Image.Image:
    """A synthetic scene (its `{split}_scenes.jsonl` objects, boxes normalised x1, y1, x2, y2)."""
    size = picture_size(width, height)
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, size[1] // 24))
    for obj in objects:
        x1, y1, x2, y2 = (value * scale for value, scale in zip(obj["box"], size * 2, strict=True))
        fill = COLOUR_RGB.get(obj["colour"], (128, 128, 128))
        shape = SHAPE_OF_CATEGORY.get(obj["category"], "ellipse")
        if shape == "ellipse":
            draw.ellipse((x1, y1, x2, y2), fill=fill, outline=OUTLINE, width=2)
        elif shape == "rectangle":
            draw.rounded_rectangle((x1, y1, x2, y2), radius=(x2 - x1) / 8, fill=fill, outline=OUTLINE, width=2)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill, outline=OUTLINE, width=2)
        label = "white" if sum(fill) < 380 else "black"
        draw.text(((x1 + x2) / 2, (y1 + y2) / 2), obj["category"], fill=label, font=font, anchor="mm")
    return image


def read_photo(path: Path) -> Image.Image:
    """A photo reduced to the picture size; an unreadable file is a DataError naming it."""
    try:
        with warnings.catch_warnings():
            # Past Image.MAX_IMAGE_PIXELS Pillow only warns (an error past twice that): refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as photo:
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
    return Image.new("RGB", picture_size(width, height), BACKGROUND)


def save_picture(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda file: image.save(file, "JPEG", quality=85))
