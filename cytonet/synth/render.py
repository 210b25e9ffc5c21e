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

from .geometry import BrainModel, SectionGeometry
from .reference import BETZ_AREA_UM2

NB = 256  # depth-fraction bins of the lamination lookup tables
NL = 2048  # depth-fraction bins of the layer lookup table
FRAC_MAX = 1.25  # beyond the cortex: white matter
WM_DENSITY, WM_AREA = 300.0, 26.0  # glia in white matter (cells/mm², µm²)
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
    density_scale: np.ndarray  # per layer I..VI, brain-specific

    @classmethod
    def draw(cls, brain_rng: np.random.Generator, sec_rng: np.random.Generator, variation: float) -> Style:
        """Brain-level stain parameters, jittered per section."""
        v = variation
        b = brain_rng

        def j(x: float, rel: float) -> float:
            return x * (1 + rel * v * sec_rng.uniform(-1, 1))

        return cls(
            glass=float(np.clip(j(b.uniform(226, 246), 0.01), 200, 252)),
            gain=j(1 + 0.28 * v * b.uniform(-1, 1), 0.06),
            gamma=1 + 0.2 * v * b.uniform(-1, 1),
            k_cell=j(1.1, 0.05),
            od_cortex=j(0.32 + 0.06 * v * b.uniform(-1, 1), 0.08),
            od_wm=j(0.06 + 0.025 * v * b.uniform(-1, 1), 0.1),
            noise=j(2.0 + 4.0 * v * b.random(), 0.1),
            psf_um=j(3.0 + 6.0 * v * b.random(), 0.1),
            uneven=0.18 * v * (0.5 + b.random()),
            uneven_grid=sec_rng.normal(0, 1, (5, 5)),
            density_scale=(1 + 0.12 * v * b.uniform(-1, 1)) * (1 + 0.12 * v * b.uniform(-1, 1, 6)),
        )


@dataclass
class Artifacts:
    """Section artifacts in full-resolution pixel coordinates."""

    tears: list[tuple[float, float, float, float, float]] = field(default_factory=list)  # x0,y0,x1,y1,width
    folds: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    bubbles: list[tuple[float, float, float]] = field(default_factory=list)  # x, y, radius
    dust: list[tuple[float, float, float, float]] = field(default_factory=list)  # x, y, radius, darkness


def lamination_luts(brain: BrainModel, style: Style) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-area lookup tables over depth fraction: density, cell area, Betz density, and layer-boundary cumsum."""
    n = len(brain.areas)
    centers = (np.arange(NB) + 0.5) * FRAC_MAX / NB
    dens = np.empty((n, NB), np.float32)
    size = np.empty((n, NB), np.float32)
    betz = np.zeros((n, NB), np.float32)
    cum = np.empty((n, 5), np.float32)
    for i, a in enumerate(brain.areas):
        c = np.cumsum(a.fractions)
        cum[i] = c[:5]
        layer = np.minimum(np.searchsorted(c, centers, side="right"), 6)
        d = np.append(a.density * style.density_scale, WM_DENSITY)
        sz = np.append(a.cell_area, WM_AREA)
        dens[i], size[i] = d[layer], sz[layer]
        # layer III: small pyramids in IIIa growing to large ones in IIIc (size ramp 0.7x..1.3x)
        in3 = (centers >= c[1]) & (centers < c[2])
        pos = (centers - c[1]) / max(a.fractions[2], 1e-6)
        size[i] = np.where(in3, size[i] * (0.7 + 0.6 * pos), size[i])
        lo = c[2]
        for share, fac in a.iv_sublayers:  # sub-layers of IV (striate cortex)
            hi = lo + share * a.fractions[3]
            dens[i] = np.where((centers >= lo) & (centers < hi), dens[i] * fac, dens[i])
            lo = hi
        if a.betz_density > 0:  # giant pyramids in the lower half of layer V
            lo, hi = c[3] + 0.4 * a.fractions[4], c[4]
            betz[i] = np.where((centers >= lo) & (centers < hi), a.betz_density * a.fractions[4] / (hi - lo), 0)
    sig = 0.012 / (FRAC_MAX / NB)
    dens = ndi.gaussian_filter1d(dens, sig, axis=1, mode="nearest")
    size = ndi.gaussian_filter1d(size, sig, axis=1, mode="nearest")
    return dens, size, betz, cum


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

    def __post_init__(self) -> None:
        self.dens, self.size, self.betz, self.cum = lamination_luts(self.geom.brain, self.style)
        cov = self.dens * self.size * 1e-6  # Betz cells are resolved: not part of the neuropil term
        centers = (np.arange(NL) + 0.5) * FRAC_MAX / NL
        self.layer_lut = np.stack([1 + (centers[:, None] >= c[None, :]).sum(1) for c in self.cum]).astype(np.uint8)
        self.layer_lut[:, centers >= 1] = 7
        # smooth uneven-staining field on a 64x64 grid, resampled bilinearly
        self.uneven_field = ndi.zoom(self.style.uneven_grid, 64 / 5, order=3, mode="nearest").astype(np.float32)
        self.cov = (cov / cov[:, : int(NB / FRAC_MAX)].mean()).astype(np.float32)
        px = self.pixel_size_um
        r_small, r_large, r_betz = (np.sqrt(a / np.pi) for a in (38.0, 58.0, BETZ_AREA_UM2))
        self.sig = [max(0.7, 0.6 * r / px) for r in (r_small, r_large, r_betz)]
        self.sig_psf = self.style.psf_um / px / 2.355
        self.halo = int(np.ceil(3 * max(self.sig) + 3 * self.sig_psf)) + 2

    # --- geometry-only (ground truth) ---
    def labels(self, rows: np.ndarray, cols: np.ndarray, block: tuple[int, int, int, int] | None = None
               ) -> dict[str, np.ndarray]:
        """Ground-truth fields at pixel coordinates (``block`` = (y0, x0, h, w) for a regular block: faster)."""
        g, brain = self.geom, self.geom.brain
        if block is not None:
            depth, s, vent = g.sample_affine(self.affine, *block)
        else:
            A = self.affine
            X = A[0, 0] * cols + A[0, 1] * rows + A[0, 2]
            Y = A[1, 0] * cols + A[1, 1] * rows + A[1, 2]
            depth, s, vent = g.sample(X, Y)
        area = brain.area_index(s, g.z_mm)
        amp, k, ph = brain.thick_wave
        T = brain.area_thickness[area] * (1 + amp * brain.variation * np.sin(2 * np.pi * k * s + ph))
        frac = (depth / T).astype(np.float32)
        tissue = (depth > 0) & ~vent
        if self.artifacts.tears:
            tissue &= ~self._segments(rows, cols, self.artifacts.tears, taper=True)
        fb = np.clip((frac * (NL / FRAC_MAX)).astype(np.int32), 0, NL - 1)
        layer = np.where(tissue, self.layer_lut[area, fb], 0).astype(np.uint8)
        cortex = (layer >= 1) & (layer <= 6)
        return dict(tissue=tissue, cortex=cortex, area=np.where(cortex, area + 1, 0).astype(np.uint8),
                    layer=layer, frac=frac, area_idx=area)

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

    # --- full render ---
    def render(self, y0: int, x0: int, h: int, w: int) -> dict[str, np.ndarray]:
        """Render image (uint8) and ground truth of the block ``[y0:y0+h, x0:x0+w]``."""
        H = self.halo
        r = np.arange(y0 - H, y0 + h + H, dtype=np.float32)[:, None]
        c = np.arange(x0 - H, x0 + w + H, dtype=np.float32)[None, :]
        rows, cols = np.broadcast_arrays(r, c)
        lab = self.labels(rows, cols, (y0 - H, x0 - H, h + 2 * H, w + 2 * H))
        st = self.style
        tissue, layer, area = lab["tissue"], lab["layer"], lab["area_idx"]
        b = np.clip((lab["frac"] * (NB / FRAC_MAX)).astype(np.int32), 0, NB - 1)
        px_mm2 = (self.pixel_size_um * 1e-3) ** 2
        px_um2 = self.pixel_size_um ** 2
        dens = np.where(tissue, self.dens[area, b], 0)
        size = self.size[area, b]
        u1, u2, u3 = _uniforms(_hash(rows, cols, self.key))
        p = dens * px_mm2
        scale = np.maximum(p, 1.0)  # at coarse pixels, several cells per pixel
        present = u1 < p / scale
        cell_area = size * np.exp(0.7 * (u2 - 0.5)) * scale
        amp = np.where(present, cell_area / px_um2, 0).astype(np.float32)
        large = size >= 50
        od = ndi.gaussian_filter(np.where(large, 0, amp), self.sig[0], truncate=3)
        od += ndi.gaussian_filter(np.where(large, amp, 0), self.sig[1], truncate=3)
        bz = self.betz[area, b]
        if bz.any():
            pb = np.where(tissue, bz, 0) * px_mm2
            bamp = np.where(u3 < pb, BETZ_AREA_UM2 * np.exp(0.5 * (u2 - 0.5)) / px_um2, 0).astype(np.float32)
            od += ndi.gaussian_filter(bamp, self.sig[2], truncate=3)
        od *= st.k_cell
        # unresolved cells and neuropil: darkness follows the expected local cell coverage
        cov = np.where(tissue, self.cov[area, b], 0) * st.od_cortex
        od += np.where(layer == 7, st.od_wm, cov)
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
