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

Each image's bytes are read and decoded once: one Spark job decodes, balances
(copies or drops training rows as planned from the label counts), tallies
(class counts, decode failures, normalisation sums, through ``observe``) and
writes all three splits. A version is built under ``_tmp-*`` (ignored by
readers) and renamed into place only when complete, so a killed run leaves
nothing readable.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import logging
import math
import pickle
import re
from typing import Any, Iterator

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import IntegerType, StringType

from oncolake import imaging, lake, registry, schema, timing
from oncolake.config import Config, HdfsConfig, PreprocessConfig
from oncolake.errors import ConfigError, DataQualityError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BALANCING = ("none", "undersample", "oversample", "class_weight")
_VERSION = re.compile(r"^v(\d+)$")
#: Each split is written as at least this many files (row groups), so up to this
#: many training processes each get a shard.
MIN_FILES = 4
#: Tensor bytes per decode task (and so per output file of the training split).
TASK_BYTES = 64 * 2 ** 20
_SUMS = ("s0", "s1", "s2", "q0", "q1", "q2")
_NO_SUMS = (None,) * len(_SUMS)
#: Parquet writer settings: no summary files (Petastorm's metadata is written
#: after), and row groups cut by size from the third row on. Petastorm's
#: materialize_dataset sets parquet.block.size.row.check.min for that, which
#: parquet-mr 1.13 (Spark 3.5) no longer reads: it checks a row group's size
#: only from the page-size check's minimum, 100 rows, on.
_ROW_GROUPS = {"parquet.summary.metadata.level": "NONE", "parquet.page.size.row.check.min": "3"}
_TENSORS = ("image_id string, label int, group_id string, split string, aux int, image binary, keep boolean, "
            "first boolean, s0 double, s1 double, s2 double, q0 double, q1 double, q2 double, error string")


def tensor_schema(size: int, aux: bool = False):
    """The Petastorm Unischema of a tensor dataset of ``size`` x ``size`` images (and their aux class)."""
    from petastorm.codecs import NdarrayCodec, ScalarCodec
    from petastorm.unischema import Unischema, UnischemaField
    return Unischema("OncolakeTensors", [
        UnischemaField("image_id", np.str_, (), ScalarCodec(StringType()), False),
        UnischemaField("label", np.int32, (), ScalarCodec(IntegerType()), False),
        UnischemaField("group_id", np.str_, (), ScalarCodec(StringType()), True),
        UnischemaField("image", np.uint8, (size, size, 3), NdarrayCodec(), False),
        *([UnischemaField("aux", np.int32, (), ScalarCodec(IntegerType()), False)] if aux else []),
    ])


def published_versions(spark: SparkSession, lake_uri: str, dataset: str) -> list[int]:
    """Complete versions of ``dataset``'s tensors, oldest first."""
    root = lake.tensors_root(lake_uri, dataset)
    found = (_VERSION.match(name) for name in lake.list_dir(spark, root))
    return sorted(int(m.group(1)) for m in found if m)


def read_manifest(spark: SparkSession, lake_uri: str, dataset: str, version: int) -> dict[str, Any]:
    return json.loads(lake.read_text(spark, f"{lake.tensors_uri(lake_uri, dataset, version)}/manifest.json"))


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
    return _run(spark, cfg, dataset, lake_uri, source_version,
                _labelled(bronze, pcfg, cfg.ingest.modality(dataset), pcfg.aux_attribute))


def _step(name: str):
    return timing.step(log, "preprocess", name)


def _run(spark, cfg, dataset, lake_uri, source_version, labelled) -> dict[str, Any]:
    pcfg = cfg.preprocess
    with _step("count labels and fingerprint"):
        # One pass over the small columns: images per label, and a digest of
        # the labelled images that says whether an existing version holds them
        # (their aux attribute's values too, when the tensors carry it).
        hashed = ("image_id", "label", "group_id", *(("aux_value",) if pcfg.aux_attribute else ()))
        rows = labelled.groupBy("label").agg(
            F.count("*").alias("count"),
            F.sum(F.xxhash64(*hashed).cast("decimal(38,0)")).alias("digest"),
            F.collect_set("modality").alias("modalities"), F.max("size_bytes").alias("largest"),
            F.collect_set(F.col("aux_value") if pcfg.aux_attribute else F.lit(None).cast("string")).alias("aux"),
        ).collect()
        counts = {r["label"]: r["count"] for r in rows}
        modalities = sorted({m for r in rows if r["label"] is not None for m in r["modalities"]})
        largest = max(((r["largest"] or 0) for r in rows), default=0)
        sums = [r["digest"] for r in rows if r["label"] is not None]
        digest = str(sum(sums)) if sums else None  # as Spark renders the decimal(38,0) sum
        fingerprint = _fingerprint(pcfg, digest)
        aux_classes = sorted({v for r in rows if r["label"] is not None for v in r["aux"]})
    unknown = counts.pop(None, 0)
    if not counts:
        raise DataQualityError(f"dataset {dataset} has no labelled images ({unknown} with unknown labels)")
    if len(counts) < 2:
        raise DataQualityError(f"dataset {dataset} has a single class ({counts}); need benign and malignant")
    if pcfg.aux_attribute and len(aux_classes) < 2:
        raise DataQualityError(f"preprocess.aux_attribute {pcfg.aux_attribute!r} takes {len(aux_classes)} value(s) "
                               f"in dataset {dataset}'s labelled images ({aux_classes}); an auxiliary task needs 2 "
                               f"or more (is it a column of the labels CSV?)")
    with _step("list versions"):
        lake.sweep_scratch(spark, lake.tensors_root(lake_uri, dataset))  # killed runs' _tmp-* folders
        versions = published_versions(spark, lake_uri, dataset)
        manifests = {v: read_manifest(spark, lake_uri, dataset, v) for v in versions}
    for version, manifest in manifests.items():
        if manifest.get("fingerprint") == fingerprint:
            log.info("tensors v%d already hold this data and configuration", version)
            return _summary(dataset, version, lake.tensors_root(lake_uri, dataset), manifest, created=False)

    splits_uri = lake.table_uri(lake_uri, "silver.splits")
    images = labelled.filter(F.col("label").isNotNull()).withColumn("aux", _aux_index(pcfg, aux_classes))
    # group -> split (and the group's images per label) is small: kept, so the
    # plan, the decode and the lineage see one assignment.
    assignment = _assign_splits(images.drop("content"), _prior_assignments(
        spark, splits_uri, dataset, manifests, pcfg), pcfg).persist()
    version = (versions[-1] + 1) if versions else 1
    # Everything is built under _tmp-* (ignored by readers) and renamed into place.
    tmp = f"{lake.tensors_root(lake_uri, dataset)}/{lake.scratch_name(f'v{version}')}"
    try:
        split_of = F.broadcast(assignment.select("group_key", "split"))
        meta = images.drop("content").join(split_of, "group_key")
        with _step("plan"):
            planned = {s: {"0": 0, "1": 0} for s in SPLITS}
            for r in assignment.groupBy("split").agg(F.sum("images").alias("n"), F.sum("ones").alias("ones")).collect():
                planned[r["split"]] = {"0": r["n"] - r["ones"], "1": r["ones"]}
            _check_filled(dataset, planned, pcfg.require_all_splits)
            copies, planned_after = _balance_plan(meta.filter(F.col("split") == "train"), planned["train"], pcfg)
        expected = sum(sum(planned[s].values()) for s in ("val", "test")) + sum(planned_after.values())
        with _step("decode, balance and write"):
            # Arrow batches of about ingest.batch_mb of stored images (a few
            # mammograms, hundreds of dermoscopy JPEGs) bound a worker's memory.
            batch_rows = lake.arrow_batch_rows(largest, cfg.ingest.batch_mb)
            with lake.spark_conf(spark, {"spark.sql.execution.arrow.maxRecordsPerBatch": str(batch_rows)}):
                tally = _write_tensors(spark, tmp, images.join(split_of, "group_key")
                                       .withColumn("copies", copies), pcfg, expected, dataset, cfg.hdfs,
                                       len(aux_classes))
        class_counts, failed = tally["class_counts"], tally["failed"]
        manifest = {
            "dataset": dataset, "version": version, "fingerprint": fingerprint,
            "source_table": lake.table_uri(lake_uri, "bronze.images"),
            "source_table_version": source_version, "size": pcfg.size, "resize": pcfg.resize,
            "pixels": pcfg.pixels(), "modalities": modalities,
            "seed": pcfg.seed, "split_fractions": dict(pcfg.split),
            "class_counts": class_counts,
            "balancing": _balance_info(class_counts["train"], tally["written"]["train"], pcfg),
            "normalisation": tally["normalisation"],
            "unknown_labels": unknown, "decode_failures": len(failed),
            **({"aux": {"attribute": pcfg.aux_attribute, "classes": aux_classes,
                        "train_counts": tally["aux_counts"]}} if pcfg.aux_attribute else {}),
            "label_mapping": {"1": list(pcfg.positive_labels), "0": list(pcfg.negative_labels)},
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        with _step("record splits"):
            good = meta.join(F.broadcast(spark.createDataFrame([(i,) for i in failed], "image_id string")),
                             "image_id", "left_anti") if failed else meta
            _record_splits(spark, splits_uri, dataset, version, good)
        _publish(spark, tmp, manifest)
        return _summary(dataset, version, lake.tensors_root(lake_uri, dataset), manifest, created=True)
    finally:
        assignment.unpersist()
        if lake.exists(spark, tmp):
            lake.delete(spark, tmp)


def _check_filled(dataset: str, counts: dict[str, dict[str, int]], require_all: bool = True) -> None:
    """Every split must get images (only train with ``preprocess.require_all_splits`` false)."""
    needed = SPLITS if require_all else ("train",)
    if any(sum(counts[s].values()) == 0 for s in needed):
        raise DataQualityError(f"dataset {dataset} is too small to fill {', '.join(needed)}: {counts} "
                               f"(groups, not images, are dealt to splits)")
    if not require_all and any(sum(counts[s].values()) == 0 for s in SPLITS):
        log.warning("dataset %s leaves a split empty (%s): tensors for inspection only, not for training",
                    dataset, counts)


def _check(pcfg: PreprocessConfig) -> None:
    if set(pcfg.split) != set(SPLITS) or not math.isclose(sum(pcfg.split.values()), 1.0, abs_tol=1e-6) \
            or min(pcfg.split.values()) <= 0:
        raise ConfigError(f"preprocess.split needs train, val and test fractions > 0 summing to 1, "
                          f"got {dict(pcfg.split)}")
    if pcfg.balance not in BALANCING:
        raise ConfigError(f"preprocess.balance must be one of {BALANCING}, got {pcfg.balance!r}")
    if pcfg.shades_of_grey < 0:
        raise ConfigError(f"preprocess.shades_of_grey must be 0 (off) or a norm >= 1, got {pcfg.shades_of_grey}")
    if pcfg.aux_attribute and not re.fullmatch(r"[A-Za-z0-9_.-]+", pcfg.aux_attribute):
        raise ConfigError(f"preprocess.aux_attribute must be a labels-CSV column name (letters, digits, _ . -) "
                          f"or empty, got {pcfg.aux_attribute!r}")
    if pcfg.resize not in imaging.RESIZE_POLICIES:
        raise ConfigError(f"preprocess.resize must be one of {imaging.RESIZE_POLICIES}, got {pcfg.resize!r}")
    if not 8 <= pcfg.size <= 1024:
        raise ConfigError(f"preprocess.size must be between 8 and 1024, got {pcfg.size}")


def _labelled(bronze: DataFrame, pcfg: PreprocessConfig, default_modality: str,
              aux_attribute: str = "") -> DataFrame:
    """Bronze rows with the label mapped to 1 (malignant), 0 (benign) or null (unknown).

    With ``aux_attribute``, each row also carries that attribute's value
    (``aux_value``; null where the labels CSV gave none).
    """
    raw = F.lower(F.trim("label"))
    label = (F.when(raw.isin([v.lower() for v in pcfg.positive_labels]), 1)
             .when(raw.isin([v.lower() for v in pcfg.negative_labels]), 0))
    aux = ([F.nullif(F.trim(F.col("attributes")[aux_attribute]), F.lit("")).alias("aux_value")]
           if aux_attribute else [])
    return bronze.select("image_id", label.cast("int").alias("label"), "group_id", "content", "size_bytes",
                         F.coalesce("group_id", F.concat(F.lit("image:"), "image_id")).alias("group_key"),
                         schema.modality(bronze, default_modality).alias("modality"), *aux)


def _aux_index(pcfg: PreprocessConfig, classes: list[str]) -> Column:
    """The image's aux class: its attribute value's index in ``classes`` (sorted); -1 without one."""
    if not pcfg.aux_attribute:
        return F.lit(-1)
    index = F.create_map(*[x for i, c in enumerate(classes) for x in (F.lit(c), F.lit(i))])
    return F.coalesce(index[F.col("aux_value")], F.lit(-1)).cast("int")


def differences(manifest: dict[str, Any], pcfg: PreprocessConfig) -> dict[str, tuple[Any, Any]]:
    """What a tensor version's images were made with that ``pcfg`` would make differently.

    Size, resize policy and pixel options (read as scoring reads a model's:
    :func:`oncolake.registry.pixel_options`), each as (the version's, the
    settings'). Empty when the settings would make the same pixels.
    """
    made = {"size": manifest.get("size"), "resize": manifest.get("resize"),
            "pixels": registry.pixel_options(manifest)}
    now = {"size": pcfg.size, "resize": pcfg.resize, "pixels": pcfg.pixels()}
    return {k: (made[k], now[k]) for k in made if made[k] != now[k]}


#: Settings added since tensors were first fingerprinted: while off, they leave the fingerprint as it was.
_ADDED_OFF = ("shades_of_grey", "aux_attribute")


def _fingerprint(pcfg: PreprocessConfig, digest: str | None) -> str:
    import hashlib
    settings = json.dumps({k: (dict(v) if isinstance(v, dict) else v)
                           for k, v in dataclasses.asdict(pcfg).items() if not (k in _ADDED_OFF and not v)},
                          sort_keys=True, default=list)
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
    """group_key -> split for every group: grouped, stratified, stable (see the module doc).

    Each row also carries the group's images and how many are malignant
    (``ones``), so the split's class counts need no second pass.
    """
    groups = (images.groupBy("group_key").agg(F.count("*").alias("images"), F.max("label").alias("stratum"),
                                              F.sum("label").alias("ones"))
              .withColumn("order", F.xxhash64(F.lit(pcfg.seed), "group_key")))
    if prior is not None:
        groups = groups.join(prior, "group_key", "left")
    else:
        groups = groups.withColumn("prior", F.lit(None).cast("string"))
    fractions = dict(pcfg.split)
    return groups.groupBy("stratum").applyInPandas(lambda pdf: _deal(pdf, fractions),
                                                  "group_key string, split string, images long, ones long")


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
        pd.DataFrame({"group_key": kept["group_key"], "split": kept["prior"], "images": kept["images"],
                      "ones": kept["ones"]}),
        pd.DataFrame({"group_key": new["group_key"], "split": picks, "images": new["images"], "ones": new["ones"]}),
    ], ignore_index=True)


def _tensor_batches(batches: Iterator[pd.DataFrame], size: int, policy: str,
                    options: dict[str, bool] | None = None) -> Iterator[pd.DataFrame]:
    """Executor side: bytes -> uint8 tensor (npy bytes, as Petastorm's NdarrayCodec stores it).

    An image comes out ``copies`` times (its balancing plan); the first row
    carries any decode error and, for a training image, its pixel sums. An
    image planned out of the training set (``copies`` 0) is still decoded for
    the statistics and comes out once with ``keep`` false.
    """
    import cv2
    cv2.setNumThreads(1)
    names = ["image_id", "label", "group_id", "split", "aux"]
    for batch in batches:
        index, images, keep, first, errors, sums = [], [], [], [], [], []

        def emit(i: int, image: bytes | None, kept: bool, is_first: bool, error: str | None, pixels: tuple) -> None:
            index.append(i)
            images.append(image)
            keep.append(kept)
            first.append(is_first)
            errors.append(error)
            sums.append(pixels)
        for i, (content, copies, split) in enumerate(zip(batch["content"], batch["copies"], batch["split"])):
            copies = int(copies)
            try:
                tensor = imaging.prepare(bytes(content), size, policy, **(options or {}))
            except (imaging.ImageError, cv2.error) as err:
                emit(i, None, False, True, str(err)[:200], _NO_SUMS)
                continue
            image = None
            if copies > 0:
                buffer = io.BytesIO()
                np.save(buffer, tensor)
                image = buffer.getvalue()
            # float64 sums per channel (squares to about 1e-16 relative); only training images make the statistics
            emit(i, image, copies > 0, True, None,
                 (*cv2.sumElems(tensor)[:3], *(cv2.norm(p, cv2.NORM_L2SQR) for p in cv2.split(tensor)))
                 if split == "train" else _NO_SUMS)
            for _ in range(copies - 1):
                emit(i, image, True, False, None, _NO_SUMS)
        out = batch[names].iloc[index].reset_index(drop=True)
        out["label"], out["aux"] = out["label"].astype("int32"), out["aux"].astype("int32")
        out["image"], out["keep"], out["first"] = images, keep, first
        out[list(_SUMS)] = pd.DataFrame(sums, columns=list(_SUMS), dtype="float64")
        out["error"] = errors
        yield out


def _order(seed: int) -> Column:
    """The seeded order in which balancing picks training images."""
    return F.xxhash64(F.lit(seed), "image_id")


def _balance_plan(train: DataFrame, counts: dict[str, int], pcfg: PreprocessConfig) -> tuple[Column, dict]:
    """How many times each image is written: the balancing of the training split.

    Returns a column (1 outside training; 0 for an undersampled-away image;
    2 or more for an oversampled one) and the training counts it promises.
    The images picked are the first in the seeded order (ties by id), found
    with one top-k query per class, so no image bytes move.
    """
    one = F.lit(1)
    if pcfg.balance not in ("undersample", "oversample"):
        return one, dict(counts)
    if min(counts.values()) == 0:
        raise DataQualityError(f"cannot {pcfg.balance} a training split with one class: {counts}")
    minority, majority = ("0", "1") if counts["0"] < counts["1"] else ("1", "0")

    def first(label: str, n: int) -> Column:
        """True for the ``n`` first training images of ``label`` in the seeded order."""
        if n == 0:
            return F.lit(False)
        last = (train.filter(F.col("label") == int(label)).select(_order(pcfg.seed).alias("o"), "image_id")
                .orderBy("o", "image_id").limit(n).agg(F.max(F.struct("o", "image_id")).alias("m")).first()["m"])
        order = _order(pcfg.seed)
        return (order < last["o"]) | ((order == last["o"]) & (F.col("image_id") <= last["image_id"]))

    training = F.col("split") == "train"
    if pcfg.balance == "undersample":
        kept = first(majority, counts[minority])
        copies = F.when(training & (F.col("label") == int(majority)), F.when(kept, 1).otherwise(0)).otherwise(one)
        return copies, {minority: counts[minority], majority: counts[minority]}
    whole, extra = divmod(counts[majority], counts[minority])
    copies = F.when(training & (F.col("label") == int(minority)),
                    F.lit(whole) + first(minority, extra).cast("int")).otherwise(one)
    return copies, {minority: counts[majority], majority: counts[majority]}


def _balance_info(before: dict[str, int], after: dict[str, int], pcfg: PreprocessConfig) -> dict[str, Any]:
    info: dict[str, Any] = {"method": pcfg.balance, "seed": pcfg.seed,
                            "before": dict(before), "after": {k: after[k] for k in ("0", "1")}}
    if pcfg.balance == "class_weight":
        total = before["0"] + before["1"]
        info["class_weight"] = {k: round(total / (2 * before[k]), 6) for k in ("0", "1")}
    return info


def _tasks(spark: SparkSession, rows: int, row_bytes: int) -> int:
    """Decode tasks: at least MIN_FILES, about TASK_BYTES of tensors each, whole waves of the cores."""
    cores = max(spark.sparkContext.defaultParallelism, 1)
    tasks = max(MIN_FILES, math.ceil(rows * row_bytes / TASK_BYTES))
    return math.ceil(tasks / cores) * cores


def _decode_input(spark: SparkSession, planned: DataFrame, rows: int, row_bytes: int) -> DataFrame:
    """The rows to decode, in tasks of at most about 2 x TASK_BYTES of tensors, at least MIN_FILES.

    Bronze's own read splits (spark.sql.files.maxPartitionBytes of stored
    images) are used when there are enough of them: shuffling every image's
    bytes to even the tasks out cost 1.2-2 s of a 25 s run at 23,936 images
    (docs/benchmarks.md). Too few of them (a small dataset; a few large
    files) and the rows are spread by image id.
    """
    tasks = _tasks(spark, rows, row_bytes)
    cores = max(spark.sparkContext.defaultParallelism, 1)
    splits = planned.rdd.getNumPartitions()
    if splits >= max(MIN_FILES, cores) and 2 * splits >= tasks:
        return planned
    return planned.repartition(tasks, "image_id")


def _write_tensors(spark: SparkSession, tmp: str, planned: DataFrame, pcfg: PreprocessConfig, rows: int,
                   dataset: str, hdfs: HdfsConfig, aux_classes: int = 0) -> dict[str, Any]:
    """Decode, balance and write the three splits under ``tmp`` in one pass; returns the tally.

    The tally (rows written and images per split and label, decode failures,
    the training split's pixel sums) is observed on the rows as they go by,
    so nothing is read twice.
    """
    row_bytes = pcfg.size ** 2 * 3 + 128  # an npy tensor and its row's other columns
    tensors = (_decode_input(spark, planned.select("image_id", "label", "group_id", "split", "aux", "content",
                                                   "copies"),
                             rows, row_bytes)
               .mapInPandas(lambda it: _tensor_batches(it, pcfg.size, pcfg.resize, pcfg.pixels()), _TENSORS))
    ok, train = F.col("error").isNull(), F.col("split") == "train"

    def count(condition: Column) -> Column:
        return F.sum(F.when(condition, 1).otherwise(0))
    cells = [(s, c) for s in SPLITS for c in ("0", "1")]
    observation = Observation("tensors")
    tensors = tensors.observe(
        observation,
        *[count(ok & F.col("keep") & (F.col("split") == s) & (F.col("label") == int(c))).alias(f"rows_{s}_{c}")
          for s, c in cells],
        *[count(ok & F.col("first") & (F.col("split") == s) & (F.col("label") == int(c))).alias(f"images_{s}_{c}")
          for s, c in cells],
        *[F.sum(F.when(ok & F.col("first") & train, F.col(c))).alias(c) for c in _SUMS],
        # (a string: Observation hands arrays back as Java objects)
        F.concat_ws(" ", F.collect_list(F.when(~ok, F.col("image_id")))).alias("failed"),
        *[count(ok & F.col("first") & train & (F.col("aux") == k)).alias(f"aux_{k}")
          for k in (range(-1, aux_classes) if pcfg.aux_attribute else ())])
    aux = ("aux",) if pcfg.aux_attribute else ()
    (tensors.filter(ok & F.col("keep")).select("image_id", "label", "group_id", "split", "image", *aux)
     .write.options(**_ROW_GROUPS, **{"parquet.block.size": str(pcfg.rows_per_row_group * row_bytes)})
     .partitionBy("split").parquet(tmp))
    seen = observation.get
    tally = {"written": {s: {c: seen[f"rows_{s}_{c}"] for c in ("0", "1")} for s in SPLITS},
             "class_counts": {s: {c: seen[f"images_{s}_{c}"] for c in ("0", "1")} for s in SPLITS},
             "failed": (seen["failed"] or "").split()}
    if pcfg.aux_attribute:  # training images per aux class index (before balancing); -1: without a value
        tally["aux_counts"] = {str(k): seen[f"aux_{k}"] for k in range(-1, aux_classes)}
    _check_filled(dataset, tally["written"], pcfg.require_all_splits)
    _petastorm_metadata(spark, tmp, [s for s in SPLITS if sum(tally["written"][s].values())],
                        tensor_schema(pcfg.size, aux=bool(pcfg.aux_attribute)), hdfs)
    if tally["failed"]:
        log.warning("%d images of %s failed to decode and were left out", len(tally["failed"]), dataset)
    tally["normalisation"] = _normalisation(seen, sum(tally["class_counts"]["train"].values()), pcfg.size)
    return tally


def _petastorm_metadata(spark: SparkSession, tmp: str, splits: list[str], unischema: Any,
                        hdfs: HdfsConfig) -> None:
    """What Petastorm's ``materialize_dataset`` leaves in each split's folder, for all splits at once.

    Each folder's ``_common_metadata`` holds the pickled Unischema and the
    number of row groups in each file, which Petastorm's readers plan from.
    ``materialize_dataset`` counts them with a Spark job of one task per file
    for each folder: three jobs, 2.3 s of a 25 s run at 23,936 images
    (docs/benchmarks.md). Here one job, a task per core, reads every footer.
    """
    import pyarrow.parquet as pq
    from petastorm.etl.dataset_metadata import ROW_GROUPS_PER_FILE_KEY, UNISCHEMA_KEY
    files = [f"{tmp}/split={s}/{name}" for s in splits for name in lake.list_dir(spark, f"{tmp}/split={s}")
             if name.endswith(".parquet")]

    def row_groups(uri: str) -> tuple[str, int]:
        fs, path = lake.python_fs(uri, hdfs)
        with fs.open(path, "rb") as f:
            return uri, pq.ParquetFile(f).metadata.num_row_groups
    counts = dict(spark.sparkContext.parallelize(files, max(1, min(len(files), spark.sparkContext.defaultParallelism)))
                  .map(row_groups).collect()) if files else {}
    for split in splits:
        folder = f"{tmp}/split={split}"
        mine = {uri.rsplit("/", 1)[1]: n for uri, n in counts.items() if uri.rsplit("/", 1)[0] == folder}
        if not mine:
            raise DataQualityError(f"{folder} holds no Parquet files after the write")
        fs, path = lake.python_fs(folder, hdfs)
        with fs.open(f"{path}/{min(mine)}", "rb") as f:
            arrow = pq.read_schema(f)
        metadata = {**(arrow.metadata or {}), UNISCHEMA_KEY: pickle.dumps(unischema),
                    ROW_GROUPS_PER_FILE_KEY: json.dumps(mine).encode()}
        with fs.open(f"{path}/_common_metadata", "wb") as f:
            pq.write_metadata(arrow.with_metadata(metadata), f)


def _normalisation(sums: dict[str, Any], images: int, size: int) -> dict[str, Any]:
    """Per-channel mean and standard deviation (0-255 scale) from the training images' pixel sums."""
    pixels = max(images, 1) * size * size
    mean = [(sums[f"s{c}"] or 0.0) / pixels for c in range(3)]
    std = [math.sqrt(max((sums[f"q{c}"] or 0.0) / pixels - mean[c] ** 2, 0.0)) for c in range(3)]
    return {"mean": [round(m, 4) for m in mean], "std": [round(s, 4) for s in std],
            "computed_on": "train", "images": images}


def _publish(spark: SparkSession, tmp: str, manifest: dict[str, Any]) -> None:
    """Write the manifest, then rename ``tmp`` into place as the version."""
    lake.write_text(spark, f"{tmp}/manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    target = tmp.rsplit("/", 1)[0] + f"/v{manifest['version']}"
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
                    .option("replaceWhere", f"dataset = {lake.sql_string(dataset)} AND version = {int(version)}")
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
