"""Reference values of the cortex phantom, derived from published laminar tables.

Sources (read in place from the shared data folder, see ``shared_data_dir``):

* von Economo & Koskinas (1925): thickness of layers I..VI in mm per area
  (``laminar/von_economo_laminar_thickness.csv``).
* BigBrain (Amunts et al. 2013, Science 340), 1 µm cell segmentations at 80 sample sites
  (``laminar/bigbrain_cellular_{density,size}.csv``): per-layer cell density (cells/mm² of section) and mean
  cell-body area (µm²). Each site's ``bb_vertex`` indexes the 163842-vertex BigBrain surface of
  ``bigbrain/bigbrain_profiles18_layers_areas.npz`` (Wagstyl et al. 2020, PLoS Biol), whose ``economo`` label
  gives the site's von Economo area (hemisphere from the sign of the site's x, x < 0 = left).  Where an area has
  sites, its cellular values are the mean over them; otherwise the median over all 80 sites is used.

* BigBrain laminar staining profiles (18 equivolumetric depths per surface vertex, Wagstyl et al. 2020) of each
  area's vertices in both hemispheres: the mean darkness profile, the principal components of the within-area
  (between-vertex) covariance, the between-hemisphere difference of the means (a stand-in for between brains) and
  the relative spread of the six layer fractions (``derive_profiles``).

When the shared folder is absent, a packaged copy of exactly these derived values is read from
``cytonet/data/synth_reference.csv`` and ``synth_profiles.csv`` (see ``cytonet/data/README.md``).  The modelling
rules that turn these values into rendering parameters (striate sub-layers of IV, Betz cells) live in
``area_models``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from cytonet import data as packaged_data  # the packaged reference values (its files are in the fingerprint)

#: The demo areas: von Economo name, display colour.  FA | PB are the central-sulcus neighbours, OC is striate.
AREAS: tuple[tuple[str, str], ...] = (
    ("FB", "#e6a03c"),
    ("FA", "#d7301f"),
    ("PB", "#2c7fb8"),
    ("PC", "#41ab5d"),
    ("OC", "#8856a7"),
    ("TE", "#f0d73c"),
)
LAYERS = ("I", "II", "III", "IV", "V", "VI")
PACKAGED = "synth_reference.csv"
PACKAGED_PROFILES = "synth_profiles.csv"
N_DEPTHS = 18  #: BigBrain profile depths (equivolumetric, pial side first)
N_PCS = N_DEPTHS  #: principal components of the within-area profile covariance (all: the full covariance)
OUTSIDE = 65535  #: BigBrain profile value of a sample outside tissue


def shared_data_dir() -> Path | None:
    """Return the shared reference-data folder (env ``CYTONET_SHARED_DATA`` or ``../shared/data``), or None."""
    env = os.environ.get("CYTONET_SHARED_DATA")
    cand = Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return cand if (cand / "laminar").is_dir() else None


def derive_reference(shared: Path) -> pd.DataFrame:
    """Derive the per-area, per-layer reference table from the shared laminar/BigBrain tables."""
    lam = shared / "laminar"
    thick = pd.read_csv(lam / "von_economo_laminar_thickness.csv", sep=";").set_index("parcel")
    dens = pd.read_csv(lam / "bigbrain_cellular_density.csv").set_index("bb_vertex")
    size = pd.read_csv(lam / "bigbrain_cellular_size.csv").set_index("bb_vertex")
    samples = pd.read_csv(lam / "bigbrain_cellular_samples.csv").set_index("bb_vertex")
    site_area = pd.Series("unknown", index=dens.index)
    npz = shared / "bigbrain" / "bigbrain_profiles18_layers_areas.npz"
    if npz.exists():
        with np.load(npz, allow_pickle=True) as d:
            economo, names = d["economo"], d["economo_names"]
        hemi = (samples.loc[dens.index, "x"].to_numpy() >= 0).astype(int)
        site_area[:] = names[economo[hemi, dens.index.to_numpy()]]
    rows = []
    for name, _ in AREAS:
        t = thick.loc[f"L_{name}"].to_numpy(float)
        sites = site_area.index[site_area == name]
        if len(sites):
            d_l, s_l = dens.loc[sites].mean().to_numpy(), size.loc[sites].mean().to_numpy()
            src = f"bigbrain_sites_mean(n={len(sites)})"
        else:
            d_l, s_l = dens.median().to_numpy(), size.median().to_numpy()
            src = "bigbrain_median_80_sites"
        for i, layer in enumerate(LAYERS):
            rows.append(dict(area=name, layer=layer, thickness_mm=t[i], density_per_mm2=round(float(d_l[i]), 3),
                             cell_area_um2=round(float(s_l[i]), 3), cellular_source=src))
    return pd.DataFrame(rows)


def load_packaged() -> pd.DataFrame:
    """Read the packaged fallback copy of the reference table."""
    return _packaged(PACKAGED)


def derive_profiles(shared: Path) -> pd.DataFrame:
    """Per-area statistics of BigBrain's laminar profiles, as a tidy table (area, quantity, index, value).

    Darkness is ``1 - value / 65535`` (high = many cell bodies); vertices with a sample outside tissue or without
    valid layer thicknesses are dropped. Quantities: ``mean`` (18 depths, both hemispheres), ``pc1..pc18`` (the
    leading principal components of the within-area covariance pooled over the hemispheres, each scaled by the
    square root of its variance, so a column's deviation is ``sum z_k pc_k`` with standard normal ``z_k``),
    ``brain_sd`` (the left-right difference of the hemisphere means / sqrt 2, per depth) and ``fraction_sd`` (6
    values: the between-vertex sd of each layer's share of the thickness, relative to its mean share).
    """
    with np.load(shared / "bigbrain" / "bigbrain_profiles18_layers_areas.npz", allow_pickle=True) as d:
        names = [str(n) for n in d["economo_names"]]
        prof, thick, economo = d["profiles"], d["layer_thickness_mm"], d["economo"]
    rows: list[tuple[str, str, int, float]] = []
    for name, _ in AREAS:
        means, covs, counts, fracs = [], [], [], []
        for h in range(prof.shape[0]):
            t = thick[h]
            keep = (economo[h] == names.index(name)) & (prof[h] < OUTSIDE).all(1) & np.isfinite(t).all(1)
            dark = 1.0 - prof[h][keep].astype(np.float64) / OUTSIDE
            means.append(dark.mean(0))
            covs.append(np.cov(dark.T) * (len(dark) - 1))
            counts.append(len(dark))
            tk = t[keep].astype(np.float64)
            tk = tk[tk.sum(1) > 0]
            fracs.append(tk / tk.sum(1, keepdims=True))
        cov = sum(covs) / (sum(counts) - len(counts))
        val, vec = np.linalg.eigh(cov)
        order = np.argsort(val)[::-1][:N_PCS]
        quantities = {"mean": (means[0] * counts[0] + means[1] * counts[1]) / sum(counts),
                      "brain_sd": np.abs(means[0] - means[1]) / np.sqrt(2)}
        for k, j in enumerate(order):
            v = vec[:, j] * np.sign(vec[:, j].sum() or 1.0)  # sign convention: a darker column has z > 0
            quantities[f"pc{k + 1}"] = v * np.sqrt(val[j])
        f = np.vstack(fracs)
        f = f[np.isfinite(f).all(1)]
        quantities["fraction_sd"] = f.std(0) / np.maximum(f.mean(0), 1e-6)
        for q, values in quantities.items():
            rows += [(name, q, i, round(float(x), 7)) for i, x in enumerate(values)]
    return pd.DataFrame(rows, columns=["area", "quantity", "index", "value"])


def _packaged(name: str) -> pd.DataFrame:
    with resources.files(packaged_data).joinpath(name).open("r") as fh:
        return pd.read_csv(fh, comment="#")


def load_packaged_profiles() -> pd.DataFrame:
    """Read the packaged fallback copy of the profile statistics."""
    return _packaged(PACKAGED_PROFILES)


def _shared_or_packaged(derive, packaged) -> pd.DataFrame:
    shared = shared_data_dir()
    if shared is not None:
        try:
            return derive(shared)
        except (OSError, KeyError, ValueError):
            pass
    return packaged()


def load_reference() -> pd.DataFrame:
    """Reference table from the shared data when present, else from the packaged copy."""
    return _shared_or_packaged(derive_reference, load_packaged)


def load_profiles() -> pd.DataFrame:
    """Profile statistics from the shared data when present, else from the packaged copy."""
    return _shared_or_packaged(derive_profiles, load_packaged_profiles)


@dataclass(frozen=True)
class AreaModel:
    """Rendering parameters of one area.

    ``profile`` is the mean stain darkness at 18 equivolumetric depths, ``pcs`` [18, 18] the scaled principal
    components of its between-column variation and ``brain_sd`` [18] the between-brain sd (all BigBrain); layer
    fractions are von Economo's, each varying between columns by ``fraction_sd`` (relative, BigBrain).
    """

    name: str
    color: str
    fractions: np.ndarray  # von Economo thickness fractions of layers I..VI (sum 1)
    thickness_mm: float  # von Economo total thickness
    density: np.ndarray  # cells / mm² of section per layer (BigBrain cellular tables; sets the cell count)
    cell_area: np.ndarray  # µm² per layer (BigBrain cellular tables)
    profile: np.ndarray  # [18] mean darkness
    pcs: np.ndarray  # [N_PCS, 18]
    brain_sd: np.ndarray  # [18]
    fraction_sd: np.ndarray  # [6] relative
    betz_density: float  # giant layer-Vb pyramids / mm² (FA only)
    iv_sublayers: tuple[tuple[float, float], ...] = ((1.0, 1.0),)  # (share of IV, density factor), pia first


BETZ_AREA_UM2 = 2400.0  # cross-section of a ~40 x 75 µm giant Betz pyramid (layer Vb of area 4)
BETZ_DENSITY = 6.0  # Betz cells per mm² of section in layer Vb
#: striate cortex: IVa dense, IVb (stria of Gennari) cell-poor, IVc very dense (von Economo's OC)
STRIATE_IV = ((0.25, 1.05), (0.30, 0.8), (0.45, 1.1))


def _quantities(profiles: pd.DataFrame, area: str):
    """Accessor of one area's profile statistics: ``q("mean")`` -> values in index order."""
    own = profiles[profiles.area == area]

    def q(quantity: str) -> np.ndarray:
        rows = own[own.quantity == quantity].sort_values("index")
        if rows.empty:
            raise KeyError(f"profile statistics: no {quantity!r} for area {area}")
        return rows.value.to_numpy(float)

    return q


def area_models(ref: pd.DataFrame | None = None, profiles: pd.DataFrame | None = None) -> list[AreaModel]:
    """Turn the reference tables into per-area rendering models.

    Modelling rules on top of the measured values: OC's layer IV is split into IVa / cell-poor IVb (stria of
    Gennari) / dense IVc; FA gets sparse giant Betz cells in layer Vb.
    """
    ref = load_reference() if ref is None else ref
    profiles = load_profiles() if profiles is None else profiles
    models = []
    for name, color in AREAS:
        sub = ref[ref.area == name].set_index("layer").loc[list(LAYERS)]
        t = sub.thickness_mm.to_numpy(float)
        q = _quantities(profiles, name)
        models.append(AreaModel(
            name, color, t / t.sum(), float(t.sum()), sub.density_per_mm2.to_numpy(float).copy(),
            sub.cell_area_um2.to_numpy(float).copy(), q("mean"),
            np.stack([q(f"pc{k + 1}") for k in range(N_PCS)]), q("brain_sd"), q("fraction_sd"),
            BETZ_DENSITY if name == "FA" else 0.0, STRIATE_IV if name == "OC" else ((1.0, 1.0),)))
    return models
