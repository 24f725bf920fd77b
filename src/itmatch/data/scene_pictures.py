"""Pictures of the synthetic scenes (`itmatch make-synthetic`), which have region features but no
photo: each object a shape of its colour at its box, labelled with its category. A picture source
(`itmatch.data.pictures`) for any data folder with `{split}_scenes.jsonl` beside its features.
"""

from __future__ import annotations

import json

from PIL import Image, ImageDraw, ImageFont

from itmatch.data.pictures import picture_source
from itmatch.data.precomp import read_captions
from itmatch.errors import DataError

SCENES = "{split}_scenes.jsonl"

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


@picture_source
def scene_pictures(split):
    """The drawing of each image's scene, or None when the split has no scene file."""
    path = split.data_dir / SCENES.format(split=split.split)
    if not path.exists():
        return None
    try:
        scenes = [json.loads(line)["objects"] for line in read_captions(path)]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DataError(path, f"is not a scene description file ({type(error).__name__}: {error})") from None
    if len(scenes) != split.n_images:
        raise DataError(path, f"has {len(scenes):,} scenes for {split.n_images:,} images")

    def draw(row: int, size: tuple[int, int]) -> Image.Image:
        try:
            return draw_scene(scenes[row], size)
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(
                path, f"line {row + 1}: not a scene of objects with box, colour and category ({error!r})"
            ) from None

    return draw


def draw_scene(objects: list[dict], size: tuple[int, int]) -> Image.Image:
    """A synthetic scene (its `{split}_scenes.jsonl` objects, boxes normalised x1, y1, x2, y2)."""
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
