"""Separation metrics of ``cytonet embed`` (:mod:`cytonet.analysis.embed`), all cosine / on L2-normalised
features: silhouettes, kNN (leave-one-out, leave-one-brain-out, known -> unknown brains) and the separation of an
area pair (centroid distance over spread, out-of-fold Fisher score and ROC AUC of LDA and logistic regression)."""

from __future__ import annotations

from typing import Any

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine geometry); zero rows stay zero."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def silhouette_per_area(x: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Mean cosine silhouette overall and per label (needs >= 2 labels)."""
    from sklearn.metrics import silhouette_samples

    if len(np.unique(labels)) < 2:
        return {"overall": None, "per_area": {}}
    s = silhouette_samples(x, labels, metric="cosine")
    return {"overall": float(s.mean()),
            "per_area": {(a.item() if isinstance(a, np.generic) else a): float(s[labels == a].mean())
                         for a in np.unique(labels)}}


def _vote(neigh_labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    # Majority vote; ties go to the class of the nearest neighbour among the tied classes.
    counts = (neigh_labels[:, :, None] == classes[None, None, :]).sum(1)
    best = counts == counts.max(1, keepdims=True)
    pred = np.empty(len(neigh_labels), classes.dtype)
    for i in range(len(neigh_labels)):
        tied = set(classes[best[i]].tolist())
        pred[i] = next(lab for lab in neigh_labels[i] if lab in tied)
    return pred


def _accuracy_report(y: np.ndarray, pred: np.ndarray, train_labels: np.ndarray | None = None) -> dict[str, Any]:
    classes = np.unique(y)
    per = {int(a): float((pred[y == a] == a).mean()) for a in classes}
    ref = y if train_labels is None else train_labels
    share = np.unique(ref, return_counts=True)[1] / len(ref)
    return {"n": int(len(y)), "accuracy": float((pred == y).mean()),
            "balanced_accuracy": float(np.mean(list(per.values()))),
            "chance_accuracy": float(share.max()), "chance_balanced": float(1.0 / max(1, len(np.unique(ref)))),
            "per_area": per}


def knn_loo(x: np.ndarray, labels: np.ndarray, k: int = 10) -> dict[str, Any]:
    """Leave-one-out kNN (cosine) accuracy overall, balanced, and per area (= recall of that area)."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(x) - 1)
    if k < 1:
        return {"k": k, "n": int(len(x)), "accuracy": None, "balanced_accuracy": None, "per_area": {}}
    idx = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(x).kneighbors(x, return_distance=False)
    # Drop the point itself (with duplicates it need not come first), keep the k nearest others.
    rows = np.arange(len(x))[:, None]
    keep = np.where(idx == rows, -1, idx)
    neigh = np.array([r[r >= 0][:k] for r in keep])
    pred = _vote(labels[neigh], np.unique(labels))
    return {"k": k, **_accuracy_report(labels, pred)}


def knn_transfer(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 k: int = 10) -> dict[str, Any]:
    """kNN (cosine) fit on one set, scored on another (e.g. known -> unknown brains)."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(x_train))
    idx = NearestNeighbors(n_neighbors=k, metric="cosine").fit(x_train).kneighbors(x_test, return_distance=False)
    pred = _vote(y_train[idx], np.unique(y_train))
    return {"k": k, **_accuracy_report(y_test, pred, y_train)}


def knn_leave_one_brain_out(x: np.ndarray, labels: np.ndarray, brains: np.ndarray,
                            k: int = 10) -> dict[str, Any] | None:
    """kNN predicting each brain from all other brains (no spatial neighbours of the same brain help)."""
    ub = np.unique(brains)
    if len(ub) < 2:
        return None
    pred = np.empty_like(labels)
    for b in ub:
        te = brains == b
        from sklearn.neighbors import NearestNeighbors

        kk = min(k, int((~te).sum()))
        idx = NearestNeighbors(n_neighbors=kk, metric="cosine").fit(x[~te]).kneighbors(x[te], return_distance=False)
        pred[te] = _vote(labels[~te][idx], np.unique(labels[~te]))
    return {"k": k, "brains": [str(b) for b in ub], **_accuracy_report(labels, pred)}


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else None


def _fisher(y: np.ndarray, score: np.ndarray) -> float:
    a, b = score[y == 1], score[y == 0]
    return float((a.mean() - b.mean()) ** 2 / max(a.var() + b.var(), 1e-12))


def pair_separation(x: np.ndarray, is_a: np.ndarray, groups: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """How well two classes (e.g. FA = True, PB = False) separate in feature space (rows L2-normalised inside).

    ``separation_ratio``: distance between the class centroids / mean within-class RMS distance to the own
    centroid (scale-free; > 1 means the centroids are further apart than a typical point is from its centroid).
    ``fisher_lda`` / ``auc_lda`` / ``auc_logistic``: out-of-fold 1D projections, folds = ``groups`` (brains)
    when at least two groups hold both classes, else 5 stratified folds, so in-sample overfitting of a
    high-dimensional direction cannot inflate them.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import LeaveOneGroupOut, StratifiedKFold

    x = l2_normalize(np.asarray(x, np.float64))
    y = np.asarray(is_a).astype(int)
    n_a, n_b = int(y.sum()), int((1 - y).sum())
    res: dict[str, Any] = {"n_a": n_a, "n_b": n_b}
    if n_a < 2 or n_b < 2:
        return {**res, "separation_ratio": None, "fisher_lda": None, "auc_lda": None, "auc_logistic": None, "cv": None}
    res.update(_centroid_stats(x, y))
    # Folds: whole brains when possible (the honest "unseen brain" setting), else stratified folds.
    splits, cv = None, None
    if groups is not None and len(np.unique(groups)) >= 2:
        splits = list(LeaveOneGroupOut().split(x, y, groups))
        cv = f"leave-one-brain-out ({len(np.unique(groups))} brains)"
    if splits is None:
        n_folds = int(min(5, n_a, n_b))
        if n_folds < 2:
            return {**res, "fisher_lda": None, "auc_lda": None, "auc_logistic": None, "cv": None}
        splits = list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(x, y))
        cv = f"{n_folds}-fold stratified"
    lda_s, log_s, tested = np.zeros(len(y)), np.zeros(len(y)), np.zeros(len(y), bool)
    for tr, te in splits:
        if len(np.unique(y[tr])) < 2:
            continue
        lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x[tr], y[tr])
        lda_s[te] = lda.decision_function(x[te])
        log = LogisticRegression(C=1.0, max_iter=2000).fit(x[tr], y[tr])
        log_s[te] = log.decision_function(x[te])
        tested[te] = True
    yt = y[tested]
    res.update(cv=cv, n_tested=int(tested.sum()), fisher_lda=_fisher(yt, lda_s[tested]),
               auc_lda=_auc(yt, lda_s[tested]), auc_logistic=_auc(yt, log_s[tested]))
    return res


def _centroid_stats(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Centroid distance, within-class RMS spreads and their ratio for labels y in {0, 1} (x L2-normalised)."""
    ca, cb = x[y == 1].mean(0), x[y == 0].mean(0)
    wa = float(np.sqrt(((x[y == 1] - ca) ** 2).sum(1).mean()))
    wb = float(np.sqrt(((x[y == 0] - cb) ** 2).sum(1).mean()))
    between = float(np.linalg.norm(ca - cb))
    return {"centroid_distance": between, "within_rms_a": wa, "within_rms_b": wb,
            "separation_ratio": between / max(0.5 * (wa + wb), 1e-12)}


def border_subset(xyz: np.ndarray, is_a: np.ndarray, brains: np.ndarray, radius_mm: float) -> np.ndarray:
    """Mask of patches within ``radius_mm`` (3D) of a patch of the other class in the same brain (the border zone)."""
    from scipy.spatial import cKDTree

    near = np.zeros(len(xyz), bool)
    for b in np.unique(brains):
        m = brains == b
        a, o = np.flatnonzero(m & is_a), np.flatnonzero(m & ~is_a)
        if len(a) == 0 or len(o) == 0:
            continue
        near[a] = cKDTree(xyz[o]).query(xyz[a], k=1)[0] <= radius_mm
        near[o] = cKDTree(xyz[a]).query(xyz[o], k=1)[0] <= radius_mm
    return near


def pair_transfer(x_tr: np.ndarray, a_tr: np.ndarray, x_te: np.ndarray, a_te: np.ndarray) -> dict[str, Any]:
    """Pair classifiers trained on known brains, AUC on unknown brains."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression

    x_tr, x_te = l2_normalize(x_tr.astype(np.float64)), l2_normalize(x_te.astype(np.float64))
    res = {"n_a": int(a_te.sum()), "n_b": int((~a_te).sum()), "cv": "train known, test unknown"}
    if len(np.unique(a_tr)) < 2 or len(np.unique(a_te)) < 2:
        return res
    res.update(_centroid_stats(x_te, a_te.astype(int)))  # geometry of the unseen brain(s) alone
    lda = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(x_tr, a_tr)
    log = LogisticRegression(C=1.0, max_iter=2000).fit(x_tr, a_tr)
    ls = lda.decision_function(x_te)
    res.update(auc_lda=_auc(a_te.astype(int), ls), fisher_lda=_fisher(a_te.astype(int), ls),
               auc_logistic=_auc(a_te.astype(int), log.decision_function(x_te)))
    return res



def _ratio_2d(e: np.ndarray, is_a: np.ndarray) -> float | None:
    if is_a.sum() < 2 or (~is_a).sum() < 2:
        return None
    ca, cb = e[is_a].mean(0), e[~is_a].mean(0)
    w = 0.5 * (np.sqrt(((e[is_a] - ca) ** 2).sum(1).mean()) + np.sqrt(((e[~is_a] - cb) ** 2).sum(1).mean()))
    return float(np.linalg.norm(ca - cb) / max(w, 1e-12))
