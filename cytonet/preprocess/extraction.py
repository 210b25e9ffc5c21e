"""Cutting patches out of a section: an LRU cache of decoded image tiles, anti-aliased resampling to the patch
grid, and the extraction task that each Dask worker runs (whole Zarr shards per task; only small metadata goes
back to the driver). Used by ``cytonet patches`` (:mod:`cytonet.preprocess.patches`). No torch.
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

READ_TILE_PX = 256  # virtual tile of the LRU read cache; a multiple of the usual 256-px TIFF tiles
CACHE_BYTES = 256 * 2**20  # per task


# ----------------------------------------------------------------------------------------------------------------
# reading and resampling


def _default_opener(path: str, pixel_size_um: float | None = None, section_id: str | None = None):
    from cytonet.io.readers import open_section

    return open_section(path, pixel_size_um=pixel_size_um, section_id=section_id)


def _open_tiff_level(section: Any, level: int) -> tuple[Any, Any] | None:
    """(TiffFile, page) to decode tiles of ``level`` directly, when the level is a tiled grey uint8 TIFF page.

    Going through tifffile's zarr store costs several ms of overhead per region; decoding the stored tiles
    directly costs about the deflate time alone. Anything else (RGB, OME-Zarr, strips) uses ``region()``.
    """
    path = getattr(section, "path", None)
    if path is None or getattr(section, "is_rgb", True) or str(path).lower().endswith((".png", ".jpg", ".jpeg")):
        return None
    try:
        import tifffile

        tf = tifffile.TiffFile(str(path))
    except Exception:  # noqa: BLE001 - not a TIFF (e.g. OME-Zarr): use the reader
        return None
    try:
        series = tf.series[0]
        lv = series.levels[level]
        page = lv.keyframe
        if (len(lv.pages) == 1 and page.is_tiled and page.dtype == np.uint8 and page.samplesperpixel == 1
                and page.imagedepth == 1 and tuple(lv.shape) == tuple(section.levels[level].shape[:2])
                and not page.photometric == 0):  # MINISWHITE would need inverting: leave it to the reader
            return tf, lv.pages[0]
    except Exception:  # noqa: BLE001
        pass
    tf.close()
    return None


class TileCache:
    """Reads rectangles of one pyramid level through an LRU cache of aligned tiles (each tile decoded once).

    Tiles are the file's own tiles when the level is a tiled grey TIFF (decoded directly), else virtual
    ``tile``-px squares read with ``section.region``.
    """

    def __init__(self, section: Any, level: int, tile: int = READ_TILE_PX, budget: int = CACHE_BYTES):
        self.section, self.level = section, level
        self.shape = tuple(section.levels[level].shape[:2])
        self.tiff = _open_tiff_level(section, level)
        if self.tiff is not None:
            page = self.tiff[1]
            self.th, self.tw = int(page.tilelength), int(page.tilewidth)
            self.ntx = -(-self.shape[1] // self.tw)
        else:
            self.th = self.tw = tile
        self.cap = max(4, budget // (self.th * self.tw))
        self.tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.decoded_bytes = 0
        self.reads = 0

    def close(self) -> None:
        """Close the directly opened TIFF, if any."""
        if self.tiff is not None:
            self.tiff[0].close()
            self.tiff = None

    def _decode(self, ty: int, tx: int, h: int, w: int) -> np.ndarray:
        tf, page = self.tiff
        idx = ty * self.ntx + tx
        offset, count = page.dataoffsets[idx], page.databytecounts[idx]
        if count == 0:  # sparse tile: not stored
            return np.zeros((h, w), np.uint8)
        fh = tf.filehandle
        fh.seek(offset)
        data = fh.read(count)
        if len(data) != count:
            raise OSError(f"{self.section.path}: tile {idx} of level {self.level} is truncated")
        tile = page.decode(data, idx, jpegtables=page.jpegtables)[0]
        return np.asarray(tile).reshape(self.th, self.tw)[:h, :w]

    def _tile(self, ty: int, tx: int) -> np.ndarray:
        key = (ty, tx)
        arr = self.tiles.get(key)
        if arr is None:
            h, w = min(self.th, self.shape[0] - ty * self.th), min(self.tw, self.shape[1] - tx * self.tw)
            if self.tiff is not None:
                arr = self._decode(ty, tx, h, w)
            else:
                arr = np.asarray(self.section.region(self.level, ty * self.th, tx * self.tw, h, w), dtype=np.uint8)
            self.decoded_bytes += arr.nbytes
            self.reads += 1
            self.tiles[key] = arr
            if len(self.tiles) > self.cap:
                self.tiles.popitem(last=False)
        else:
            self.tiles.move_to_end(key)
        return arr

    def read(self, y0: int, x0: int, h: int, w: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rectangle [y0, y0+h) × [x0, x0+w) of the level, zero outside the image (as ``region``), into ``out``."""
        inside = y0 >= 0 and x0 >= 0 and y0 + h <= self.shape[0] and x0 + w <= self.shape[1]
        if out is None:
            out = np.empty((h, w), np.uint8) if inside else np.zeros((h, w), np.uint8)
        elif not inside:
            out[...] = 0
        th, tw = self.th, self.tw
        ya, yb = max(y0, 0), min(y0 + h, self.shape[0])
        xa, xb = max(x0, 0), min(x0 + w, self.shape[1])
        for ty in range(ya // th, (yb - 1) // th + 1 if yb > ya else 0):
            for tx in range(xa // tw, (xb - 1) // tw + 1 if xb > xa else 0):
                tile = self._tile(ty, tx)
                sy0, sy1 = max(ya, ty * th), min(yb, ty * th + tile.shape[0])
                sx0, sx1 = max(xa, tx * tw), min(xb, tx * tw + tile.shape[1])
                out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = tile[sy0 - ty * th:sy1 - ty * th,
                                                                 sx0 - tx * tw:sx1 - tx * tw]
        return out


def _area_weights(origin: float, f: float, n_out: int, start: int, n_in: int):
    """Sparse (n_out × n_in) box-filter weights: output pixel j averages input [origin + j f, origin + (j+1) f)."""
    from scipy.sparse import csr_matrix

    rows, cols, vals = [], [], []
    for j in range(n_out):
        a, b = origin + j * f, origin + (j + 1) * f
        for k in range(int(math.floor(a)), int(math.ceil(b))):
            overlap = min(b, k + 1) - max(a, k)
            if overlap > 1e-9:
                rows.append(j), cols.append(k - start), vals.append(overlap / f)
    return csr_matrix((vals, (rows, cols)), shape=(n_out, n_in), dtype=np.float32)


def cut_patch(reader: Callable[[int, int, int, int], np.ndarray], tx0: int, ty0: int, S: int, f: float) -> np.ndarray:
    """Patch S×S whose target-grid top-left is (ty0, tx0), from a level whose pixel is 1/f target pixels.

    Anti-aliased: each output pixel is the area average of the level pixels it covers (block mean when f is an
    integer, exact box weights otherwise).
    """
    fi = round(f)
    if abs(f - fi) < 1e-6 and fi >= 1:
        region = reader(ty0 * fi, tx0 * fi, S * fi, S * fi)
        if fi == 1:
            return region
        block = region.reshape(S, fi, S, fi).astype(np.float32).mean(axis=(1, 3))
        return np.rint(block).astype(np.uint8)
    oy, ox = ty0 * f, tx0 * f
    y0, x0 = int(math.floor(oy)), int(math.floor(ox))
    n = int(math.ceil(oy + S * f)) - y0, int(math.ceil(ox + S * f)) - x0
    region = reader(y0, x0, n[0], n[1]).astype(np.float32)
    wy = _area_weights(oy, f, S, y0, n[0])
    wx = _area_weights(ox, f, S, x0, n[1])
    out = (wx @ (wy @ region).T).T
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def level_and_factor(section: Any, pixel_size_um: float) -> tuple[int, float]:
    """Pyramid level to read for a target resolution, and target pixel size / level pixel size."""
    level = int(section.level_for(pixel_size_um))
    return level, pixel_size_um / float(section.levels[level].pixel_size_um)



# ----------------------------------------------------------------------------------------------------------------
# tasks (run on Dask workers; return only small metadata)


def _extract_task(task: dict[str, Any]) -> dict[str, Any]:
    """Cut the patches of whole shards and write them; returns counts, or the failing section instead of raising."""
    import zarr

    # One core per task: zarr's codec thread pool would only add switching (~20% faster shard writes).
    with zarr.config.set({"threading.max_workers": 1}):
        return _extract_task_inner(task)


def _extract_task_inner(task: dict[str, Any]) -> dict[str, Any]:
    import zarr

    delay = float(os.environ.get("CYTONET_TEST_TASK_DELAY_S", "0") or 0)  # test hook: makes kill tests reliable
    opener = task.get("opener") or _default_opener
    arr = zarr.open_array(task["array"], mode="r+")
    S, t = task["patch_px"], task["pixel_size_um"]
    sections: dict[int, tuple[TileCache, float]] = {}
    t0 = time.perf_counter()
    stats = {"patches": 0, "decoded_bytes": 0, "tile_reads": 0, "error": None, "seconds": 0.0}
    sec_idx, tx0, ty0 = task["section"], task["tx0"], task["ty0"]
    pos = 0
    for s0, s1 in task["shards"]:
        buf = np.empty((s1 - s0, S, S), np.uint8)
        for i in range(s1 - s0):
            si = int(sec_idx[pos])
            info = task["sections"][si]
            try:
                if si not in sections:
                    sec = opener(info["image"], pixel_size_um=info["pixel_size_um"], section_id=info["section"])
                    level, f = level_and_factor(sec, t)
                    sections[si] = (TileCache(sec, level), f)
                cache, f = sections[si]
                if abs(f - 1.0) < 1e-6:  # same grid: tiles go straight into the shard buffer (no extra copy)
                    cache.read(int(ty0[pos]), int(tx0[pos]), S, S, out=buf[i])
                else:
                    buf[i] = cut_patch(cache.read, int(tx0[pos]), int(ty0[pos]), S, f)
            except Exception as exc:  # noqa: BLE001 - reported to the driver with section and file
                for cache, _ in sections.values():
                    cache.close()
                stats["error"] = {"section": info["section"], "file": info["image"],
                                  "problem": f"cannot read image: {type(exc).__name__}: {exc}"}
                return stats
            pos += 1
        arr[s0:s1] = buf
        stats["patches"] += s1 - s0
        if delay:
            time.sleep(delay)
    for cache, _ in sections.values():
        stats["decoded_bytes"] += cache.decoded_bytes
        stats["tile_reads"] += cache.reads
        cache.close()
    stats["seconds"] = time.perf_counter() - t0
    return stats
