"""The colour names products are described with: a fixed palette of twelve basic colour names, each with a few
sRGB anchor colours. Its one home, for the synthetic set (which draws products in the first anchor of a name)
and for extraction (which names a colour by its nearest anchor in CIELAB, extract/colour.py).

The first anchor of each name is a mid-tone typical of the name; the others widen it to what people also call
by that name (pure and dark red, navy and sky blue, silver, ...), so that nearest-anchor naming in CIELAB does
not, for example, call pure blue (0, 0, 255) purple. See docs/attributes.md for the table.
"""

from __future__ import annotations

RGB = tuple[int, int, int]

PALETTE: dict[str, tuple[RGB, ...]] = {
    "red": ((200, 30, 40), (255, 0, 0), (140, 20, 25)),
    "orange": ((240, 120, 20), (255, 165, 0)),
    "yellow": ((240, 190, 30), (255, 255, 0), (250, 230, 110)),
    "green": ((30, 150, 70), (0, 255, 0), (0, 100, 0), (120, 180, 60)),
    "cyan": ((20, 160, 170), (0, 255, 255), (0, 128, 128)),
    "blue": ((30, 90, 190), (0, 0, 255), (0, 0, 128), (100, 150, 230)),
    "purple": ((120, 50, 160), (128, 0, 128), (190, 130, 220)),
    "pink": ((230, 90, 150), (255, 192, 203), (255, 105, 180)),
    "brown": ((150, 100, 60), (100, 60, 30), (139, 69, 19)),
    "white": ((235, 235, 230), (255, 255, 255)),
    "grey": ((130, 140, 150), (128, 128, 128), (170, 170, 170), (80, 80, 80)),
    "black": ((40, 40, 45), (0, 0, 0)),
}
COLOUR_NAMES: tuple[str, ...] = tuple(PALETTE)


def reference_rgb(name: str) -> RGB:
    """The name's first anchor: the colour the synthetic set draws a product of that name in."""
    return PALETTE[name][0]
