"""Grad-CAM: the heat map finds what the model responds to."""
import numpy as np

from oncolake import config, explain, training


def _brightness_model():
    """score = sigmoid(w * mean(relu(conv1x1(x)))) with w > 0: brighter pixels raise the score."""
    import tensorflow as tf
    inputs = tf.keras.Input((32, 32, 3), dtype=tf.uint8)
    x = tf.keras.layers.Rescaling(1 / 255.0)(inputs)
    x = tf.keras.layers.Conv2D(1, 1, activation="relu", kernel_initializer="ones", bias_initializer="zeros")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    out = tf.keras.layers.Dense(1, activation="sigmoid", kernel_initializer="ones",
                                bias_initializer=tf.keras.initializers.Constant(-1.0))(x)
    return tf.keras.Model(inputs, out)


def test_gradcam_points_at_the_bright_square():
    images = np.full((3, 32, 32, 3), 10, np.uint8)
    corners = [(2, 2), (20, 4), (8, 22)]
    for image, (row, col) in zip(images, corners):
        image[row:row + 8, col:col + 8] = 250
    cams = explain.gradcam(_brightness_model(), images)
    assert cams.shape == (3, 32, 32) and cams.dtype == np.float32
    assert cams.min() >= 0 and np.isclose(cams.max(axis=(1, 2)), 1.0).all()
    for cam, (row, col) in zip(cams, corners):
        inside = cam[row:row + 8, col:col + 8].mean()
        outside = np.delete(cam.ravel(), [r * 32 + c for r in range(row, row + 8) for c in range(col, col + 8)])
        assert inside > 0.9 and outside.mean() < 0.2


def test_gradcam_runs_on_the_pipeline_model_and_overlays():
    model = training.build_model(32, [120.0] * 3, [40.0] * 3, config.TrainConfig(filters=(4, 8), dense_units=4))
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    cams = explain.gradcam(model, images, batch_size=2)
    assert cams.shape == (5, 32, 32) and np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    blended = explain.overlay(images[0], cams[0])
    assert blended.shape == (32, 32, 3) and blended.dtype == np.uint8


def test_outcomes_are_picked_by_confidence():
    labels = [1, 1, 0, 0, 1, 0]
    scores = [0.9, 0.2, 0.8, 0.1, 0.6, 0.4]
    picked = explain.pick_outcomes(labels, scores, threshold=0.5, per_outcome=2)
    assert picked == {"true positive": [0, 4], "false positive": [2], "false negative": [1],
                      "true negative": [3, 5]}
