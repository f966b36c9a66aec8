"""Drift figures: PSI and tests against hand computations, image statistics, the alert rule."""
import math

import numpy as np
import pytest

from oncolake import drift, imaging
from oncolake.config import DriftConfig


def _psi_by_hand(e: list[float], a: list[float]) -> float:
    e = [max(x, 1e-4) for x in e]
    a = [max(x, 1e-4) for x in a]
    return sum((y - x) * math.log(y / x) for x, y in zip(e, a))


def test_psi_over_quartiles_equals_the_formula_by_hand():
    expected = np.arange(100.0)  # quartile edges 24.75, 49.5, 74.25: 25 values in each bin
    actual = np.arange(25.0)  # all in the first quarter
    assert drift.psi(expected, actual, bins=4) == pytest.approx(_psi_by_hand([.25] * 4, [1, 0, 0, 0]))
    # 30 values: 0..9 (first bin), 40..49 (second), 80..89 (fourth)
    mixed = [*range(10), *range(40, 50), *range(80, 90)]
    assert drift.psi(expected, mixed, bins=4) == pytest.approx(_psi_by_hand([.25] * 4, [1 / 3, 1 / 3, 0, 1 / 3]))
    assert drift.psi(expected, expected, bins=10) == pytest.approx(0.0, abs=1e-12)


def test_values_beyond_a_tied_reference_maximum_get_a_bin_of_their_own():
    every_image_the_same_size = [0.27] * 200
    assert drift.psi(every_image_the_same_size, [0.27] * 50) == pytest.approx(0.0, abs=1e-12)
    larger = drift.psi(every_image_the_same_size, [12.0] * 50)
    smaller = drift.psi(every_image_the_same_size, [0.1] * 50)
    assert larger == pytest.approx(smaller) == pytest.approx(_psi_by_hand([1, 0], [0, 1]))


def test_bins_shrink_with_small_samples():
    assert drift.bins_for(10_000, 5_000) == 10
    assert drift.bins_for(10_000, 100) == 4
    assert drift.bins_for(34, 46) == 2


def test_psi_over_categories_equals_the_formula_by_hand():
    want = {"jpeg": 80, "png": 20}
    assert drift.psi_counts(want, {"jpeg": 40, "png": 10}) == pytest.approx(0.0, abs=1e-12)
    assert drift.psi_counts(want, {"jpeg": 10, "dicom": 30}) == pytest.approx(
        _psi_by_hand([0, .8, .2], [.75, .25, 0]))  # keys sorted: dicom, jpeg, png


def test_tests_tell_noise_from_a_shift():
    rng = np.random.default_rng(0)
    reference = rng.normal(0.5, 0.1, 2000)
    assert drift.p_value(reference, reference[:300]) > 0.5
    assert drift.p_value(reference, rng.normal(0.2, 0.1, 300)) < 1e-30
    assert drift.p_value_counts({"jpeg": 900, "png": 100}, {"jpeg": 88, "png": 12}) > 0.3
    assert drift.p_value_counts({"jpeg": 900, "png": 100}, {"dicom": 50}) < 1e-30
    assert drift.p_value_counts({"jpeg": 900}, {"jpeg": 50}) == 1.0


def test_image_statistics_by_hand():
    grey = np.full((16, 16, 3), 51, np.uint8)  # 51 / 255 = 0.2
    assert imaging.image_statistics(grey) == pytest.approx((0.2, 0.0, 0.0), abs=1e-9)
    halves = np.zeros((16, 16, 3), np.uint8)
    halves[:, 8:] = 255
    brightness, contrast, _ = imaging.image_statistics(halves)
    assert (brightness, contrast) == pytest.approx((0.5, 0.5))
    # the 4-neighbour Laplacian of a checkerboard of 0 and 1 is -4 or +4 everywhere but the border
    board = ((np.indices((32, 32)).sum(axis=0) % 2) * 255).astype(np.uint8)
    sharp = imaging.image_statistics(np.repeat(board[:, :, None], 3, axis=2))[2]
    blurred = imaging.image_statistics(np.repeat(np.full((32, 32), 128, np.uint8)[:, :, None], 3, axis=2))[2]
    assert sharp > 10 and blurred == 0.0


def _reference(rng, n=400):
    return {"values": {"brightness": list(rng.normal(0.5, 0.1, n)), "probability": list(rng.uniform(0, 1, n))},
            "counts": {"format": {"jpeg": n}}, "quarantine_rate": 0.01}


def _night(rng, n, shift=0.0, fmt="jpeg", files=None, quarantined=0):
    return {"values": {"brightness": list(rng.normal(0.5 - shift, 0.1, n)), "probability": list(rng.uniform(0, 1, n))},
            "counts": {"format": {fmt: n}}, "images": n, "files": files or n, "quarantined": quarantined}


def test_an_alert_needs_a_large_shift_that_is_not_noise_in_a_big_enough_night():
    rng = np.random.default_rng(1)
    reference, limits = _reference(rng), DriftConfig()
    calm = drift.compare(reference, _night(rng, 200), limits)
    assert calm["drift_alert"] is False and calm["psi"]["brightness"] < 0.1 and calm["alerts"] == []
    dark = drift.compare(reference, _night(rng, 200, shift=0.3), limits)
    assert dark["drift_alert"] is True and dark["psi"]["brightness"] > 1
    assert [a.split(":")[0] for a in dark["alerts"]] == ["brightness"]
    other = drift.compare(reference, _night(rng, 200, fmt="dicom"), limits)
    assert [a.split(":")[0] for a in other["alerts"]] == ["format"]
    # the same shift in 10 images: figures, no alert (below min_images)
    few = drift.compare(reference, _night(rng, 10, shift=0.3), limits)
    assert few["psi"]["brightness"] > 1 and few["drift_alert"] is False
    # PSI past the limit but the test cannot tell it from noise: no alert
    strict = drift.compare(reference, _night(rng, 40, shift=0.1), DriftConfig(psi_alert=0.0, alpha=1e-300))
    assert strict["drift_alert"] is False


def test_a_night_that_quarantines_too_much_alerts():
    rng = np.random.default_rng(2)
    result = drift.compare(_reference(rng), _night(rng, 90, files=100, quarantined=10), DriftConfig())
    assert result["quarantine_rate"] == pytest.approx(0.1)
    assert result["alerts"] == ["quarantine rate 0.100 > 0.05 (reference 0.010)"]
    assert drift.compare(_reference(rng), _night(rng, 99, files=100, quarantined=1),
                         DriftConfig())["drift_alert"] is False
