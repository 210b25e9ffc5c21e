"""3D smoothing of area probabilities across neighbouring sections (``cytonet smooth3d``).

Areas are continuous in 3D, but each section is classified on its own, so section-to-section noise makes borders
jump. For each section s and each of its output cells:

1. the cell centre in full-resolution pixels is ``(j + 0.5)·c − 0.5, (i + 0.5)·c − 0.5`` (c = output_um / image_um,
   the frame of infer's NGFF translation), mapped to mm by s's transform (:meth:`SectionTransform.to_mm`);
2. for every neighbour n within ±k sections in z order (same brain) that 3D point is mapped back into n's pixel
   plane: the 3×4 affine is inverted in-plane by least squares on its first two columns (exact for any affine whose
   in-plane part has full rank; with a displacement field a few Gauss-Newton steps follow), then to n's output grid;
3. n's probabilities are sampled there (bilinear, NaN-aware: a sample needs ≥ 50 % of its bilinear weight inside
   n's tissue, else it is skipped), and all samples, the section's own included, are averaged with Gaussian
   weights ``exp(−d²/2σ²)`` of the out-of-plane distance d between the point and its projection on n (for parallel
   sections, the z distance).

Cells outside the section's own tissue stay NaN; a cell that no neighbour covers keeps its own probabilities, and a
section without neighbours (k = 0 or alone in its brain) is unchanged. Outputs use infer's formats and writers, so
section metrics, aggregation and viewers take them as they are: ``<name>.ome.zarr``, ``<name>_areas.png``,
``<name>_entropy.tif``, ``<name>_overlay.png`` and, last, ``<name>_infer.json`` (infer's manifest plus a ``smooth3d``
entry).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import map_coordinates

from cytonet.io.maps import SectionMapWriter, read_manifest
from cytonet.io.transforms import SectionTransform

MIN_SAMPLE_WEIGHT = 0.5  # a bilinear sample needs half its weight inside the neighbour's tissue


class SmoothError(ValueError):
    """Bad input to smooth3d; the message names the file or section."""


@dataclass
class SectionMaps:
    """One section's probability map and its geometry."""

    name: str
    probs: np.ndarray              # float32 (c, gh, gw), NaN outside tissue
    transform: SectionTransform
    output_um: float
    image_um: float
    z_um: float = 0.0
    manifest: dict = field(default_factory=dict)

    @property
    def cell_px(self) -> float:
        """Output cell side in full-resolution pixels."""
        return self.output_um / self.image_um


# ----------------------------------------------------------------------------------------------- geometry
def cell_centres_px(grid_shape: tuple[int, int], cell_px: float) -> tuple[np.ndarray, np.ndarray]:
    """(cols, rows), each (gh, gw): full-resolution pixel coordinates of the output cell centres."""
    gh, gw = grid_shape
    rows = (np.arange(gh) + 0.5) * cell_px - 0.5
    cols = (np.arange(gw) + 0.5) * cell_px - 0.5
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return cc, rr


def invert_affine(affine: np.ndarray, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cols, rows) whose affine image is nearest to the (N, 3) mm points (least squares on columns 0 and 1)."""
    A = np.asarray(affine, dtype=np.float64)
    pinv = np.linalg.pinv(A[:, :2])  # (2, 3): the least-squares solution of A[:, :2] @ (c, r) = xyz - t
    cr = (np.asarray(xyz, np.float64) - A[:, 3]) @ pinv.T
    return cr[:, 0], cr[:, 1]


def invert_transform(transform: SectionTransform, xyz: np.ndarray,
                     iterations: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(cols, rows) of the nearest in-plane point of a section to each mm point (field: Gauss-Newton steps)."""
    cols, rows = invert_affine(transform.affine, xyz)
    if transform.field is None:
        return cols, rows
    pinv = np.linalg.pinv(transform.affine[:, :2])
    for _ in range(iterations):  # the field is smooth and small against the affine: the affine Jacobian suffices
        d = (np.asarray(xyz, np.float64) - transform.to_mm(cols, rows)) @ pinv.T
        cols, rows = cols + d[:, 0], rows + d[:, 1]
    return cols, rows


def sample_probs(probs: np.ndarray, gi: np.ndarray, gj: np.ndarray) -> np.ndarray:
    """NaN-aware bilinear samples (c, N) of a (c, gh, gw) map at fractional cell indices; NaN where not covered."""
    valid = np.isfinite(probs[0]).astype(np.float32)
    coords = np.stack([np.ravel(gi), np.ravel(gj)])
    w = map_coordinates(valid, coords, order=1, mode="constant", cval=0.0)
    filled = np.nan_to_num(probs, nan=0.0)
    out = np.stack([map_coordinates(filled[k], coords, order=1, mode="constant", cval=0.0) for k in
                    range(probs.shape[0])])
    ok = w >= MIN_SAMPLE_WEIGHT
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(ok, out / np.where(ok, w, 1.0), np.nan)
    return out


def smooth_section(target: SectionMaps, neighbours: Sequence[SectionMaps], sigma_um: float) -> tuple[np.ndarray, dict]:
    """Gaussian-in-distance average of the target's and its neighbours' probabilities at the target's cells.

    Returns the smoothed (c, gh, gw) map and per-neighbour statistics (mean distance in µm, fraction covered).
    """
    c, gh, gw = target.probs.shape
    tissue = np.isfinite(target.probs[0])
    cols, rows = cell_centres_px((gh, gw), target.cell_px)
    cols, rows = cols[tissue], rows[tissue]
    num = np.nan_to_num(target.probs[:, tissue], nan=0.0).astype(np.float64)  # own weight: exp(0) = 1
    den = np.ones(num.shape[1])
    stats = {}
    if len(cols) and neighbours:
        xyz = target.transform.to_mm(cols, rows)
        for nb in neighbours:
            if nb.probs.shape[0] != c:
                raise SmoothError(f"section {nb.name} has {nb.probs.shape[0]} areas, {target.name} has {c}")
            nc, nr = invert_transform(nb.transform, xyz)
            d_um = np.linalg.norm(xyz - nb.transform.to_mm(nc, nr), axis=1) * 1000.0
            gi = (nr + 0.5) / nb.cell_px - 0.5
            gj = (nc + 0.5) / nb.cell_px - 0.5
            s = sample_probs(nb.probs, gi, gj)
            ok = np.isfinite(s[0])
            w = np.where(ok, np.exp(-0.5 * (d_um / sigma_um) ** 2), 0.0)
            num += w * np.nan_to_num(s, nan=0.0)
            den += w
            stats[nb.name] = {"mean_distance_um": float(d_um.mean()), "covered": float(ok.mean()),
                              "mean_weight": float(w[ok].mean()) if ok.any() else 0.0}
    out = np.full((c, gh, gw), np.nan, np.float32)
    out[:, tissue] = (num / den).astype(np.float32)
    return out, stats


def neighbours_of(order: Sequence[str], name: str, k: int) -> list[str]:
    """The up to 2k sections within ±k positions of ``name`` in z order (itself excluded)."""
    i = list(order).index(name)
    return [order[j] for j in range(max(0, i - k), min(len(order), i + k + 1)) if j != i]


def smooth_stack(sections: Sequence[SectionMaps], sigma_um: float, k: int) -> list[np.ndarray]:
    """Smoothed probabilities of every section of one brain (sorted here by z)."""
    ordered = sorted(sections, key=lambda s: s.z_um)
    order = [s.name for s in ordered]
    by_name = {s.name: s for s in ordered}
    result = {s.name: smooth_section(s, [by_name[n] for n in neighbours_of(order, s.name, k)], sigma_um)[0]
              for s in ordered}
    return [result[s.name] for s in sections]


# ---------------------------------------------------------------------------------------------------- I/O
def read_probabilities(pred_dir: str | os.PathLike, name: str) -> tuple[np.ndarray, dict]:
    """(probabilities (c, gh, gw) float32, manifest) of an infer output ``<pred_dir>/<name>``."""
    import zarr

    pred_dir = Path(pred_dir)
    manifest = read_manifest(pred_dir, name, SmoothError)
    zpath = pred_dir / manifest.get("outputs", {}).get("zarr", f"{name}.ome.zarr")
    try:
        probs = np.asarray(zarr.open_group(str(zpath), mode="r")["0"][...], dtype=np.float32)
    except Exception as exc:  # noqa: BLE001
        raise SmoothError(f"section {name}: cannot read probabilities from {zpath}: {exc}") from exc
    return probs, manifest


def write_maps(out_dir: str | os.PathLike, name: str, probs: np.ndarray, areas: Sequence[dict], output_um: float,
               image_um: float, *, uncertain_below: float = 0.5, thumb: np.ndarray | None = None,
               manifest: dict | None = None, pyramid_levels: int = 4) -> dict[str, Path]:
    """Write probabilities (c, gh, gw; NaN outside tissue) in infer's formats, with infer's writers; manifest last.

    ``thumb``: grey section thumbnail for the overlay (a flat grey one when None). ``manifest``: extra keys.
    """
    t0 = time.perf_counter()
    c, gh, gw = probs.shape
    if c != len(areas):
        raise SmoothError(f"section {name}: {c} probability channels but {len(areas)} areas")
    tissue = np.isfinite(probs).all(axis=0)
    if thumb is None:
        k = max(1, min(4, 2048 // max(gh, gw, 1)))
        thumb = np.full((gh * k, gw * k), 200, np.uint8)
    with SectionMapWriter(out_dir, name, (gh, gw), list(areas), uncertain_below, 512, "smooth3d") as maps:
        maps.write(0, 0, np.moveaxis(probs, 0, -1), tissue)
        info = dict(manifest or {})
        info.setdefault("seconds", round(time.perf_counter() - t0, 3))
        return maps.finish(output_um, image_um, pyramid_levels, thumb, info)


def _thumbnail_for(image: str | None, pixel_size_um: float | None, manifest: dict) -> np.ndarray | None:
    """The section thumbnail infer's overlay uses (None when the image cannot be read)."""
    if not image or not Path(image).exists():
        return None
    try:
        from cytonet.io.maps import thumbnail
        from cytonet.io.readers import open_section

        sec = open_section(image, pixel_size_um=pixel_size_um)
        net_um = float(manifest.get("network_pixel_size_um") or manifest["output_um"])
        return thumbnail(sec, net_um, float(manifest["output_um"]), sec.pixel_size_um)
    except Exception:  # noqa: BLE001 - overlay falls back to a plain background
        return None


def smooth_brain(brains: str | os.PathLike, brain: str, pred: str, out: str, *, sigma_um: float,
                 neighbours: int, sections: Sequence[str] | None = None, thickness_um: float | None = None,
                 overlay_image: bool = True) -> list[Path]:
    """Smooth one brain's infer outputs (``pred``/``out`` may hold ``{brain}`` and ``{section}``); manifests."""
    from cytonet.io.tables import load_brains, load_sections

    if sigma_um <= 0 or neighbours < 0:
        raise SmoothError(f"sigma_um must be > 0 and neighbours >= 0 (got {sigma_um}, {neighbours})")
    bt = load_brains(brains, check_files=False)
    row = bt[bt["brain_id"] == brain]
    if row.empty:
        raise SmoothError(f"brain '{brain}' is not in the brains table {brains}")
    st = load_sections(row.iloc[0]["sections"], brain, check_files=False, section_thickness_um=thickness_um)
    st = st.sort_values("z_um", kind="stable").reset_index(drop=True)
    order = list(st["section_id"])
    targets = list(sections) if sections else order
    missing = sorted(set(targets) - set(order))
    if missing:
        raise SmoothError(f"section(s) {missing} are not in brain '{brain}'")
    base = Path(str(row.iloc[0]["sections"])).parent
    cache: dict[str, SectionMaps] = {}

    def load(sid: str) -> SectionMaps:
        if sid not in cache:
            r = st[st["section_id"] == sid].iloc[0]
            probs, man = read_probabilities(pred.format(brain=brain, section=sid), sid)
            cache[sid] = SectionMaps(sid, probs, SectionTransform.from_spec(r["transform"], base),
                                     float(man["output_um"]), float(man["image_pixel_size_um"]), float(r["z_um"]), man)
        return cache[sid]

    written = []
    for sid in targets:
        t0 = time.perf_counter()
        target = load(sid)
        nbs = [load(n) for n in neighbours_of(order, sid, neighbours)]
        smoothed, stats = smooth_section(target, nbs, sigma_um)
        r = st[st["section_id"] == sid].iloc[0]
        px = r.get("pixel_size_um")
        thumb = _thumbnail_for(r["image"], None if px is None or px != px else float(px), target.manifest) \
            if overlay_image else None
        extra = dict(target.manifest)
        extra["smooth3d"] = {"source": str(Path(pred.format(brain=brain, section=sid)).resolve()),
                             "sigma_um": sigma_um, "neighbours": neighbours, "neighbour_stats": stats,
                             "seconds": round(time.perf_counter() - t0, 3)}
        res = write_maps(out.format(brain=brain, section=sid), sid, smoothed, target.manifest["areas"],
                         target.output_um, target.image_um,
                         uncertain_below=float(target.manifest.get("uncertain_below", 0.5)), thumb=thumb,
                         manifest=extra)
        written.append(res["manifest"])
        # sections behind the sliding window are not needed again (targets are in z order when all are smoothed)
        keep = set(neighbours_of(order, sid, 2 * neighbours + 1)) | {sid}
        for name in [n for n in cache if n not in keep]:
            del cache[name]
    return written


# ------------------------------------------------------------------------------------------------------ CLI
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``cytonet smooth3d``."""
    parser.add_argument("--brains", required=True, help="brains table")
    parser.add_argument("--brain", required=True, help="brain id")
    parser.add_argument("--pred", required=True,
                        help="folder of the infer outputs <section>_infer.json/.ome.zarr; may contain {brain} and "
                             "{section}")
    parser.add_argument("--out", required=True, help="output folder (may contain {brain} and {section})")
    parser.add_argument("--section", action="append",
                        help="section to smooth (repeatable; default: all sections of the brain)")
    parser.add_argument("--sigma-um", type=float, default=400.0,
                        help="Gaussian sigma of the weight in out-of-plane distance, µm (default 400)")
    parser.add_argument("--neighbours", type=int, default=2, help="sections on each side in z order (default 2)")
    parser.add_argument("--section-thickness-um", type=float, help="config section_thickness_um (for section_index)")
    parser.add_argument("--no-image", action="store_true", help="overlay on a plain background (do not read images)")


def run(args: argparse.Namespace) -> int:
    """Run ``cytonet smooth3d``."""
    try:
        written = smooth_brain(args.brains, args.brain, args.pred, args.out, sigma_um=args.sigma_um,
                               neighbours=args.neighbours, sections=args.section,
                               thickness_um=args.section_thickness_um, overlay_image=not args.no_image)
    except (SmoothError, ValueError) as exc:
        print(f"cytonet smooth3d: error: {exc}", file=sys.stderr)
        return 2
    print(f"smooth3d {args.brain}: {len(written)} section(s), sigma {args.sigma_um:g} µm, ±{args.neighbours}")
    return 0
