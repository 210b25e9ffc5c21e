"""Classical baseline: laminar intensity profile features + standardised logistic regression (no torch).

Cytoarchitectonic areas differ mainly in their laminar pattern: the order, thickness and cell density of the
layers across the cortical depth. A patch's orientation relative to the cortex is unknown, so the features are
made orientation-robust:

1. **Oriented laminar profile.** The stain image (dark = stain, mapped to ``1 - x/255`` so high = cells) is
   smoothed (Gaussian, sigma = S/16) and its structure tensor, weighted by a Gaussian window around the
   centre, gives the dominant gradient direction: the normal to the layers. The (lightly smoothed) stain is
   sampled on a strip through the centre along that normal: ``N_PROFILE`` points at fixed spacing over
   90 % of the patch, each averaged over ``N_ACROSS`` points along the layers (so single cells average out).
   The normal has no sign, so the profile is sign-normalised: it is reversed when needed so the stronger-stained
   half comes first. Features: this profile, its absolute first difference, and the symmetric part
   ``(p + p[::-1]) / 2`` (invariant to the sign whatever the normalisation picked).
2. **Rotation-invariant profiles.** Mean stain in ``N_RINGS`` annuli around the centre, and the radially
   averaged log power spectrum in ``N_BANDS`` frequency bands (layer spacing / cell size), both unchanged by
   rotation.
3. **Texture statistics.** Mean, std and 10/50/90th percentiles of the stain, mean gradient magnitude of the
   smoothed stain, structure-tensor coherence (how laminar the patch is) and the fraction of "cell" pixels
   (stain well above the smoothed local background).

Intensities are not standardised per patch: absolute cell density separates areas (as in cytonet.nn.models).
The classifier is ``StandardScaler`` + ``LogisticRegression`` (lbfgs, multinomial, class-balanced weights to
match the class-balanced sampling of finetuning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

FEATURE_VERSION = 1
N_PROFILE = 16    # samples along the layer normal
N_ACROSS = 9      # samples along the layers averaged into one profile point
N_RINGS = 8       # annuli of the radial profile
N_BANDS = 8       # radial frequency bands of the power spectrum


def _stain(patches: np.ndarray) -> np.ndarray:
    """uint8 [N,S,S] (dark = stain) -> float32 stain in [0, 1] (high = cells)."""
    return 1.0 - np.asarray(patches, np.float32) / 255.0


def _bilinear(img: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sample images [N,S,S] at per-image points y, x [N, ...] (bilinear, clamped at the border)."""
    n, h, w = img.shape
    y = np.clip(y, 0, h - 1.0)
    x = np.clip(x, 0, w - 1.0)
    y0 = np.minimum(np.floor(y).astype(np.int64), h - 2)
    x0 = np.minimum(np.floor(x).astype(np.int64), w - 2)
    fy, fx = y - y0, x - x0
    b = np.arange(n).reshape((n,) + (1,) * (y.ndim - 1))
    v00, v01 = img[b, y0, x0], img[b, y0, x0 + 1]
    v10, v11 = img[b, y0 + 1, x0], img[b, y0 + 1, x0 + 1]
    return (v00 * (1 - fy) * (1 - fx) + v01 * (1 - fy) * fx + v10 * fy * (1 - fx) + v11 * fy * fx)


def _ring_index(size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Annulus index of every pixel (centre at (S-1)/2) out to the inscribed circle; -1 outside."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - c, xx - c) / (size / 2.0)
    idx = np.where(r < 1.0, np.minimum((r * n).astype(np.int64), n - 1), -1)
    return idx, r


def _freq_band(size: int, n: int) -> np.ndarray:
    """Band index of every unshifted FFT bin by radial frequency |k| (up to Nyquist), -1 beyond."""
    f = np.fft.fftfreq(size)
    r = np.hypot(f[:, None], f[None, :]) / 0.5  # exact rot90 symmetry: built from |k|, not a shifted grid
    return np.where(r <= 1.0, np.minimum((r * n).astype(np.int64), n - 1), -1)


def profile_features(patches: np.ndarray, block: int = 1024) -> np.ndarray:
    """Orientation-robust laminar features float32 [N, F] of uint8 patches [N, S, S] (see module docstring)."""
    patches = np.asarray(patches)
    if patches.ndim != 3 or patches.shape[1] != patches.shape[2]:
        raise ValueError(f"patches must be uint8 [N, S, S], got shape {patches.shape}")
    if len(patches) > block:  # bounded memory: the intermediates are ~10 float arrays of the batch
        return np.concatenate([profile_features(patches[i:i + block], block) for i in range(0, len(patches), block)])
    n, size, _ = patches.shape
    if n == 0:
        return np.zeros((0, n_features()), np.float32)
    s = _stain(patches)
    c = (size - 1) / 2.0
    sig = max(1.0, size / 16.0)
    smooth = ndimage.gaussian_filter(s, sigma=(0, sig, sig), mode="reflect")
    fine = ndimage.gaussian_filter(s, sigma=(0, 1.0, 1.0), mode="reflect")
    gy = ndimage.sobel(smooth, axis=1, mode="reflect")
    gx = ndimage.sobel(smooth, axis=2, mode="reflect")

    # Structure tensor under a centred Gaussian window (the orientation at the patch centre matters most).
    yy, xx = np.mgrid[0:size, 0:size]
    win = np.exp(-((yy - c) ** 2 + (xx - c) ** 2) / (2 * (size / 4.0) ** 2)).astype(np.float32)
    jxx = (gx * gx * win).sum((1, 2))
    jyy = (gy * gy * win).sum((1, 2))
    jxy = (gx * gy * win).sum((1, 2))
    theta = 0.5 * np.arctan2(2 * jxy, jxx - jyy)  # direction of the largest eigenvector (the layer normal)
    lam_sum = jxx + jyy
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy ** 2) / np.maximum(lam_sum, 1e-12)
    nx, ny = np.cos(theta), np.sin(theta)

    # Strip through the centre: t along the normal, u along the layers.
    half = 0.45 * size
    t = np.linspace(-half, half, N_PROFILE)
    u = np.linspace(-0.2 * size, 0.2 * size, N_ACROSS)
    py = c + t[None, :, None] * ny[:, None, None] + u[None, None, :] * nx[:, None, None]
    px = c + t[None, :, None] * nx[:, None, None] - u[None, None, :] * ny[:, None, None]
    prof = _bilinear(fine, py, px).mean(axis=2)  # [N, N_PROFILE]
    # Sign normalisation: the more strongly stained half first.
    h = N_PROFILE // 2
    flip = prof[:, :h].sum(1) < prof[:, -h:].sum(1)
    prof = np.where(flip[:, None], prof[:, ::-1], prof)
    dprof = np.abs(np.diff(prof, axis=1))
    sym = 0.5 * (prof + prof[:, ::-1])[:, :h]  # symmetric part; its second half repeats the first

    # Rotation-invariant radial profile and power-spectrum bands.
    ring, _ = _ring_index(size, N_RINGS)
    flat = fine.reshape(n, -1)
    rflat = ring.reshape(-1)
    radial = np.stack([flat[:, rflat == k].mean(1) for k in range(N_RINGS)], axis=1)
    spec = np.abs(np.fft.fft2(s - s.mean((1, 2), keepdims=True))) ** 2
    sflat = spec.reshape(n, -1)
    bflat = _freq_band(size, N_BANDS).reshape(-1)
    bands = np.log1p(np.stack([sflat[:, bflat == k].mean(1) for k in range(N_BANDS)], axis=1))

    # Texture statistics.
    pct = np.percentile(s.reshape(n, -1), [10, 50, 90], axis=1).T
    gmag = np.hypot(gx, gy).mean((1, 2))
    cells = (s - smooth > 0.1).mean((1, 2))  # stain well above the local background: cell bodies
    stats = np.column_stack([s.mean((1, 2)), s.std((1, 2)), pct, gmag, coherence, cells])
    return np.concatenate([prof, dprof, sym, radial, bands, stats], axis=1).astype(np.float32)


def n_features() -> int:
    """Length of the feature vector of profile_features."""
    return N_PROFILE + (N_PROFILE - 1) + N_PROFILE // 2 + N_RINGS + N_BANDS + 8


@dataclass
class ProfileBaseline:
    """A fitted baseline: sklearn pipeline (scaler + logistic regression) and its class labels (area ids)."""

    pipeline: Any
    classes: np.ndarray
    seed: int
    feature_version: int = FEATURE_VERSION
    info: dict = field(default_factory=dict)


def fit_profile_baseline_features(features: np.ndarray, labels: np.ndarray, seed: int = 0,
                                  c: float = 1.0) -> ProfileBaseline:
    """Fit scaler + logistic regression on precomputed profile features (labels: area ids)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
    if len(np.unique(labels)) < 2:
        raise ValueError("the profile baseline needs at least two classes in its training labels")
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, class_weight="balanced",
                                                              random_state=seed))
    pipe.fit(features, labels)
    return ProfileBaseline(pipe, np.asarray(pipe.classes_), int(seed),
                           info={"n_train": int(len(labels)), "C": c, "n_features": int(features.shape[1])})


def fit_profile_baseline(patches: np.ndarray, labels: np.ndarray, seed: int = 0) -> ProfileBaseline:
    """Fit the laminar-profile baseline on uint8 patches [N,S,S] with area-id labels [N]."""
    return fit_profile_baseline_features(profile_features(patches), labels, seed)


def predict_profile_baseline_features(model: ProfileBaseline, features: np.ndarray) -> np.ndarray:
    """Class probabilities float32 [N, n_classes] (columns in model.classes order) from precomputed features."""
    if model.feature_version != FEATURE_VERSION:
        raise ValueError(f"baseline was fitted with feature version {model.feature_version}, "
                         f"code has {FEATURE_VERSION}")
    if len(features) == 0:
        return np.zeros((0, len(model.classes)), np.float32)
    return model.pipeline.predict_proba(features).astype(np.float32)


def predict_profile_baseline(model: ProfileBaseline, patches: np.ndarray) -> np.ndarray:
    """Class probabilities float32 [N, n_classes] (columns in model.classes order) for uint8 patches [N,S,S]."""
    return predict_profile_baseline_features(model, profile_features(patches))


def save_baseline(model: ProfileBaseline, path: str | Path) -> None:
    """Write the fitted baseline with joblib (temp file, then rename)."""

    import joblib

    from cytonet.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        joblib.dump(model, tmp)


def load_baseline(path: str | Path) -> ProfileBaseline:
    """Read a baseline written by save_baseline."""
    import joblib

    return joblib.load(path)
