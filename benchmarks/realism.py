"""Helpers of ``bench_phantom_realism.py``: laminar profiles of real (BigBrain) and demo cortex, and the metrics.

Both sides are turned into the same kind of sample: 18 stain-darkness values at equal steps of normalised
cortical depth (0 = pial side, 1 = white-matter side) plus the thickness in mm of layers I..VI. BigBrain gives
them per surface vertex; the demo gives them per cortical column, the cortex pixels whose nearest pial-surface
pixel falls in one ``column_mm`` square tile, depth from distance transforms of the ground-truth layer map.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

N_BINS = 18
OUTSIDE = 65535  # BigBrain: the sample fell outside tissue
WHITE_MATTER = 7  # demo layer map: 0 none, 1..6 layers I..VI, 7 white matter


@dataclass
class Samples:
    """Laminar samples of one data set: profiles [N, 18], thickness [N, 6] mm, area label [N], group [N]."""

    profiles: np.ndarray
    thickness: np.ndarray
    area: np.ndarray
    group: np.ndarray  # BigBrain: hemisphere "L"/"R"; demo: role "known"/"unknown"

    def select(self, keep: np.ndarray) -> Samples:
        return Samples(self.profiles[keep], self.thickness[keep], self.area[keep], self.group[keep])

    def features(self, with_thickness: bool) -> np.ndarray:
        return np.hstack([self.profiles, self.thickness]) if with_thickness else self.profiles


# ----------------------------------------------------------------------------------------------- BigBrain
def load_bigbrain(npz: Path, areas: list[str]) -> tuple[Samples, dict[str, int]]:
    """Vertices of the named von Economo areas in both hemispheres, outside-tissue vertices dropped.

    Returns the samples (profiles as darkness 1 - value/65535) and the mapping area name -> economo index.
    """
    with np.load(npz, allow_pickle=True) as d:
        names = [str(n) for n in d["economo_names"]]
        missing = [a for a in areas if a not in names]
        if missing:
            raise KeyError(f"{npz}: economo_names lacks {missing} (has {names})")
        index = {a: names.index(a) for a in areas}
        prof, thick, economo = d["profiles"], d["layer_thickness_mm"], d["economo"]
        hemi = d["hemi"] if "hemi" in d.files else None
    if hemi is None:  # the full file: [hemisphere, vertex, ...]
        hemi = np.repeat([0, 1], prof.shape[1])
        prof, thick, economo = prof.reshape(-1, prof.shape[-1]), thick.reshape(-1, 6), economo.ravel()
    label = np.full(economo.shape, "", dtype=object)
    for a, i in index.items():
        label[economo == i] = a
    keep = (label != "") & (prof < OUTSIDE).all(axis=1) & np.isfinite(thick).all(axis=1)
    dark = 1.0 - prof[keep].astype(np.float64) / OUTSIDE
    group = np.where(np.asarray(hemi)[keep] == 0, "L", "R")
    return Samples(dark, thick[keep].astype(np.float64), label[keep].astype(str), group), index


# --------------------------------------------------------------------------------------------------- demo
def column_profiles(image: np.ndarray, layer: np.ndarray, area: np.ndarray, tissue: np.ndarray,
                    pixel_size_um: float, column_mm: float = 0.5, n_bins: int = N_BINS, n_fine: int = 60,
                    min_purity: float = 0.9, min_per_bin: int = 3) -> dict[str, np.ndarray]:
    """Laminar profiles of one demo section, one per cortical column.

    ``image`` uint8 (dark = stain), ``layer`` 0/1..6/7, ``area`` id (0 = none), ``tissue`` bool. A column keeps
    when ``min_purity`` of its pixels share one area and every depth bin holds ``min_per_bin`` tissue pixels.
    Layer fractions come from ``n_fine`` depth slices (the majority layer of each), so they are fractions of
    depth, not of pixel counts (which a curved column would bias). Returns ``profiles`` [N, n_bins] (darkness
    0..1), ``thickness`` [N, 6] mm, ``local_thickness`` [N] mm, ``area`` [N], ``bin_edges`` [n_bins + 1] and
    ``coverage`` (the share of cortex pixels that lie in kept columns).
    """
    cortex = (layer >= 1) & (layer <= 6)
    d_pial, (iy, ix) = ndimage.distance_transform_edt(layer != 0, return_indices=True)
    d_wm = ndimage.distance_transform_edt(layer != WHITE_MATTER)
    tile = max(1, int(round(column_mm * 1000 / pixel_size_um)))
    py, px = iy[cortex] // tile, ix[cortex] // tile
    _, col = np.unique(py * (layer.shape[1] // tile + 1) + px, return_inverse=True)
    n_col = int(col.max()) + 1 if col.size else 0
    dp, dw = d_pial[cortex], d_wm[cortex]
    depth = dp / (dp + dw)
    local = np.bincount(col, (dp + dw - 1) * pixel_size_um / 1000, n_col) / np.maximum(np.bincount(col), 1)
    fine = np.minimum((depth * n_fine).astype(np.int64), n_fine - 1)
    counts = np.bincount((col * n_fine + fine) * 8 + layer[cortex], minlength=n_col * n_fine * 8)
    counts = counts.reshape(n_col, n_fine, 8)[:, :, 1:7]
    major = np.where(counts.sum(-1) > 0, counts.argmax(-1), -1)
    frac = np.stack([(major == k).sum(1) for k in range(6)], 1) / np.maximum((major >= 0).sum(1), 1)[:, None]
    tis = tissue[cortex]
    b = np.minimum((depth * n_bins).astype(np.int64), n_bins - 1)
    key = (col * n_bins + b)[tis]
    dark = 1.0 - image[cortex][tis] / 255.0
    n_px = np.bincount(key, minlength=n_col * n_bins).reshape(n_col, n_bins)
    prof = np.bincount(key, dark, n_col * n_bins).reshape(n_col, n_bins) / np.maximum(n_px, 1)
    a_counts = np.bincount(col * 256 + area[cortex], minlength=n_col * 256).reshape(n_col, 256)
    a_major = a_counts.argmax(1)
    purity = a_counts.max(1) / np.maximum(a_counts.sum(1), 1)
    keep = (a_major > 0) & (purity >= min_purity) & (n_px >= min_per_bin).all(1)
    coverage = float(keep[col].mean()) if col.size else 0.0
    return dict(profiles=prof[keep], thickness=frac[keep] * local[keep, None], local_thickness=local[keep],
                area=a_major[keep], bin_edges=np.linspace(0, 1, n_bins + 1), coverage=np.float64(coverage))


def _png(path: Path) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"demo ground truth missing: {path}")
    return np.asarray(Image.open(path))


def section_samples(row: Any, column_mm: float = 0.5) -> dict[str, np.ndarray]:
    """Column profiles of one demo section: a row of ``cytonet.io.tables.load_sections`` (absolute paths).

    The layer and tissue maps lie beside the area ground truth (``truth/<section>_{area,layer,tissue}.png``).
    """
    from cytonet.io.readers import open_section

    sid = str(row["section_id"])
    sec = open_section(row["image"])
    image = sec.region(0, 0, 0, *sec.levels[0].shape)
    truth = Path(row["ground_truth"]).parent
    layer, area = _png(truth / f"{sid}_layer.png"), _png(truth / f"{sid}_area.png")
    tissue = _png(truth / f"{sid}_tissue.png") > 0
    if not (image.shape == layer.shape == area.shape == tissue.shape):
        raise ValueError(f"{row['image']}: section {sid}: image {image.shape} and truth maps "
                         f"{layer.shape}/{area.shape}/{tissue.shape} differ in shape")
    return column_profiles(image, layer, area, tissue, float(row["pixel_size_um"]), column_mm)


def load_demo_names(demo_dir: Path) -> list[str]:
    """Area names of a demo, in area-id order (``areas.csv``)."""
    from cytonet.io.tables import load_areas

    return [str(n) for n in load_areas(demo_dir / "areas.csv")["name"]]


def load_demo(demo_dir: Path, column_mm: float = 0.5) -> tuple[Samples, dict[int, str], dict[str, dict]]:
    """Column samples of every section of every demo brain; group = the brain's role (known/unknown).

    Returns the samples (area as name), the area id -> name map of ``areas.csv`` and, per section, its number
    of columns and their pixel coverage.
    """
    from cytonet.io.tables import load_all_sections, load_areas

    areas = load_areas(demo_dir / "areas.csv")
    names = {int(i): str(n) for i, n in zip(areas["area_id"], areas["name"])}
    parts, per_section = [], {}
    for _, row in load_all_sections(demo_dir / "brains.csv").iterrows():
        s = section_samples(row, column_mm)
        per_section[row["section_id"]] = dict(columns=len(s["area"]), coverage=float(s["coverage"]))
        parts.append((s, row["role"]))
    prof = np.vstack([s["profiles"] for s, _ in parts])
    thick = np.vstack([s["thickness"] for s, _ in parts])
    area = np.concatenate([[names[int(a)] for a in s["area"]] for s, _ in parts]).astype(str)
    group = np.concatenate([[role] * len(s["area"]) for s, role in parts]).astype(str)
    return Samples(prof, thick, area, group), names, per_section


def subsample(s: Samples, max_per: int, seed: int = 0) -> Samples:
    """At most ``max_per`` samples per (group, area), drawn at random with a fixed seed."""
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(s.area), bool)
    for g in np.unique(s.group):
        for a in np.unique(s.area):
            idx = np.flatnonzero((s.group == g) & (s.area == a))
            keep[rng.choice(idx, min(max_per, len(idx)), replace=False)] = True
    return s.select(keep)


# ------------------------------------------------------------------------------------------------ metrics
def _classifier():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=3000))


def macro_f1(train: Samples, test: Samples, areas: list[str], with_thickness: bool) -> float:
    """Macro-F1 over ``areas`` of a linear classifier trained on ``train``, tested on ``test``."""
    from sklearn.metrics import f1_score

    clf = _classifier().fit(train.features(with_thickness), train.area)
    return float(f1_score(test.area, clf.predict(test.features(with_thickness)), labels=areas, average="macro"))


def pair_auc(train: Samples, test: Samples, a: str, b: str, with_thickness: bool = False) -> float:
    """Test AUC of a two-class linear classifier of area ``a`` against ``b`` (``b`` = positive class)."""
    from sklearn.metrics import roc_auc_score

    tr, te = train.select(np.isin(train.area, [a, b])), test.select(np.isin(test.area, [a, b]))
    if len(np.unique(tr.area)) < 2 or len(np.unique(te.area)) < 2:
        raise ValueError(f"pair {a}-{b}: both areas are needed in train and test "
                         f"(train has {sorted(set(tr.area))}, test has {sorted(set(te.area))})")
    clf = _classifier().fit(tr.features(with_thickness), tr.area == b)
    return float(roc_auc_score(te.area == b, clf.decision_function(te.features(with_thickness))))


def all_pair_aucs(train: Samples, test: Samples, areas: list[str]) -> dict[str, float]:
    """Pair AUC (profiles only) for every pair of ``areas``, keyed ``"A-B"``."""
    return {f"{a}-{b}": pair_auc(train, test, a, b) for a, b in combinations(areas, 2)}
