"""Ingest: a folder of raw images becomes rows of the bronze Delta table.

Executors read and fully validate every candidate file (:func:`imaging.inspect`),
in one pass over its bytes: the bytes that were validated and hashed are the
bytes stored, and no file is read twice. The driver only sees file names,
sizes and counts. Good images are merged into
``bronze.images`` on (dataset, image_id = SHA-256 of the bytes); bad files go to
``bronze.quarantine`` with a reason. A table is only committed to when there is
something new, so a re-run on the same input leaves every table version as it was.

DICOM files (``.dcm``, ``.dicom``, or no extension and the DICM preamble) take
the same path with three differences, all on the executors: the image id is a
keyed hash of the file (:class:`oncolake.dicom.deid.Pseudonyms`), the group is
the patient's pseudonym, and the bytes stored are the de-identified file
(:mod:`oncolake.dicom.deid`), never the original. DICOMDIR indexes and files
without an extension that are not DICOM are skipped and counted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import logging
import os
import urllib.parse
from functools import partial
from typing import Any, Iterator

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from oncolake import faults, imaging, isolation, lake, schema, timing
from oncolake.config import Config
from oncolake.dicom import deid as dicom_deid
from oncolake.dicom import read as dicom_read
from oncolake.errors import ConfigError, InputError

log = logging.getLogger(__name__)

#: The attribute that lists the labels of an image filed under two or more (it keeps none).
LABEL_CONFLICT = "label_conflict"
#: Up to this many files, file metadata is broadcast to the image bytes instead of shuffling them.
BROADCAST_FILES = 500_000


def _step(name: str):
    return timing.step(log, "ingest", name)


def run(spark: SparkSession, cfg: Config, dataset: str, source: str,
        labels: str | None = None, ingest_date: str | None = None,
        modality: str | None = None) -> dict[str, Any]:
    """Ingest every image under ``source`` into ``bronze.images`` for ``dataset``.

    ``modality`` is that of the non-DICOM images (default: the dataset's
    ``ingest.modalities`` entry); DICOM images carry their own.
    Returns the job summary (counts, table URI and version).
    """
    if not dataset or not dataset.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"dataset must be letters, digits, - or _, got {dataset!r}")
    day = _parse_date(ingest_date)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    icfg = cfg.ingest
    modality = (modality or icfg.modality(dataset)).strip()
    dcfg = icfg.dicom
    key = dicom_deid.load_key(dcfg.key_file) if dcfg.key_file else None
    root = lake.qualify(spark, source)
    if not lake.is_dir(spark, root):
        raise InputError(f"input folder {source} does not exist or is not a folder")
    bronze_uri = lake.table_uri(lake.qualify(spark, cfg.lake), "bronze.images")
    quarantine_uri = lake.table_uri(lake.qualify(spark, cfg.lake), "bronze.quarantine")
    log.info("ingest dataset=%s input=%s labels=%s ingest_date=%s table=%s",
             dataset, root, labels, day, bronze_uri)

    with _step("list"):
        reader = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(root)
        label_rows, label_notes = (_read_labels(spark, labels, icfg.group_columns) if labels
                                   else (None, {"labels_refused": 0, "labels_conflicting_paths": 0}))
        linked, dead = links(root)
        listing = _with_dead_links(spark, _outside(_with_relative_path(reader.select("path", "length"), root), linked),
                                   root, dead)
        files = _classify(listing, label_rows, icfg.extensions, icfg.max_file_bytes)
        files.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        with _step("classify"):
            stats, odd, largest = _file_counts(files)
            indexed = len(reader._jdf.inputFiles())  # one call to the JVM, not one per file
            if sum(stats.values()) - len(dead) != indexed:
                # Spark's scan leaves zero-length files out; only the file index has them.
                files.unpersist()
                listing = _outside(_with_empty_files(spark, reader, listing, root), linked)  # dead links kept
                files = _classify(listing, label_rows, icfg.extensions, icfg.max_file_bytes)
                files.persist(StorageLevel.MEMORY_AND_DISK)
                stats, odd, largest = _file_counts(files)
            odd_rows = (files.filter("status = 'read' AND NOT has_image_ext").select("path", "in_csv").collect()
                        if odd else [])
            odd_paths = [r["path"] for r in odd_rows]
            # files the labels CSV names are validated whatever their name
            named = frozenset(r["path"] for r in odd_rows if r["in_csv"])
        # A Python worker gets Arrow batches of this many files: a few large
        # DICOMs per batch, a few hundred small JPEGs.
        content = _outside(_with_relative_path(
            _read_content(spark, root, icfg.extensions, icfg.max_file_bytes, odd_paths), root), linked
        ).drop("relative_path")
        landed = land(spark, cfg, files, content, dataset=dataset, now=now, day=day, modality=modality,
                      key=key, batch_rows=lake.arrow_batch_rows(largest, icfg.batch_mb), named=named,
                      broadcast=sum(stats.values()) <= BROADCAST_FILES)
        kinds, merged, reasons = landed.kinds, landed.merged, landed.reasons
        skipped_by_content = landed.skipped_by_content
        quarantine_added = landed.quarantine_added
        with _step("count"):
            by_modality = landed.modalities
            valid = sum(by_modality.values())
            labels_without_file = 0
            if label_rows is not None:
                labels_without_file = label_rows.join(files, "relative_path", "left_anti").count()
        return {
            "job": "ingest",
            "dataset": dataset,
            "input": root,
            "ingest_date": day.isoformat(),
            "files_seen": sum(stats.values()),
            "candidates": sum(v for k, v in stats.items() if k != "skipped") - sum(skipped_by_content.values()),
            "valid": valid,
            "dicom": sum(n for (fmt, reason), n in kinds.items() if fmt == "dicom" and reason is None),
            "modalities": dict(sorted(by_modality.items())),
            "ingested": merged["inserted"],
            "labels_updated": merged["updated"],
            "already_present": merged["already_present"],
            "duplicates": valid - merged["distinct"],
            "quarantined": sum(reasons.values()),
            "quarantine_added": quarantine_added,
            "quarantine_reasons": dict(sorted(reasons.items())),
            "skipped": stats.get("skipped", 0) + sum(skipped_by_content.values()),
            "dicomdir_skipped": skipped_by_content.get("dicomdir", 0),
            "labels_without_file": labels_without_file,
            "linked_folders_skipped": len(linked),
            "label_conflicts": landed.label_conflicts,
            "labels_refused": label_notes["labels_refused"],
            "labels_conflicting_paths": label_notes["labels_conflicting_paths"],
            "table": bronze_uri,
            "table_version": lake.table_version(spark, bronze_uri),
            "quarantine_table": quarantine_uri,
        }
    finally:
        files.unpersist()


@dataclasses.dataclass(frozen=True)
class Landed:
    """What :func:`land` did with one batch of candidates."""
    kinds: dict          # (format, reason or None) -> files
    merged: dict         # inserted, updated, already_present, distinct
    reasons: dict        # quarantine reason -> files
    quarantine_added: int
    modalities: dict     # modality -> valid files
    skipped_by_content: dict
    label_conflicts: int  # distinct images whose copies carry different labels (kept unlabelled)

    @property
    def valid(self) -> int:
        return sum(self.modalities.values())


def land(spark: SparkSession, cfg: Config, files: DataFrame, content: DataFrame, *, dataset: str,
         now: dt.datetime, day: dt.date, modality: str, key: bytes | None, batch_rows: int,
         named: frozenset[str] = frozenset(), any_name: bool = False, broadcast: bool = True,
         txn: tuple[str, int] | None = None) -> Landed:
    """Validate candidates on the executors and merge them into bronze: the one path every source takes.

    ``files`` has one row per candidate: path, relative_path, length, label,
    group_id, attributes, and status (``read``, or the quarantine reason of a
    candidate refused before reading, with ``status_detail``); ``content`` has
    (path, content) for the ``read`` ones. ``any_name``: inspect every
    candidate whatever its name (a stream's records have no file names).
    ``txn`` (application id, version) makes each commit idempotent through
    Delta's ``txnAppId``/``txnVersion``: a replayed streaming batch commits
    nothing twice.
    """
    icfg, dcfg = cfg.ingest, cfg.ingest.dicom
    lake_root = lake.qualify(spark, cfg.lake)
    bronze_uri = lake.table_uri(lake_root, "bronze.images")
    quarantine_uri = lake.table_uri(lake_root, "bronze.quarantine")
    inspected = checked = bad = chosen = None
    batch = {"spark.sql.execution.arrow.maxRecordsPerBatch": str(batch_rows)}
    try:
        with _step("read and validate"), lake.spark_conf(spark, batch):
            # Decoding is the expensive step: once. What comes back is the
            # verdict and, for a good image, the bytes to store: the file's
            # own (the very bytes validated and hashed), or a DICOM's
            # de-identified file, made in the same pass. The files are read
            # once; nothing later goes back to them.
            inspected = content.mapInPandas(
                partial(_inspect_batches, max_pixels=icfg.max_pixels, min_side=icfg.min_side, key=key,
                        pattern=dcfg.patient_id_pattern, accept_burned_in=dcfg.accept_burned_in, named=named,
                        any_name=any_name, timeout_s=icfg.decode_timeout_s),
                schema.INSPECTION).persist(StorageLevel.DISK_ONLY)  # image bytes: never on the heap
            # Everything but the MERGE's write reads the small verdicts only.
            checked = inspected.drop("content").persist(StorageLevel.MEMORY_AND_DISK)
            kinds, modalities = {}, {}
            for r in checked.groupBy("format", "reason", F.coalesce("modality", F.lit(modality)).alias("modality")
                                     ).count().collect():
                kinds[r["format"], r["reason"]] = kinds.get((r["format"], r["reason"]), 0) + r["count"]
                if r["reason"] is None:
                    modalities[r["modality"]] = modalities.get(r["modality"], 0) + r["count"]
        if kinds.get(("dicom", "no_key")):
            dicom_deid.load_key("")  # raises the one clear error, before any table is touched
        skipped_by_content = {reason: n for (_, reason), n in kinds.items() if reason in dicom_read.SKIPPED}

        # Broadcast file metadata to the image bytes unless the listing is huge.
        chosen = _chosen_images(checked, files).persist(StorageLevel.MEMORY_AND_DISK)
        hint = F.broadcast if broadcast else (lambda frame: frame)
        # On (path, image_id): should Spark recompute a lost partition of
        # `inspected` from a file changed since, its new bytes no longer match
        # the verdict and are left for the next run rather than stored under it.
        good = (inspected.filter(F.col("reason").isNull()).select("path", "image_id", "content")
                .join(hint(chosen), ["path", "image_id"])
                .select(*_bronze_columns(dataset, now, day, modality)))
        bad = _quarantine_rows(checked, files, dataset, now, day).persist(StorageLevel.MEMORY_AND_DISK)
        with _step("merge images"), lake.spark_conf(spark, batch), lake.own_commits(spark):
            bronze = lake.ensure_delta_table(spark, bronze_uri, schema.BRONZE_IMAGES,
                                             schema.BRONZE_IMAGES_PARTITIONS)
            added = lake.add_missing_columns(spark, bronze_uri, schema.BRONZE_IMAGES)
            if added:
                log.info("bronze.images made by an earlier oncolake: added columns %s", ", ".join(added))
            # Delta's MERGE would shuffle the rows by partition column before
            # writing: a whole ingest date, image bytes and all, into one task
            # and one file. Written as read, the night is spread over the tasks.
            with lake.spark_conf(spark, {"spark.databricks.delta.merge.repartitionBeforeWrite.enabled": "false"}):
                merged = _merge_images(spark, bronze, chosen, good, dataset, bronze_uri, txn)
        with _step("merge quarantine"), lake.own_commits(spark):
            lake.ensure_delta_table(spark, quarantine_uri, schema.BRONZE_QUARANTINE,
                                    schema.BRONZE_QUARANTINE_PARTITIONS)
            reasons = {r["reason"]: r["count"] for r in bad.groupBy("reason").count().collect()}
            quarantine_added = (_merge_quarantine(spark, quarantine_uri, bad, dataset, txn) if reasons else 0)
        conflicts = merged["label_conflicts"]
        if conflicts:
            log.warning("%d images are filed under different labels (the same bytes); kept unlabelled", conflicts)
        return Landed(kinds, merged, reasons, quarantine_added, dict(sorted(modalities.items())),
                      skipped_by_content, conflicts)
    finally:
        for frame in (inspected, checked, bad, chosen):
            if frame is not None:
                frame.unpersist()


@contextlib.contextmanager
def _idempotent(spark: SparkSession, txn: tuple[str, int] | None, operation: str) -> Iterator[None]:
    """Delta's idempotent-write confs for one commit of a replayable batch (nothing without ``txn``)."""
    if txn is None:
        yield
        return
    app, version = txn
    with lake.spark_conf(spark, {"spark.databricks.delta.write.txnAppId": f"{app}:{operation}",
                                 "spark.databricks.delta.write.txnVersion": str(version)}):
        yield


def _parse_date(value: str | None) -> dt.date:
    if value is None:
        return dt.datetime.now(dt.timezone.utc).date()
    try:
        return dt.date.fromisoformat(value)
    except ValueError as err:
        raise ConfigError(f"--ingest-date must be YYYY-MM-DD, got {value!r}") from err


def links(root: str) -> tuple[list[str], list[str]]:
    """Symbolic links under a local ``root`` that listing must not take as they are.

    Returns (linked folders, dead links), as paths relative to ``root``.
    Hadoop's local file system follows every folder link, so ``a/up -> ..``
    would list the tree again under ``a/up/a/up/...`` until the kernel's
    link limit: a link to a folder inside the input (or to one of its
    ancestors) reaches nothing the real folders do not, and is left out.
    Links to folders elsewhere (a mounted archive) are followed. A link that
    leads nowhere (dangling, or a loop of links) is not listed by Hadoop at
    all; it is quarantined as ``unreadable`` instead of vanishing.
    """
    if not lake.is_local(root):
        return [], []  # HDFS: symbolic links are off by default
    top = urllib.parse.urlsplit(root).path or root
    real_top = os.path.realpath(top)
    linked, dead = [], []
    for folder, subfolders, names in os.walk(top):  # links are listed, never entered
        for name in subfolders:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if (target == real_top or target.startswith(real_top + os.sep)
                        or real_top.startswith(target + os.sep)):
                    linked.append(os.path.relpath(path, top))
        dead += [os.path.relpath(os.path.join(folder, n), top) for n in names
                 if os.path.islink(os.path.join(folder, n)) and not os.path.exists(os.path.join(folder, n))]
    if linked:
        log.warning("%d linked folders under %s lead back into it and are left out: %s",
                    len(linked), root, ", ".join(sorted(linked)[:5]))
    return sorted(linked), sorted(dead)


def _with_dead_links(spark: SparkSession, listing: DataFrame, root: str, dead: list[str]) -> DataFrame:
    """The listing plus the dead links, with length -1 (:func:`with_size_status` makes them ``unreadable``)."""
    if not dead:
        return listing
    rows = [(f"{root}/{name}", -1, name) for name in dead]
    return listing.unionByName(spark.createDataFrame(rows, "path string, length long, relative_path string"))


def _outside(files: DataFrame, linked: list[str]) -> DataFrame:
    """``files`` without the ones reached through the linked folders of :func:`links`."""
    for prefix in linked:
        files = files.filter(~F.col("relative_path").startswith(prefix + "/"))
    return files


def _with_relative_path(listing: DataFrame, root: str) -> DataFrame:
    # binaryFile's path column is Hadoop's Path.toString(): the folder, a slash, the name.
    return listing.withColumn("relative_path", F.expr(f"substring(path, {len(root) + 2})"))


def _file_counts(files: DataFrame) -> tuple[dict[str, int], int, int]:
    """Files per status, how many are read without an image extension (the CSV names them),
    and the size of the largest file read (one Spark job for the three)."""
    stats, odd, largest = {}, 0, 0
    for r in files.groupBy("status", "has_image_ext").agg(F.count("*").alias("count"),
                                                          F.max("length").alias("largest")).collect():
        stats[r["status"]] = stats.get(r["status"], 0) + r["count"]
        odd += r["count"] if r["status"] == "read" and not r["has_image_ext"] else 0
        largest = max(largest, r["largest"] or 0) if r["status"] == "read" else largest
    return stats, odd, largest


def _with_empty_files(spark: SparkSession, reader: DataFrame, scanned: DataFrame, root: str) -> DataFrame:
    """The scanned files plus the zero-length ones that only the file index lists.

    Only taken when the counts differ: bringing the index's paths to Python
    costs a call to the JVM per file.
    """
    known = {r["path"] for r in scanned.select("path").collect()}
    empty = [(path, 0) for path in map(_hadoop_path_string, reader.inputFiles()) if path not in known]
    log.info("%d zero-length files under %s", len(empty), root)
    return scanned.unionByName(_with_relative_path(spark.createDataFrame(empty, "path string, length long"), root))


def _hadoop_path_string(uri: str) -> str:
    """The inputFiles() URI (file:///a%20b) as binaryFile renders paths (file:/a b)."""
    parts = urllib.parse.urlsplit(uri)
    authority = f"//{parts.netloc}" if parts.netloc else ""
    return f"{parts.scheme}:{authority}{urllib.parse.unquote(parts.path)}"


def _read_labels(spark: SparkSession, uri: str, group_columns: tuple[str, ...]) -> tuple[DataFrame, dict[str, int]]:
    """The labels CSV as (relative_path, label, group_id, attributes), and what was refused in it.

    UTF-8 (with or without a byte-order mark), else read as Latin-1. Rows
    whose path is absolute or climbs out of the input (``..``) are refused:
    counted, never matched to a file. A path given two different labels
    keeps no label (counted): which one is right is not ingest's guess.
    """
    if not lake.exists(spark, uri):
        raise InputError(f"labels CSV {uri} does not exist")
    head = lake.read_head(spark, uri, 4 << 20)
    encoding = _csv_encoding(head)
    try:
        # multiLine: a quoted field may hold a line break (a file name with a newline)
        raw = (spark.read.option("header", "true").option("escape", '"').option("mode", "FAILFAST")
               .option("multiLine", "true").option("encoding", encoding).csv(uri))
        # a byte-order mark, or spaces, around a column name are not part of it
        raw = raw.toDF(*[c.replace("\ufeff", "").strip() for c in raw.columns])
        columns = raw.columns
    except Exception as err:  # Spark raises several types for an unreadable CSV
        raise InputError(f"labels CSV {uri} cannot be read: {str(err).splitlines()[0][:200]}") from err
    missing = {"path", "label"} - set(columns)
    if missing:
        raise InputError(f"labels CSV {uri} has no {' or '.join(sorted(missing))} column "
                         f"(columns: {', '.join(columns)})")
    group = next((c for c in group_columns if c in columns), None)
    extra = sorted(c for c in columns if c not in ("path", "label", group))
    attributes = (F.create_map(*[x for c in extra for x in (F.lit(c), F.col(f"`{c}`"))]) if extra
                  else F.create_map().cast("map<string,string>"))
    rows = raw.select(
        F.regexp_replace(F.regexp_replace(F.trim("path"), r"\\", "/"), r"^(\./)+", "").alias("relative_path"),
        F.nullif(F.trim("label"), F.lit("")).alias("label"),
        (F.nullif(F.trim(F.col(f"`{group}`")), F.lit("")) if group else F.lit(None).cast("string")).alias("group_id"),
        attributes.alias("attributes"),
    ).filter(F.col("relative_path").isNotNull() & (F.col("relative_path") != ""))
    escapes = (F.col("relative_path").startswith("/") | F.col("relative_path").rlike(r"^[A-Za-z]:")
               | F.col("relative_path").contains("://") | F.col("relative_path").rlike(r"(^|/)\.\.(/|$)"))
    # One row per path: its label if all its rows agree (empty cells aside), none if they do not.
    per_path = (rows.filter(~escapes).groupBy("relative_path").agg(
        F.countDistinct("label").alias("labels"), F.max("label").alias("label"), F.max("group_id").alias("group_id"),
        F.min_by("attributes", F.struct(F.col("label").isNull(), "label", "group_id")).alias("attributes"))
        .withColumn("label", F.when(F.col("labels") <= 1, F.col("label"))))
    try:
        # both counts in one Spark job: rows refused, and kept paths with two or more labels
        tally = (rows.groupBy("relative_path", escapes.alias("refused"))
                 .agg(F.count("*").alias("rows"), F.countDistinct("label").alias("labels"))
                 .agg(F.sum(F.when(F.col("refused"), F.col("rows"))).alias("refused"),
                      F.count(F.when(~F.col("refused") & (F.col("labels") > 1), 1)).alias("conflicted")).first())
        refused, n_conflicted = tally["refused"] or 0, tally["conflicted"]
    except Exception as err:
        raise InputError(f"labels CSV {uri} cannot be read: {str(err).splitlines()[0][:200]}") from err
    if refused:
        log.warning("labels CSV %s: %d rows refused (absolute paths or '..': never read)", uri, refused)
    if n_conflicted:
        log.warning("labels CSV %s: %d paths have two or more labels; kept unlabelled", uri, n_conflicted)
    kept = per_path.drop("labels")
    return kept, {"labels_refused": refused, "labels_conflicting_paths": n_conflicted, "encoding": encoding}


def _csv_encoding(head: bytes) -> str:
    """UTF-8 if the bytes decode as UTF-8 (a cut last character allowed), else Latin-1."""
    try:
        head.decode("utf-8")
        return "UTF-8"
    except UnicodeDecodeError as err:
        if err.start >= len(head) - 3:  # the sample ends inside a multi-byte character
            return "UTF-8"
        return "ISO-8859-1"


def _classify(listing: DataFrame, labels: DataFrame | None, extensions: tuple[str, ...],
              max_bytes: int) -> DataFrame:
    """Add ``status``: skipped, empty, too_large (by bytes) or read; and the CSV columns."""
    ext = F.lower(F.regexp_extract("relative_path", r"(\.[^./]+)$", 1))
    # A name without a dot may be a DICOM file (PACS exports often have no
    # extension): read, and skipped later unless it has the DICM preamble.
    no_ext = ~F.regexp_extract("relative_path", r"([^/]*)$", 1).contains(".")
    files = (listing.withColumn("has_image_ext", ext.isin([e.lower() for e in extensions]))
             .withColumn("no_ext", no_ext))
    if labels is not None:
        files = files.join(labels.withColumn("in_csv", F.lit(True)), "relative_path", "left")
    else:
        files = (files.withColumn("label", F.lit(None).cast("string"))
                 .withColumn("group_id", F.lit(None).cast("string"))
                 .withColumn("attributes", F.lit(None).cast("map<string,string>"))
                 .withColumn("in_csv", F.lit(False)))
    candidate = F.col("has_image_ext") | F.col("no_ext") | F.coalesce(F.col("in_csv"), F.lit(False))
    return with_size_status(files.withColumn("status", F.when(~candidate, "skipped")), max_bytes)


def with_size_status(files: DataFrame, max_bytes: int) -> DataFrame:
    """Complete ``status`` (kept where already set) with ``empty``, ``too_large`` or ``read``, and ``status_detail``."""
    status = (F.when(F.col("status").isNotNull(), F.col("status")).when(F.col("length") < 0, "unreadable")
              .when(F.col("length") == 0, "empty").when(F.col("length") > max_bytes, "too_large").otherwise("read"))
    detail = (F.when(F.col("status_detail").isNotNull() & F.col("status").isNotNull(), F.col("status_detail"))
              .when(F.col("length") < 0, F.lit("a symbolic link that leads nowhere (dangling, or a loop of links)"))
              .when(F.col("length") == 0, F.lit("the file has no bytes"))
              .when(F.col("length") > max_bytes,
                    F.concat(F.lit("file of "), F.col("length").cast("string"),
                             F.lit(" bytes exceeds ingest.max_file_bytes"))))
    if "status_detail" not in files.columns:
        files = files.withColumn("status_detail", F.lit(None).cast("string"))
    return files.withColumn("status_detail", detail).withColumn("status", status)


def _read_content(spark: SparkSession, root: str, extensions: tuple[str, ...], max_bytes: int,
                  odd_paths: list[str]) -> DataFrame:
    """The bytes of every candidate; executors read them, the driver never does.

    A file that cannot be read (permissions, vanished) is left out of the
    result rather than failing the job; the caller quarantines what is missing.
    """
    def reader():
        return (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
                .option("ignoreCorruptFiles", "true").option("ignoreMissingFiles", "true"))
    # Only image extensions are read in bulk; the glob keeps other files unread.
    content = reader().option("pathGlobFilter", _glob(extensions)).load(root)
    if odd_paths:  # files without an image extension that the labels CSV names
        content = content.unionByName(reader().load(odd_paths))
    return content.filter((F.col("length") > 0) & (F.col("length") <= max_bytes)).select(
        "path", "content")


def _glob(extensions: tuple[str, ...]) -> str:
    """A case-insensitive Hadoop glob for file names ending in one of ``extensions``."""
    def fold(ext: str) -> str:
        return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in ext.lstrip("."))
    return "*.{" + ",".join(fold(e) for e in extensions) + "}"


def _inspect_batches(batches: Iterator[pd.DataFrame], max_pixels: int, min_side: int,
                     key: bytes | None = None, pattern: str = "", accept_burned_in: bool = False,
                     named: frozenset[str] = frozenset(), any_name: bool = False,
                     timeout_s: float = 0.0) -> Iterator[pd.DataFrame]:
    """Executor side: hash and fully validate each file.

    What comes back is the verdict, and for a good DICOM file its
    de-identified bytes (nothing else leaves the worker with image bytes).
    Each file is validated in a child process limited to ``timeout_s``
    seconds (:mod:`oncolake.isolation`): a decoder that hangs or crashes
    costs that file (``timeout``, ``decoder_crash``), not the task.
    """
    import cv2
    cv2.setNumThreads(1)  # one task, one core
    pseudonyms = dicom_deid.Pseudonyms(key, pattern) if key else None
    deidentifier = dicom_deid.Deidentifier(pseudonyms) if key else None
    verdict = partial(_verdict, max_pixels=max_pixels, min_side=min_side, pseudonyms=pseudonyms,
                      deidentifier=deidentifier, accept_burned_in=accept_burned_in, named=named, any_name=any_name)
    with isolation.Isolated(verdict, timeout_s) as isolated:
        for batch in batches:
            rows = []
            for path, data in zip(batch["path"], batch["content"]):
                data = bytes(data)
                try:
                    row = isolated(path, data)
                    if row.get("reason") is None and row.get("format") != "dicom":
                        row["content"] = data  # stored as validated: never read twice
                    rows.append(row)
                except isolation.Overrun as err:
                    log.warning("%s: %s", path, err.detail)
                    dicom = dicom_read.is_dicom(data)
                    rows.append({"path": path, "format": "dicom" if dicom else imaging.sniff(data),
                                 "image_id": (pseudonyms.image_id(data) if dicom and pseudonyms
                                              else hashlib.sha256(data).hexdigest()),
                                 "reason": err.reason, "detail": err.detail})
            out = pd.DataFrame(rows, columns=schema.INSPECTION.fieldNames())
            for column in ("width", "height", "channels", "bit_depth", "dicom_bits_stored", "dicom_frames"):
                out[column] = out[column].astype("Int32")
            # a key missing from a row's dict is NaN to pandas; Arrow wants None for an array
            out["dicom_pixel_spacing"] = [v if isinstance(v, list) else None for v in out["dicom_pixel_spacing"]]
            yield out


def _verdict(path: str, data: bytes, *, max_pixels: int, min_side: int, pseudonyms, deidentifier,
             accept_burned_in: bool, named: frozenset[str], any_name: bool) -> dict:
    """One file's inspection row (what :func:`_inspect_batches` runs in the isolated process)."""
    if dicom_read.is_dicom(data):
        return {"path": path, **_inspect_dicom(data, max_pixels, min_side, pseudonyms, deidentifier,
                                               accept_burned_in)}
    if not any_name and "." not in path.rsplit("/", 1)[-1] and path not in named:  # no extension, not DICOM, not named
        return {"path": path, "reason": "not_dicom", "detail": "no extension and no DICM preamble"}
    result = imaging.inspect(data, max_pixels=max_pixels, min_side=min_side)
    return {"path": path, "image_id": hashlib.sha256(data).hexdigest(),
            "format": result.format, "width": result.width, "height": result.height,
            "channels": result.channels, "bit_depth": result.bit_depth,
            "reason": result.reason, "detail": result.detail}


def _inspect_dicom(data: bytes, max_pixels: int, min_side: int, pseudonyms, deidentifier,
                   accept_burned_in: bool) -> dict:
    """One DICOM file's verdict and de-identified file; with no key, only that it is DICOM (ingest then fails)."""
    if pseudonyms is None:
        return {"format": "dicom", "reason": "no_key", "detail": "no ingest.dicom.key_file"}
    image_id = pseudonyms.image_id(data)
    try:
        ds, facts = dicom_read.validate(data, max_pixels, min_side, accept_burned_in)
    except dicom_read.DicomError as err:
        return {"image_id": image_id, "format": "dicom", "reason": err.reason, "detail": err.detail}
    study, series = (str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "SeriesInstanceUID"))
    patient = pseudonyms.patient(str(ds.get("PatientID", "") or ""))
    try:
        deidentified = deidentifier.to_bytes(deidentifier.deidentify(ds)[0])
    except Exception as err:  # never echo what failed: it may quote a value
        return {"image_id": image_id, "format": "dicom", "reason": "corrupt",
                "detail": f"the header could not be de-identified ({type(err).__name__})"}
    return {
        "image_id": image_id, "format": "dicom", "width": facts.width, "height": facts.height,
        "channels": facts.samples, "bit_depth": facts.bits_stored,
        "patient": patient, "modality": facts.modality, "content": deidentified,
        "dicom_body_part": facts.body_part, "dicom_laterality": facts.laterality,
        "dicom_view_position": facts.view_position, "dicom_manufacturer": facts.manufacturer,
        "dicom_photometric": facts.photometric, "dicom_bits_stored": facts.bits_stored,
        "dicom_frames": facts.frames,
        "dicom_pixel_spacing": list(facts.pixel_spacing) if facts.pixel_spacing else None,
        "dicom_transfer_syntax": facts.transfer_syntax,
        "dicom_study": pseudonyms.uid(study) if study else None,
        "dicom_series": pseudonyms.uid(series) if series else None,
    }


def _chosen_images(inspected: DataFrame, files: DataFrame) -> DataFrame:
    """Metadata of one file per distinct good image: a labelled copy first, then the first relative path;
    no label where its copies disagree (``label_conflict``).

    (By relative path, so a folder and a stream of the same folder keep the same copy.)

    A DICOM image's group is its patient's pseudonym, whatever a CSV says.
    """
    meta = files.select("path", "relative_path", "length", "label", F.col("group_id").alias("csv_group"),
                        "attributes")
    good = (inspected.filter(F.col("reason").isNull()).drop("reason", "detail").join(meta, "path")
            .withColumn("group_id", F.when(F.col("format") == "dicom", F.col("patient"))
                        .otherwise(F.col("csv_group")))
            .drop("csv_group", "patient"))
    first = (good.groupBy("image_id")
             .agg(F.min(F.struct(F.col("label").isNull().alias("unlabelled"), "relative_path", "path"))
                  .alias("first"), F.array_sort(F.collect_set("label")).alias("labels"))
             .select("first.path", "labels"))
    # The same picture filed under two diagnoses: no label (so no split takes
    # it), and the labels it was given kept in its attributes.
    conflict = F.size("labels") > 1
    attrs = F.coalesce("attributes", F.create_map().cast("map<string,string>"))
    return (good.join(first, "path")
            .withColumn("label", F.when(~conflict, F.col("label")))
            .withColumn("attributes", F.when(~conflict, F.col("attributes")).otherwise(F.map_concat(
                F.map_filter(attrs, lambda k, v: k != LABEL_CONFLICT),
                F.create_map(F.lit(LABEL_CONFLICT), F.concat_ws("|", "labels")))))
            .withColumn("label_conflict", conflict).drop("labels"))


def _bronze_columns(dataset: str, now: dt.datetime, day: dt.date, modality: str) -> list:
    """The bronze.images columns from chosen metadata joined to the file's (or de-identified file's) bytes."""
    facts = F.struct(*[F.col(f"dicom_{f.name}").alias(f.name) for f in schema.DICOM_FACTS.fields])
    return ["image_id", F.lit(dataset).alias("dataset"), "path", "relative_path", "label", "group_id",
            F.coalesce("attributes", F.create_map().cast("map<string,string>")).alias("attributes"),
            "format", "width", "height", "channels", "bit_depth",
            F.length("content").cast("long").alias("size_bytes"), "content",
            F.lit(now).cast("timestamp").alias("ingested_at"),
            F.lit(now).cast("timestamp").alias("updated_at"),
            F.lit(day).cast("date").alias("ingest_date"),
            F.coalesce(F.col("modality"), F.lit(modality)).alias("modality"),
            F.when(F.col("format") == "dicom", facts).alias("dicom")]


def _quarantine_rows(inspected: DataFrame, files: DataFrame, dataset: str, now: dt.datetime,
                     day: dt.date) -> DataFrame:
    """Bad files: failed validation, refused by size, or not readable at all."""
    meta = files.select("path", "relative_path", "length", "status", "status_detail")
    failed = (inspected.filter(F.col("reason").isNotNull() & ~F.col("reason").isin(*dicom_read.SKIPPED))
              .join(meta, "path")).select(
        "path", "relative_path", "length", "reason", "detail", F.col("image_id").alias("content_sha256"))
    refused = meta.filter(~F.col("status").isin("read", "skipped")).select(
        "path", "relative_path", "length", F.col("status").alias("reason"), F.col("status_detail").alias("detail"),
        F.lit(None).cast("string").alias("content_sha256"))
    unreadable = (meta.filter(F.col("status") == "read").join(inspected.select("path"), "path", "left_anti")
                  .select("path", "relative_path", "length", F.lit("unreadable").alias("reason"),
                          F.lit("Spark could not read the file (permissions or I/O error)").alias("detail"),
                          F.lit(None).cast("string").alias("content_sha256")))
    return failed.unionByName(refused).unionByName(unreadable).select(
        F.lit(dataset).alias("dataset"), "path", "relative_path", "reason", "detail",
        F.col("length").alias("size_bytes"), "content_sha256",
        F.lit(now).cast("timestamp").alias("quarantined_at"),
        F.lit(day).cast("date").alias("ingest_date"))


def _attributes_key(column: str):
    """Attributes as comparable text: the same entries in any order are the same (a CSV's
    column order and a stream's header order differ)."""
    return F.to_json(F.array_sort(F.map_entries(F.coalesce(column, F.create_map().cast("map<string,string>")))))


def _merge_images(spark: SparkSession, bronze, chosen: DataFrame, rows: DataFrame, dataset: str, uri: str,
                  txn: tuple[str, int] | None = None) -> dict[str, int]:
    """Insert new images, then correct changed labels; commit nothing when nothing changed.

    What is new or changed is worked out from the (small) metadata; new rows
    go in with an insert-only MERGE (one anti-join pass in Delta, and safe
    against a concurrent ingest of the same files); the update MERGE runs only
    for the rows whose label, group or attributes changed. Returns the counts (inserted, updated,
    already_present, distinct, and label_conflicts: images whose copies carry different labels).
    """
    target = (bronze.toDF().filter(F.col("dataset") == dataset)
              .select("image_id", F.col("label").alias("t_label"), F.col("group_id").alias("t_group"),
                      _attributes_key("attributes").alias("t_attrs")))
    keyed = chosen.select("image_id", "label", "group_id", _attributes_key("attributes").alias("attrs"),
                          "label_conflict")
    same = (F.col("label").eqNullSafe(F.col("t_label")) & F.col("group_id").eqNullSafe(F.col("t_group"))
            & F.col("attrs").eqNullSafe(F.col("t_attrs")))
    flagged = keyed.join(target, "image_id", "left").select(
        "image_id", F.col("t_attrs").isNotNull().alias("present"),
        (F.col("t_attrs").isNotNull() & ~same).alias("changed"), "label_conflict"
    ).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        tally = flagged.agg(F.count("*").alias("distinct"), F.sum(F.col("present").cast("int")).alias("present"),
                            F.sum(F.col("changed").cast("int")).alias("changed"),
                            F.sum(F.col("label_conflict").cast("int")).alias("label_conflicts")).first()
        distinct, present, changed = tally["distinct"], tally["present"] or 0, tally["changed"] or 0
        on = f"t.dataset = {lake.sql_string(dataset)} AND t.dataset = s.dataset AND t.image_id = s.image_id"
        inserted = updated = 0
        before = lake.current_version(bronze)
        if distinct - present:
            faults.barrier("ingest.merge")
            with _idempotent(spark, txn, f"images:insert:{dataset}"):
                lake.with_retry(lambda: bronze.alias("t").merge(rows.alias("s"), on)
                                .whenNotMatchedInsertAll().execute(), f"insert into {uri}")
        if changed:
            fixes = rows.join(F.broadcast(flagged.filter("changed").select("image_id")), "image_id")
            with _idempotent(spark, txn, f"images:update:{dataset}"):
                lake.with_retry(lambda: bronze.alias("t").merge(fixes.alias("s"), on).whenMatchedUpdate(set={
                    "label": "s.label", "group_id": "s.group_id", "attributes": "s.attributes",
                    "updated_at": "s.updated_at"}).execute(), f"update labels in {uri}")
        if distinct - present or changed:
            metrics = lake.commit_metrics(bronze, before, "numTargetRowsInserted", "numTargetRowsUpdated")
            inserted, updated = metrics["numTargetRowsInserted"], metrics["numTargetRowsUpdated"]
        return {"inserted": inserted, "updated": updated, "already_present": present, "distinct": distinct,
                "label_conflicts": tally["label_conflicts"] or 0}
    finally:
        flagged.unpersist()


def _merge_quarantine(spark: SparkSession, uri: str, rows: DataFrame, dataset: str,
                      txn: tuple[str, int] | None = None) -> int:
    """Insert quarantine rows not already recorded (same dataset, path and content)."""
    from delta.tables import DeltaTable
    table = DeltaTable.forPath(spark, uri)
    key = ("t.dataset = s.dataset AND t.path = s.path AND t.reason = s.reason "
           "AND t.content_sha256 <=> s.content_sha256")
    existing = table.toDF().filter(F.col("dataset") == dataset).alias("t")
    new = rows.alias("s").join(existing, F.expr(key), "left_anti")
    if new.limit(1).count() == 0:
        return 0
    before = lake.current_version(table)
    with _idempotent(spark, txn, f"quarantine:{dataset}"):
        on = f"t.dataset = {lake.sql_string(dataset)} AND {key}"
        lake.with_retry(lambda: table.alias("t").merge(rows.alias("s"), on).whenNotMatchedInsertAll().execute(),
                        f"merge into {uri}")
    return lake.commit_metric(table, before, "numTargetRowsInserted")
