"""The font of every label the project draws (contact sheets, TensorBoard image grids)."""

from __future__ import annotations

from PIL import ImageFont


def label_font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled TrueType font at ``size`` px (Pillow >= 10.1), else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: load_default takes no size
        return ImageFont.load_default()


def text_size(draw, text: str, font) -> tuple[int, int]:
    """(width, height) px of ``text`` (lines apart by 2 px) drawn at (0, 0) with ``font`` on ``draw``
    (a PIL ImageDraw)."""
    _, _, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, spacing=2)
    return right, bottom
