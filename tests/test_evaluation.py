"""metrics: numpy metrics against scikit-learn on known labels and scores."""
import numpy as np
import pytest
from sklearn import metrics as sk

from oncolake import metrics


@pytest.fixture(params=[0, 1, 2])
def case(request):
    rng = np.random.default_rng(request.param)
    y = rng.integers(0, 2, 300)
    s = np.clip(0.3 * y + rng.normal(0.35, 0.2, 300), 0, 1)
    if request.param == 2:
        s = np.round(s, 1)  # many ties
    return y, s


def test_auc_and_average_precision_equal_sklearn(case):
    y, s = case
    assert metrics.roc_auc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    assert metrics.average_precision(y, s) == pytest.approx(sk.average_precision_score(y, s), abs=1e-12)


def test_threshold_metrics_equal_sklearn(case):
    y, s = case
    t = 0.45
    m = metrics.summary(y, s, t, bootstrap=200)
    p = (s >= t).astype(int)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, p))
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, p))
    assert m["sensitivity"] == pytest.approx(sk.recall_score(y, p))
    assert m["specificity"] == pytest.approx(sk.recall_score(1 - y, 1 - p))
    assert m["f1"] == pytest.approx(sk.f1_score(y, p))
    assert m["brier"] == pytest.approx(sk.brier_score_loss(y, s))
    tn, fp, fn, tp = sk.confusion_matrix(y, p).ravel()
    assert m["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    low, high = m["auc_ci95"]
    assert low < m["auc"] < high


def test_roc_curve_points_equal_sklearn(case):
    y, s = case
    fpr, tpr, _ = metrics.roc_curve(y, s)
    sk_fpr, sk_tpr, _ = sk.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_threshold_rules_do_what_they_say(case):
    y, s = case
    t = metrics.choose_threshold(y, s, "youden")
    fpr, tpr, thresholds = sk.roc_curve(y, s, drop_intermediate=False)
    best = (tpr - fpr)[np.isfinite(thresholds)].max()
    p = s >= t
    assert (p[y == 1].mean() - p[y == 0].mean()) == pytest.approx(best)
    t90 = metrics.choose_threshold(y, s, "sensitivity", target_sensitivity=0.9)
    assert (s[y == 1] >= t90).mean() >= 0.9
    higher = s[s > t90]
    if higher.size:  # the next higher threshold would miss the target
        assert (s[y == 1] >= higher.min()).mean() < 0.9
    with pytest.raises(ValueError, match="threshold rule"):
        metrics.choose_threshold(y, s, "median")


def test_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="both classes"):
        metrics.roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="labels"):
        metrics.roc_auc([0, 2], [0.2, 0.3])


def test_calibration_bins_are_means():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.05, 0.15, 0.85, 0.95])
    cal = metrics.calibration(y, s, bins=2)
    assert cal["predicted"] == pytest.approx([0.1, 0.9])
    assert (cal["observed"], cal["count"]) == ([0.0, 1.0], [2, 2])


def test_subgroups_band_ages_and_mark_small_groups():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 100)
    scores = np.clip(labels * 0.3 + rng.random(100) * 0.7, 0, 1)
    sexes = ["male"] * 60 + ["female"] * 35 + [None] * 5
    ages = ["25"] * 10 + ["50"] * 80 + ["80.0"] * 9 + ["n/a"]
    out = metrics.subgroup_metrics(labels, scores, {"sex": sexes, "age": ages, "site": [None] * 100},
                                   min_size=30)
    assert "site" not in out  # nothing known: no table
    male = next(r for r in out["sex"] if r["group"] == "male")
    assert (male["n"], male["positives"]) == (60, int(labels[:60].sum()))
    assert male["auc"] == pytest.approx(metrics.roc_auc(labels[:60], scores[:60]))
    assert male["auc_ci95"][0] <= male["auc"] <= male["auc_ci95"][1]
    bands = {r["group"]: r for r in out["age"]}
    assert set(bands) == {"<30", "45-59", "75+", "unknown"}
    assert bands["<30"]["n"] == 10 and bands["<30"]["too_small"] and "auc" not in bands["<30"]
    assert bands["45-59"]["n"] == 80 and "auc" in bands["45-59"]
    assert next(r for r in out["sex"] if r["group"] == "unknown")["n"] == 5
