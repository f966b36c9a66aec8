"""Calibration: the fitted map recovers a known miscalibration, and the saved model applies it."""
import numpy as np
import pytest

from oncolake import calibration, config, metrics, registry, training


def _miscalibrated(n=20000, seed=0):
    """Labels drawn from true probabilities q; the model reports sigmoid(2 logit(q) + 1)."""
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(-1.0, 1.5, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(int)
    reported = 1 / (1 + np.exp(-(2 * true_logit + 1)))
    return labels, reported


def test_platt_recovers_the_inverse_of_a_known_distortion():
    labels, reported = _miscalibrated()
    a, b = calibration.fit(labels, reported, "platt")
    # logit(q) = (logit(p) - 1) / 2: a = 0.5, b = -0.5
    assert a == pytest.approx(0.5, abs=0.03) and b == pytest.approx(-0.5, abs=0.05)
    fixed = calibration.apply(reported, a, b)
    assert metrics.expected_calibration_error(labels, fixed) < 0.015
    assert metrics.expected_calibration_error(labels, reported) > 0.1
    # monotone: the ranking, and so the AUC, is unchanged
    assert metrics.roc_auc(labels, fixed) == pytest.approx(metrics.roc_auc(labels, reported), abs=1e-9)
    np.testing.assert_allclose(calibration.invert(fixed, a, b), reported, rtol=1e-6, atol=1e-9)


def test_temperature_only_rescales_and_none_is_identity():
    labels, reported = _miscalibrated(seed=1)
    a, b = calibration.fit(labels, reported, "temperature")
    assert b == 0.0 and 0.3 < a < 0.7
    assert calibration.fit(labels, reported, "none") == (1.0, 0.0)
    with pytest.raises(ValueError):
        calibration.fit(labels, reported, "isotonic")


def test_a_map_that_would_reverse_the_ranking_is_refused():
    labels, reported = _miscalibrated(seed=2)
    chosen = calibration.choose(labels, 1 - reported, "platt")  # a model worse than chance
    assert (chosen["method"], chosen["a"], chosen["b"]) == ("none", 1.0, 0.0)


def test_expected_calibration_error_and_wilson_interval_by_hand():
    # bin [0.1, 0.2): predicted 0.15, observed 0/2; bin [0.9, 1]: predicted 0.95, observed 1/2
    ece = metrics.expected_calibration_error([0, 0, 1, 0], [0.15, 0.15, 0.95, 0.95])
    assert ece == pytest.approx(0.5 * 0.15 + 0.5 * 0.45)
    low, high = metrics.wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert metrics.wilson_interval(0, 0) == [0.0, 1.0]


def test_calibrated_model_applies_the_map_and_keeps_the_weights():
    tcfg = config.TrainConfig(filters=(4,), dense_units=4, precision="float32")
    model = training.build_model(16, [120.0] * 3, [40.0] * 3, tcfg)
    images = np.random.default_rng(3).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    raw = model.predict(images, verbose=0).ravel()
    wrapped = calibration.calibrated_model(model, 0.7, -0.4)
    loaded = registry.load_model_bytes(registry.model_bytes(wrapped))  # safe mode: built-in layers only
    np.testing.assert_allclose(loaded.predict(images, verbose=0).ravel(), calibration.apply(raw, 0.7, -0.4),
                               rtol=1e-4, atol=1e-6)
    assert training.weights_digest(loaded) == training.weights_digest(model)
