"""The lake's tables in a Spark catalog, for analysts' SQL.

``oncolake.images`` (bronze images without their bytes), ``oncolake.predictions``,
``oncolake.quarantine`` and the view ``oncolake.latest_predictions`` (each
image's newest prediction next to its metadata and known label). With Spark's
Hive catalog (scripts/submit.sh enables it, an embedded Derby metastore by
default, or a shared one via ``spark.hadoop.hive.metastore.uris``) the
definitions persist; they point at the Delta tables' locations, so they are
re-declared whenever the lake is registered.
"""
from __future__ import annotations

import re

from pyspark.sql import SparkSession

from oncolake import lake
from oncolake.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def register(spark: SparkSession, lake_uri: str, database: str = "oncolake") -> list[str]:
    """Declare the lake's tables and views in ``database``; returns what was declared."""
    if not _NAME.match(database):
        raise ConfigError(f"catalog database must be an identifier, got {database!r}")
    spark.sql(f"CREATE DATABASE IF NOT EXISTS {database}")
    declared = []
    bronze = lake.table_uri(lake_uri, "bronze.images")
    predictions = lake.table_uri(lake_uri, "gold.predictions")
    quarantine = lake.table_uri(lake_uri, "bronze.quarantine")
    if lake.exists(spark, bronze):
        columns = [f.name for f in spark.read.format("delta").load(bronze).schema if f.name != "content"]
        spark.sql(f"CREATE OR REPLACE VIEW {database}.images AS SELECT {', '.join(columns)} "
                  f"FROM {lake.sql_path(bronze)}")
        declared.append(f"{database}.images")
    for name, uri in (("predictions", predictions), ("quarantine", quarantine)):
        if lake.exists(spark, uri):
            spark.sql(f"CREATE OR REPLACE VIEW {database}.{name} AS SELECT * FROM {lake.sql_path(uri)}")
            declared.append(f"{database}.{name}")
    if f"{database}.images" in declared and f"{database}.predictions" in declared:
        spark.sql(f"""
            CREATE OR REPLACE VIEW {database}.latest_predictions AS
            WITH ranked AS (
                SELECT p.*, row_number() OVER (PARTITION BY p.dataset, p.image_id
                                               ORDER BY p.model_version DESC, p.scored_at DESC) AS newest
                FROM {database}.predictions p)
            SELECT i.dataset, i.image_id, i.relative_path, i.label AS known_label, i.group_id,
                   i.ingest_date, r.model_version, r.probability, r.predicted_label, r.threshold,
                   r.error, r.scored_at
            FROM {database}.images i JOIN ranked r
              ON i.dataset = r.dataset AND i.image_id = r.image_id AND r.newest = 1""")
        declared.append(f"{database}.latest_predictions")
    return declared
