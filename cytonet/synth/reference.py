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

When the shared folder is absent, a packaged copy of exactly these derived values is read from
``cytonet/data/synth_reference.csv`` (see ``cytonet/data/README.md``).  The modelling rules that turn these
values into rendering parameters (granular layer IV, Betz cells, brightness equalisation) live in
``area_model``.
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
    with resources.files(packaged_data).joinpath(PACKAGED).open("r") as fh:
        return pd.read_csv(fh, comment="#")


def load_reference() -> pd.DataFrame:
    """Reference table from the shared data when present, else from the packaged copy."""
    shared = shared_data_dir()
    if shared is not None:
        try:
            return derive_reference(shared)
        except (OSError, KeyError, ValueError):
            pass
    return load_packaged()


@dataclass(frozen=True)
class AreaModel:
    """Rendering parameters of one area (all per layer I..VI)."""

    name: str
    color: str
    fractions: np.ndarray  # thickness fractions (sum 1)
    thickness_mm: float  # von Economo total thickness
    density: np.ndarray  # cells / mm² of section, after modelling rules
    cell_area: np.ndarray  # µm²
    betz_density: float  # giant layer-V pyramids / mm² (FA only)
    iv_sublayers: tuple[tuple[float, float], ...] = ((1.0, 1.0),)  # (share of IV, density factor) pia first

    @property
    def od_per_layer(self) -> np.ndarray:
        """Expected cell coverage (area fraction) per layer: the reference darkness pattern."""
        cov = self.density * self.cell_area * 1e-6
        cov[4] += self.betz_density * BETZ_AREA_UM2 * 1e-6
        return cov


EQUALISE = 0.5  # partial brightness equalisation between areas (0 = measured densities, 1 = equal mean)
BETZ_AREA_UM2 = 900.0  # ~34 µm soma diameter (giant Betz pyramids, layer Vb of area 4)
KONIO_IV_FACTOR = 1.6  # koniocortex (von Economo type 5: OC, PB): dense granular layer IV
#: striate cortex: IVa dense, IVb (stria of Gennari) cell-poor, IVc very dense (mean factor 1)
STRIATE_IV = ((0.25, 0.8), (0.30, 0.45), (0.45, 1.6))


def area_models(ref: pd.DataFrame | None = None, equalise: float = EQUALISE) -> list[AreaModel]:
    """Turn the reference table into per-area rendering models.

    Rules (modelling assumptions on top of the measured values): koniocortex (OC, PB) gets a denser layer IV, split
    in OC into IVa / cell-poor IVb (stria of Gennari) / dense IVc; FA gets sparse giant Betz cells in layer Vb;
    densities are then scaled per area so that the mean cortical darkness moves towards the mean of all areas
    (``equalise`` = 1: equal), so areas differ by lamination only.
    """
    ref = load_reference() if ref is None else ref
    models = []
    for name, color in AREAS:
        sub = ref[ref.area == name].set_index("layer").loc[list(LAYERS)]
        t = sub.thickness_mm.to_numpy(float)
        dens = sub.density_per_mm2.to_numpy(float).copy()
        size = sub.cell_area_um2.to_numpy(float).copy()
        betz = 0.0
        if name in ("OC", "PB"):
            dens[3] *= KONIO_IV_FACTOR
        if name == "FA":
            betz = 12.0
        models.append(AreaModel(name, color, t / t.sum(), float(t.sum()), dens, size, betz))
    mean_od = np.array([m.fractions @ m.od_per_layer for m in models])
    target = mean_od.mean()
    out = []
    for m, od in zip(models, mean_od):
        f = (target / od) ** equalise
        out.append(AreaModel(m.name, m.color, m.fractions, m.thickness_mm, m.density * f, m.cell_area,
                             m.betz_density * f, m.iv_sublayers))
    return out
