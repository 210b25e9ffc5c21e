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
LAYER_FIELD_MM = (2.0, 15.0)  # wavelength range (mm along the sheet) of the columns' layer-share variation
PROFILE_FIELD_MM = (0.8, 2.0)  # ... of their profile variation (BigBrain's vertex-to-vertex spread)
#: Share of BigBrain's between-vertex profile variance that the phantom draws as tissue variation; the rest is the
#: measurement noise the rendering adds itself (cells, stain, scanner). Measured by benchmarks/phantom_noise.py.
TISSUE_VARIANCE_SHARE = 0.79
FIELD_WAVES = 10  # waves summed per random field
COLUMN_TABLE = 4096  # steps of the sheet ring on which the column fields are tabulated
COLUMN_SMOOTH_MM = 0.15  # Gaussian sigma of the smoothing of the column fields within the tissue
COLUMN_GRID = 4  # the column fields' grid is this many geometry steps
COLUMN_SAMPLE_UM = 32.0  # the column fields are sampled at this spacing on the image and repeated in between
BOK_THICKNESS = 0.12  # cortex thicker at gyral crowns, thinner in fundi (relative, at curvature +-1)
BOK_AREA_RATIO = 0.5  # white / pial surface-area ratio is 1 -+ this at crowns / fundi (Bok's equivolumetry)
BORDER_MM = 0.75  # width of an area border's transition zone (neighbour weight 0.9 -> 0.1)


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % TWO_PI - np.pi


def equivolumetric(frac: np.ndarray, kappa: np.ndarray) -> np.ndarray:
    """Volume fraction of the cortex above depth fraction ``frac`` at curvature class ``kappa`` (Bok 1929).

    The area of a surface parallel to the pia changes linearly with depth, from 1 at the pia to the white / pial
    ratio ``rho`` (< 1 under a gyral crown, > 1 in a fundus); layers keep their volume fractions, so at crowns the
    deep layers are thicker and in fundi the superficial ones. Beyond the cortex the depth fraction is kept.
    """
    rho = 1.0 - BOK_AREA_RATIO * kappa
    f = np.minimum(frac, 1.0)
    vol = (f + 0.5 * (rho - 1.0) * f * f) / (0.5 * (1.0 + rho))
    return np.where(frac < 1.0, vol, frac).astype(np.float32)


def _ring_bump(s: np.ndarray, center: float, width: float, length: float) -> np.ndarray:
    """Gaussian bump of ``width`` mm at ``center`` on a ring of ``length`` mm."""
    d = (s - center + length / 2) % length - length / 2
    return np.exp(-((d / width) ** 2))


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
        self.harm = [(k, 0.05 / k ** 0.6 * rng.uniform(0.3, 1.0), rng.uniform(0, TWO_PI), rng.uniform(0.2, 0.8))
                     for k in (2, 3, 4, 5, 6, 7, 9, 11)]
        # Irregular folding: sulci at gamma-distributed spacings, deep and shallow, bent and tilted.
        n_sulci = max(5, int(rng.poisson(TWO_PI * self.R0 / 8.5)))
        gaps = rng.gamma(4.0, 1.0, n_sulci) + 1.0
        base = np.cumsum(gaps) / gaps.sum() * TWO_PI
        self.theta0 = (base + rng.uniform(0, TWO_PI)) % TWO_PI
        self.central = int(rng.integers(n_sulci))
        depth = self.R0 * np.where(rng.random(n_sulci) < 0.3, rng.uniform(0.06, 0.14, n_sulci),
                                   rng.uniform(0.18, 0.50, n_sulci))
        depth[self.central] = self.R0 * 0.56 * (1 + 0.06 * v * rng.uniform(-1, 1))
        self.depth0 = depth
        self.curv = v * rng.uniform(-0.35, 0.35, n_sulci)  # rad of bend at the fundus
        self.tilt = v * rng.uniform(-0.2, 0.2, n_sulci)  # rad of lean of the sulcal axis
        self.gap = rng.uniform(0.18, 0.5, n_sulci)  # mm between banks at the lip
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
                          0.13 * self.R0 * rng.uniform(0.8, 1.3), 0.05 * self.R0 * rng.uniform(0.8, 1.3),
                          rng.uniform(0, np.pi))
        # thickness of each area: cortex_thickness * sqrt(vonEconomo / mean)
        t = np.array([a.thickness_mm for a in self.areas])
        self.area_thickness = self.thickness_mm * np.sqrt(t / t.mean()) * self.thick_scale
        # This brain's offset of each area's mean profile, at BigBrain's between-hemisphere spread (smooth in depth).
        depth01 = (np.arange(len(self.areas[0].profile)) + 0.5) / len(self.areas[0].profile)
        z = rng.normal(0, 1, (n_a, 2))
        shape = np.stack([np.ones_like(depth01), np.sqrt(3) * (2 * depth01 - 1)])
        self.profile_offset = v * np.stack([a.brain_sd for a in self.areas]) * (z @ shape) / np.sqrt(2)
        # Smooth random fields along the sheet: the columns' profile components and layer-fraction deviations.
        self.sheet_length0 = TWO_PI * self.R0 + 2 * self.depth0.sum()
        n_pcs = self.areas[0].pcs.shape[0]
        n_fields = n_pcs + 6
        lo, hi = np.full(n_fields, LAYER_FIELD_MM[0]), np.full(n_fields, LAYER_FIELD_MM[1])
        lo[:n_pcs], hi[:n_pcs] = PROFILE_FIELD_MM
        lam = np.exp(rng.uniform(np.log(lo)[:, None], np.log(hi)[:, None], (n_fields, FIELD_WAVES)))
        self.field_n = np.maximum(1, np.rint(self.sheet_length0 / lam))
        self.field_kz = TWO_PI / lam * rng.uniform(-1, 1, lam.shape)
        self.field_phase = rng.uniform(0, TWO_PI, lam.shape)
        # each wave's amplitude undoes its damping by the smoothing of the column fields (COLUMN_SMOOTH_MM)
        self.field_gain = np.exp(2 * (np.pi * COLUMN_SMOOTH_MM / lam) ** 2)

    def sheet_fields(self, z_mm: float, n: int = COLUMN_TABLE) -> np.ndarray:
        """Unit-variance random fields [n_fields, n] on ``n`` equal steps of the sheet ring at ``z_mm``.

        Rows 0..K-1 weight the areas' profile components, rows K..K+5 perturb the six layer fractions; each is a
        sum of ``FIELD_WAVES`` waves along the sheet that drift with ``z``, with wavelengths in ``PROFILE_FIELD_MM``
        (the profile components) or ``LAYER_FIELD_MM`` (the layer fractions).
        """
        s = np.arange(n) / n
        ph = TWO_PI * self.field_n[..., None] * s + (self.field_kz * z_mm + self.field_phase)[..., None]
        return (np.sqrt(2.0 / FIELD_WAVES) * (self.field_gain[..., None] * np.cos(ph)).sum(1)).astype(np.float32)

    def sheet_curvature(self, z_mm: float, n: int = COLUMN_TABLE) -> np.ndarray:
        """Curvature class of the pial surface on ``n`` steps of the sheet ring: +1 gyral crown, -1 fundus, 0 wall.

        Read off the folding model (crowns are the middles of the outer segments between sulci, fundi the sulcal
        bottoms, shallow dimples count in proportion to their depth); it drives Bok's equivolumetric layers.
        """
        theta, depth = self.sulci(z_mm)
        order = np.argsort(theta)
        L = self.sheet_length(z_mm)
        s = np.arange(n) / n * L
        starts = theta[order] * self.R0 + np.concatenate([[0.0], np.cumsum(2 * depth[order])[:-1]])
        ends = starts + 2 * depth[order]
        kappa = np.zeros(n)
        for s0, d in zip(starts, depth[order]):
            kappa -= min(1.0, d / 2.0) * _ring_bump(s, s0 + d, 0.8, L)
        for e, nxt in zip(ends, np.roll(starts, -1) + np.r_[np.zeros(len(starts) - 1), L]):
            seg = nxt - e
            kappa += _ring_bump(s, e + seg / 2, 0.3 * seg + 0.5, L)
        return np.clip(kappa, -1, 1).astype(np.float32)

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
        return self.area_blend(s_frac, z_mm)[0]

    def area_blend(self, s_frac: np.ndarray, z_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(area, nearest neighbouring area, the neighbour's weight) at sheet positions ``s_frac``.

        Lamination changes gradually across a border: the neighbour's weight falls logistically from 0.5 at the
        border to 0.1 at ``BORDER_MM / 2`` inside the area; the label is the area of higher weight.
        """
        starts = self.borders(z_mm)
        order = np.argsort(starts)
        st = starts[order]
        n = len(st)
        idx = (np.searchsorted(st, s_frac, side="right") - 1) % n
        d_prev = (s_frac - st[idx]) % 1.0
        d_next = (st[(idx + 1) % n] - s_frac) % 1.0
        prev_closer = d_prev < d_next
        nb = np.where(prev_closer, order[(idx - 1) % n], order[(idx + 1) % n])
        d_mm = np.minimum(d_prev, d_next) * self.sheet_length(z_mm)
        w = 1.0 / (1.0 + np.exp(np.minimum(d_mm * (2 * np.log(9.0) / BORDER_MM), 60.0)))
        return order[idx], nb, w.astype(np.float32)


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
    texture: np.ndarray  # unit-sd random field (white-matter fibre and glia texture)
    columns: np.ndarray  # [7, ...] on a COLUMN_GRID coarser grid: 5 layer boundaries, curvature, thickness (mm)
    profiles: np.ndarray  # [18, cells] each column-grid cell's darkness profile (cells: the flattened grid)
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
            center = tk + brain.tilt[k] * tc + brain.curv[k] * tc ** 2
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
        trng = np.random.default_rng([brain.seed, int(round(z_mm * 1000)), 5])
        tex = sum(w * ndi.gaussian_filter(trng.normal(0, 1, depth.shape).astype(np.float32), sig / step_mm)
                  for w, sig in ((1.0, 0.05), (1.5, 0.25)))
        tex = (tex - tex.mean()) / max(float(tex.std()), 1e-6)
        columns, profiles = _column_fields(brain, z_mm, s[::COLUMN_GRID, ::COLUMN_GRID] / L,
                                           tissue[::COLUMN_GRID, ::COLUMN_GRID], step_mm * COLUMN_GRID)
        return cls(brain, z_mm, step_mm, x0, depth, np.cos(ang).astype(np.float32),
                   np.sin(ang).astype(np.float32), tex.astype(np.float32), columns, profiles, ventricle_ok)

    def sample_affine(self, affine: np.ndarray, y0: int, x0: int, h: int, w: int
                      ) -> dict[str, np.ndarray]:
        """Fields on the pixel block [y0:y0+h, x0:x0+w]: ``depth`` (mm below the pia), ``s`` (sheet fraction),
        ``vent`` (ventricle mask), ``tex`` (texture), ``columns`` (column fields, see ``_column_fields``) and
        ``cell`` (flat index of the nearest column-grid cell, for ``profiles``).

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
        tex = ndi.affine_transform(self.texture, **kw)
        # column fields: sampled every k pixels (about COLUMN_SAMPLE_UM) and repeated over each k x k cell
        px_um = 1e3 * self.step_mm * float(np.hypot(mat[0, 0], mat[0, 1]))
        k = max(1, int(round(COLUMN_SAMPLE_UM / px_um)))
        mc = mat / COLUMN_GRID
        oc = off / COLUMN_GRID + mc @ np.full(2, (k - 1) / 2)
        hk, wk = -(-h // k), -(-w // k)
        columns = np.stack([ndi.affine_transform(f, matrix=mc * k, offset=oc, output_shape=(hk, wk), order=1,
                                                 mode="nearest") for f in self.columns])
        columns = np.repeat(np.repeat(columns, k, 1), k, 2)[:, :h, :w]
        rr = np.arange(h, dtype=np.float64)[:, None]
        cc = np.arange(w, dtype=np.float64)[None, :]
        cell = self._cell(mc[0, 0] * rr + mc[0, 1] * cc + off[0] / COLUMN_GRID,
                          mc[1, 0] * rr + mc[1, 1] * cc + off[1] / COLUMN_GRID)
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
        return dict(depth=depth, s=s_frac, vent=vent, tex=tex, columns=columns, cell=cell)

    def _cell(self, gi: np.ndarray, gj: np.ndarray) -> np.ndarray:
        """Flat index of the nearest column-grid cell at column-grid coordinates (row ``gi``, col ``gj``)."""
        ny, nx = self.columns.shape[1:]
        i = np.clip(np.rint(gi), 0, ny - 1).astype(np.int64)
        j = np.clip(np.rint(gj), 0, nx - 1).astype(np.int64)
        return i * nx + j

    def sample(self, X: np.ndarray, Y: np.ndarray) -> dict[str, np.ndarray]:
        """The fields of ``sample_affine``, bilinearly interpolated at phantom points (mm)."""
        ci = np.stack([(Y - self.x0) / self.step_mm, (X - self.x0) / self.step_mm])
        depth = ndi.map_coordinates(self.depth, ci, order=1, mode="nearest")
        c = ndi.map_coordinates(self.s_cos, ci, order=1, mode="nearest")
        s = ndi.map_coordinates(self.s_sin, ci, order=1, mode="nearest")
        s_frac = (np.arctan2(s, c) / TWO_PI) % 1.0
        tex = ndi.map_coordinates(self.texture, ci, order=1, mode="nearest")
        columns = np.stack([ndi.map_coordinates(f, ci / COLUMN_GRID, order=1, mode="nearest") for f in self.columns])
        if self.ventricle_ok:
            vent = _ellipse(X, Y, *self.brain.ventricle)
        else:
            vent = np.zeros(X.shape, bool)
        cell = self._cell(ci[0] / COLUMN_GRID, ci[1] / COLUMN_GRID)
        return dict(depth=depth, s=s_frac, vent=vent, tex=tex, columns=columns, cell=cell)


def _column_fields(brain: BrainModel, z_mm: float, s_frac: np.ndarray, tissue: np.ndarray, step_mm: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Column properties on a coarse grid: ``columns`` [7, ...] and ``profiles`` [18, cells].

    ``columns``: the five layer boundaries (cumulative von Economo fractions, each layer's share varied by
    BigBrain's relative spread), the curvature class and the cortical thickness (the area's, with a slow wave along
    the sheet, thicker at crowns and thinner in fundi). ``profiles``: the darkness at BigBrain's 18 depths, the
    area's mean (blended with the neighbour's across a border) plus this brain's offset plus the columns' variation
    drawn from BigBrain's full within-area covariance. All are functions of the sheet position of the nearest pial
    point; smoothing them within the tissue hides the jumps where that point switches between the banks of a gyrus.
    """
    s_idx = np.minimum((s_frac * COLUMN_TABLE).astype(np.int64), COLUMN_TABLE - 1)
    fields = brain.sheet_fields(z_mm, COLUMN_TABLE)[:, s_idx]
    K = brain.areas[0].pcs.shape[0]
    area, nb, nb_w = brain.area_blend(s_frac, z_mm)
    frac = np.stack([a.fractions for a in brain.areas])[area]  # [..., 6]
    sd = np.stack([a.fraction_sd for a in brain.areas])[area] * brain.variation
    frac = frac * np.exp(sd * np.moveaxis(fields[K:K + 6], 0, -1) - 0.5 * sd * sd)
    bounds = np.moveaxis(np.cumsum(frac, -1) / frac.sum(-1, keepdims=True), -1, 0)[:5]
    curvature = brain.sheet_curvature(z_mm, COLUMN_TABLE)[s_idx]
    amp, k, ph = brain.thick_wave
    thickness = brain.area_thickness[area] * (1 + amp * brain.variation * np.sin(TWO_PI * k * s_frac + ph))
    thickness *= 1 + BOK_THICKNESS * brain.variation * curvature
    mean = np.stack([a.profile for a in brain.areas]) + brain.profile_offset  # [n_areas, 18]
    prof = (1 - nb_w)[..., None] * mean[area] + nb_w[..., None] * mean[nb]
    for i, a in enumerate(brain.areas):  # variation: sum_k z_k pc_k, z_k the columns' unit-variance fields
        m = area == i
        prof[m] += brain.variation * np.sqrt(TISSUE_VARIANCE_SHARE) * fields[:K, m].T @ a.pcs
    m = tissue.astype(np.float32)
    sig = COLUMN_SMOOTH_MM / step_mm
    norm = ndi.gaussian_filter(m, sig)
    far = norm < 1e-3  # beyond the tissue any value will do: the field's mean

    def smooth(f: np.ndarray) -> np.ndarray:
        fill = float(f[tissue].mean()) if tissue.any() else float(f.mean())
        return np.where(far, fill, ndi.gaussian_filter((f * m).astype(np.float32), sig) / np.maximum(norm, 1e-3))

    columns = np.stack([smooth(f) for f in (*bounds, curvature, thickness)]).astype(np.float32)
    profiles = np.stack([smooth(prof[..., d]).ravel() for d in range(prof.shape[-1])]).astype(np.float32)
    return columns, profiles


def _ellipse(X, Y, cx, cy, a, b, phi):
    c, s = np.cos(phi), np.sin(phi)
    u = (X - cx) * c + (Y - cy) * s
    v = -(X - cx) * s + (Y - cy) * c
    return (u / a) ** 2 + (v / b) ** 2 < 1
