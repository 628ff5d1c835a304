"""Tensors <-> pictures: PIL images and PNG grids."""

import os

import numpy as np
import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images [B, 3, H, W] in [-1, 1] -> PIL RGB images."""
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


def image_grid(rows: list[torch.Tensor], pad: int = 2, scale: int = 1) -> Image.Image:
    """Rows of images, each [N, 3, H, W] in [-1, 1] (same H, W), as one picture with `pad`
    white pixels between cells, each cell enlarged `scale` times (nearest)."""
    if not rows or any(r.ndim != 4 for r in rows):
        raise ValueError("image_grid: expected a non-empty list of [N, 3, H, W] tensors")
    h, w = rows[0].shape[-2:]
    cols = max(r.shape[0] for r in rows)
    ch, cw = h * scale, w * scale
    canvas = np.full((len(rows) * (ch + pad) + pad, cols * (cw + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(to_pil(row)):
            cell = np.asarray(img.resize((cw, ch), Image.NEAREST) if scale > 1 else img)
            y, x = pad + i * (ch + pad), pad + j * (cw + pad)
            canvas[y:y + ch, x:x + cw] = cell
    return Image.fromarray(canvas)


def save_grid(rows: list[torch.Tensor], path: str, scale: int = 1) -> None:
    """`image_grid` written as a PNG (to a temporary name, then renamed)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image_grid(rows, scale=scale).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)
