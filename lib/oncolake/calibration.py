"""Probability calibration fitted on the validation split, stored inside the model.

A network trained with class weights (or on a rebalanced split) scores the
minority class too high; its probabilities rank well but do not mean what
they say. The fix is a monotone map of the logit, fitted on the validation
split: Platt scaling ``sigmoid(a * logit + b)`` or temperature scaling
``sigmoid(a * logit)``. Being monotone (``a > 0``) it changes no ranking, so
ROC AUC and the model selection stand.

The map is applied by the model itself (:func:`calibrated_model`: the last
layer's logit, a ``Rescaling`` layer and a sigmoid, all built-in Keras layers,
so the file still loads in safe mode), so evaluate, score, predict and the
API all get calibrated probabilities without code of their own.
"""
from __future__ import annotations

from typing import Any

import numpy as np

METHODS = ("platt", "temperature", "none")
_EPS = 1e-7


def logit(probabilities) -> np.ndarray:
    p = np.clip(np.asarray(probabilities, np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def apply(probabilities, a: float, b: float) -> np.ndarray:
    """Calibrated probabilities: ``sigmoid(a * logit(p) + b)``."""
    return 1.0 / (1.0 + np.exp(-(a * logit(probabilities) + b)))


def invert(calibrated, a: float, b: float) -> np.ndarray:
    """The model's probabilities before calibration: the inverse of :func:`apply`."""
    return 1.0 / (1.0 + np.exp(-((logit(calibrated) - b) / a)))


def fit(labels, probabilities, method: str = "platt", iterations: int = 100) -> tuple[float, float]:
    """``(a, b)`` minimising the log loss of ``sigmoid(a * logit(p) + b)`` on these labels.

    Newton's method on the convex log loss, with a small ridge on ``a - 1``
    and ``b`` so a perfectly separated validation split gives finite values;
    ``temperature`` keeps ``b = 0``; ``none`` is ``(1, 0)``.
    """
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    y = np.asarray(labels, np.float64).ravel()
    z = logit(probabilities).ravel()
    if y.shape != z.shape:
        raise ValueError(f"{y.size} labels but {z.size} probabilities")
    if method == "none" or y.min() == y.max():
        return 1.0, 0.0
    ridge = 1e-3

    def loss(a: float, b: float) -> float:
        t = a * z + b
        return float(np.sum(np.logaddexp(0.0, t) - y * t) + ridge / 2 * ((a - 1) ** 2 + b * b))

    a, b = 1.0, 0.0
    current = loss(a, b)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(a * z + b)))
        w = p * (1 - p)
        grad = np.array([np.sum((p - y) * z) + ridge * (a - 1), np.sum(p - y) + ridge * b])
        hess = np.array([[np.sum(w * z * z) + ridge, np.sum(w * z)], [np.sum(w * z), np.sum(w) + ridge]])
        if method == "temperature":
            step = np.array([grad[0] / hess[0, 0], 0.0])
        else:
            step = np.linalg.solve(hess, grad)
        # damped Newton: halve the step until the loss falls (plain Newton can
        # overshoot from a start far from the optimum)
        scale = 1.0
        while scale > 1e-6 and loss(a - scale * step[0], b - scale * step[1]) > current:
            scale /= 2
        a, b = a - scale * step[0], b - scale * step[1]
        previous, current = current, loss(a, b)
        if np.abs(scale * step).max() < 1e-10 or previous - current < 1e-12:
            break
    return float(a), float(b)


def choose(labels, probabilities, method: str) -> dict[str, Any]:
    """Fit ``method`` on validation scores; refuse a map that would reverse the ranking."""
    from oncolake import metrics
    a, b = fit(labels, probabilities, method)
    if a <= 0:  # a model scoring worse than chance on validation: leave it as it is
        method, a, b = "none", 1.0, 0.0
    after = apply(probabilities, a, b)
    return {"method": method, "a": a, "b": b, "fitted_on": "val",
            "val_ece_before": metrics.expected_calibration_error(labels, probabilities),
            "val_ece_after": metrics.expected_calibration_error(labels, after)}


def calibrated_model(model, a: float, b: float):
    """The model with its output ``sigmoid(a * logit + b)``: same weights, built-in layers only."""
    import tensorflow as tf
    head = model.get_layer("malignant")
    dense = tf.keras.layers.Dense(1, name="logit", dtype="float32")
    z = dense(head.input)
    dense.set_weights(head.get_weights())
    z = tf.keras.layers.Rescaling(scale=a, offset=b, name="calibration", dtype="float32")(z)
    out = tf.keras.layers.Activation("sigmoid", name="malignant", dtype="float32")(z)
    return tf.keras.Model(model.input, out, name=model.name)
