"""Grad-CAM saliency: which parts of an image moved the model's malignancy score.

Grad-CAM (Selvaraju et al., 2017) weighs the feature maps that enter the
network's global pooling by the mean gradient of the malignancy logit with
respect to each map, keeps the positive part and scales it to [0, 1]. It
shows where the model looked, not why, and not whether it was right.
"""
from __future__ import annotations

import numpy as np

OUTCOMES = ("true positive", "false positive", "false negative", "true negative")


def _feature_layer(model):
    """The layer whose output the global pooling reduces: the last spatial feature maps."""
    import tensorflow as tf
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.GlobalAveragePooling2D):
            return layer
    raise ValueError(f"model {model.name} has no GlobalAveragePooling2D layer to explain")


def gradcam(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Heat maps in [0, 1], one per image, at the images' size (``n x h x w`` float32)."""
    import cv2
    import tensorflow as tf
    pooling = _feature_layer(model)
    probe = tf.keras.Model(model.input, [pooling.input, model.output])
    maps = []
    for start in range(0, len(images), batch_size):
        batch = tf.constant(images[start:start + batch_size])
        with tf.GradientTape() as tape:
            features, probability = probe(batch, training=False)
            p = tf.clip_by_value(tf.cast(probability, tf.float32), 1e-6, 1 - 1e-6)
            score = tf.math.log(p) - tf.math.log1p(-p)  # the logit: no saturation at confident scores
        grads = tape.gradient(score, features)
        if grads is None:
            raise ValueError("the malignancy score does not depend on the pooled feature maps")
        grads, features = tf.cast(grads, tf.float32), tf.cast(features, tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cams = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy()
        for cam in cams:
            peak = cam.max()
            cam = cam / peak if peak > 0 else cam
            maps.append(cv2.resize(cam.astype(np.float32), (images.shape[2], images.shape[1]),
                                   interpolation=cv2.INTER_LINEAR))
    return np.stack(maps) if maps else np.zeros((0,) + images.shape[1:3], np.float32)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The RGB image with the heat map blended over it (uint8 RGB)."""
    import cv2
    heat = cv2.applyColorMap(np.uint8(np.clip(cam, 0, 1) * 255), cv2.COLORMAP_JET)[:, :, ::-1]
    return np.uint8(np.clip((1 - alpha) * image.astype(np.float32) + alpha * heat, 0, 255))


def pick_outcomes(labels, scores, threshold: float, per_outcome: int = 4) -> dict[str, list[int]]:
    """Indices of up to ``per_outcome`` images for each outcome at ``threshold``,
    the most confident first (the clearest successes and the worst mistakes)."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    predicted = (s >= threshold).astype(int)
    out = {}
    for outcome, (truth, guess) in zip(OUTCOMES, ((1, 1), (0, 1), (1, 0), (0, 0))):
        members = np.flatnonzero((y == truth) & (predicted == guess))
        confidence = np.abs(s[members] - threshold)
        out[outcome] = [int(i) for i in members[np.argsort(-confidence, kind="mergesort")][:per_outcome]]
    return out
