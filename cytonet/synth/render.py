"""Rendering of a phantom section, block by block, in bounded memory.

Cell bodies are drawn as impulses: every pixel holds a cell centre with probability ``density × pixel area``
(a thinned Poisson process); the random numbers come from a counter-based hash of the global pixel position,
so any block (with a halo for the blur) renders exactly the same cells as its neighbours and the whole image
is seamless whatever the block size.  Impulses carry the cell's area as optical density; they are split into
size classes and blurred with a Gaussian of the class's soma radius.  Intensity follows Beer-Lambert
(``glass × exp(-OD)``), so cells are dark on a light glass, white matter is pale and the cortex ribbon dark.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .geometry import BrainModel, SectionGeometry, equivolumetric
from .reference import BETZ_AREA_UM2

NB = 256  # depth-fraction bins of the lamination lookup tables
NL = 2048  # depth-fraction bins of the layer lookup table
FRAC_MAX = 1.25  # beyond the cortex: white matter
WM_DENSITY, WM_AREA = 300.0, 26.0  # glia in white matter (cells/mm², µm²)
DARKNESS_FLOOR = 0.12  # darkness of cell-free tissue on BigBrain's scale (its lightest mean profile value: 0.25)
COLUMN_MM, COLUMN_CONTRAST = 0.05, 0.15  # radial cell columns: spacing, density modulation (layers III-VI)
RADIAL_VESSEL_SPACING_MM = 1.0  # mean spacing of radial (perforating) vessels along the pial surface
LUMINA_PER_MM2 = 1.5  # round vessel cross-sections per mm² of tissue
RIM = 1.35  # a lumen's rim of endothelial and perivascular nuclei reaches this many radii
TWO_PI_F = np.float32(2 * np.pi)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _hash(rows: np.ndarray, cols: np.ndarray, key: int) -> np.ndarray:
    """splitmix64 of (row, col, key): uint64 per pixel."""
    k = (rows.astype(np.uint64) + np.uint64(1 << 20)) << np.uint64(32)
    k = k | (cols.astype(np.uint64) + np.uint64(1 << 20))
    k ^= np.uint64(key & 0xFFFFFFFFFFFFFFFF)
    k ^= k >> np.uint64(30)
    k *= _M1
    k ^= k >> np.uint64(27)
    k *= _M2
    k ^= k >> np.uint64(31)
    return k


def _uniforms(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = np.uint64((1 << 21) - 1)
    f = np.float32(1.0 / (1 << 21))
    return ((h & m).astype(np.float32) * f, ((h >> np.uint64(21)) & m).astype(np.float32) * f,
            ((h >> np.uint64(42)) & m).astype(np.float32) * f)


@dataclass
class Style:
    """Staining/scanning parameters of one section."""

    glass: float
    gain: float
    gamma: float
    k_cell: float
    od_cortex: float
    od_wm: float
    noise: float
    psf_um: float
    uneven: float
    uneven_grid: np.ndarray

    @classmethod
    def draw(cls, brain_rng: np.random.Generator, sec_rng: np.random.Generator, variation: float) -> Style:
        """Brain-level stain parameters, jittered per section."""
        v = variation
        b = brain_rng

        def j(x: float, rel: float) -> float:
            return x * (1 + rel * v * sec_rng.uniform(-1, 1))

        return cls(
            glass=float(np.clip(j(b.uniform(226, 246), 0.01), 200, 252)),
            gain=j(1 + 0.15 * v * b.uniform(-1, 1), 0.03),
            gamma=1 + 0.05 * v * b.uniform(-1, 1),
            k_cell=j(1.1, 0.05),
            od_cortex=j(0.32 + 0.04 * v * b.uniform(-1, 1), 0.03),
            od_wm=j(0.06 + 0.025 * v * b.uniform(-1, 1), 0.1),
            noise=j(2.0 + 4.0 * v * b.random(), 0.1),
            psf_um=j(3.0 + 6.0 * v * b.random(), 0.1),
            uneven=0.04 * v * (0.5 + b.random()),
            uneven_grid=sec_rng.normal(0, 1, (5, 5)),
        )


@dataclass
class Artifacts:
    """Section artifacts in full-resolution pixel coordinates."""

    tears: list[tuple[float, float, float, float, float]] = field(default_factory=list)  # x0,y0,x1,y1,width
    folds: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    bubbles: list[tuple[float, float, float]] = field(default_factory=list)  # x, y, radius
    dust: list[tuple[float, float, float, float]] = field(default_factory=list)  # x, y, radius, darkness


@dataclass
class Vessels:
    """Blood vessels of one section: radial perforating vessels along the sheet, and round cut lumina."""

    s_mm: np.ndarray  # sorted sheet positions of the radial vessels
    half_width_mm: np.ndarray
    reach: np.ndarray  # how deep each runs, in cortical-depth fractions
    lumina: list[tuple[float, float, float]] = field(default_factory=list)  # x, y, radius (px)

    @classmethod
    def draw(cls, rng: np.random.Generator, sheet_length_mm: float) -> Vessels:
        n = rng.poisson(sheet_length_mm / RADIAL_VESSEL_SPACING_MM)
        return cls(np.sort(rng.uniform(0, sheet_length_mm, n)), rng.uniform(0.006, 0.02, n),
                   np.where(rng.random(n) < 0.25, rng.uniform(1.0, 1.2, n), rng.uniform(0.15, 0.9, n)))

    def radial(self, s_mm: np.ndarray, frac: np.ndarray) -> np.ndarray:
        """Mask of the pixels (sheet position, depth fraction) inside a radial vessel."""
        if not len(self.s_mm):
            return np.zeros(s_mm.shape, bool)
        j = np.clip(np.searchsorted(self.s_mm, s_mm), 1, len(self.s_mm) - 1)
        near = np.where(np.abs(s_mm - self.s_mm[j - 1]) < np.abs(s_mm - self.s_mm[j]), j - 1, j)
        return (np.abs(s_mm - self.s_mm[near]) < self.half_width_mm[near]) & (frac < self.reach[near])


@dataclass
class LaminationTables:
    """Per-area lookup tables over the depth fraction (``NB`` bins up to ``FRAC_MAX``)."""

    size: np.ndarray  # [n, NB] mean cell-body area (µm²) at the layer-aligned depth
    layer_factor: np.ndarray  # [n, NB] density factor of the striate sub-layers IVa/IVb/IVc, else 1
    betz: np.ndarray  # [n, NB] giant-pyramid density (cells/mm²)
    cum: np.ndarray  # [n, 5] von Economo layer boundaries (cumulative fractions)
    mean_darkness: float  # mean over areas and depths (brightness reference)
    mean_coverage: float  # mean cell coverage of the cellular tables (area fraction)


def lamination_tables(brain: BrainModel) -> LaminationTables:
    """Lookup tables of one brain over the depth: von Economo layers, cell sizes, striate sub-layers, Betz cells."""
    n = len(brain.areas)
    centers = (np.arange(NB) + 0.5) * FRAC_MAX / NB
    size = np.empty((n, NB), np.float32)
    layer_factor = np.ones((n, NB), np.float32)
    betz = np.zeros((n, NB), np.float32)
    cum = np.empty((n, 5), np.float32)
    for i, a in enumerate(brain.areas):
        c = np.cumsum(a.fractions)
        cum[i] = c[:5]
        layer = np.minimum(np.searchsorted(c, centers, side="right"), 6)
        size[i] = np.append(a.cell_area, WM_AREA)[layer]
        # layer III: small pyramids in IIIa growing to large ones in IIIc (size ramp 0.7x..1.3x)
        in3 = (centers >= c[1]) & (centers < c[2])
        pos = (centers - c[1]) / max(a.fractions[2], 1e-6)
        size[i] = np.where(in3, size[i] * (0.7 + 0.6 * pos), size[i])
        lo = c[2]
        for share, fac in a.iv_sublayers:
            hi = lo + share * a.fractions[3]
            layer_factor[i] = np.where((centers >= lo) & (centers < hi), fac, layer_factor[i])
            lo = hi
        if a.betz_density > 0:  # giant pyramids in the lower half of layer V
            lo, hi = c[3] + 0.4 * a.fractions[4], c[4]
            betz[i] = np.where((centers >= lo) & (centers < hi), a.betz_density * a.fractions[4] / (hi - lo), 0)
    sig = 0.012 / (FRAC_MAX / NB)
    size = ndi.gaussian_filter1d(size, sig, axis=1, mode="nearest")
    layer_factor = ndi.gaussian_filter1d(layer_factor, sig, axis=1, mode="nearest")
    areas = brain.areas
    coverage = float(np.mean([a.fractions @ (a.density * a.cell_area * 1e-6) for a in areas]))
    return LaminationTables(size, layer_factor, betz, cum,
                            float(np.mean([a.profile.mean() for a in areas])), coverage)


@dataclass
class SectionRenderer:
    """Everything needed to render any block of one section."""

    geom: SectionGeometry
    style: Style
    artifacts: Artifacts
    affine: np.ndarray  # 2x3: (col, row, 1) -> phantom (X, Y) mm
    pixel_size_um: float
    shape: tuple[int, int]
    key: int
    vessels: Vessels | None = None

    def __post_init__(self) -> None:
        self.tables = lamination_tables(self.geom.brain)
        t = self.tables
        centers = (np.arange(NL) + 0.5) * FRAC_MAX / NL
        self.layer_lut = np.stack([1 + (centers[:, None] >= c[None, :]).sum(1) for c in t.cum]).astype(np.uint8)
        self.layer_lut[:, centers >= 1] = 7
        ends = np.ones((len(t.cum), 1), np.float32)
        self.mean_cum = np.concatenate([0 * ends, t.cum, ends], 1)
        if self.vessels is None:
            self.vessels = Vessels(np.zeros(0), np.zeros(0), np.zeros(0))
        # smooth uneven-staining field on a 64x64 grid, resampled bilinearly
        self.uneven_field = ndi.zoom(self.style.uneven_grid, 64 / 5, order=3, mode="nearest").astype(np.float32)
        px = self.pixel_size_um
        r_small, r_large, r_betz = (np.sqrt(a / np.pi) for a in (38.0, 58.0, BETZ_AREA_UM2))
        self.sig = [max(0.7, 0.6 * r / px) for r in (r_small, r_large, r_betz)]
        self.sig_psf = self.style.psf_um / px / 2.355
        self.halo = int(np.ceil(3 * max(self.sig) + 3 * self.sig_psf)) + 2

    # --- geometry-only (ground truth) ---
    def labels(self, rows: np.ndarray, cols: np.ndarray, block: tuple[int, int, int, int] | None = None
               ) -> dict[str, np.ndarray]:
        """Ground-truth fields at pixel coordinates (``block`` = (y0, x0, h, w) for a regular block: faster).

        Besides the maps of the data contract: ``frac`` (volume fraction of the cortex above the pixel, Bok),
        ``layer_frac`` (the same aligned to the area's mean von Economo layers), ``area_idx``, the weight ``nb_w`` of
        the nearest neighbouring area across a gradual border, ``s_mm`` (sheet position), ``cell`` (the column-grid
        cell whose profile the pixel shows) and the texture field ``tex``.
        """
        g, brain = self.geom, self.geom.brain
        if block is not None:
            f = g.sample_affine(self.affine, *block)
        else:
            A = self.affine
            X = A[0, 0] * cols + A[0, 1] * rows + A[0, 2]
            Y = A[1, 0] * cols + A[1, 1] * rows + A[1, 2]
            f = g.sample(X, Y)
        depth, s, vent = f["depth"], f["s"], f["vent"]
        kappa, thickness = f["columns"][5], f["columns"][6]
        area, _, nb_w = brain.area_blend(s, g.z_mm)
        frac = equivolumetric((depth / thickness).astype(np.float32), kappa * brain.variation)
        # this column's layer boundaries, mapped piecewise linearly onto the area's mean (von Economo) ones
        cb = f["columns"][:5]
        seg = (frac >= cb).sum(0)[None]
        lo = np.where(seg[0] > 0, np.take_along_axis(cb, np.maximum(seg - 1, 0), 0)[0], 0)
        hi = np.where(seg[0] < 5, np.take_along_axis(cb, np.minimum(seg, 4), 0)[0], 1)
        m_lo, m_hi = self.mean_cum[area, seg[0]], self.mean_cum[area, seg[0] + 1]
        layer_frac = m_lo + (frac - lo) / np.maximum(hi - lo, 1e-6) * (m_hi - m_lo)
        layer_frac = np.where(frac < 1, np.clip(layer_frac, 0, 0.9999), frac).astype(np.float32)
        tissue = (depth > 0) & ~vent
        if self.artifacts.tears:
            tissue &= ~self._segments(rows, cols, self.artifacts.tears, taper=True)
        fb = np.clip((layer_frac * (NL / FRAC_MAX)).astype(np.int32), 0, NL - 1)
        layer = np.where(tissue, self.layer_lut[area, fb], 0).astype(np.uint8)
        cortex = (layer >= 1) & (layer <= 6)
        return dict(tissue=tissue, cortex=cortex, area=np.where(cortex, area + 1, 0).astype(np.uint8),
                    layer=layer, frac=frac, layer_frac=layer_frac, area_idx=area, nb_w=nb_w,
                    s_mm=s * brain.sheet_length(g.z_mm), cell=f["cell"], tex=f["tex"])

    @staticmethod
    def _segments(rows, cols, segs, taper=False):
        out = np.zeros(rows.shape, bool)
        for x0, y0, x1, y1, w in segs:
            dx, dy = x1 - x0, y1 - y0
            L2 = dx * dx + dy * dy + 1e-9
            t = np.clip(((cols - x0) * dx + (rows - y0) * dy) / L2, 0, 1)
            d = np.hypot(cols - (x0 + t * dx), rows - (y0 + t * dy))
            ww = w * (1 - 0.8 * t) if taper else w
            out |= d < ww
        return out

    def _lumina(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks of the round vessel lumina and of their rims (out to ``RIM`` x the radius) in the block spanned
        by ``rows`` x ``cols``."""
        lumen, rim = np.zeros(rows.shape, bool), np.zeros(rows.shape, bool)
        r0, c0 = float(rows[0, 0]), float(cols[0, 0])
        hh, ww = rows.shape
        for x, y, rad in self.vessels.lumina:
            reach = rad * RIM
            i0, i1 = int(max(0, y - reach - r0)), int(min(hh, y + reach - r0 + 2))
            j0, j1 = int(max(0, x - reach - c0)), int(min(ww, x + reach - c0 + 2))
            if i1 <= i0 or j1 <= j0:
                continue
            d2 = (rows[i0:i1, j0:j1] - y) ** 2 + (cols[i0:i1, j0:j1] - x) ** 2
            lumen[i0:i1, j0:j1] |= d2 < rad * rad
            rim[i0:i1, j0:j1] |= d2 < reach * reach
        return lumen, rim

    # --- full render ---
    def darkness(self, lab: dict[str, np.ndarray]) -> np.ndarray:
        """Stain darkness of each pixel: its column's profile (``SectionGeometry.profiles``) at its depth."""
        prof = self.geom.profiles
        x = np.clip(lab["frac"] * prof.shape[0] - 0.5, 0, prof.shape[0] - 1)
        b0 = np.minimum(x.astype(np.int32), prof.shape[0] - 2)
        w = (x - b0).astype(np.float32)
        d = prof[b0, lab["cell"]] * (1 - w) + prof[b0 + 1, lab["cell"]] * w
        return np.where(lab["frac"] < 1, d, DARKNESS_FLOOR)

    def render(self, y0: int, x0: int, h: int, w: int) -> dict[str, np.ndarray]:
        """Render image (uint8) and ground truth of the block ``[y0:y0+h, x0:x0+w]``."""
        H = self.halo
        r = np.arange(y0 - H, y0 + h + H, dtype=np.float32)[:, None]
        c = np.arange(x0 - H, x0 + w + H, dtype=np.float32)[None, :]
        rows, cols = np.broadcast_arrays(r, c)
        lab = self.labels(rows, cols, (y0 - H, x0 - H, h + 2 * H, w + 2 * H))
        st, t = self.style, self.tables
        tissue, layer, area = lab["tissue"], lab["layer"], lab["area_idx"]
        wm = layer == 7
        lb = np.clip((lab["layer_frac"] * (NB / FRAC_MAX)).astype(np.int32), 0, NB - 1)
        px_mm2 = (self.pixel_size_um * 1e-3) ** 2
        px_um2 = self.pixel_size_um ** 2
        # relative darkness above the cell-free floor: sets both the cell count and the neuropil
        rel = np.maximum(self.darkness(lab) - DARKNESS_FLOOR, 0) / (t.mean_darkness - DARKNESS_FLOOR)
        rel *= t.layer_factor[area, lb]
        size = t.size[area, lb]
        in_columns = (lab["layer_frac"] >= t.cum[area, 1]) & ~wm
        s_mm = lab["s_mm"]
        columns = 1 + COLUMN_CONTRAST * np.cos(TWO_PI_F * s_mm / COLUMN_MM + 2.0 * np.sin(TWO_PI_F * s_mm / 0.7))
        rel = np.where(in_columns, rel * columns, rel)
        round_lumen, rim = self._lumina(rows, cols)
        lumen = (self.vessels.radial(s_mm, lab["frac"]) & tissue) | round_lumen
        rim &= ~lumen & tissue
        dens = np.where(wm, WM_DENSITY * np.exp(0.4 * lab["tex"]), rel * t.mean_coverage / (size * 1e-6))
        dens = np.where(tissue & ~lumen, dens, 0)
        dens = np.where(rim, dens + 3 * WM_DENSITY, dens)  # endothelial and perivascular nuclei
        u1, u2, u3 = _uniforms(_hash(rows, cols, self.key))
        p = dens * px_mm2
        scale = np.maximum(p, 1.0)  # at coarse pixels, several cells per pixel
        present = u1 < p / scale
        cell_area = size * np.exp(0.7 * (u2 - 0.5)) * scale
        amp = np.where(present, cell_area / px_um2, 0).astype(np.float32)
        large = size >= 50
        od = ndi.gaussian_filter(np.where(large, 0, amp), self.sig[0], truncate=3)
        od += ndi.gaussian_filter(np.where(large, amp, 0), self.sig[1], truncate=3)
        bz = t.betz[area, lb] * (1 - lab["nb_w"])
        if bz.any():
            pb = np.where(tissue & ~lumen, bz, 0) * px_mm2
            bamp = np.where(u3 < pb, BETZ_AREA_UM2 * np.exp(0.5 * (u2 - 0.5)) / px_um2, 0).astype(np.float32)
            od += ndi.gaussian_filter(bamp, self.sig[2], truncate=3)
        od *= st.k_cell
        # unresolved cells and neuropil: darkness follows the local profile; white matter is textured
        neuropil = np.where(wm, st.od_wm * np.exp(0.15 * lab["tex"]), rel * st.od_cortex)
        od += np.where(tissue, neuropil * np.where(lumen, 0.4, 1.0), 0)
        if st.uneven > 0:
            f = self.uneven_field
            sy, sx = (f.shape[0] - 1) / self.shape[0], (f.shape[1] - 1) / self.shape[1]
            field_ = ndi.affine_transform(f, matrix=[sy, sx], offset=[(y0 - H) * sy, (x0 - H) * sx],
                                          output_shape=rows.shape, order=1, mode="nearest")
            od *= np.exp(st.uneven * field_)
        if self.artifacts.folds:
            od *= np.where(self._segments(rows, cols, self.artifacts.folds) & tissue, 1.9, 1.0)
        I = st.glass * np.exp(-st.gain * od)
        I = 255.0 * (I / 255.0) ** st.gamma
        if self.sig_psf > 0.3:
            I = ndi.gaussian_filter(I, self.sig_psf, truncate=3)
        for bx, by, br in self.artifacts.bubbles:
            d = np.hypot(cols - bx, rows - by)
            if d.min() > br + 5:
                continue
            I = np.where(d < br, I + 0.3 * (st.glass - I), I)
            I = I * (1 - 0.3 * np.exp(-(((d - br) / max(1.5, 0.01 * br)) ** 2)))
        for dx, dy, dr, dk in self.artifacts.dust:
            if abs(dx - (x0 + w / 2)) > w / 2 + 4 * dr + H or abs(dy - (y0 + h / 2)) > h / 2 + 4 * dr + H:
                continue
            d2 = (cols - dx) ** 2 + (rows - dy) ** 2
            I = I * (1 - dk * np.exp(-d2 / (2 * dr * dr)))
        u4, u5, u6 = _uniforms(_hash(rows, cols, self.key ^ 0x5DEECE66D))
        I = I + st.noise * 2.0 * (u4 + u5 + u6 - 1.5)
        img = np.clip(np.rint(I), 0, 255).astype(np.uint8)
        sl = (slice(H, H + h), slice(H, H + w))
        return dict(image=img[sl], tissue=lab["tissue"][sl], cortex=lab["cortex"][sl], area=lab["area"][sl],
                    layer=layer[sl])

    def render_full(self, block: int = 512) -> dict[str, np.ndarray]:
        """Render the whole section in row strips."""
        Hh, W = self.shape
        out = {k: np.zeros((Hh, W), np.uint8 if k in ("image", "area", "layer") else bool)
               for k in ("image", "tissue", "cortex", "area", "layer")}
        for y in range(0, Hh, block):
            h = min(block, Hh - y)
            res = self.render(y, 0, h, W)
            for k in out:
                out[k][y:y + h] = res[k]
        return out
