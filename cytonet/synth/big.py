"""Benchmark mode: one huge section written tile by tile in bounded memory."""

from __future__ import annotations

from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from cytonet.io import logs

from .demo import brain_model, make_section
from .params import DemoParams
from .tiff import write_pyramid_tiled

MASK_FACTOR = 16


STRIP_H = 1024
BLOCK_W = 2048


@lru_cache(maxsize=2)
def _renderer(size_px: int, pixel_size_um: float, seed: int):
    """The section renderer (cached per process, so pool workers build it once)."""
    size_mm = size_px * pixel_size_um / 1000.0
    p = DemoParams(pixel_size_um=pixel_size_um, size_mm=max(8.0, min(400.0, size_mm)), seed=seed)
    brain = brain_model(p, 0, size_mm=size_mm)
    return make_section(p, brain, 0, 0, (size_px, size_px), 0.0).renderer


def _render_strip(args: tuple[int, float, int, int]) -> np.ndarray:
    size_px, pixel_size_um, seed, y = args
    r = _renderer(size_px, pixel_size_um, seed)
    h = min(STRIP_H, size_px - y)
    strip = np.empty((h, size_px), np.uint8)
    for x in range(0, size_px, BLOCK_W):
        w = min(BLOCK_W, size_px - x)
        strip[:, x:x + w] = r.render(y, x, h, w)["image"]
    return strip


def write_big_section(path: str | Path, size_px: int, pixel_size_um: float = 2.0, seed: int = 0,
                      progress: bool = False, n_jobs: int = 1) -> Path:
    """Write a ``size_px``² phantom section as a tiled pyramidal OME-TIFF, strip by strip.

    Also writes its ground-truth tissue mask on a grid downsampled by 16 as ``<stem>_tissue_ds16.png``.
    Memory: the renderer and a few strips of 1024 rows (one per worker, plus those waiting to be written); the
    reduced pyramid levels are spilled to a temporary file beside ``path`` (see ``write_pyramid_tiled``).
    ``n_jobs`` worker processes render strips in parallel.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size_px, size_px)
    r = _renderer(size_px, pixel_size_um, seed)
    jobs = [(size_px, pixel_size_um, seed, y) for y in range(0, size_px, STRIP_H)]

    def strips(pool):
        # imap keeps the strips in order and only a bounded number in flight.
        it = pool.imap(_render_strip, jobs) if pool else map(_render_strip, jobs)
        yield from logs.progress(it, total=len(jobs), desc="big section", unit="strip", enabled=progress)

    if n_jobs > 1:
        with get_context("spawn").Pool(n_jobs) as pool:
            write_pyramid_tiled(path, shape, strips(pool), pixel_size_um)
    else:
        write_pyramid_tiled(path, shape, strips(None), pixel_size_um)
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
