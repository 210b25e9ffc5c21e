"""Classification scores, written once: confusion counts, accuracy, per-class F1 and IoU, macro-F1, coverage.

Two forms of the same counts: a dense matrix over class indices (patch evaluation, finetune validation) and sparse
``{true id: {predicted value: count}}`` over area ids, where predicted values may also be 0 (outside tissue) or the
map's "uncertain" value (section metrics and their aggregation). Both reduce to true/false positives and false
negatives per class, and :func:`f1_iou` turns those into scores.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# Status of one section's metrics summary (section metrics write it, aggregation reads it).
STATUS_OK = "ok"
STATUS_NO_GT = "no_ground_truth"


def f1_iou(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F1 = 2tp / (2tp + fp + fn) and IoU = tp / (tp + fp + fn), float64; NaN where a class has no count."""
    tp, fp, fn = (np.asarray(v, np.float64) for v in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / denom, np.nan)
        iou = np.where(denom > 0, tp / (tp + fp + fn), np.nan)
    return f1, iou


# ------------------------------------------------------------------------------------------ dense, class indices
def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix int64 [n, n] of class indices 0..n-1: rows = true, columns = predicted."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    if len(y_true) and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= n_classes):
        raise ValueError(f"class indices must lie in [0, {n_classes})")
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def metrics_from_confusion(cm: np.ndarray) -> dict[str, object]:
    """accuracy, per-class F1 (NaN for classes absent from the ground truth), macro-F1 over present classes."""
    cm = np.asarray(cm, np.float64)
    n = cm.sum()
    tp = np.diag(cm)
    support = cm.sum(1)           # true count per class
    predicted = cm.sum(0)
    present = support > 0
    f1, _ = f1_iou(tp, predicted - tp, support - tp)
    f1 = np.where(present, f1, np.nan)
    return {"accuracy": float(tp.sum() / n) if n else float("nan"),
            "macro_f1": float(np.nanmean(f1)) if present.any() else float("nan"),
            "f1": f1, "support": support.astype(np.int64), "n": int(n)}


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, object]:
    """Metrics of class-index arrays; adds the confusion matrix under key ``confusion``."""
    cm = confusion(y_true, y_pred, n_classes)
    return {**metrics_from_confusion(cm), "confusion": cm}


# ------------------------------------------------------------------------------------------- sparse, area ids
def confusion_counts(truth: np.ndarray, pred: np.ndarray) -> dict[int, dict[int, int]]:
    """{true id: {predicted value: count}} over cortex cells (truth > 0)."""
    cortex = truth > 0
    t, p = truth[cortex].astype(np.int64), pred[cortex].astype(np.int64)
    out: dict[int, dict[int, int]] = {}
    if t.size == 0:
        return out
    pairs, n = np.unique(np.stack([t, p]), axis=1, return_counts=True)
    for (a, b), k in zip(pairs.T, n):
        out.setdefault(int(a), {})[int(b)] = int(k)
    return out


def scores_from_confusion(confusion: dict[int, dict[int, int]], area_ids: list[int] | None = None,
                          uncertain: int = 255) -> pd.DataFrame:
    """Per-area tp/fp/fn/n_px/f1/iou from confusion counts (cortex cells only); rows for areas in truth or pred.

    Predicted 0 (outside tissue) and ``uncertain`` are never an area: they only add false negatives.
    """
    conf = {int(t): {int(p): int(k) for p, k in row.items()} for t, row in confusion.items()}
    present = set(conf)
    predicted = {p for row in conf.values() for p in row if p not in (0, uncertain)}
    ids = sorted(present | predicted) if area_ids is None else [a for a in area_ids if a in present | predicted]
    tp = np.array([conf.get(a, {}).get(a, 0) for a in ids], np.int64)
    n_px = np.array([sum(conf.get(a, {}).values()) for a in ids], np.int64)
    fp = np.array([sum(row.get(a, 0) for t, row in conf.items() if t != a) for a in ids], np.int64)
    fn = n_px - tp
    f1, iou = f1_iou(tp, fp, fn)
    return pd.DataFrame({"area_id": np.array(ids, np.int64), "tp": tp, "fp": fp, "fn": fn, "n_px": n_px,
                         "f1": f1, "iou": iou}, columns=["area_id", "tp", "fp", "fn", "n_px", "f1", "iou"])


def summary_from_confusion(confusion: dict[int, dict[int, int]], uncertain: int = 255) -> dict[str, float]:
    """accuracy, macro_f1 (areas present in the truth), coverage and n_cortex_px of confusion counts."""
    per = scores_from_confusion(confusion, uncertain=uncertain)
    n = sum(sum(r.values()) for r in confusion.values())
    correct = sum(int(r.get(int(t), 0)) for t, r in confusion.items())
    confident = sum(k for r in confusion.values() for p, k in r.items() if int(p) not in (0, uncertain))
    present = per[per["n_px"] > 0]
    return {"n_cortex_px": int(n),
            "accuracy": correct / n if n else float("nan"),
            "macro_f1": float(present["f1"].mean()) if len(present) else float("nan"),
            "coverage": confident / n if n else float("nan")}
