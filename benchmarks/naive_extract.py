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


def create_store(path: str, n: int, size: int) -> None:
    """The naive output: a plain (unsharded) Zarr v3 array, one chunk (file) per patch, same codec as cytonet."""
    import zarr
    from zarr.codecs import ZstdCodec

    zarr.create_array(path, shape=(n, size, size), dtype="uint8", chunks=(1, size, size),
                      compressors=ZstdCodec(level=1), overwrite=True)


def extract_chunk(args: tuple[str, int, int, np.ndarray, str | None, int]) -> int:
    """Read patch positions (y0, x0) one by one, each written to ``store[i0 + k]``; returns bytes read."""
    import zarr

    path, level, size, pos, store, i0 = args
    out = zarr.open_array(store, mode="r+") if store else None
    total = 0
    for k, (y0, x0) in enumerate(pos):
        patch = read_patch(path, level, int(y0), int(x0), size)
        if out is not None:
            out[i0 + k] = patch
        total += patch.nbytes
    return total
