"""Benchmark mode: one huge section written tile by tile in bounded memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .demo import brain_model, make_section
from .params import DemoParams
from .tiff import write_pyramid_tiled

MASK_FACTOR = 16


def write_big_section(path: str | Path, size_px: int, pixel_size_um: float = 2.0, seed: int = 0,
                      progress: bool = False) -> Path:
    """Write a ``size_px``² phantom section as a tiled pyramidal OME-TIFF, strip by strip.

    Also writes its ground-truth tissue mask on a grid downsampled by 16 as ``<stem>_tissue_ds16.png``.
    Memory: one strip of 1024 rows plus the reduced pyramid levels (~1/3 of the full image in uint8).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size_mm = size_px * pixel_size_um / 1000.0
    p = DemoParams(pixel_size_um=pixel_size_um, size_mm=max(8.0, min(400.0, size_mm)), seed=seed)
    brain = brain_model(p, 0, size_mm=size_mm)
    shape = (size_px, size_px)
    spec = make_section(p, brain, 0, 0, shape, 0.0)
    r = spec.renderer
    strip_h = 1024
    block_w = 2048

    def strips():
        it = range(0, size_px, strip_h)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="big section", unit="strip")
        for y in it:
            h = min(strip_h, size_px - y)
            strip = np.empty((h, size_px), np.uint8)
            for x in range(0, size_px, block_w):
                w = min(block_w, size_px - x)
                strip[:, x:x + w] = r.render(y, x, h, w)["image"]
            yield strip

    write_pyramid_tiled(path, shape, strips(), pixel_size_um)
    f = MASK_FACTOR
    n = (size_px + f - 1) // f
    mask = np.zeros((n, n), np.uint8)
    for y in range(0, n, 256):
        rr = (np.arange(y, min(n, y + 256), dtype=np.float32)[:, None] + 0.5) * f - 0.5
        cc = (np.arange(n, dtype=np.float32)[None, :] + 0.5) * f - 0.5
        rows, cols = np.broadcast_arrays(rr, cc)
        mask[y:y + rows.shape[0]] = r.labels(rows, cols)["tissue"] * 255
    name = path.name.removesuffix(".ome.tif").removesuffix(".tif")
    Image.fromarray(mask).save(path.with_name(f"{name}_tissue_ds{f}.png"))
    return path
