"""Preprocess: a dataset's labelled bronze images become a versioned tensor dataset.

``LAKE/silver/tensors/NAME/v<N>/split=<train|val|test>/`` are Petastorm datasets
(uint8 ``size`` x ``size`` x 3 tensors, NdarrayCodec) with a ``manifest.json``
beside them; ``silver.splits`` records image -> split for every version.

Splits are grouped (lesion or patient; an image is its own group without one)
and stratified by label. A group keeps the split it had in the newest earlier
version made with the same seed and fractions; new groups are dealt, in the
order of a seeded hash of their id, to whichever split is furthest below its
target share of the group's label. So a rerun gives the same split, new images
never move old ones, and class ratios stay close to the whole in every split.

A version is built under ``_tmp-*`` (ignored by readers) and renamed into
place only when complete, so a killed run leaves nothing readable.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import io
import json
import logging
import math
import re
import uuid
from typing import Any, Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import IntegerType, StringType

from oncolake import imaging, lake, timing
from oncolake.config import Config, HdfsConfig, PreprocessConfig
from oncolake.errors import ConfigError, DataQualityError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BALANCING = ("none", "undersample", "oversample", "class_weight")
_VERSION = re.compile(r"^v(\d+)$")
#: Each split is written as at least this many files (row groups), so up to this
#: many training processes each get a shard.
MIN_FILES = 4
#: A ``_tmp-*`` folder this old was left by a killed run (a live run finishes
#: far sooner) and is deleted by the next run.
ABANDONED_AFTER_S = 24 * 3600
_TENSORS = ("image_id string, label int, group_id string, split string, image binary, "
            "s0 double, s1 double, s2 double, q0 double, q1 double, q2 double, error string")


def tensor_schema(size: int):
    """The Petastorm Unischema of a tensor dataset of ``size`` x ``size`` images."""
    from petastorm.codecs import NdarrayCodec, ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField
    return Unischema("OncolakeTensors", [
        UnischemaField("image_id", np.str_, (), ScalarCodec(StringType()), False),
        UnischemaField("label", np.int32, (), ScalarCodec(IntegerType()), False),
        UnischemaField("group_id", np.str_, (), ScalarCodec(StringType()), True),
        UnischemaField("image", np.uint8, (size, size, 3), NdarrayCodec(), False),
    ])


def tensors_root(lake_uri: str, dataset: str) -> str:
    return f"{lake_uri.rstrip('/')}/silver/tensors/{dataset}"


def published_versions(spark: SparkSession, lake_uri: str, dataset: str) -> list[int]:
    """Complete versions of ``dataset``'s tensors, oldest first."""
    root = tensors_root(lake_uri, dataset)
    found = (_VERSION.match(name) for name in lake.list_dir(spark, root))
    return sorted(int(m.group(1)) for m in found if m)


def read_manifest(spark: SparkSession, lake_uri: str, dataset: str, version: int) -> dict[str, Any]:
    return json.loads(lake.read_text(spark, f"{tensors_root(lake_uri, dataset)}/v{version}/manifest.json"))


def run(spark: SparkSession, cfg: Config, dataset: str) -> dict[str, Any]:
    """Build (or find) the tensor dataset version for ``dataset``'s current bronze data."""
    pcfg = cfg.preprocess
    _check(pcfg)
    lake_uri = lake.qualify(spark, cfg.lake)
    bronze_uri = lake.table_uri(lake_uri, "bronze.images")
    if not lake.exists(spark, bronze_uri):
        raise DataQualityError(f"no bronze table at {bronze_uri}: ingest {dataset} first")
    source_version = lake.table_version(spark, bronze_uri)
    bronze = (spark.read.format("delta").option("versionAsOf", source_version).load(bronze_uri)
              .filter(F.col("dataset") == dataset))
    # Not cached: counts and the digest read no image bytes (Parquet column pruning).
    return _run(spark, cfg, dataset, lake_uri, source_version, _labelled(bronze, pcfg))


def _step(name: str):
    return timing.step(log, "preprocess", name)


def _run(spark, cfg, dataset, lake_uri, source_version, labelled) -> dict[str, Any]:
    pcfg = cfg.preprocess
    with _step("count labels and fingerprint"):
        # One pass over the small columns: images per label, and a digest of
        # the labelled images that says whether an existing version holds them.
        rows = labelled.groupBy("label").agg(
            F.count("*").alias("count"),
            F.sum(F.xxhash64("image_id", "label", "group_id").cast("decimal(38,0)")).alias("digest")).collect()
        counts = {r["label"]: r["count"] for r in rows}
        sums = [r["digest"] for r in rows if r["label"] is not None]
        digest = str(sum(sums)) if sums else None  # as Spark renders the decimal(38,0) sum
        fingerprint = _fingerprint(pcfg, digest)
    unknown = counts.pop(None, 0)
    if not counts:
        raise DataQualityError(f"dataset {dataset} has no labelled images ({unknown} with unknown labels)")
    if len(counts) < 2:
        raise DataQualityError(f"dataset {dataset} has a single class ({counts}); need benign and malignant")
    with _step("list versions"):
        versions = published_versions(spark, lake_uri, dataset)
        manifests = {v: read_manifest(spark, lake_uri, dataset, v) for v in versions}
    for version, manifest in manifests.items():
        if manifest.get("fingerprint") == fingerprint:
            log.info("tensors v%d already hold this data and configuration", version)
            return _summary(dataset, version, tensors_root(lake_uri, dataset), manifest, created=False)

    _sweep_abandoned(spark, tensors_root(lake_uri, dataset))
    splits_uri = lake.table_uri(lake_uri, "silver.splits")
    prior = _prior_assignments(spark, splits_uri, dataset, manifests, pcfg)
    images = labelled.filter(F.col("label").isNotNull())
    assigned = _assign_splits(images, prior, pcfg)
    version = (versions[-1] + 1) if versions else 1
    # Everything is built under _tmp-* (ignored by readers) and renamed into place.
    tmp = f"{tensors_root(lake_uri, dataset)}/_tmp-v{version}-{uuid.uuid4().hex[:8]}"
    try:
        # Decode once into a staging Parquet table partitioned by split: later
        # passes read only the columns (tally, lineage) or the split (each
        # Petastorm write) they need, instead of every tensor every time.
        stage = f"{tmp}/stage"  # not "_stage": Spark warns about reading paths that start with _
        with _step("split and decode"):
            (assigned.mapInPandas(lambda it: _tensor_batches(it, pcfg.size, pcfg.resize), _TENSORS)
             .write.partitionBy("split").parquet(stage))
        tensors = spark.read.parquet(stage)
        with _step("tally"):
            failures, class_counts, norm = _tally(tensors, pcfg.size)
        if any(sum(class_counts[s].values()) == 0 for s in SPLITS):
            raise DataQualityError(f"dataset {dataset} is too small to fill train, val and test: {class_counts}")
        good = tensors.filter(F.col("error").isNull())
        train, balance_info = _balance(good.filter(F.col("split") == "train"), class_counts["train"], pcfg)
        manifest = {
            "dataset": dataset, "version": version, "fingerprint": fingerprint,
            "source_table": lake.table_uri(lake_uri, "bronze.images"),
            "source_table_version": source_version, "size": pcfg.size, "resize": pcfg.resize,
            "seed": pcfg.seed, "split_fractions": dict(pcfg.split),
            "class_counts": class_counts, "balancing": balance_info, "normalisation": norm,
            "unknown_labels": unknown, "decode_failures": failures,
            "label_mapping": {"1": list(pcfg.positive_labels), "0": list(pcfg.negative_labels)},
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        parts = {"train": train, "val": good.filter(F.col("split") == "val"),
                 "test": good.filter(F.col("split") == "test")}
        _publish(spark, tmp, parts, manifest, splits_uri, good, pcfg.rows_per_row_group, cfg.hdfs)
        return _summary(dataset, version, tensors_root(lake_uri, dataset), manifest, created=True)
    finally:
        if lake.exists(spark, tmp):
            lake.delete(spark, tmp)


def _sweep_abandoned(spark: SparkSession, root: str) -> None:
    """Delete the ``_tmp-*`` folders of runs killed more than ABANDONED_AFTER_S ago.

    Readers never see them, but a killed run can leave a whole staging table
    behind; younger ones may belong to a run still going and are left alone.
    """
    for name, age in lake.ages(spark, root).items():
        if name.startswith("_tmp-") and age > ABANDONED_AFTER_S:
            log.info("deleting %s/%s, left by a run killed %.0f hours ago", root, name, age / 3600)
            lake.delete(spark, f"{root}/{name}")


def _check(pcfg: PreprocessConfig) -> None:
    if set(pcfg.split) != set(SPLITS) or not math.isclose(sum(pcfg.split.values()), 1.0, abs_tol=1e-6) \
            or min(pcfg.split.values()) <= 0:
        raise ConfigError(f"preprocess.split needs train, val and test fractions > 0 summing to 1, "
                          f"got {dict(pcfg.split)}")
    if pcfg.balance not in BALANCING:
        raise ConfigError(f"preprocess.balance must be one of {BALANCING}, got {pcfg.balance!r}")
    if pcfg.resize not in imaging.RESIZE_POLICIES:
        raise ConfigError(f"preprocess.resize must be one of {imaging.RESIZE_POLICIES}, got {pcfg.resize!r}")
    if not 8 <= pcfg.size <= 1024:
        raise ConfigError(f"preprocess.size must be between 8 and 1024, got {pcfg.size}")


def _labelled(bronze: DataFrame, pcfg: PreprocessConfig) -> DataFrame:
    """Bronze rows with the label mapped to 1 (malignant), 0 (benign) or null (unknown)."""
    raw = F.lower(F.trim("label"))
    label = (F.when(raw.isin([v.lower() for v in pcfg.positive_labels]), 1)
             .when(raw.isin([v.lower() for v in pcfg.negative_labels]), 0))
    return bronze.select("image_id", label.cast("int").alias("label"), "group_id", "content",
                         F.coalesce("group_id", F.concat(F.lit("image:"), "image_id")).alias("group_key"))


def _fingerprint(pcfg: PreprocessConfig, digest: str | None) -> str:
    import hashlib
    settings = json.dumps({k: (dict(v) if isinstance(v, dict) else v)
                           for k, v in dataclasses.asdict(pcfg).items()}, sort_keys=True, default=list)
    return hashlib.sha256(f"{settings}|{digest}".encode()).hexdigest()[:16]


def _prior_assignments(spark: SparkSession, splits_uri: str, dataset: str, manifests: dict[int, dict],
                       pcfg: PreprocessConfig) -> DataFrame | None:
    """group_key -> split from the newest version made with the same seed and fractions."""
    same = [v for v, m in manifests.items()
            if m.get("seed") == pcfg.seed and m.get("split_fractions") == dict(pcfg.split)]
    if not same or not lake.exists(spark, splits_uri):
        return None
    rows = (spark.read.format("delta").load(splits_uri)
            .filter((F.col("dataset") == dataset) & (F.col("version") == max(same))))
    return rows.select("group_key", F.col("split").alias("prior")).dropDuplicates(["group_key"])


def _assign_splits(images: DataFrame, prior: DataFrame | None, pcfg: PreprocessConfig) -> DataFrame:
    """Add ``split`` to every image: grouped, stratified, stable (see the module doc)."""
    groups = (images.groupBy("group_key").agg(F.count("*").alias("images"), F.max("label").alias("stratum"))
              .withColumn("order", F.xxhash64(F.lit(pcfg.seed), "group_key")))
    if prior is not None:
        groups = groups.join(prior, "group_key", "left")
    else:
        groups = groups.withColumn("prior", F.lit(None).cast("string"))
    fractions = dict(pcfg.split)
    assignment = groups.groupBy("stratum").applyInPandas(
        lambda pdf: _deal(pdf, fractions), "group_key string, split string")
    return images.join(F.broadcast(assignment), "group_key")


def _deal(groups: pd.DataFrame, fractions: dict[str, float]) -> pd.DataFrame:
    """Within one stratum: keep prior splits, deal new groups to the split most below target."""
    names = list(SPLITS)
    target = np.array([fractions[n] for n in names])
    kept = groups[groups["prior"].isin(names)]
    counts = np.array([kept.loc[kept["prior"] == n, "images"].sum() for n in names], dtype=float)
    new = groups[~groups["prior"].isin(names)].sort_values(["order", "group_key"])
    picks = []
    for size in new["images"]:
        deficit = target * (counts.sum() + size) - counts
        choice = int(np.argmax(deficit))
        counts[choice] += size
        picks.append(names[choice])
    return pd.concat([
        pd.DataFrame({"group_key": kept["group_key"], "split": kept["prior"]}),
        pd.DataFrame({"group_key": new["group_key"], "split": picks}),
    ], ignore_index=True)


def _tensor_batches(batches: Iterator[pd.DataFrame], size: int, policy: str) -> Iterator[pd.DataFrame]:
    """Executor side: bytes -> uint8 tensor (npy bytes, as Petastorm's NdarrayCodec stores it)."""
    import cv2
    cv2.setNumThreads(1)
    for batch in batches:
        rows = []
        for image_id, label, group_id, split, content in zip(
                batch["image_id"], batch["label"], batch["group_id"], batch["split"], batch["content"]):
            row = {"image_id": image_id, "label": label, "group_id": group_id, "split": split,
                   "image": None, "error": None}
            try:
                tensor = imaging.prepare(bytes(content), size, policy)
            except (imaging.ImageError, cv2.error) as err:
                row["error"] = str(err)[:200]
            else:
                buffer = io.BytesIO()
                np.save(buffer, tensor)
                row["image"] = buffer.getvalue()
                pixels = tensor.reshape(-1, 3).astype(np.float64)
                for c in range(3):
                    row[f"s{c}"] = float(pixels[:, c].sum())
                    row[f"q{c}"] = float((pixels[:, c] ** 2).sum())
            rows.append(row)
        out = pd.DataFrame(rows, columns=["image_id", "label", "group_id", "split", "image",
                                          "s0", "s1", "s2", "q0", "q1", "q2", "error"])
        out["label"] = out["label"].astype("int32")
        yield out


def _tally(tensors: DataFrame, size: int) -> tuple[int, dict[str, dict[str, int]], dict[str, Any]]:
    """Decode failures, class counts per split and the normalisation, in one pass.

    Normalisation is the per-channel mean and standard deviation of the
    training split's pixels (0-255 scale), from the per-image sums.
    """
    sums = ("s0", "s1", "s2", "q0", "q1", "q2")
    rows = (tensors.groupBy("split", "label", F.col("error").isNull().alias("ok"))
            .agg(F.count("*").alias("n"), *[F.sum(c).alias(c) for c in sums]).collect())
    failures = sum(r["n"] for r in rows if not r["ok"])
    class_counts = {s: {"0": 0, "1": 0} for s in SPLITS}
    total = dict.fromkeys(sums, 0.0)
    images = 0
    for r in rows:
        if not r["ok"]:
            continue
        class_counts[r["split"]][str(r["label"])] = r["n"]
        if r["split"] == "train":
            images += r["n"]
            for c in sums:
                total[c] += r[c]
    pixels = max(images, 1) * size * size
    mean = [total[f"s{c}"] / pixels for c in range(3)]
    std = [math.sqrt(max(total[f"q{c}"] / pixels - mean[c] ** 2, 0.0)) for c in range(3)]
    norm = {"mean": [round(m, 4) for m in mean], "std": [round(s, 4) for s in std],
            "computed_on": "train", "images": images}
    return failures, class_counts, norm


def _balance(train: DataFrame, counts: dict[str, int], pcfg: PreprocessConfig) -> tuple[DataFrame, dict]:
    """Balance the training split only; returns the rows and what was done."""
    n0, n1 = counts["0"], counts["1"]
    info: dict[str, Any] = {"method": pcfg.balance, "seed": pcfg.seed, "before": {"0": n0, "1": n1}}
    minority, majority = ("0", "1") if n0 < n1 else ("1", "0")
    order = F.xxhash64(F.lit(pcfg.seed), "image_id")
    if pcfg.balance == "undersample":
        from pyspark.sql.window import Window
        rank = F.row_number().over(Window.partitionBy("label").orderBy(order, "image_id"))
        train = (train.withColumn("_rank", rank)
                 .filter((F.col("label") == int(minority)) | (F.col("_rank") <= counts[minority]))
                 .drop("_rank"))
        after = {minority: counts[minority], majority: counts[minority]}
    elif pcfg.balance == "oversample":
        whole, extra = divmod(counts[majority], counts[minority])
        from pyspark.sql.window import Window
        rank = F.row_number().over(Window.partitionBy("label").orderBy(order, "image_id"))
        copies = F.when(F.col("label") == int(minority),
                        F.lit(whole) + (F.col("_rank") <= extra).cast("int")).otherwise(1)
        train = (train.withColumn("_rank", rank).withColumn("_copy", F.explode(F.sequence(F.lit(1), copies)))
                 .drop("_rank", "_copy"))
        after = {minority: counts[majority], majority: counts[majority]}
    else:
        after = {"0": n0, "1": n1}
        if pcfg.balance == "class_weight":
            total = n0 + n1
            info["class_weight"] = {"0": round(total / (2 * n0), 6), "1": round(total / (2 * n1), 6)}
    info["after"] = {k: after[k] for k in ("0", "1")}
    return train, info


def _publish(spark: SparkSession, tmp: str, parts: dict[str, DataFrame], manifest: dict[str, Any],
             splits_uri: str, good: DataFrame, rows_per_group: int, hdfs: HdfsConfig) -> None:
    """Write the splits under ``tmp``, record lineage, then rename ``tmp`` into place as the version."""
    from petastorm.etl.dataset_metadata import materialize_dataset
    dataset, version = manifest["dataset"], manifest["version"]
    schema = tensor_schema(manifest["size"])
    row_bytes = manifest["size"] ** 2 * 3 + 128
    group_mb = max(1, math.ceil(rows_per_group * row_bytes / 2 ** 20))
    for split, frame in parts.items():
        rows = manifest["balancing"]["after"] if split == "train" else manifest["class_counts"][split]
        n = sum(rows.values())
        # Petastorm shards by row group: enough files for MIN_FILES Horovod ranks.
        files = max(min(MIN_FILES, n), math.ceil(n * row_bytes / (64 * 2 ** 20)))
        url = f"{tmp}/split={split}"
        factory = (None if lake.is_local(url) else
                   functools.partial(lake.petastorm_filesystem, url, hdfs))
        with _step(f"write {split}"), materialize_dataset(spark, url, schema, row_group_size_mb=group_mb,
                                                          filesystem_factory=factory):
            (frame.select("image_id", "label", "group_id", "image").repartition(files)
             .sortWithinPartitions("image_id").write.mode("overwrite").parquet(url))
    with _step("record splits"):
        _record_splits(spark, splits_uri, dataset, version, good)
    lake.delete(spark, f"{tmp}/stage")
    lake.write_text(spark, f"{tmp}/manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    target = tmp.rsplit("/", 1)[0] + f"/v{version}"
    if not lake.rename(spark, tmp, target):
        raise DataQualityError(f"{target} appeared while this run was writing it (a concurrent run?); "
                               "run again")
    log.info("published %s", target)


def _record_splits(spark: SparkSession, uri: str, dataset: str, version: int, good: DataFrame) -> None:
    """Lineage: image -> split for this version (replaced whole if a killed run left some)."""
    rows = good.select(F.lit(dataset).alias("dataset"), F.lit(version).alias("version"), "image_id",
                       "group_id", F.coalesce("group_id", F.concat(F.lit("image:"), "image_id")).alias("group_key"),
                       "label", "split")
    lake.with_retry(lambda: rows.write.format("delta").mode("overwrite")
                    .option("replaceWhere", f"dataset = '{dataset}' AND version = {version}")
                    .partitionBy("dataset").save(uri), f"record splits in {uri}")


def _summary(dataset: str, version: int, root: str, manifest: dict[str, Any], created: bool) -> dict[str, Any]:
    counts = manifest["class_counts"]
    return {
        "job": "preprocess", "dataset": dataset, "version": version, "output": f"{root}/v{version}",
        "created": created,
        "train": sum(counts["train"].values()), "val": sum(counts["val"].values()),
        "test": sum(counts["test"].values()),
        "train_after_balancing": sum(manifest["balancing"]["after"].values()),
        "balancing": manifest["balancing"]["method"], "class_counts": counts,
        "normalisation": manifest["normalisation"], "unknown_labels": manifest["unknown_labels"],
        "decode_failures": manifest["decode_failures"],
        "source_table_version": manifest["source_table_version"],
    }
