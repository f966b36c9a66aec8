"""Metrics of a binary malignant-vs-benign classifier, in numpy alone.

Scores are probabilities of malignant (label 1). The operating threshold is
chosen on the validation split (:func:`choose_threshold`) and only then
applied to the test split (:func:`summary`), which is never used for model
selection. Pure functions: evaluate, the report, calibration, model
selection and training all use them, and this module imports none of those.
"""
from __future__ import annotations

from typing import Any

import numpy as np

THRESHOLD_RULES = ("youden", "sensitivity")


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return y, s


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve: P(score of a random positive > random negative), ties count half."""
    y, s = _check(labels, scores)
    positives, negatives = y.sum(), (1 - y).sum()
    if positives == 0 or negatives == 0:
        raise ValueError("ROC AUC needs both classes")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_scores = s[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(s)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and the thresholds giving them (descending)."""
    y, s = _check(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / max(y.sum(), 1)]
    fpr = np.r_[0.0, fps / max((1 - y).sum(), 1)]
    thresholds = np.r_[np.inf, s[distinct]]
    return fpr, tpr, thresholds


def average_precision(labels, scores) -> float:
    """Area under the precision-recall curve as the step-wise average precision."""
    y, s = _check(labels, scores)
    if y.sum() == 0:
        raise ValueError("average precision needs positives")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    precision = tps / (distinct + 1)
    recall = tps / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def confusion(labels, scores, threshold: float) -> dict[str, int]:
    """Counts at ``threshold`` (score >= threshold is malignant)."""
    y, s = _check(labels, scores)
    predicted = s >= threshold
    return {"tp": int((predicted & (y == 1)).sum()), "fp": int((predicted & (y == 0)).sum()),
            "tn": int((~predicted & (y == 0)).sum()), "fn": int((~predicted & (y == 1)).sum())}


def choose_threshold(labels, scores, rule: str = "youden", target_sensitivity: float = 0.9) -> float:
    """The operating threshold from validation scores.

    ``youden`` maximises sensitivity + specificity - 1; ``sensitivity`` is the
    highest threshold whose sensitivity reaches ``target_sensitivity`` (what a
    screening setting asks for).
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {THRESHOLD_RULES}, got {rule!r}")
    fpr, tpr, thresholds = roc_curve(labels, scores)
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if rule == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    reaching = np.flatnonzero(tpr >= target_sensitivity)
    return float(thresholds[reaching[0]])


def expected_calibration_error(labels, scores, bins: int = 10) -> float:
    """Expected calibration error: the count-weighted gap between the mean predicted
    probability and the observed malignant rate, over equal-width probability bins."""
    y, s = _check(labels, scores)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(s, edges[1:-1]), 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            gap += members.sum() / len(s) * abs(y[members].mean() - s[members].mean())
    return float(gap)


def wilson_interval(successes: int, total: int, z: float = 1.96) -> list[float]:
    """A 95 % Wilson score interval of a proportion (sensible at 0 and at n)."""
    if total <= 0:
        return [0.0, 1.0]
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def summary(labels, scores, threshold: float, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Everything the evaluation report shows, at the given operating threshold."""
    y, s = _check(labels, scores)
    c = confusion(y, s, threshold)
    sensitivity = c["tp"] / max(c["tp"] + c["fn"], 1)
    specificity = c["tn"] / max(c["tn"] + c["fp"], 1)
    precision = c["tp"] / max(c["tp"] + c["fp"], 1)
    f1 = 2 * precision * sensitivity / max(precision + sensitivity, 1e-12)
    auc = roc_auc(y, s)
    return {
        "n": int(len(y)), "positives": int(y.sum()), "threshold": float(threshold),
        "auc": auc, "auc_ci95": bootstrap_auc_ci(y, s, bootstrap, seed),
        "pr_auc": average_precision(y, s),
        "accuracy": (c["tp"] + c["tn"]) / len(y),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity, "specificity": specificity, "precision": precision, "f1": f1,
        "sensitivity_ci95": wilson_interval(c["tp"], c["tp"] + c["fn"]),
        "specificity_ci95": wilson_interval(c["tn"], c["tn"] + c["fp"]),
        "brier": float(np.mean((s - y) ** 2)), "ece": expected_calibration_error(y, s), "confusion": c,
    }


def bootstrap_auc_ci(labels, scores, rounds: int = 1000, seed: int = 0) -> list[float]:
    """A 95 % percentile bootstrap interval of the ROC AUC (resamples lacking a class are skipped)."""
    y, s = _check(labels, scores)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        pick = rng.integers(0, len(y), len(y))
        if 0 < y[pick].sum() < len(pick):
            values.append(roc_auc(y[pick], s[pick]))
    if not values:
        raise ValueError("no bootstrap resample had both classes")
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def calibration(labels, scores, bins: int = 10) -> dict[str, list[float]]:
    """Mean predicted probability and observed malignant rate per equal-width bin."""
    y, s = _check(labels, scores)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(s, edges[1:-1]), 0, bins - 1)
    predicted, observed, counts = [], [], []
    for b in range(bins):
        members = index == b
        if members.any():
            predicted.append(float(s[members].mean()))
            observed.append(float(y[members].mean()))
            counts.append(int(members.sum()))
    return {"predicted": predicted, "observed": observed, "count": counts}


AGE_BANDS = ((30, "<30"), (45, "30-44"), (60, "45-59"), (75, "60-74"), (float("inf"), "75+"))


def subgroup_value(attribute: str, value: str | None) -> str:
    """The subgroup an attribute value falls in: age bands for ages, the value itself otherwise."""
    if value is None or str(value).strip() in ("", "nan", "unknown", "None"):
        return "unknown"
    if attribute.startswith("age"):
        try:
            age = float(value)
        except ValueError:
            return "unknown"
        return next(band for limit, band in AGE_BANDS if age < limit)
    return str(value).strip().lower()


def subgroup_metrics(labels, scores, attributes: dict[str, list[str | None]], min_size: int = 30,
                     bootstrap: int = 200, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """ROC AUC with a bootstrap interval per subgroup of each attribute.

    A subgroup smaller than ``min_size``, or lacking one of the classes, is
    listed with its counts and ``too_small`` (or ``one_class``) instead of an AUC.
    """
    y, s = _check(labels, scores)
    out = {}
    for attribute, values in attributes.items():
        groups = np.array([subgroup_value(attribute, v) for v in values], dtype=object)
        if (groups == "unknown").all():
            continue
        rows = []
        for group in sorted(set(groups)):
            members = groups == group
            n, positives = int(members.sum()), int(y[members].sum())
            row: dict[str, Any] = {"group": group, "n": n, "positives": positives}
            if n < min_size:
                row["too_small"] = True
            elif positives in (0, n):
                row["one_class"] = True
            else:
                row["auc"] = roc_auc(y[members], s[members])
                row["auc_ci95"] = bootstrap_auc_ci(y[members], s[members], bootstrap, seed)
            rows.append(row)
        out[attribute] = rows
    return out
