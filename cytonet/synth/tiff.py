"""Writing sections as a slide scanner does: tiled, pyramidal (SubIFDs, factor 2), deflate-compressed OME-TIFF."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from cytonet.io.atomic import atomic_path

MIN_LEVEL_PX = 512
# Streaming writes: rows of tiles per band read back from a spilled level, and bytes tifffile compresses at once
# (its default, 256 MB, made the 40k section's writer hold ~0.5 GB of compressed tiles).
BAND_TILES = 4
BUFFER_BYTES = 16 * 2**20


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


def _tiles(band: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """The tiles of a full-width row band in TIFF order, edge tiles padded by replication."""
    for ty in range(0, band.shape[0], tile):
        for tx in range(0, band.shape[1], tile):
            t = band[ty:ty + tile, tx:tx + tile]
            if t.shape != (tile, tile):
                t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1])), mode="edge")
            yield t


def write_pyramid_tiled(path: str | Path, shape: tuple[int, int], strips: Iterator[np.ndarray],
                        pixel_size_um: float, tile: int = 256) -> Path:
    """Write a huge image given as an iterator of full-width row strips (height a multiple of ``2 * tile``).

    Memory stays at a few strips whatever the image size: the full-resolution level streams from the strips, each
    reduced level is spilled to a temporary memory-mapped file beside ``path`` while the level above it is written,
    and tifffile compresses at most ``BUFFER_BYTES`` at a time.
    """
    path = Path(path)
    n = n_sublevels(shape)
    kw = dict(maxworkers=2, buffersize=BUFFER_BYTES, **_kw(tile))
    # the TIFF goes to a temporary name first: a killed run leaves no file that looks like a complete section
    with atomic_path(path, suffix=".ome.tif") as part, \
            tempfile.TemporaryDirectory(dir=path.parent, prefix=".pyramid-") as tmp:

        def spill(bands: Iterator[np.ndarray], shape: tuple[int, int], level: int) -> Iterator[np.ndarray]:
            """Yield the tiles of ``bands`` while writing their 2×2 mean into the memory map of ``level``."""
            down = None
            if level <= n:
                down = np.lib.format.open_memmap(Path(tmp) / f"level{level}.npy", mode="w+", dtype=np.uint8,
                                                 shape=((shape[0] + 1) // 2, (shape[1] + 1) // 2))
            y = 0
            for band in bands:
                if down is not None:
                    d = downsample2(band)
                    down[y // 2:y // 2 + d.shape[0]] = d
                y += band.shape[0]
                yield from _tiles(band, tile)
            if down is not None:
                down.flush()

        def bands_of(level: int) -> Iterator[np.ndarray]:
            a = np.load(Path(tmp) / f"level{level}.npy", mmap_mode="r")
            for y in range(0, a.shape[0], BAND_TILES * tile):
                yield np.asarray(a[y:y + BAND_TILES * tile])

        with tifffile.TiffWriter(part, bigtiff=True, ome=True) as tw:
            tw.write(spill(strips, shape, 1), shape=shape, dtype=np.uint8, subifds=n,
                     metadata=_meta(pixel_size_um), resolution=(1e4 / pixel_size_um, 1e4 / pixel_size_um),
                     resolutionunit="CENTIMETER", **kw)
            for level in range(1, n + 1):
                lshape = np.load(Path(tmp) / f"level{level}.npy", mmap_mode="r").shape
                tw.write(spill(bands_of(level), lshape, level + 1), shape=lshape, dtype=np.uint8,
                         subfiletype=1, metadata=None, **kw)
    return path
