"""The CAM method gallery of handler/tools/explain.py, drawn with Pillow.

One row per photo: the photo, then its overlay under each CAM method, each fitted (aspect kept)
into a ``panel`` x ``panel`` box, over a two-line caption: the method and the class label with
its probability. A row is as tall as its tallest picture (``panel`` for an empty row), so a
landscape photo makes a low row. Geometry, for tests and layout, with ``heights`` the rows':

    width  = PAD + columns * (panel + PAD)
    height = PAD + sum(h + CAPTION + PAD for h in heights)

and the picture of (row, column) starts at :func:`panel_origin` (centred in its box).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

__all__ = ["PAD", "CAPTION", "Panel", "gallery_row", "row_heights", "gallery_size", "panel_origin", "draw_gallery"]

PAD = 8
CAPTION = 36
_BACKGROUND = (255, 255, 255)
_EMPTY = (232, 232, 232)
_TEXT = (17, 17, 17)
_MUTED = (96, 96, 96)
_FONT_PX = 13


@dataclass
class Panel:
    """One picture of a row and its two caption lines; ``image`` None draws an empty panel."""

    image: Image.Image | None
    title: str
    subtitle: str


def row_heights(rows: list[list[Panel]], panel: int) -> list[int]:
    """Each row's picture height: its tallest picture, ``panel`` when it has none."""
    return [max((p.image.height for p in row if p.image is not None), default=panel) for row in rows]


def gallery_size(heights: list[int], columns: int, panel: int) -> tuple[int, int]:
    """(width, height) of a gallery whose rows have these picture heights."""
    return PAD + columns * (panel + PAD), PAD + sum(h + CAPTION + PAD for h in heights)


def panel_origin(heights: list[int], row: int, column: int, panel: int) -> tuple[int, int]:
    """Top-left pixel of a panel's box (``panel`` wide, ``heights[row]`` high)."""
    return PAD + column * (panel + PAD), PAD + sum(h + CAPTION + PAD for h in heights[:row])


def _fit(image: Image.Image, panel: int) -> Image.Image:
    return ImageOps.contain(image.convert("RGB"), (panel, panel), method=Image.Resampling.LANCZOS)


def _probabilities(body: dict) -> dict[int, float]:
    return {p["class_id"]: p["probability"] for p in body.get("predictions", [])}


def gallery_row(photo: Path, results: dict, methods: list[str], panel: int) -> list[Panel]:
    """The panels of one photo from its answers per method (``explain.Result`` objects).

    The first panel is the photo as the server saw it (EXIF orientation applied), captioned with
    its file name and top-1 prediction; then one overlay per method, captioned with the method
    and the CAM's class and probability. A failed request leaves an empty panel with its error.
    """
    first = results[methods[0]]
    try:
        with Image.open(photo) as image:
            picture = _fit(ImageOps.exif_transpose(image), panel)
    except (OSError, UnidentifiedImageError, ValueError):
        picture = None
    top = (first.body or {}).get("predictions") if first.ok else None
    row = [Panel(picture, photo.name, f"{top[0]['label']} {top[0]['probability']:.2f}" if top else "")]
    for method in methods:
        result = results.get(method)
        cams = (result.body or {}).get("cams") if result is not None and result.ok else None
        if not cams or "overlay" not in cams[0]:
            why = "no CAM asked for" if result is not None and result.ok else (result.error if result else "not sent")
            row.append(Panel(None, method, str(why)))
            continue
        cam = cams[0]
        overlay = Image.open(io.BytesIO(base64.b64decode(cam["overlay"])))
        probability = _probabilities(result.body).get(cam["class_id"])
        label = f"{cam.get('label', cam['class_id'])}" + (f" {probability:.2f}" if probability is not None else "")
        row.append(Panel(_fit(overlay, panel), cam.get("method", method), label))
    return row


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=_FONT_PX)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _clip(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """The text, shortened with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def draw_gallery(rows: list[list[Panel]], panel: int) -> Image.Image:
    """The gallery image: ``rows`` of panels, all rows as long as the longest."""
    columns = max((len(r) for r in rows), default=1)
    heights = row_heights(rows, panel)
    canvas = Image.new("RGB", gallery_size(heights, columns, panel), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for r, row in enumerate(rows):
        height = heights[r]
        for c, item in enumerate(row):
            x, y = panel_origin(heights, r, c, panel)
            if item.image is None:
                draw.rectangle((x, y, x + panel - 1, y + height - 1), fill=_EMPTY)
            else:
                canvas.paste(item.image, (x + (panel - item.image.width) // 2, y + (height - item.image.height) // 2))
            draw.text((x, y + height + 3), _clip(draw, item.title, font, panel), fill=_TEXT, font=font)
            draw.text((x, y + height + 3 + CAPTION // 2), _clip(draw, item.subtitle, font, panel), fill=_MUTED,
                      font=font)
    return canvas
