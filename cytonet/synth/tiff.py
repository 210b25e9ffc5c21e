"""Writing sections as a slide scanner does: tiled, pyramidal (SubIFDs, factor 2), deflate-compressed OME-TIFF."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

MIN_LEVEL_PX = 512


def n_sublevels(shape: tuple[int, int]) -> int:
    """Number of reduced levels (factor 2) until the largest side is <= 512 px."""
    n, s = 0, max(shape)
    while s > MIN_LEVEL_PX:
        s = (s + 1) // 2
        n += 1
    return n


def downsample2(a: np.ndarray) -> np.ndarray:
    """2×2 mean (odd edges replicated) of a uint8 image."""
    h, w = a.shape
    if h % 2 or w % 2:
        a = np.pad(a, ((0, h % 2), (0, w % 2)), mode="edge")
    s = a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2).astype(np.uint16).sum(axis=(1, 3))
    return ((s + 2) // 4).astype(np.uint8)


def _meta(pixel_size_um: float) -> dict:
    return {"axes": "YX", "PhysicalSizeX": pixel_size_um, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": pixel_size_um, "PhysicalSizeYUnit": "µm"}


def _kw(tile: int) -> dict:
    return dict(tile=(tile, tile), compression="zlib", compressionargs={"level": 6}, photometric="minisblack")


def write_pyramid(path: str | Path, image: np.ndarray, pixel_size_um: float, tile: int = 256) -> Path:
    """Write an in-memory uint8 image as a tiled pyramidal OME-TIFF."""
    path = Path(path)
    n = n_sublevels(image.shape)
    bigtiff = image.size > 2**31
    with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=True) as tw:
        tw.write(image, subifds=n, metadata=_meta(pixel_size_um),
                 resolution=(1e4 / pixel_size_um, 1e4 / pixel_size_um), resolutionunit="CENTIMETER", **_kw(tile))
        level = image
        for _ in range(n):
            level = downsample2(level)
            tw.write(level, subfiletype=1, metadata=None, **_kw(tile))
    return path


def write_pyramid_tiled(path: str | Path, shape: tuple[int, int], strips: Iterator[np.ndarray],
                        pixel_size_um: float, tile: int = 256) -> Path:
    """Write a huge image given as an iterator of full-width row strips (height a multiple of ``tile``).

    The full-resolution level streams from the strips; the reduced levels (1/4 of the pixels and less) are
    accumulated in memory while streaming and written afterwards.
    """
    path = Path(path)
    H, W = shape
    n = n_sublevels(shape)
    levels: list[np.ndarray] = []
    if n:
        levels.append(np.empty(((H + 1) // 2, (W + 1) // 2), np.uint8))
    pos = [0]

    def tiles() -> Iterator[np.ndarray]:
        for strip in strips:
            h = strip.shape[0]
            if n:
                d = downsample2(strip)
                y = pos[0] // 2
                levels[0][y:y + d.shape[0]] = d
            pos[0] += h
            for ty in range(0, h, tile):
                for tx in range(0, W, tile):
                    t = strip[ty:ty + tile, tx:tx + tile]
                    if t.shape != (tile, tile):
                        t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1])), mode="edge")
                    yield t

    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
        tw.write(tiles(), shape=shape, dtype=np.uint8, subifds=n, metadata=_meta(pixel_size_um),
                 resolution=(1e4 / pixel_size_um, 1e4 / pixel_size_um), resolutionunit="CENTIMETER",
                 maxworkers=2, **_kw(tile))
        if n:
            level = levels.pop()
            for i in range(n):
                if i:
                    level = downsample2(level)
                tw.write(level, subfiletype=1, metadata=None, maxworkers=2, **_kw(tile))
    return path
