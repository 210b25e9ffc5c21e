"""Folded cortical sheet of one phantom brain, evaluated per section on a coarse grid.

Model: in each section plane (phantom coordinates X, Y in mm; Z = section position) the pial outline is a
star-shaped curve ``r_out(theta, z)`` (an ellipse plus low harmonics) into which narrow radial slits are cut:
the sulci, with a gap between their banks.  Their angle, curvature and depth drift smoothly with ``z``, so
consecutive sections show the same folds slightly changed.  Depth below the pia is a Euclidean distance
transform of the tissue; the *sheet coordinate* ``s`` (mm along the unfolded sheet) of the nearest pial point
defines the area, so borders run continuously across the sulcal walls and across neighbouring sections.  The
deepest slit is the central sulcus, with FA on its front bank and PB on its back bank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from .reference import AreaModel

TWO_PI = 2 * np.pi


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % TWO_PI - np.pi


@dataclass
class BrainModel:
    """Random, seed-determined shape and staining parameters of one brain."""

    seed: int
    size_mm: float
    areas: list[AreaModel]
    variation: float = 1.0
    thickness_mm: float = 2.2
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        v = self.variation
        self.R0 = 0.40 * self.size_mm * (1 + 0.04 * v * rng.uniform(-1, 1))
        self.ecc = 0.08 + 0.05 * v * rng.uniform(-1, 1)
        self.ecc_angle = rng.uniform(0, np.pi)
        self.harm = [(k, 0.025 * rng.uniform(0.3, 1.0), rng.uniform(0, TWO_PI), rng.uniform(0.2, 0.8))
                     for k in (3, 4, 5, 7)]
        n_sulci = max(4, int(round(TWO_PI * self.R0 / 8.0)))
        base = np.sort((np.arange(n_sulci) + 0.5 * v * rng.uniform(-0.35, 0.35, n_sulci)) / n_sulci) * TWO_PI
        self.theta0 = (base + rng.uniform(0, TWO_PI)) % TWO_PI
        self.central = int(rng.integers(n_sulci))
        depth = self.R0 * rng.uniform(0.30, 0.46, n_sulci)
        depth[self.central] = self.R0 * 0.56 * (1 + 0.06 * v * rng.uniform(-1, 1))
        self.depth0 = depth
        self.curv = v * rng.uniform(-0.12, 0.12, n_sulci)  # rad of bend at the fundus
        self.gap = rng.uniform(0.22, 0.45, n_sulci)  # mm between banks at the lip
        self.drift_amp = 0.03 + 0.03 * rng.random(n_sulci)  # rad
        self.drift_len = rng.uniform(4, 10, n_sulci)  # mm along z
        self.drift_phase = rng.uniform(0, TWO_PI, n_sulci)
        # Area widths along the sheet (fractions of the sheet length), with border shifts between brains.
        n_a = len(self.areas)
        w = np.ones(n_a) * (1 + 0.22 * v * rng.uniform(-1, 1, n_a))
        self.area_w = w / w.sum()
        self.central_shift_mm = 0.25 * v * rng.uniform(-1, 1)
        self.border_wobble = [(0.35 * rng.uniform(0.3, 1), rng.uniform(3, 8), rng.uniform(0, TWO_PI))
                              for _ in range(n_a)]
        self.thick_scale = 1 + 0.08 * v * rng.uniform(-1, 1)
        self.thick_wave = (0.10 * rng.uniform(0.5, 1.0), int(rng.integers(3, 7)), rng.uniform(0, TWO_PI))
        self.ventricle = (rng.uniform(-0.1, 0.1) * self.R0, rng.uniform(-0.1, 0.1) * self.R0,
                          0.13 * self.R0 * rng.uniform(0.8, 1.2), 0.05 * self.R0 * rng.uniform(0.8, 1.3),
                          rng.uniform(0, np.pi))
        # thickness of each area: cortex_thickness * sqrt(vonEconomo / mean)
        t = np.array([a.thickness_mm for a in self.areas])
        self.area_thickness = self.thickness_mm * np.sqrt(t / t.mean()) * self.thick_scale

    # --- folds at a given z ---
    def sulci(self, z_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """Angle and depth (mm) of each sulcus at ``z_mm``."""
        ph = TWO_PI * z_mm / self.drift_len + self.drift_phase
        theta = (self.theta0 + self.drift_amp * np.sin(ph)) % TWO_PI
        depth = self.depth0 * (1 + 0.12 * self.variation * np.sin(ph * 0.7 + 1.0))
        return theta, depth

    def r_out(self, theta: np.ndarray, z_mm: float) -> np.ndarray:
        """Outer pial radius (mm) as a function of angle."""
        r = 1 + self.ecc * np.cos(2 * (theta - self.ecc_angle))
        for k, amp, ph, rate in self.harm:
            r = r + amp * np.cos(k * theta + ph + rate * z_mm)
        return self.R0 * r

    def sheet_length(self, z_mm: float) -> float:
        """Length (mm) of the unfolded sheet ring at ``z_mm``."""
        return TWO_PI * self.R0 + 2 * self.sulci(z_mm)[1].sum()

    def borders(self, z_mm: float) -> np.ndarray:
        """Sheet positions (fraction of the ring, increasing) where each area starts; area 0 = first."""
        theta, depth = self.sulci(z_mm)
        L = self.sheet_length(z_mm)
        order = np.argsort(theta)
        k = int(np.where(order == self.central)[0][0])
        th_sorted, d_sorted = theta[order], depth[order]
        off = th_sorted[k] * self.R0 + 2 * d_sorted[:k].sum()
        s_central = (off + d_sorted[k] + self.central_shift_mm) / L  # fundus of the central sulcus
        names = [a.name for a in self.areas]
        i_pb = names.index("PB")
        starts = np.empty(len(names))
        cum = np.concatenate([[0.0], np.cumsum(self.area_w)])
        for i in range(len(names)):
            wob = 0.0
            if i != i_pb:
                amp, lam, ph = self.border_wobble[i]
                wob = amp * np.sin(TWO_PI * z_mm / lam + ph) / L * self.variation
            starts[i] = s_central + cum[i] - cum[i_pb] + wob
        return starts % 1.0

    def area_index(self, s_frac: np.ndarray, z_mm: float) -> np.ndarray:
        """Area index (0..n-1) at sheet positions ``s_frac`` in [0, 1)."""
        starts = self.borders(z_mm)
        order = np.argsort(starts)
        idx = np.searchsorted(starts[order], s_frac, side="right") - 1
        return order[idx % len(starts)]


@dataclass
class SectionGeometry:
    """Coarse-grid geometry of one section in phantom coordinates (mm)."""

    brain: BrainModel
    z_mm: float
    step_mm: float
    x0: float  # phantom coordinate of coarse pixel (0, 0)
    depth: np.ndarray  # signed depth below pia, mm (negative outside)
    s_cos: np.ndarray
    s_sin: np.ndarray
    ventricle_ok: bool

    @classmethod
    def build(cls, brain: BrainModel, z_mm: float, extent_mm: float, step_mm: float) -> SectionGeometry:
        """Compute the coarse geometry covering ``[-extent/2, extent/2]²``."""
        n = int(np.ceil(extent_mm / step_mm)) + 1
        x0 = -extent_mm / 2
        ax = x0 + step_mm * np.arange(n)
        X, Y = np.meshgrid(ax, ax)
        r = np.hypot(X, Y)
        th = np.arctan2(Y, X) % TWO_PI
        inside = r < brain.r_out(th, z_mm)
        theta_k, depth_k = brain.sulci(z_mm)
        order = np.argsort(theta_k)
        slit_any = np.zeros_like(inside)
        s_bg = np.zeros(r.shape, np.float64)
        L = brain.sheet_length(z_mm)
        # outer pial points: s = theta * R0 plus the unfolded walls of all sulci before theta
        s_bg[:] = th * brain.R0
        for _j, k in enumerate(order):
            s_bg += np.where(th > theta_k[k], 2 * depth_k[k], 0.0)
        off = 0.0
        for k in order:
            tk, dk = theta_k[k], depth_k[k]
            r_lip = float(brain.r_out(np.array([tk]), z_mm)[0])
            t = (r_lip - r) / dk
            tc = np.clip(t, 0, 1)
            center = tk + brain.curv[k] * tc ** 2
            dth = _wrap(th - center)
            dist = np.abs(r * dth)
            rf = r_lip - dk
            fx, fy = rf * np.cos(center), rf * np.sin(center)
            dist = np.where(t > 1, np.hypot(X - fx, Y - fy), dist)
            dist = np.where(t < -0.3, np.inf, dist)
            half = 0.5 * brain.gap[k] * (1 - 0.35 * tc)
            cut = dist < half
            slit_any |= cut
            near = (dist < half + 3 * step_mm) & (t > -0.15)
            s_wall = tk * brain.R0 + off + dk * (1 + np.sign(dth) * (1 - tc))
            s_bg = np.where(near, s_wall, s_bg)
            off += 2 * dk
        tissue0 = inside & ~slit_any
        sd = ndi.distance_transform_edt(tissue0) - ndi.distance_transform_edt(~tissue0)
        sd = ndi.gaussian_filter(sd.astype(np.float32), 0.1 / step_mm)
        tissue = sd > 0
        d_in, idx = ndi.distance_transform_edt(tissue, return_indices=True)
        d_out = ndi.distance_transform_edt(~tissue)
        # EDT measures to the nearest background pixel centre: subtract half a step so depth is 0 on the boundary
        depth = np.where(tissue, d_in - 0.5, 0.5 - d_out).astype(np.float32) * step_mm
        s = s_bg[idx[0], idx[1]] % L
        ang = TWO_PI * s / L
        vx, vy, va, vb, vphi = brain.ventricle
        vmask = _ellipse(X, Y, vx, vy, va, vb, vphi)
        ventricle_ok = bool(vmask.any() and depth[vmask].min() > brain.area_thickness.max() + 0.4)
        return cls(brain, z_mm, step_mm, x0, depth, np.cos(ang).astype(np.float32),
                   np.sin(ang).astype(np.float32), ventricle_ok)

    def sample_affine(self, affine: np.ndarray, y0: int, x0: int, h: int, w: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(depth_mm, sheet fraction s, ventricle mask) on the pixel block [y0:y0+h, x0:x0+w].

        ``affine`` (2x3) maps pixel (col, row, 1) to phantom (X, Y) mm; the coarse fields are resampled with one
        bilinear affine transform each.
        """
        A = np.asarray(affine, float) / self.step_mm
        # coarse (i=row from Y, j=col from X) as a function of block pixel (r, c)
        mat = np.array([[A[1, 1], A[1, 0]], [A[0, 1], A[0, 0]]])
        off = np.array([A[1, 0] * x0 + A[1, 1] * y0 + A[1, 2] - self.x0 / self.step_mm,
                        A[0, 0] * x0 + A[0, 1] * y0 + A[0, 2] - self.x0 / self.step_mm])
        kw = dict(matrix=mat, offset=off, output_shape=(h, w), order=1, mode="nearest")
        depth = ndi.affine_transform(self.depth, **kw)
        c = ndi.affine_transform(self.s_cos, **kw)
        s = ndi.affine_transform(self.s_sin, **kw)
        s_frac = (np.arctan2(s, c) * (1 / TWO_PI)) % 1.0
        vent = np.zeros((h, w), bool)
        if self.ventricle_ok:
            vx, vy, va, vb, vphi = self.brain.ventricle
            inv = np.linalg.inv(np.vstack([affine, [0, 0, 1]]))[:2]
            rad = max(va, vb) * np.hypot(inv[0, 0], inv[0, 1]) + 2
            vc = inv[0, 0] * vx + inv[0, 1] * vy + inv[0, 2]
            vr = inv[1, 0] * vx + inv[1, 1] * vy + inv[1, 2]
            r0, r1 = int(max(y0, vr - rad)), int(min(y0 + h, vr + rad + 1))
            c0, c1 = int(max(x0, vc - rad)), int(min(x0 + w, vc + rad + 1))
            if r1 > r0 and c1 > c0:
                rr = np.arange(r0, r1, dtype=np.float64)[:, None]
                cc = np.arange(c0, c1, dtype=np.float64)[None, :]
                X = affine[0, 0] * cc + affine[0, 1] * rr + affine[0, 2]
                Y = affine[1, 0] * cc + affine[1, 1] * rr + affine[1, 2]
                vent[r0 - y0:r1 - y0, c0 - x0:c1 - x0] = _ellipse(X, Y, vx, vy, va, vb, vphi)
        return depth, s_frac, vent

    def sample(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bilinear-interpolate (depth_mm, sheet fraction s in [0,1), ventricle mask) at phantom points."""
        ci = np.stack([(Y - self.x0) / self.step_mm, (X - self.x0) / self.step_mm])
        depth = ndi.map_coordinates(self.depth, ci, order=1, mode="nearest")
        c = ndi.map_coordinates(self.s_cos, ci, order=1, mode="nearest")
        s = ndi.map_coordinates(self.s_sin, ci, order=1, mode="nearest")
        s_frac = (np.arctan2(s, c) / TWO_PI) % 1.0
        if self.ventricle_ok:
            vent = _ellipse(X, Y, *self.brain.ventricle)
        else:
            vent = np.zeros(X.shape, bool)
        return depth, s_frac, vent


def _ellipse(X, Y, cx, cy, a, b, phi):
    c, s = np.cos(phi), np.sin(phi)
    u = (X - cx) * c + (Y - cy) * s
    v = -(X - cx) * s + (Y - cy) * c
    return (u / a) ** 2 + (v / b) ** 2 < 1
