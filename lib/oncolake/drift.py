"""Drift and data quality: a night's images and predictions against the model's reference.

A model's **reference** (``reference.json`` beside the model, written by the
evaluate job, or by the first night that needs it) holds what the model was
built on: the image statistics (:func:`oncolake.imaging.image_statistics`)
and sizes of its training and validation images, their formats and
modalities, the dataset's quarantine rate, and the model's probabilities on
the validation split (never the training split, which it has fitted).

A **night** is compared figure by figure with two numbers:

- the population stability index, PSI = sum over bins of (a - e) ln(a / e),
  with e and a the reference's and the night's share of each bin. Bins are
  the reference's quantiles (deciles; fewer when either side is small, at
  least 25 images per bin, so that an unchanged night reads near 0); for
  formats and modalities, each value is a bin. A share of 0 counts as 1e-4.
  The usual reading: below 0.1 stable, 0.1-0.25 a shift, above 0.25 a
  population change.
- a two-sample test: Kolmogorov-Smirnov for the continuous figures,
  chi-square for formats and modalities.

A figure alerts when its PSI reaches ``nightly.drift.psi_alert`` *and* its
test's p-value is below ``nightly.drift.alpha``: a large shift that is not
sampling noise (PSI alone reads high on small samples; a test alone flags
tiny shifts in large ones). The quarantine rate alerts above
``nightly.drift.max_quarantine_rate``. Nights with fewer than
``nightly.drift.min_images`` images get figures but no alert.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from collections import Counter
from typing import Any, Iterable, Mapping

import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from oncolake import imaging, lake, registry, schema
from oncolake.config import Config, DriftConfig

log = logging.getLogger(__name__)

REFERENCE = "reference.json"
#: Continuous figures: the image statistics, the image's size, the model's probability.
CONTINUOUS = (*imaging.STATISTICS, "megapixels", "probability")
#: Categorical figures.
CATEGORICAL = ("format", "modality")
#: Every figure compared, in the order of gold.nightly_runs' psi_* columns.
FIGURES = ("brightness", "contrast", "sharpness", "megapixels", "format", "modality", "probability")
_FLOOR = 1e-4
_MAX_BINS = 10
_PER_BIN = 25
_KEEP = 5000  # reference values kept per figure (a seeded sample)


# --- pure: PSI, tests, comparison ------------------------------------------------------

def bins_for(n_expected: int, n_actual: int) -> int:
    """Quantile bins for samples of these sizes: up to 10, at least 25 of the smaller per bin, at least 2."""
    return int(min(_MAX_BINS, max(2, min(n_expected, n_actual) // _PER_BIN)))


def edges(expected: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges: the reference's quantiles; with ties at its maximum, one more edge just above it.

    A bin holds ``edges[i-1] <= x < edges[i]``. When the reference's top
    quantile is its maximum (many equal values, e.g. every image 600 x 450),
    larger values would share that bin unnoticed; the extra edge gives them
    their own, empty in the reference.
    """
    expected = np.asarray(expected, dtype=np.float64)
    inner = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    top = expected.max()
    if inner.size and inner[-1] >= top:
        inner = np.append(inner, np.nextafter(top, np.inf))
    return inner


def _shares(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return np.maximum(counts / total if total else np.zeros_like(counts, dtype=np.float64), _FLOOR)


def _psi(e: np.ndarray, a: np.ndarray) -> float:
    e, a = _shares(np.asarray(e, dtype=np.float64)), _shares(np.asarray(a, dtype=np.float64))
    return float(np.sum((a - e) * np.log(a / e)))


def psi(expected: Iterable[float], actual: Iterable[float], bins: int | None = None) -> float:
    """Population stability index of ``actual`` against ``expected`` over the reference's quantile bins."""
    expected, actual = np.asarray(list(expected), np.float64), np.asarray(list(actual), np.float64)
    inner = edges(expected, bins or bins_for(expected.size, actual.size))
    k = inner.size + 1
    return _psi(np.bincount(np.searchsorted(inner, expected, side="right"), minlength=k),
                np.bincount(np.searchsorted(inner, actual, side="right"), minlength=k))


def psi_counts(expected: Mapping[str, int], actual: Mapping[str, int]) -> float:
    """Population stability index over categories (a category one side lacks counts as a 1e-4 share there)."""
    keys = sorted(set(expected) | set(actual))
    return _psi(np.array([expected.get(k, 0) for k in keys]), np.array([actual.get(k, 0) for k in keys]))


def p_value(expected: Iterable[float], actual: Iterable[float]) -> float:
    """Two-sample Kolmogorov-Smirnov test's p-value."""
    from scipy import stats
    return float(stats.ks_2samp(np.asarray(list(expected)), np.asarray(list(actual))).pvalue)


def p_value_counts(expected: Mapping[str, int], actual: Mapping[str, int]) -> float:
    """Chi-square test of homogeneity's p-value for two category counts (1.0 for a single category)."""
    from scipy import stats
    keys = sorted(set(expected) | set(actual))
    if len(keys) < 2:
        return 1.0
    table = np.array([[expected.get(k, 0) for k in keys], [actual.get(k, 0) for k in keys]])
    return float(stats.chi2_contingency(table).pvalue)


def compare(reference: Mapping[str, Any], night: Mapping[str, Any], limits: DriftConfig) -> dict[str, Any]:
    """The night's drift figures: ``psi``, ``p``, the alerts (one sentence each) and ``drift_alert``.

    ``night`` holds ``values`` (figure -> list), ``counts`` (figure ->
    category -> n), ``images`` and, optionally, ``files`` and ``quarantined``.
    """
    psis, ps, alerts = {}, {}, []
    enough = night.get("images", 0) >= limits.min_images
    for name in FIGURES:
        if name in CATEGORICAL:
            want, got = reference["counts"].get(name) or {}, night["counts"].get(name) or {}
            if not want or not got:
                continue
            psis[name], ps[name] = psi_counts(want, got), p_value_counts(want, got)
        else:
            want, got = reference["values"].get(name) or [], night["values"].get(name) or []
            if len(want) < 2 or not got:
                continue
            psis[name], ps[name] = psi(want, got), p_value(want, got)
        if enough and psis[name] >= limits.psi_alert and ps[name] < limits.alpha:
            alerts.append(f"{name}: PSI {psis[name]:.2f} >= {limits.psi_alert}, p {ps[name]:.1e}")
    files = night.get("files", 0)
    rate = night.get("quarantined", 0) / files if files else None
    if rate is not None and files >= limits.min_images and rate > limits.max_quarantine_rate:
        alerts.append(f"quarantine rate {rate:.3f} > {limits.max_quarantine_rate} "
                      f"(reference {reference.get('quarantine_rate', 0):.3f})")
    return {"psi": {k: round(v, 4) for k, v in psis.items()}, "p": ps, "quarantine_rate": rate,
            "alerts": alerts, "drift_alert": bool(alerts)}


# --- the reference -------------------------------------------------------------------

def read_reference(spark: SparkSession, lake_uri: str, dataset: str, version: int) -> dict[str, Any] | None:
    """Model ``version``'s reference, or None if it has none yet (evaluated before drift monitoring)."""
    path = f"{registry.version_uri(lake_uri, dataset, version)}/{REFERENCE}"
    return json.loads(lake.read_text(spark, path)) if lake.exists(spark, path) else None


def write_reference(spark: SparkSession, cfg: Config, lake_uri: str, dataset: str, version: int,
                    record: Mapping[str, Any], val_scores: Iterable[float]) -> dict[str, Any]:
    """Build the reference from the model's training and validation tensors and write ``reference.json``.

    ``val_scores`` are the model's probabilities on its validation split.
    """
    tensors = _tensors(lake_uri, dataset, record)
    ids: dict[str, tuple[float, float, float]] = {}
    for split in ("train", "val"):  # a balanced training split repeats images: each counts once
        url = registry.petastorm_url(f"{tensors}/split={split}")
        ids.update(_tensor_statistics(url, lake.petastorm_filesystem(url, cfg.hdfs), ids))
    rng = np.random.default_rng(cfg.train.seed)
    statistics = np.array(list(ids.values()), np.float64).reshape(-1, len(imaging.STATISTICS))
    mix = _image_mix(spark, cfg, lake_uri, dataset, list(ids))
    values = {name: statistics[:, j] for j, name in enumerate(imaging.STATISTICS)}
    values["megapixels"] = np.asarray(mix["megapixels"], np.float64)
    values["probability"] = np.asarray(list(val_scores), np.float64)
    bronze = spark.read.format("delta").load(lake.table_uri(lake_uri, "bronze.images")).filter(
        F.col("dataset") == dataset).count()
    quarantine_uri = lake.table_uri(lake_uri, "bronze.quarantine")
    quarantined = (spark.read.format("delta").load(quarantine_uri).filter(F.col("dataset") == dataset).count()
                   if lake.exists(spark, quarantine_uri) else 0)
    built = {
        "dataset": dataset, "model_version": version, "tensors_version": record.get("tensors_version"),
        "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "images": len(ids), "validation_images": int(values["probability"].size),
        "quarantine_rate": quarantined / (bronze + quarantined) if bronze + quarantined else 0.0,
        "counts": {name: mix[name] for name in CATEGORICAL},
        # sorted before the seeded sample and after it: the same images give the same reference,
        # whatever order Spark returned them in
        "values": {name: sorted(round(float(x), 6) for x in _sample(np.sort(v), rng)) for name, v in values.items()},
    }
    lake.write_text(spark, f"{registry.version_uri(lake_uri, dataset, version)}/{REFERENCE}",
                    json.dumps(built, sort_keys=True))
    return built


def _tensors(lake_uri: str, dataset: str, record: Mapping[str, Any]) -> str:
    return lake.tensors_uri(lake_uri, dataset, record["tensors_version"])


def _tensor_statistics(url: str, filesystem, seen: Mapping[str, Any]) -> dict[str, tuple[float, float, float]]:
    """Image statistics of a tensor split's distinct images not in ``seen``, read row by row."""
    from petastorm import make_reader
    found: dict[str, tuple[float, float, float]] = {}
    with make_reader(url, schema_fields=["image_id", "image"], num_epochs=1, shuffle_row_groups=False,
                     reader_pool_type="dummy", filesystem=filesystem) as reader:
        for row in reader:
            image_id = str(row.image_id)  # a numpy string from Petastorm
            if image_id not in seen and image_id not in found:
                found[image_id] = imaging.image_statistics(row.image)
    return found


def _sample(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return values if values.size <= _KEEP else rng.choice(values, _KEEP, replace=False)


def _image_mix(spark: SparkSession, cfg: Config, lake_uri: str, dataset: str,
               ids: list[str] | None = None, predicted=None) -> dict[str, Any]:
    """Formats and modalities (counts) and sizes (megapixels) of bronze images: ``ids``, or ``predicted``'s."""
    bronze = spark.read.format("delta").load(lake.table_uri(lake_uri, "bronze.images")).filter(
        F.col("dataset") == dataset)
    wanted = predicted if predicted is not None else spark.createDataFrame([(i,) for i in ids], "image_id string")
    rows = (bronze.select("image_id", "format", schema.modality(bronze, cfg.ingest.modality(dataset)).alias("modality"),
                          (F.col("width").cast("double") * F.col("height") / 1e6).alias("megapixels"))
            .join(wanted.select("image_id").distinct(), "image_id").drop("image_id").collect())
    return {"format": dict(Counter(r.format for r in rows)), "modality": dict(Counter(r.modality for r in rows)),
            "megapixels": [r.megapixels for r in rows]}


# --- a night ---------------------------------------------------------------------------

def night(spark: SparkSession, cfg: Config, lake_uri: str, dataset: str, reference: Mapping[str, Any] | None,
          predictions, files: int, quarantined: int) -> dict[str, Any]:
    """The night's figures against the model's ``reference``: columns of ``gold.nightly_runs``.

    ``predictions`` are the night's rows of ``gold.predictions``: the image
    statistics and probabilities are those of the images predicted; sizes,
    formats and modalities those of every image scored (an image of a
    modality the model does not know is not predicted, but it arrived).
    ``files`` and ``quarantined`` are what the night's ingest saw and refused.
    """
    rows = predictions.filter(F.col("error").isNull()).select("probability", *imaging.STATISTICS).collect()
    values: dict[str, list[float]] = {name: [r[name] for r in rows if r[name] is not None]
                                      for name in (*imaging.STATISTICS, "probability")}
    mix = _image_mix(spark, cfg, lake_uri, dataset, predicted=predictions)  # what arrived, predicted or not
    values["megapixels"] = mix["megapixels"]
    observed = {"values": values, "counts": {name: mix[name] for name in CATEGORICAL},
                "images": len(mix["megapixels"]), "files": files, "quarantined": quarantined}
    figures = compare(reference or {"values": {}, "counts": {}}, observed, cfg.nightly.drift)
    columns: dict[str, Any] = {f"psi_{name}": figures["psi"].get(name) for name in FIGURES}
    columns.update({name: round(float(np.mean(values[name])), 6) if values[name] else None
                    for name in imaging.STATISTICS})
    rate = figures["quarantine_rate"]
    return {**columns, "quarantine_rate": None if rate is None else round(rate, 4),
            "input_mix": json.dumps({name: mix[name] for name in CATEGORICAL}, sort_keys=True),
            "drift_alert": figures["drift_alert"], "alerts": "; ".join(figures["alerts"])}
