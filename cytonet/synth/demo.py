"""The demo brains: layout, per-brain generation, tables and previews (see ``cytonet.synth``)."""

from __future__ import annotations

import csv
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cytonet.io import logs

from .geometry import BrainModel, SectionGeometry
from .params import DemoParams
from .reference import area_models
from .render import LUMINA_PER_MM2, Artifacts, SectionRenderer, Style, Vessels
from .tiff import write_pyramid


def _params(demo_cfg: dict[str, Any] | DemoParams | None) -> DemoParams:
    return demo_cfg if isinstance(demo_cfg, DemoParams) else DemoParams.from_cfg(demo_cfg)


def layout(demo_cfg: dict[str, Any] | DemoParams | None) -> dict[str, list[str]]:
    """Brain id -> section ids, computed from the config alone (nothing is generated)."""
    p = _params(demo_cfg)
    return {b: [f"{b}_s{i:03d}" for i in range(p.sections_per_brain)] for b in p.brain_ids()}


def annotated(p: DemoParams, brain_id: str, index: int) -> bool:
    """Whether section ``index`` of ``brain_id`` ships an annotation."""
    return p.role(brain_id) == "known" and index % p.annotate_every == 0


@dataclass
class SectionSpec:
    """Where a section lies and how it is drawn."""

    section_id: str
    z_um: float
    transform: np.ndarray  # 3x4 pixel (col, row, 0, 1) -> mm
    renderer: SectionRenderer


def brain_model(p: DemoParams, brain_index: int, size_mm: float | None = None) -> BrainModel:
    """The random shape model of brain ``brain_index`` (0-based)."""
    return BrainModel(seed=int(np.random.SeedSequence([p.seed, brain_index, 1]).generate_state(1)[0]),
                      size_mm=size_mm or p.size_mm, areas=area_models(), variation=p.variation,
                      thickness_mm=p.cortex_thickness_mm)


def make_section(p: DemoParams, brain: BrainModel, brain_index: int, sec_index: int, shape: tuple[int, int],
                 z_um: float, artifacts: bool | None = None) -> SectionSpec:
    """Build the renderer of one section: pose (transform), stain and artifacts."""
    v = p.variation
    brng = np.random.default_rng([p.seed, brain_index, 2])
    srng = np.random.default_rng([p.seed, brain_index, sec_index, 3])
    px_mm = p.pixel_size_um / 1000.0
    phi = 0.5 * v * brng.uniform(-1, 1) + 0.05 * v * srng.uniform(-1, 1)
    shrink = (1 - 0.06 * v * brng.random()) * (1 + 0.012 * v * srng.uniform(-1, 1))
    t = 0.5 * v * srng.uniform(-1, 1, 2)
    m = px_mm / shrink
    R = np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
    M = m * R
    center = np.array([shape[1] / 2, shape[0] / 2])
    b = t - M @ center
    affine = np.hstack([M, b[:, None]])
    transform = np.zeros((3, 4))
    transform[:2, :2], transform[:2, 3] = M, b
    transform[2, 3] = z_um / 1000.0
    extent = min(max(shape) * m * 1.45, 3.0 * brain.R0 + 2.0) + 2 * np.abs(t).max()
    step = max(4 * px_mm, extent / 1400)
    geom = SectionGeometry.build(brain, z_um / 1000.0, extent, step)
    style = Style.draw(brng, srng, v)
    art = Artifacts()
    if p.artifacts if artifacts is None else artifacts:
        art = _draw_artifacts(srng, geom, affine, shape, p.pixel_size_um)
    key = int(np.random.SeedSequence([p.seed, brain_index, sec_index, 4]).generate_state(1, np.uint64)[0])
    vessels = _draw_vessels(np.random.default_rng([p.seed, brain_index, sec_index, 6]), geom, affine, shape,
                            p.pixel_size_um)
    r = SectionRenderer(geom, style, art, affine, p.pixel_size_um, shape, key, vessels)
    return SectionSpec("", z_um, transform, r)


def _tissue_points(geom: SectionGeometry, affine: np.ndarray, shape: tuple[int, int], lo_mm: float, hi_mm: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Pixel (cols, rows) of the coarse-grid points at depth ``lo_mm..hi_mm`` below the pia inside the image."""
    inv = np.linalg.inv(np.vstack([affine, [0, 0, 1]]))[:2]
    iy, ix = np.nonzero((geom.depth > lo_mm) & (geom.depth < hi_mm))
    X, Y = geom.x0 + ix * geom.step_mm, geom.x0 + iy * geom.step_mm
    cols = inv[0, 0] * X + inv[0, 1] * Y + inv[0, 2]
    rows = inv[1, 0] * X + inv[1, 1] * Y + inv[1, 2]
    ok = (cols > 0) & (cols < shape[1]) & (rows > 0) & (rows < shape[0])
    return cols[ok], rows[ok]


def _draw_vessels(rng: np.random.Generator, geom: SectionGeometry, affine: np.ndarray, shape: tuple[int, int],
                  pixel_size_um: float) -> Vessels:
    """Radial vessels along the sheet and round lumina (radius 8-60 µm, log-uniform) anywhere in the tissue."""
    vessels = Vessels.draw(rng, geom.brain.sheet_length(geom.z_mm))
    cols, rows = _tissue_points(geom, affine, shape, 0.05, np.inf)
    n = rng.poisson(LUMINA_PER_MM2 * len(cols) * geom.step_mm ** 2) if len(cols) else 0
    pick = rng.integers(0, max(len(cols), 1), n)
    radius = np.exp(rng.uniform(np.log(8.0), np.log(60.0), n)) / pixel_size_um
    jitter = rng.uniform(-0.5, 0.5, (2, n)) * geom.step_mm * 1000 / pixel_size_um
    vessels.lumina = [(float(cols[i] + jx), float(rows[i] + jy), float(r))
                      for i, jx, jy, r in zip(pick, jitter[0], jitter[1], radius)]
    return vessels


def _draw_artifacts(rng: np.random.Generator, geom: SectionGeometry, affine: np.ndarray, shape: tuple[int, int],
                    pixel_size_um: float) -> Artifacts:
    """Tears and folds at the tissue edge, bubbles and dust anywhere, scaled to the section's area."""
    cols, rows = _tissue_points(geom, affine, shape, 0.05, 1.5)
    upx = 1000.0 / pixel_size_um  # px per mm
    art = Artifacts()
    area_mm2 = shape[0] * shape[1] / upx**2
    if len(cols) == 0:
        return art
    cx, cy = shape[1] / 2, shape[0] / 2

    def pick():
        i = rng.integers(len(cols))
        return float(cols[i]), float(rows[i])

    for _ in range(rng.poisson(0.6 * area_mm2 / 650)):
        x, y = pick()
        ang = np.arctan2(cy - y, cx - x) + rng.uniform(-0.6, 0.6)
        L = rng.uniform(1.0, 4.0) * upx
        art.tears.append((x, y, x + L * np.cos(ang), y + L * np.sin(ang), rng.uniform(0.04, 0.12) * upx))
    for _ in range(rng.poisson(0.4 * area_mm2 / 650)):
        x, y = pick()
        ang = rng.uniform(0, np.pi)
        L = rng.uniform(1.5, 5.0) * upx
        art.folds.append((x - L * np.cos(ang), y - L * np.sin(ang), x + L * np.cos(ang), y + L * np.sin(ang),
                          rng.uniform(0.1, 0.35) * upx))
    for _ in range(rng.poisson(0.8 * area_mm2 / 650)):
        art.bubbles.append((rng.uniform(0, shape[1]), rng.uniform(0, shape[0]), rng.uniform(0.4, 1.8) * upx))
    for _ in range(rng.poisson(25 * area_mm2 / 650)):
        art.dust.append((rng.uniform(0, shape[1]), rng.uniform(0, shape[0]),
                         max(0.7, rng.uniform(0.006, 0.05) * upx), rng.uniform(0.3, 0.9)))
    return art


def section_shape(p: DemoParams) -> tuple[int, int]:
    """Full-resolution image shape of demo sections."""
    n = int(round(p.size_mm * 1000 / p.pixel_size_um))
    return (n, n)


def section_specs(p: DemoParams, brain_id: str) -> list[SectionSpec]:
    """Renderers of all sections of one brain."""
    bi = p.brain_ids().index(brain_id)
    brain = brain_model(p, bi)
    shape = section_shape(p)
    specs = []
    z0 = 1000.0 * bi  # brains do not share a reference space; offset only for readability
    for si, sid in enumerate(layout(p)[brain_id]):
        spec = make_section(p, brain, bi, si, shape, z0 * 0 + si * p.section_spacing_um)
        spec.section_id = sid
        specs.append(spec)
    return specs


def _png(path: Path, a: np.ndarray) -> None:
    Image.fromarray(a).save(path, compress_level=1)


def _write_section(args: tuple[DemoParams, str, int, str]) -> dict[str, Any]:
    p, brain_id, si, out = args
    spec = section_specs_one(p, brain_id, si)
    bdir = Path(out) / brain_id
    res = spec.renderer.render_full()
    sid = spec.section_id
    write_pyramid(bdir / "images" / f"{sid}.ome.tif", res["image"], p.pixel_size_um, p.tile_px)
    _png(bdir / "truth" / f"{sid}_tissue.png", res["tissue"].astype(np.uint8) * 255)
    _png(bdir / "truth" / f"{sid}_cortex.png", res["cortex"].astype(np.uint8) * 255)
    _png(bdir / "truth" / f"{sid}_area.png", res["area"])
    _png(bdir / "truth" / f"{sid}_layer.png", res["layer"])
    ann = ""
    if annotated(p, brain_id, si):
        _png(bdir / "annotations" / f"{sid}_area.png", res["area"])
        ann = f"annotations/{sid}_area.png"
    thumb = None
    if si == p.sections_per_brain // 2:
        thumb = (res["image"][::8, ::8].copy(), res["area"][::8, ::8].copy())
    return dict(section_id=sid, image=f"images/{sid}.ome.tif", pixel_size_um=p.pixel_size_um,
                z_um=round(spec.z_um, 3), transform=" ".join(f"{x:.10g}" for x in spec.transform.ravel()),
                annotation=ann, ground_truth=f"truth/{sid}_area.png", _thumb=thumb)


def section_specs_one(p: DemoParams, brain_id: str, si: int) -> SectionSpec:
    """Renderer of section ``si`` of ``brain_id``."""
    bi = p.brain_ids().index(brain_id)
    spec = make_section(p, brain_model(p, bi), bi, si, section_shape(p), si * p.section_spacing_um)
    spec.section_id = layout(p)[brain_id][si]
    return spec


SECTION_COLUMNS = ["section_id", "image", "pixel_size_um", "z_um", "transform", "annotation", "ground_truth"]


def generate_brain(brain_id: str, demo_cfg: dict[str, Any] | DemoParams | None, out_dir: str | Path,
                   progress: bool = False) -> Path:
    """Write one brain (images, truth, annotations, sections.csv, preview); returns its sections table."""
    p = _params(demo_cfg)
    if brain_id not in p.brain_ids():
        raise ValueError(f"demo: unknown brain {brain_id!r} (have {', '.join(p.brain_ids())})")
    out = Path(out_dir)
    bdir = out / brain_id
    for sub in ("images", "truth", "annotations"):
        (bdir / sub).mkdir(parents=True, exist_ok=True)
    (out / "previews").mkdir(parents=True, exist_ok=True)
    jobs = [(p, brain_id, si, str(out)) for si in range(p.sections_per_brain)]
    if p.n_jobs > 1:
        with ProcessPoolExecutor(p.n_jobs) as ex:
            it = ex.map(_write_section, jobs)
            rows = list(logs.progress(it, total=len(jobs), desc=brain_id, unit="section", enabled=progress))
    else:
        rows = list(logs.progress(map(_write_section, jobs), total=len(jobs), desc=brain_id, unit="section",
                                  enabled=progress))
    thumb = next(r["_thumb"] for r in rows if r["_thumb"] is not None)
    write_preview(out / "previews" / f"{brain_id}.png", *thumb, title=f"{brain_id} ({p.role(brain_id)})")
    table = bdir / "sections.csv"
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, SECTION_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return table


def areas_rows() -> list[dict[str, Any]]:
    """Rows of the areas table."""
    return [dict(area_id=i + 1, name=a.name, color=a.color) for i, a in enumerate(area_models())]


def write_areas(path: str | Path) -> Path:
    """Write ``areas.csv``."""
    path = Path(path)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["area_id", "name", "color"])
        w.writeheader()
        w.writerows(areas_rows())
    return path


def write_tables(demo_cfg: dict[str, Any] | DemoParams | None, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``areas.csv`` and ``brains.csv`` without generating images."""
    p = _params(demo_cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    areas = write_areas(out / "areas.csv")
    brains = out / "brains.csv"
    with open(brains, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["brain_id", "sections", "role"])
        for b in p.brain_ids():
            w.writerow([b, f"{b}/sections.csv", p.role(b)])
    return areas, brains


def generate_demo(demo_cfg: dict[str, Any] | DemoParams | None, out_dir: str | Path | None = None,
                  progress: bool = False) -> Path:
    """Write all demo brains plus ``areas.csv`` and ``brains.csv``; returns ``brains.csv``."""
    p = _params(demo_cfg)
    out = Path(out_dir if out_dir is not None else p.out_dir)
    for b in p.brain_ids():
        generate_brain(b, p, out, progress=progress)
    return write_tables(p, out)[1]


def write_preview(path: Path, image: np.ndarray, area: np.ndarray, title: str = "") -> Path:
    """Thumbnail of a section beside its area ground truth, with a colour legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = areas_rows()
    lut = np.full((256, 3), 255, np.uint8)
    lut[0] = (235, 235, 235)
    for r in rows:
        lut[r["area_id"]] = [int(r["color"][i:i + 2], 16) for i in (1, 3, 5)]
    fig, ax = plt.subplots(1, 2, figsize=(10, 5.4), dpi=90)
    ax[0].imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="lanczos")
    ax[1].imshow(lut[area], interpolation="nearest")
    for a in ax:
        a.set_axis_off()
    ax[0].set_title("section (Nissl-like)")
    ax[1].set_title("area ground truth")
    fig.legend(handles=[Patch(color=r["color"], label=r["name"]) for r in rows], loc="lower center",
               ncol=len(rows), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path
