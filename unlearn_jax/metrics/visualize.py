"""Labelled image grids as PNG, for looking at what changed rather than reading numbers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from unlearn_jax.atomic_files import write_png

LABEL_HEIGHT = 14


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[H,W,3] float in [0,1] -> uint8 (NaN shown as black)."""
    return (np.nan_to_num(np.clip(image, 0.0, 1.0)) * 255 + 0.5).astype(np.uint8)


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Writes one [H,W,3] float image in [0,1] (atomically: whole or not at all)."""
    write_png(path, Image.fromarray(to_uint8(image)))


def save_grid(
    rows: Sequence[Sequence[np.ndarray]],
    path: str | Path,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    min_cell: int = 96,
    gap: int = 2,
) -> Path:
    """Writes a grid of [H,W,3] images in [0,1], with optional row and column labels.

    Small images are enlarged by an integer factor (nearest neighbour) to at
    least `min_cell` pixels, so a 16x16 sample is still visible.
    """
    first = rows[0][0]
    scale = max(1, -(-min_cell // max(first.shape[:2])))
    ch, cw = first.shape[0] * scale, first.shape[1] * scale
    ncols = max(len(r) for r in rows)
    top = LABEL_HEIGHT if col_labels else 0
    left_labels = row_labels is not None
    row_h = ch + (LABEL_HEIGHT if left_labels else 0)
    canvas = Image.new(
        "RGB", (ncols * (cw + gap) + gap, top + len(rows) * (row_h + gap) + gap), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j, label in enumerate(col_labels or []):
        draw.text((gap + j * (cw + gap) + 2, 1), str(label), fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        y = top + gap + i * (row_h + gap)
        if left_labels:
            draw.text(
                (gap + 2, y), str(row_labels[i])[: 6 * ncols * cw // 40], fill=(0, 0, 0), font=font
            )
            y += LABEL_HEIGHT
        for j, image in enumerate(row):
            tile = Image.fromarray(to_uint8(image)).resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (gap + j * (cw + gap), y))
    return write_png(path, canvas)
