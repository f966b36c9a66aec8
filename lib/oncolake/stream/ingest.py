"""Streaming ingest: Kafka records become bronze rows exactly once.

Spark Structured Streaming reads the topic; every micro-batch goes through
:func:`oncolake.ingest.land`, the validation, quarantine and insert-only
MERGE that folder ingest uses. Records are refused before their bytes are
looked at when the headers are missing or malformed, name no usable dataset,
or point at a claim-checked file that is not there (:data:`records.REASONS`).

Exactly once: the checkpoint lives in the lake (LAKE/bronze/_checkpoints/
stream_ingest/<topic>); every Delta commit of a micro-batch carries Delta's
``txnAppId`` (the query's id, fixed by the checkpoint) and ``txnVersion``
(the batch id), so a batch replayed after a crash commits nothing twice;
and the MERGEs are keyed (dataset, image id) and (dataset, record, reason),
so even a replay under a new query id inserts nothing again.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
import signal
import sys
import threading
import time
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQueryListener

from oncolake import ingest, lake
from oncolake.config import Config
from oncolake.dicom import deid as dicom_deid
from oncolake.errors import ConfigError, InputError, OncolakeError
from oncolake.stream import records

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Totals:
    batches: int = 0
    records: int = 0
    valid: int = 0
    ingested: int = 0
    labels_updated: int = 0
    already_present: int = 0
    duplicates: int = 0
    label_conflicts: int = 0
    quarantined: int = 0
    quarantine_added: int = 0
    reasons: dict = dataclasses.field(default_factory=dict)
    datasets: dict = dataclasses.field(default_factory=dict)
    error: BaseException | None = None


_UNITS = {"ms": "milliseconds", "s": "seconds", "m": "minutes", "h": "hours"}


def interval(text: str) -> str:
    """A trigger interval as Spark takes it: ``30s`` or ``30 seconds`` -> ``30 seconds``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|milliseconds?|seconds?|minutes?|hours?)\s*", text or "")
    if not match:
        raise ConfigError(f"--trigger must be an interval such as 30s, 500ms, 2m or '30 seconds', got {text!r}")
    number, unit = match.groups()
    unit = _UNITS.get(unit, unit if unit.endswith("s") else unit + "s")
    return f"{number} {unit}"


def run(spark: SparkSession, cfg: Config, topic: str, dataset: str | None = None,
        available_now: bool = True, trigger: str | None = None, ingest_date: str | None = None,
        stop_event: threading.Event | None = None) -> dict[str, Any]:
    """Ingest ``topic`` into bronze until it is drained (``available_now``) or the job is stopped.

    ``dataset``: the topic carries one dataset (records may omit the header,
    and one naming another dataset is quarantined); otherwise every record
    names its own, one of ``stream.datasets`` (default: the datasets of
    ``ingest.modalities``).
    """
    if not topic or not all(c.isalnum() or c in "._-" for c in topic):
        raise ConfigError(f"topic must be letters, digits, '.', '_' or '-', got {topic!r}")
    if dataset is not None and not records.DATASET_PATTERN.match(dataset):
        raise ConfigError(f"dataset must be letters, digits, - or _, got {dataset!r}")
    accepted = [dataset] if dataset else list(cfg.stream.datasets or cfg.ingest.modalities)
    if not accepted:
        raise ConfigError("no dataset: give --dataset, or list stream.datasets")
    odd = [name for name in accepted if not records.DATASET_PATTERN.match(name)]
    if odd:
        raise ConfigError(f"dataset names must be letters, digits, - or _: {', '.join(map(repr, odd))}")
    every = None if available_now else interval(trigger or "30 seconds")
    day = ingest._parse_date(ingest_date) if ingest_date else None
    key = dicom_deid.load_key(cfg.ingest.dicom.key_file) if cfg.ingest.dicom.key_file else None
    lake_root = lake.qualify(spark, cfg.lake)
    checkpoint = lake.checkpoint_uri(lake_root, topic)
    name = f"stream_ingest_{topic}"
    totals = _Totals()
    lags: dict[int, dict[str, int]] = {}
    options = {"kafka.bootstrap.servers": cfg.stream.bootstrap_servers, "subscribe": topic,
               "startingOffsets": cfg.stream.starting_offsets, "includeHeaders": "true",
               "maxOffsetsPerTrigger": str(cfg.stream.max_offsets_per_trigger), "failOnDataLoss": "true",
               **{f"kafka.{k}": v for k, v in cfg.stream.kafka.items()}}
    log.info("stream_ingest topic=%s datasets=%s checkpoint=%s trigger=%s", topic, ",".join(accepted),
             checkpoint, "availableNow" if available_now else trigger)

    def process(frame: DataFrame, batch_id: int) -> None:
        if totals.error is not None:
            raise RuntimeError("stream_ingest stopped after an error") from totals.error
        try:
            # The query's id is kept by its checkpoint: a new checkpoint is a new id, so its
            # batch ids (from 0 again) are never mistaken for ones Delta has seen.
            app = next((q.id for q in spark.streams.active if q.name == name), None)
            if app is None:
                raise RuntimeError(f"the streaming query {name} is not active")
            _process(spark, cfg, frame, batch_id, app, accepted, dataset, day, key, lake_root, totals, lags)
        except OncolakeError as err:  # a configuration problem, not a poison record: stop the stream
            totals.error = err
            raise

    _check_broker(cfg, topic)
    reader = spark.readStream.format("kafka").options(**options).load()
    writer = (reader.writeStream.queryName(name).foreachBatch(process)
              .option("checkpointLocation", checkpoint))
    writer = (writer.trigger(availableNow=True) if available_now
              else writer.trigger(processingTime=every))
    listener = _LagListener(lags)
    spark.streams.addListener(listener)
    started = time.monotonic()
    query = writer.start()
    stop = stop_event or threading.Event()
    previous = {}
    if not available_now and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):  # stop between batches, then report
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        while query.isActive:
            if stop.is_set():
                log.info("stopping the stream after the running micro-batch")
                deadline = time.monotonic() + 600
                while query.isActive and query.status.get("isTriggerActive") and time.monotonic() < deadline:
                    time.sleep(0.5)
                query.stop()  # a batch interrupted all the same is replayed by the next start
                break
            try:
                query.awaitTermination(1)
            except Exception:  # the query failed: reported below from query.exception()
                break
        exception = query.exception()
        if exception is not None or totals.error is not None:
            if isinstance(totals.error, OncolakeError):
                raise totals.error
            cause = [line for line in str(exception).splitlines() if "Exception:" in line or "Error:" in line]
            raise RuntimeError(f"the stream failed: {(cause or [str(exception)])[-1].strip()[:300]}")
    finally:
        if query.isActive:
            query.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        time.sleep(0.2)  # the listener's last progress event
        spark.streams.removeListener(listener)
    bronze_uri = lake.table_uri(lake_root, "bronze.images")
    return {
        "job": "stream_ingest", "topic": topic, "datasets": dict(sorted(totals.datasets.items())),
        "batches": totals.batches, "records": totals.records, "valid": totals.valid,
        "ingested": totals.ingested, "labels_updated": totals.labels_updated,
        "already_present": totals.already_present, "duplicates": totals.duplicates,
        "label_conflicts": totals.label_conflicts,
        "quarantined": totals.quarantined, "quarantine_added": totals.quarantine_added,
        "quarantine_reasons": dict(sorted(totals.reasons.items())),
        "seconds": round(time.monotonic() - started, 1),
        "table": bronze_uri,
        "table_version": lake.table_version(spark, bronze_uri) if lake.exists(spark, bronze_uri) else None,
        "quarantine_table": lake.table_uri(lake_root, "bronze.quarantine"),
        "checkpoint": checkpoint,
    }


def _check_broker(cfg: Config, topic: str, timeout_s: float = 15.0) -> None:
    """Fail in seconds, with one clear line, when the broker cannot be reached (Spark would retry for minutes)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    admin = AdminClient({"bootstrap.servers": cfg.stream.bootstrap_servers, **dict(cfg.stream.kafka)})
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as err:
        raise InputError(f"Kafka at {cfg.stream.bootstrap_servers} cannot be reached within {timeout_s:.0f} s "
                         f"({err.args[0].str() if err.args else err}); is the broker up (scripts/kafka.sh status)?") from err
    if topic not in metadata.topics:
        log.warning("topic %s does not exist yet on %s: nothing to read until it is created",
                    topic, cfg.stream.bootstrap_servers)


def _header(name: str):
    """The first value of header ``name`` as a string (null when absent)."""
    return F.expr(f"try_element_at(filter(headers, h -> h.key = '{name}'), 1).value").cast("string")


def records_frame(frame: DataFrame, dataset: str | None, accepted: list[str]) -> DataFrame:
    """Kafka rows as candidates: path (the record's address), key, headers parsed, ``status`` for refused ones."""
    attrs = F.expr(f"map_from_entries(transform(filter(headers, h -> h.key like '{records.ATTRIBUTE_PREFIX}%'), "
                   f"h -> struct(substring(h.key, {len(records.ATTRIBUTE_PREFIX) + 1}) as key, "
                   "nullif(cast(h.value as string), '') as value)))")
    named = _header(records.DATASET)
    effective = F.coalesce(named, F.lit(dataset)) if dataset else named
    ref = _header(records.REF)
    digest = _header(records.SHA256)
    duplicated = F.expr("size(headers) != size(array_distinct(transform(headers, h -> h.key)))")
    status = (F.when(F.col("headers").isNull() | (F.size("headers") == 0), "no_headers")
              .when(duplicated | (digest.isNotNull() & ~digest.rlike("^[0-9a-f]{64}$")), "malformed_headers")
              .when(F.col("relative_path") == "", "missing_key")
              .when(effective.isNull(), "missing_dataset")
              .when(~effective.isin(*accepted), "unknown_dataset")
              .when(ref.isNotNull() & ~ref.rlike(records.REF_PATTERN.pattern), "bad_reference"))
    base = frame.select(
        F.concat(F.lit("kafka:/"), "topic", F.lit("/"), F.col("partition").cast("string"), F.lit("/"),
                 F.col("offset").cast("string")).alias("path"),
        F.coalesce(F.col("key").cast("string"), F.lit("")).alias("relative_path"),
        "value", "headers", "partition", "offset")
    out = base.select(
        "path", "relative_path", "value", "partition", "offset",
        F.when(effective.isNotNull() & effective.rlike(records.DATASET_PATTERN.pattern)
               & effective.isin(*accepted), effective).otherwise(F.lit(records.NO_DATASET)).alias("dataset"),
        F.nullif(F.trim(_header(records.LABEL)), F.lit("")).alias("label"),
        F.nullif(F.trim(_header(records.GROUP)), F.lit("")).alias("group_id"),
        F.when(F.col("headers").isNotNull() & ~duplicated, attrs).alias("attributes"),
        ref.alias("ref"), digest.alias("sha256"), status.alias("status"))
    return out.withColumn("status_detail", F.when(F.col("status").isNotNull(), _details()[F.col("status")]))


def _details():
    """The quarantine detail of each reason of :data:`records.REASONS`, as a SQL map."""
    return F.create_map(*[x for k, v in records.REASONS.items() for x in (F.lit(k), F.lit(v))])


def _process(spark: SparkSession, cfg: Config, frame: DataFrame, batch_id: int, app: str,
             accepted: list[str], dataset: str | None, day: dt.date | None, key: bytes | None,
             lake_root: str, totals: _Totals, lags: dict) -> None:
    started = time.monotonic()
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    night = day or now.date()
    details = _details()
    with lake.spark_conf(spark, {"spark.sql.mapKeyDedupPolicy": "LAST_WIN"}):
        parsed = (records_frame(frame, dataset, accepted)
                  .persist(StorageLevel.DISK_ONLY))  # the batch's bytes: local disk, not the heap
    landed = files = None
    try:
        # Claim checks: the bytes are in the landing area, named by content.
        # One pass over the batch: records per dataset, the largest inline image, the references.
        ok = F.col("status").isNull()
        tally = parsed.groupBy("dataset").agg(
            F.count("*").alias("count"),
            F.max(F.when(ok & F.col("ref").isNull(), F.length("value"))).alias("largest"),
            F.collect_set(F.when(ok, F.col("ref"))).alias("refs")).collect()
        counts = {r["dataset"]: r["count"] for r in tally}
        largest = max([r["largest"] or 1 for r in tally] or [1])
        refs = sorted({ref for r in tally for ref in r["refs"]})
        landing = lake.qualify(spark, records.landing_root(lake_root, cfg.stream.landing))
        present = [ref for ref in refs if lake.exists(spark, f"{landing}/{ref}")]
        originals: list[str] = []  # claim-checked DICOM files: patient identity, deleted once committed
        inline = parsed.filter(F.col("ref").isNull()).select("path", F.col("value").alias("content"))
        if present:
            found = spark.read.format("binaryFile").load([f"{landing}/{ref}" for ref in present])
            landed_meta = found.select(
                "path", "length", (F.hex(F.substring("content", 129, 4)) == "4449434D").alias("dicom")).collect()
            largest = max([largest] + [r["length"] for r in landed_meta])
            originals = [r["path"] for r in landed_meta if r["dicom"]]
            # a ref is <dataset>/<file>: the last two parts of the path Spark read
            landed = (found
                      .select(F.regexp_extract("path", r"([^/]+/[^/]+)$", 1).alias("ref"), "content")
                      .persist(StorageLevel.DISK_ONLY))
            by_ref = parsed.filter(F.col("ref").isNotNull()).select("path", "ref").join(landed, "ref")
            content_all = inline.unionByName(by_ref.select("path", "content"))
        else:
            content_all = inline
        sizes = content_all.select("path", F.length("content").cast("long").alias("length"),
                                   F.sha2("content", 256).alias("actual_sha256"))
        files = (parsed.drop("value").join(sizes, "path", "left")
                 .withColumn("status", F.when(F.col("status").isNotNull(), F.col("status"))
                             .when(F.col("ref").isNotNull() & F.col("length").isNull(), "missing_reference")
                             .when(F.col("sha256").isNotNull() & F.col("length").isNotNull() & (F.col("length") > 0)
                                   & (F.col("sha256") != F.col("actual_sha256")), "checksum_mismatch"))
                 .withColumn("status_detail", F.when(F.col("status").isNotNull(), details[F.col("status")]))
                 .withColumn("length", F.coalesce("length", F.lit(0).cast("long"))))
        files = ingest.with_size_status(files, cfg.ingest.max_file_bytes).persist(StorageLevel.MEMORY_AND_DISK)
        content = content_all.join(files.filter(F.col("status") == "read").select("path"), "path", "left_semi")
        batch_rows = lake.arrow_batch_rows(largest, cfg.ingest.batch_mb)
        stats = {"batch": batch_id, "records": sum(counts.values()), "ingested": 0, "already_present": 0,
                 "duplicates": 0, "quarantined": 0}
        for name in sorted(counts):
            mine = files.filter(F.col("dataset") == name)
            result = ingest.land(spark, cfg, mine, content.join(mine.select("path"), "path", "left_semi"),
                                 dataset=name, now=now, day=night, modality=cfg.ingest.modality(name), key=key,
                                 batch_rows=batch_rows, any_name=True, txn=(f"oncolake-stream:{app}", batch_id))
            merged = result.merged
            totals.valid += result.valid
            totals.ingested += merged["inserted"]
            totals.labels_updated += merged["updated"]
            totals.already_present += merged["already_present"]
            totals.duplicates += result.valid - merged["distinct"]
            totals.quarantine_added += result.quarantine_added
            totals.label_conflicts += result.label_conflicts
            quarantined = sum(result.reasons.values())
            totals.quarantined += quarantined
            for reason, n in result.reasons.items():
                totals.reasons[reason] = totals.reasons.get(reason, 0) + n
            if name != records.NO_DATASET:
                totals.datasets[name] = totals.datasets.get(name, 0) + merged["inserted"]
            stats["ingested"] += merged["inserted"]
            stats["already_present"] += merged["already_present"]
            stats["duplicates"] += result.valid - merged["distinct"]
            stats["quarantined"] += quarantined
        for original in originals:  # the de-identified copy is committed (or the file was refused)
            lake.delete(spark, original)
        totals.batches += 1
        totals.records += stats["records"]
        stats["seconds"] = round(time.monotonic() - started, 2)
        lags[batch_id] = stats
    finally:
        parsed.unpersist()
        if files is not None:
            files.unpersist()
        if landed is not None:
            landed.unpersist()


class _LagListener(StreamingQueryListener):
    """Prints one JSON line per micro-batch on stderr: the batch's counts and the lag per partition.

    ``lags`` is filled by the batch function (batch id -> counts); the lag is
    the source's latest offset minus the batch's end offset, per partition.
    """

    def __init__(self, lags: dict):
        self.lags = lags

    def onQueryStarted(self, event):
        pass

    def onQueryProgress(self, event):
        progress = event.progress
        stats = self.lags.pop(progress.batchId, None)
        if stats is None:  # a progress event with no batch (an idle trigger)
            return
        lag = {}
        for source in progress.sources:
            try:
                end, latest = json.loads(source.endOffset or "{}"), json.loads(source.latestOffset or "{}")
            except ValueError:
                continue
            for topic, partitions in latest.items():
                for part, offset in partitions.items():
                    lag[part] = int(offset) - int(end.get(topic, {}).get(part, offset))
        line = {**stats, "lag": dict(sorted(lag.items(), key=lambda kv: int(kv[0]))),
                "rows_per_s": round(progress.processedRowsPerSecond or 0.0, 1)}
        print(json.dumps({"stream_ingest_batch": line}), file=sys.stderr, flush=True)

    def onQueryIdle(self, event):
        pass

    def onQueryTerminated(self, event):
        pass
