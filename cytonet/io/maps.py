"""Writing area maps: OME-NGFF probability pyramids, label and entropy images, overlays (torch-free).

Shared by whole-section inference (:mod:`cytonet.mapping.infer`) and 3D smoothing (:mod:`cytonet.mapping.smooth3d`), so
every set of maps has the same files and metadata. See docs/contracts.md ("Maps").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from cytonet.io.geojson import hex_rgb

NGFF_VERSION = "0.5"
UNCERTAIN_U8 = 255
UNCERTAIN_U16 = 65535


def normalised_entropy(p: np.ndarray) -> np.ndarray:
    n = p.shape[-1]
    if n < 2:
        return np.zeros(p.shape[:-1], np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=-1) / math.log(n)
    return np.clip(h, 0.0, 1.0).astype(np.float32)




# ------------------------------------------------------------------------------------------------ OME-Zarr
def _axes(channel: bool) -> list[dict]:
    ax = [{"name": "c", "type": "channel"}] if channel else []
    return ax + [{"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}]


def _multiscales(name: str, n_levels: int, output_um: float, image_um: float, channel: bool,
                 method: str, prefix: str = "") -> list[dict]:
    """One NGFF multiscale; ``prefix`` is the group of its arrays relative to the group holding this metadata."""
    ds = []
    for lv in range(n_levels):
        um = output_um * 2 ** lv
        # translation: cell centre in the frame where the section image's pixel (0,0) centre is at 0
        tr = um / 2 - image_um / 2
        ds.append({"path": f"{prefix}{lv}", "coordinateTransformations": [
            {"type": "scale", "scale": ([1.0] if channel else []) + [um, um]},
            {"type": "translation", "translation": ([0.0] if channel else []) + [tr, tr]}]})
    return [{"name": name, "axes": _axes(channel), "datasets": ds, "type": method}]


class NgffWriter:
    """Creates the OME-Zarr arrays up front and takes one output block at a time (one chunk per block)."""

    def __init__(self, path: Path, shape: tuple[int, int], n_areas: int, chunk: int, label_dtype: Any) -> None:
        import zarr

        self.path, self.shape, self.n, self.chunk = path, shape, n_areas, chunk
        self.root = zarr.open_group(str(path), mode="w", zarr_format=3)
        c = (min(chunk, shape[0]), min(chunk, shape[1]))
        self.p0 = self.root.create_array("0", shape=(n_areas, *shape), chunks=(n_areas, *c), dtype="float32",
                                         fill_value=float("nan"), dimension_names=["c", "y", "x"])
        lab = self.root.create_group("labels").create_group("areas")
        self.l0 = lab.create_array("0", shape=shape, chunks=c, dtype=label_dtype, fill_value=0,
                                   dimension_names=["y", "x"])
        self.e0 = self.root.create_group("entropy").create_array("0", shape=shape, chunks=c, dtype="float32",
                                                                 fill_value=float("nan"), dimension_names=["y", "x"])

    def write(self, i0: int, j0: int, p: np.ndarray, lab: np.ndarray, ent: np.ndarray) -> None:
        ni, nj = lab.shape
        self.p0[:, i0:i0 + ni, j0:j0 + nj] = p
        self.l0[i0:i0 + ni, j0:j0 + nj] = lab
        self.e0[i0:i0 + ni, j0:j0 + nj] = ent

    def labels0(self) -> np.ndarray:
        return self.l0[...]

    def entropy0(self) -> np.ndarray:
        return self.e0[...]

    def finish(self, output_um: float, image_um: float, max_levels: int, names: list[str], colours: list[str],
               ids: list[int], uncertain: int) -> None:
        levels = 1
        h, w = self.shape
        while levels < max_levels and min(h, w) // 2 ** levels >= 8:
            levels += 1
        groups = [(self.root, self.p0, "mean"), (self.root["entropy"], self.e0, "mean"),
                  (self.root["labels/areas"], self.l0, "nearest")]
        for grp, arr0, method in groups:
            prev = arr0
            for lv in range(1, levels):
                shape = prev.shape[:-2] + (-(-prev.shape[-2] // 2), -(-prev.shape[-1] // 2))
                cy, cx = (min(c, n) for c, n in zip(arr0.chunks[-2:], shape[-2:]))
                out = grp.create_array(str(lv), shape=shape, chunks=arr0.chunks[:-2] + (cy, cx), dtype=arr0.dtype,
                                       fill_value=arr0.fill_value, dimension_names=arr0.metadata.dimension_names)
                # one destination chunk at a time: memory stays at a few chunks, no chunk is written twice
                for r0 in range(0, shape[-2], cy):
                    for c0 in range(0, shape[-1], cx):
                        r1, c1 = min(r0 + cy, shape[-2]), min(c0 + cx, shape[-1])
                        src = prev[..., 2 * r0:2 * r1, 2 * c0:2 * c1]
                        out[..., r0:r1, c0:c1] = _down2(src, method, (r1 - r0, c1 - c0))
                prev = out
        self.levels = levels
        self._write_metadata(output_um, image_um, names, colours, ids, uncertain)

    def _write_metadata(self, output_um: float, image_um: float, names: list[str], colours: list[str],
                        ids: list[int], uncertain: int) -> None:
        """NGFF 0.5 metadata of the probabilities image, its ``labels/areas`` and the ``entropy`` image.

        NGFF 0.5 lets an image group list only integer label images (``labels``); a float image is found through
        the group's ``multiscales`` list, where each entry is a named image whose dataset paths are relative to the
        group. So ``entropy`` is the second, named entry of the root's list (readers default to the first entry:
        the probabilities) and also carries its own multiscales, so it opens on its own (``<map>/entropy``).
        """
        levels = self.levels
        omero = {"name": self.path.name, "version": NGFF_VERSION, "rdefs": {"model": "color"},
                 "channels": [{"label": n, "color": c.lstrip("#").upper(), "active": True,
                               "window": {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0}}
                              for n, c in zip(names, colours)]}
        probabilities = _multiscales("probabilities", levels, output_um, image_um, True, "mean")
        entropy = _multiscales("entropy", levels, output_um, image_um, False, "mean", prefix="entropy/")
        self.root.attrs["ome"] = {"version": NGFF_VERSION, "multiscales": probabilities + entropy, "omero": omero}
        self.root["entropy"].attrs["ome"] = {"version": NGFF_VERSION, "multiscales": _multiscales(
            "entropy", levels, output_um, image_um, False, "mean")}
        self.root["labels"].attrs["ome"] = {"version": NGFF_VERSION, "labels": ["areas"]}
        rgba = [list(hex_rgb(c)) + [255] for c in colours]
        self.root["labels/areas"].attrs["ome"] = {
            "version": NGFF_VERSION,
            "multiscales": _multiscales("areas", levels, output_um, image_um, False, "nearest"),
            "image-label": {
                "version": NGFF_VERSION,
                "colors": [{"label-value": int(i), "rgba": c} for i, c in zip(ids, rgba)]
                + [{"label-value": int(uncertain), "rgba": [128, 128, 128, 255]}],
                "properties": [{"label-value": int(i), "name": n} for i, n in zip(ids, names)]
                + [{"label-value": int(uncertain), "name": "uncertain"}],
                "source": {"image": "../../"}}}


def _down2(x: np.ndarray, method: str, out_hw: tuple[int, int]) -> np.ndarray:
    """2x downsampling of the last two axes: NaN-aware mean (probabilities, entropy) or nearest (labels)."""
    if method == "nearest":  # NGFF labels must keep their values
        return x[..., ::2, ::2]
    import warnings

    h, w = out_hw
    pad = [(0, 0)] * (x.ndim - 2) + [(0, 2 * h - x.shape[-2]), (0, 2 * w - x.shape[-1])]
    x = np.pad(x, pad, constant_values=np.nan)  # odd edges: partial blocks average what exists
    x = x.reshape(x.shape[:-2] + (h, 2, w, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks (outside tissue) -> NaN, expected
        return np.nanmean(x, axis=(-3, -1)).astype(x.dtype)


# ------------------------------------------------------------------------------------------ PNG/TIFF outputs
def write_label_png(path: Path, labels: np.ndarray, ids: list[int], colours: list[str], uncertain: int) -> Path:
    from PIL import Image

    if labels.dtype == np.uint8:
        # palette-indexed: pixel values stay the area ids, viewers show the area colours
        im = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
        pal = np.zeros((256, 3), np.uint8)
        for i, c in zip(ids, colours):
            pal[i] = hex_rgb(c)
        pal[uncertain] = (128, 128, 128)
        im.putpalette(pal.flatten().tolist())
    else:
        im = Image.fromarray(labels.astype(np.uint16))
    im.save(path, format="PNG")
    return path


def write_entropy_tif(path: Path, entropy: np.ndarray, output_um: float) -> Path:
    import tifffile

    tifffile.imwrite(path, entropy.astype(np.float32), imagej=True, resolution=(1 / output_um, 1 / output_um),
                     metadata={"unit": "um", "spacing": output_um})
    return path


def thumbnail(img: Any, net_um: float, output_um: float, image_um: float, max_side: int = 2048) -> np.ndarray:
    """Grey thumbnail: at least 4 px per output cell where that stays under max_side px."""
    from cytonet.io.readers import Section

    if isinstance(img, Section):
        H, W = img.levels[0].shape
        um = max(image_um, output_um / 4, image_um * max(H, W) / max_side)
        return np.asarray(img.read(um).compute())
    H, W = img.shape
    k = max(1, math.ceil(max(H, W) / max_side), int(output_um / net_um / 4))
    arr = img if hasattr(img, "compute") else np.asarray(img)
    import dask.array as da

    src = arr if hasattr(arr, "compute") else da.from_array(arr, chunks=2048)
    src = da.pad(src, ((0, -H % k), (0, -W % k)), mode="edge")
    return np.asarray(da.coarsen(np.mean, src.astype(np.float32), {0: k, 1: k}).compute()).astype(np.uint8)


def write_overlay(path: Path, thumb: np.ndarray, labels: np.ndarray, ids: list[int], names: list[str],
                  colours: list[str], uncertain: int) -> Path:
    """Area map blended over the thumbnail, uncertain grey + hatched, legend of area names; PNG of thumb's size."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    h, w = thumb.shape
    iy = np.minimum((np.arange(h) * labels.shape[0] / h).astype(int), labels.shape[0] - 1)
    ix = np.minimum((np.arange(w) * labels.shape[1] / w).astype(int), labels.shape[1] - 1)
    lab = labels[np.ix_(iy, ix)]
    lut = np.zeros((int(max(max(ids), uncertain)) + 1, 3), np.float32)
    for i, c in zip(ids, colours):
        lut[i] = hex_rgb(c)
    lut[uncertain] = (128, 128, 128)
    grey = np.repeat(thumb.astype(np.float32)[..., None], 3, axis=2)
    colour = lut[lab]
    alpha = np.where(lab > 0, 0.5, 0.0)[..., None]
    rgb = np.clip(grey * (1 - alpha) + colour * alpha, 0, 255).astype(np.uint8)
    dpi = 100
    fig = plt.figure(figsize=(w / dpi, h / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(rgb, interpolation="nearest")
    unc = (lab == uncertain).astype(float)
    if unc.any():
        ax.contourf(unc, levels=[0.5, 1.5], colors="none", hatches=["////"])
    ax.set_axis_off()
    handles = [Patch(facecolor=np.array(hex_rgb(c)) / 255, edgecolor="k", label=n) for n, c in zip(names, colours)]
    handles.append(Patch(facecolor=(0.5, 0.5, 0.5), hatch="////", edgecolor="k", label="uncertain"))
    ax.legend(handles=handles, loc="upper right", fontsize=max(4, min(10, h / 60)), framealpha=0.8)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return path


def publish(paths: dict[str, Path], out_dir: Path) -> dict[str, Path]:
    """Move finished outputs from their temporary folder into ``out_dir`` (replacing old ones); return new paths."""
    import os
    import shutil

    final: dict[str, Path] = {}
    for key, src in paths.items():
        dst = Path(out_dir) / Path(src).name
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(src, dst)
        final[key] = dst
    return final


# ------------------------------------------------------------------------------------------- one section's maps
def label_encoding(area_ids: list[int]) -> tuple[Any, int]:
    """(label dtype, "uncertain" value): uint8/255 when every area id fits below 255, else uint16/65535."""
    return (np.uint8, UNCERTAIN_U8) if max(area_ids) < UNCERTAIN_U8 else (np.uint16, UNCERTAIN_U16)


class SectionMapWriter:
    """The maps of one section, written block by block into a temp folder and published whole.

    Per block, :meth:`write` turns probabilities into the area label (most probable area; "uncertain" below
    ``uncertain_below``) and the normalised entropy. :meth:`finish` builds the pyramids, writes the area PNG, the
    entropy TIFF and the overlay, moves everything into ``out_dir`` and writes ``<name>_infer.json`` last: only a
    manifest vouches for a complete set of maps. Used as a context manager, a failure leaves no partial output.
    """

    def __init__(self, out_dir: str | Path, name: str, grid_shape: tuple[int, int], areas: list[dict],
                 uncertain_below: float, chunk: int, tag: str) -> None:
        import os
        import shutil

        self.out_dir, self.name, self.grid_shape = Path(out_dir), name, tuple(grid_shape)
        self.ids = [int(a["area_id"]) for a in areas]
        self.names = [str(a["name"]) for a in areas]
        self.colours = [str(a["color"]) for a in areas]
        self.uncertain_below = float(uncertain_below)
        self.label_dtype, self.uncertain = label_encoding(self.ids)
        self.n_tissue = 0
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = self.out_dir / f"{name}_infer.json"
        self.manifest.unlink(missing_ok=True)  # an old manifest must not vouch for outputs about to be replaced
        self.tmp = self.out_dir / f".{name}.{tag}-tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.zarr = self.tmp / f"{name}.ome.zarr"
        self.store = NgffWriter(self.zarr, self.grid_shape, len(self.ids), chunk, self.label_dtype)

    def __enter__(self) -> SectionMapWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, i0: int, j0: int, p: np.ndarray, tissue: np.ndarray) -> None:
        """Probabilities ``p`` (h, w, areas) of the block at cell (i0, j0); cells outside ``tissue`` get NaN."""
        p = np.where(tissue[..., None], p, np.nan)
        top = np.nanmax(np.where(tissue[..., None], p, 0.0), axis=-1)
        lab = np.where(tissue, np.asarray(self.ids)[np.argmax(np.nan_to_num(p, nan=-1.0), axis=-1)], 0)
        lab = lab.astype(self.label_dtype)
        lab[tissue & (top < self.uncertain_below)] = self.uncertain
        ent = np.where(tissue, normalised_entropy(np.nan_to_num(p)), np.nan).astype(np.float32)
        self.store.write(i0, j0, np.moveaxis(p, -1, 0).astype(np.float32), lab, ent)
        self.n_tissue += int(tissue.sum())

    def finish(self, output_um: float, image_um: float, pyramid_levels: int, thumb: np.ndarray | None,
               info: dict[str, Any]) -> dict[str, Path]:
        """Pyramids, PNG/TIFF/overlay (none without ``thumb``), publish, then the manifest with ``info`` in it."""
        import json

        from cytonet.io.atomic import atomic_write_text
        from cytonet.io.geojson import labels_to_geojson, write_geojson  # rasterio: imported only when writing

        self.store.finish(output_um, image_um, pyramid_levels, self.names, self.colours, self.ids, self.uncertain)
        labels = self.store.labels0()
        paths = {"zarr": self.zarr,
                 "areas_png": write_label_png(self.tmp / f"{self.name}_areas.png", labels, self.ids, self.colours,
                                              self.uncertain),
                 "entropy_tif": write_entropy_tif(self.tmp / f"{self.name}_entropy.tif", self.store.entropy0(),
                                                  output_um)}
        if thumb is not None:
            paths["overlay_png"] = write_overlay(self.tmp / f"{self.name}_overlay.png", thumb, labels, self.ids,
                                                 self.names, self.colours, self.uncertain)
        # the area map for QuPath: full-resolution section pixels (a cell is output_um / image_um pixels a side)
        paths["areas_geojson"] = write_geojson(self.tmp / f"{self.name}_areas.geojson", labels_to_geojson(
            labels, list(zip(self.ids, self.names, self.colours)), output_um / image_um))
        final = publish(paths, self.out_dir)
        manifest = {"section": self.name, **info, "output_um": output_um, "image_pixel_size_um": image_um,
                    "grid_shape": list(self.grid_shape), "n_tissue_locations": self.n_tissue,
                    "uncertain_below": self.uncertain_below, "uncertain_value": int(self.uncertain),
                    "areas": [{"area_id": i, "name": n, "color": c}
                              for i, n, c in zip(self.ids, self.names, self.colours)],
                    "ngff_version": NGFF_VERSION, "outputs": {k: v.name for k, v in final.items()}}
        atomic_write_text(self.manifest, json.dumps(manifest, indent=2))  # last: it vouches for the outputs above
        final["manifest"] = self.manifest
        return final


def read_manifest(pred_dir: str | Path, name: str, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The manifest ``<pred_dir>/<name>_infer.json`` of a set of maps; ``error`` names the missing section."""
    import json

    path = Path(pred_dir) / f"{name}_infer.json"
    if not path.is_file():
        raise error(f"section {name}: inference manifest {path} not found (inference incomplete?)")
    return json.loads(path.read_text())
