"""Naive patch extractor (the baseline): every patch opens the TIFF afresh and slices its region on its own.

This is what many tools do (``tifffile.imread(path, aszarr=True)`` + zarr slicing per patch): tiles shared by
neighbouring patches are decoded again for each patch, and the TIFF's tile tables are parsed once per patch.
"""

from __future__ import annotations

import numpy as np


def read_patch(path: str, level: int, y0: int, x0: int, size: int) -> np.ndarray:
    """One patch of one pyramid level, with a fresh open of the file."""
    import tifffile
    import zarr

    store = tifffile.imread(path, aszarr=True, series=0)
    try:
        node = zarr.open(store, mode="r")
        arr = node[str(level)] if isinstance(node, zarr.Group) else node
        return np.asarray(arr[y0:y0 + size, x0:x0 + size])
    finally:
        store.close()


def extract_chunk(args: tuple[str, int, int, np.ndarray]) -> int:
    """Read a list of patch positions (y0, x0) one by one; returns the bytes of patch pixels read."""
    path, level, size, pos = args
    total = 0
    for y0, x0 in pos:
        total += read_patch(path, level, int(y0), int(x0), size).nbytes
    return total
