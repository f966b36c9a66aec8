"""Export the gold predictions to PostgreSQL for applications (scripts/submit.sh export).

    scripts/submit.sh export --lake LAKE --dataset NAME [--to postgresql://USER@HOST:PORT/DB]

Rows of ``gold.predictions`` joined to their image's metadata (path inside
the dataset, known label, group, modality; never the bytes) are upserted
into ``oncolake.predictions``, primary key (dataset, image_id, model_version).

Incremental and exactly once: the export records, in
``oncolake.export_partitions``, how many rows of each (dataset, model
version, ingest date) partition it has written; a run exports only the
partitions whose row count in the lake differs from the record. Spark's JDBC
writer puts those rows into a staging table, then each partition is upserted
and its record updated **in one transaction**: a run killed at any point has
either committed a partition whole, with its record, or not at all, so the
rerun leaves no duplicate and no gap. Runs for the same database take a
PostgreSQL advisory lock, so two never interleave. ``exported`` counts rows
inserted or changed (a rerun: 0).
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from oncolake import faults, lake, postgres
from oncolake.config import Config
from oncolake.errors import InputError

log = logging.getLogger(__name__)

#: Held for a run's length: exports to one database never interleave.
_LOCK = 0x6F6E636F  # "onco"
_COLUMNS = ("dataset", "image_id", "model_version", "probability", "predicted_label", "threshold", "error",
            "scored_at", "ingest_date", "relative_path", "modality", "known_label", "group_id")
SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS oncolake;
CREATE TABLE IF NOT EXISTS oncolake.predictions (
    dataset text NOT NULL,
    image_id text NOT NULL,
    model_version integer NOT NULL,
    probability double precision,
    predicted_label smallint,
    threshold double precision NOT NULL,
    error text,
    scored_at timestamp NOT NULL,
    ingest_date date NOT NULL,
    relative_path text,
    modality text,
    known_label text,
    group_id text,
    exported_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dataset, image_id, model_version));
CREATE INDEX IF NOT EXISTS predictions_by_date ON oncolake.predictions (dataset, ingest_date);
CREATE TABLE IF NOT EXISTS oncolake.export_partitions (
    dataset text NOT NULL,
    model_version integer NOT NULL,
    ingest_date date NOT NULL,
    row_count bigint NOT NULL,
    lake text NOT NULL,
    exported_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dataset, model_version, ingest_date));
CREATE UNLOGGED TABLE IF NOT EXISTS oncolake.export_stage (
    dataset text, image_id text, model_version integer, probability double precision, predicted_label smallint,
    threshold double precision, error text, scored_at timestamp, ingest_date date, relative_path text,
    modality text, known_label text, group_id text);
"""
_UPSERT = f"""
INSERT INTO oncolake.predictions ({', '.join(_COLUMNS)})
SELECT {', '.join(_COLUMNS)} FROM oncolake.export_stage
 WHERE dataset = %(dataset)s AND model_version = %(version)s AND ingest_date = %(date)s
ON CONFLICT (dataset, image_id, model_version) DO UPDATE SET
    {', '.join(f'{c} = EXCLUDED.{c}' for c in _COLUMNS[3:])}, exported_at = now()
 WHERE ({', '.join(f'oncolake.predictions.{c}' for c in _COLUMNS[3:])})
       IS DISTINCT FROM ({', '.join(f'EXCLUDED.{c}' for c in _COLUMNS[3:])})
"""
_RECORD = """
INSERT INTO oncolake.export_partitions (dataset, model_version, ingest_date, row_count, lake)
VALUES (%(dataset)s, %(version)s, %(date)s, %(rows)s, %(lake)s)
ON CONFLICT (dataset, model_version, ingest_date) DO UPDATE
   SET row_count = EXCLUDED.row_count, lake = EXCLUDED.lake, exported_at = now()
"""


def ensure_schema(conn) -> None:
    """The export's tables, created when missing (idempotent)."""
    with conn.transaction():
        conn.execute("SET LOCAL client_min_messages = warning")
        conn.execute(SCHEMA_SQL)


def run(spark: SparkSession, cfg: Config, dataset: str, to: str | None = None) -> dict[str, Any]:
    """Upsert the dataset's new or changed prediction partitions into PostgreSQL."""
    db = postgres.database(cfg, to)
    lake_uri = lake.qualify(spark, cfg.lake)
    predictions_uri = lake.table_uri(lake_uri, "gold.predictions")
    bronze_uri = lake.table_uri(lake_uri, "bronze.images")
    if not lake.exists(spark, predictions_uri):
        raise InputError(f"no predictions table at {predictions_uri}: score first")
    start = time.perf_counter()
    predictions = spark.read.format("delta").load(predictions_uri).filter(F.col("dataset") == dataset)
    counts = {(r["model_version"], r["ingest_date"]): r["count"]
              for r in predictions.groupBy("model_version", "ingest_date").count().collect()}
    with db.connect() as conn:
        ensure_schema(conn)
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK,))
        conn.commit()
        try:
            recorded = {(r[0], r[1]): r[2] for r in conn.execute(
                "SELECT model_version, ingest_date, row_count FROM oncolake.export_partitions "
                "WHERE dataset = %s", (dataset,)).fetchall()}
            conn.commit()
            todo = sorted(k for k, n in counts.items() if recorded.get(k) != n)
            summary = {"job": "export", "dataset": dataset, "database": db.url, "table": "oncolake.predictions",
                       "partitions": len(counts), "partitions_exported": 0, "exported": 0, "rows_read": 0}
            with conn.transaction():  # also what a killed export staged after its last commit
                conn.execute("TRUNCATE oncolake.export_stage")
            if not todo:
                return _finish(summary, start)
            log.info("exporting %d of %d partitions of %s to %s", len(todo), len(counts), dataset, db.url)
            rows = _rows(spark, predictions, bronze_uri, dataset, todo)
            rows.write.jdbc(db.jdbc_url, "oncolake.export_stage", mode="append",
                            properties={**db.jdbc_properties(), "batchsize": "5000",
                                        "stringtype": "unspecified", "reWriteBatchedInserts": "true"})
            log.info("staged %s's rows in oncolake.export_stage", dataset)
            for version, date in todo:
                params = {"dataset": dataset, "version": version, "date": date,
                          "rows": counts[(version, date)], "lake": lake_uri}
                with conn.transaction():
                    written = conn.execute(_UPSERT, params).rowcount
                    faults.point("export.before_commit")
                    conn.execute(_RECORD, params)
                summary["exported"] += max(written, 0)
                summary["partitions_exported"] += 1
                summary["rows_read"] += counts[(version, date)]
                log.info("exported %s v%d %s: %d rows written", dataset, version, date, written)
                faults.point("export.partition_committed")
            with conn.transaction():
                conn.execute("TRUNCATE oncolake.export_stage")
            return _finish(summary, start)
        finally:
            if not conn.closed:
                conn.rollback()
                conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK,))
                conn.commit()


def _rows(spark: SparkSession, predictions, bronze_uri: str, dataset: str, todo: list[tuple[int, dt.date]]):
    """The prediction rows of ``todo``'s partitions with their image's metadata (no bytes)."""
    dates = sorted({d for _, d in todo})
    chosen = F.lit(False)
    for version, date in todo:
        chosen = chosen | ((F.col("model_version") == version) & (F.col("ingest_date") == F.lit(date)))
    wanted = predictions.filter(F.col("ingest_date").isin(dates)).filter(chosen)
    images = (spark.read.format("delta").load(bronze_uri)
              .filter((F.col("dataset") == dataset) & F.col("ingest_date").isin(dates))
              .select("image_id", "relative_path", F.col("label").alias("known_label"), "group_id",
                      (F.col("modality") if "modality" in spark.read.format("delta").load(bronze_uri).columns
                       else F.lit(None).cast("string")).alias("modality")))
    return (wanted.join(images, "image_id", "left")
            .select(*[F.col(c) for c in _COLUMNS]))


def _finish(summary: dict[str, Any], start: float) -> dict[str, Any]:
    seconds = time.perf_counter() - start
    summary["seconds"] = round(seconds, 1)
    return summary
