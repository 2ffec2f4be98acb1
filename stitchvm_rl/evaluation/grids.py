"""Captioned image grids: one row per prompt (its text above the row), a group of columns per policy."""

from __future__ import annotations

import io
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL = 128  # pixels per image side in the grid (toy-world images are upscaled, SD3.5's shrunk)
LINE = 12  # pixels per line of text in PIL's default font
GAP = 8  # white pixels between two groups of columns


def captioned_grid(cells: list[list[np.ndarray]], captions: list[str], titles: list[str], cell: int = CELL) -> bytes:
    """PNG bytes of a grid: `cells[row][column]` uint8 (H, W, 3) images, `captions[row]` written
    above each row (wrapped, at most two lines), `titles[g]` above the g-th group of columns (the
    columns split evenly between the titles: e.g. a policy's N images each)."""
    font = ImageFont.load_default()
    columns = len(cells[0])
    group = columns // len(titles)
    width = columns * cell + (len(titles) - 1) * GAP
    left = [j * cell + (j // group) * GAP for j in range(columns)]
    chars = max(8, width // 6)
    wrapped = [textwrap.wrap(c, chars)[:2] or [""] for c in captions]
    height = LINE + 4 + sum(len(w) * LINE + 4 + cell for w in wrapped)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        draw.text((left[j * group] + 4, 2), title[: group * cell // 6], fill="black", font=font)
    y = LINE + 4
    for row, lines in zip(cells, wrapped):
        for i, line in enumerate(lines):
            draw.text((4, y + i * LINE), line, fill=(40, 40, 40), font=font)
        y += len(lines) * LINE + 4
        for j, image in enumerate(row):
            canvas.paste(Image.fromarray(image).resize((cell, cell), Image.BICUBIC), (left[j], y))
        y += cell
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()
