"""Nightly scoring: bronze images without a prediction get one, in a pandas UDF.

By default every ingest-date partition of the dataset that is not fully scored
for the chosen model version is scored, so a missed night is caught up and a
finished night costs two small counts. Only those partitions are read.

On the executors, the model is loaded once per Python worker (from broadcast
bytes, Keras safe mode) and kept; images are decoded and resized by
:func:`oncolake.imaging.prepare`, the function preprocessing used, and
predicted in batches. Results are inserted into ``gold.predictions`` with an
insert-only MERGE on (dataset, image_id, model_version): a rerun, or a retried
task, never duplicates a row.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import time
from typing import Any, Iterator

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from oncolake import faults, imaging, lake, registry, schema
from oncolake.config import Config
from oncolake.errors import ConfigError, InputError

log = logging.getLogger(__name__)

_SCORED = ("image_id string, ingest_date date, probability double, error string, "
           "brightness double, contrast double, sharpness double")
#: The error of an image whose modality the model was not trained on (never predicted).
MODALITY_MISMATCH = "modality_mismatch"
_MODELS: dict[str, Any] = {}  # per Python worker: model bytes digest -> loaded model


def run(spark: SparkSession, cfg: Config, dataset: str, model_version: int | None = None,
        ingest_date: str | None = None, score_all: bool = False) -> dict[str, Any]:
    """Score the dataset's unscored bronze images with a registered model."""
    lake_uri = lake.qualify(spark, cfg.lake)
    version = model_version or registry.latest(spark, lake_uri, dataset)
    model_dir = registry.version_uri(lake_uri, dataset, version)
    record = registry.read_record(spark, model_dir)
    if not lake.exists(spark, f"{model_dir}/metrics.json"):
        raise InputError(f"model v{version} has no operating threshold: run evaluate first")
    threshold = float(json.loads(lake.read_text(spark, f"{model_dir}/metrics.json"))["threshold"])
    bronze_uri = lake.table_uri(lake_uri, "bronze.images")
    predictions_uri = lake.table_uri(lake_uri, "gold.predictions")
    if not lake.exists(spark, bronze_uri):
        raise InputError(f"no bronze table at {bronze_uri}: ingest first")
    target = lake.ensure_delta_table(spark, predictions_uri, schema.GOLD_PREDICTIONS,
                                     schema.GOLD_PREDICTIONS_PARTITIONS)
    if lake.add_missing_columns(spark, predictions_uri, schema.GOLD_PREDICTIONS):  # scored before drift figures
        target = lake.ensure_delta_table(spark, predictions_uri, schema.GOLD_PREDICTIONS)
    images = spark.read.format("delta").load(bronze_uri).filter(F.col("dataset") == dataset)
    done = (target.toDF().filter((F.col("dataset") == dataset) & (F.col("model_version") == version)))

    if ingest_date and score_all:
        raise ConfigError("give --ingest-date or --all, not both")
    if ingest_date:
        dates = [_parse_date(ingest_date)]
    else:
        have = {r["ingest_date"]: r["count"] for r in images.groupBy("ingest_date").count().collect()}
        scored = {r["ingest_date"]: r["count"] for r in done.groupBy("ingest_date").count().collect()}
        dates = sorted(d for d, n in have.items() if score_all or n > scored.get(d, 0))
    if not dates:
        return _summary(dataset, version, [], 0, 0, 0, predictions_uri, 0.0, threshold)
    in_dates = F.col("ingest_date").isin(dates)
    todo = images.filter(in_dates).select(
        "image_id", "ingest_date", "content",
        schema.modality(images, cfg.ingest.modality(dataset)).alias("modality")).join(
        done.filter(in_dates).select("image_id"), "image_id", "left_anti")
    already = done.filter(in_dates).count()
    pending = todo.select("image_id").count()  # ids only: no image bytes read
    if pending == 0:
        return _summary(dataset, version, dates, 0, already, 0, predictions_uri, 0.0, threshold)
    log.info("scoring %d images of %s (partitions %s) with model v%d", pending, dataset,
             ", ".join(d.isoformat() for d in dates), version)

    # Rows come in the bronze files' layout, and a night may sit in a file or
    # two: read as it is, one core would predict the whole night. Predicting an
    # image costs far more than shuffling its bytes, so deal the rows
    # round-robin into a whole number of waves over every task slot.
    slots = spark.sparkContext.defaultParallelism
    tasks = math.ceil(max(slots, math.ceil(pending / cfg.score.rows_per_task)) / slots) * slots
    todo = todo.repartition(tasks)
    model_bytes = registry.read_model_bytes(spark, model_dir)
    shipped = spark.sparkContext.broadcast(model_bytes)
    size, policy, batch = record["size"], record["resize"], cfg.score.batch_size
    threads = max(1, int(spark.conf.get("spark.task.cpus", "1")))
    known = registry.modalities(record, cfg.ingest.modality(dataset))
    pixels = registry.pixel_options(record)
    scored_rows = todo.mapInPandas(
        lambda batches: _score_batches(batches, shipped, size, policy, batch, threads, pixels, known), _SCORED)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    rows = scored_rows.select(
        "image_id", F.lit(dataset).alias("dataset"), F.lit(version).alias("model_version"), "probability",
        F.when(F.col("probability").isNull(), F.lit(None).cast("int"))
        .otherwise((F.col("probability") >= threshold).cast("int")).alias("predicted_label"),
        F.lit(threshold).alias("threshold"), "error", F.lit(now).cast("timestamp").alias("scored_at"),
        "ingest_date", *imaging.STATISTICS)
    faults.barrier("score.merge")
    start = time.perf_counter()
    before = lake.current_version(target)
    on = (f"t.dataset = {lake.sql_string(dataset)} AND t.model_version = {int(version)} AND t.dataset = s.dataset "
          "AND t.model_version = s.model_version AND t.image_id = s.image_id AND t.ingest_date = s.ingest_date")
    # Image rows are large: a bounded Arrow batch keeps each Python worker's
    # memory small; a night of mammograms (10 MB each) gets a few per batch.
    largest = images.filter(in_dates).agg(F.max("size_bytes")).first()[0]
    rows_per_batch = lake.arrow_batch_rows(largest, cfg.ingest.batch_mb, cfg.score.arrow_batch_rows)
    with lake.spark_conf(spark, {"spark.sql.execution.arrow.maxRecordsPerBatch": str(rows_per_batch)}), \
            lake.own_commits(spark):
        lake.with_retry(lambda: target.alias("t").merge(rows.alias("s"), on).whenNotMatchedInsertAll().execute(),
                        f"insert into {predictions_uri}")
        seconds = time.perf_counter() - start
        inserted = lake.commit_metric(target, before, "numTargetRowsInserted")
    tally = (target.toDF().filter((F.col("dataset") == dataset) & (F.col("model_version") == version)
                                  & in_dates & F.col("error").isNotNull())
             .agg(F.count("*").alias("errors"),
                  F.sum((F.col("error") == MODALITY_MISMATCH).cast("int")).alias("mismatch")).first())
    shipped.unpersist()
    _declare_tables(spark, lake_uri)
    return _summary(dataset, version, dates, inserted, already, tally["errors"], predictions_uri,
                    inserted / seconds if seconds > 0 else 0.0, threshold,
                    modality_mismatch=tally["mismatch"] or 0, modalities=known)


def _declare_tables(spark: SparkSession, lake_uri: str) -> None:
    """Keep the analysts' catalog views current; scoring itself does not depend on it."""
    from oncolake import catalog
    try:
        catalog.register(spark, lake_uri)
    except Exception as err:  # a busy or unreachable metastore must not fail the night
        log.warning("could not declare catalog tables: %s", str(err).splitlines()[0][:200])


def _parse_date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError as err:
        raise ConfigError(f"--ingest-date must be YYYY-MM-DD, got {value!r}") from err


def _model(shipped) -> Any:
    """The model for this Python worker: loaded on first use, then kept."""
    data = shipped.value
    key = hashlib.sha256(data).hexdigest()
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = registry.load_model_bytes(data)
    return _MODELS[key]


def _score_batches(batches: Iterator[pd.DataFrame], shipped, size: int, policy: str, batch_size: int,
                   threads: int, pixels: dict[str, bool] | None = None,
                   modalities: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """Executor side: decode with the preprocessing function, predict in batches.

    Each predicted image also gets :func:`oncolake.imaging.image_statistics`
    of the tensor the model saw (the nightly drift figures). With
    ``modalities``, an image of any other modality is not decoded nor
    predicted: its row gets the error ``modality_mismatch``.
    """
    import cv2
    import tensorflow as tf
    cv2.setNumThreads(1)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already set by an earlier task in this reused worker
        pass
    model = _model(shipped)
    for frame in batches:
        tensors, keep, errors = [], [], [None] * len(frame)
        statistics = np.full((len(frame), len(imaging.STATISTICS)), np.nan)
        kinds = frame["modality"] if modalities is not None and "modality" in frame else [None] * len(frame)
        for i, (content, kind) in enumerate(zip(frame["content"], kinds)):
            if kind is not None and kind not in modalities:
                errors[i] = MODALITY_MISMATCH
                continue
            try:
                tensors.append(imaging.prepare(bytes(content), size, policy, **(pixels or {})))
                statistics[i] = imaging.image_statistics(tensors[-1])
                keep.append(i)
            except (imaging.ImageError, cv2.error) as err:
                errors[i] = str(err)[:200]
        probability = np.full(len(frame), np.nan)
        if tensors:
            probability[keep] = model.predict(np.stack(tensors), batch_size=batch_size, verbose=0).ravel()
        out = pd.DataFrame({"image_id": frame["image_id"], "ingest_date": frame["ingest_date"],
                            "probability": np.where(np.isnan(probability), None, probability),
                            "error": errors})
        for j, name in enumerate(imaging.STATISTICS):
            out[name] = np.where(np.isnan(statistics[:, j]), None, statistics[:, j])
        yield out


def _summary(dataset, version, dates, inserted, already, errors, table, rate, threshold,
             modality_mismatch: int = 0, modalities: list[str] | None = None) -> dict[str, Any]:
    return {"job": "score", "dataset": dataset, "model_version": version,
            "partitions_scored": [d.isoformat() for d in dates], "scored": inserted,
            "already_scored": already, "errors": errors, "modality_mismatch": modality_mismatch,
            "model_modalities": modalities or [], "table": table,
            "images_per_sec": round(rate, 1), "threshold": threshold}
