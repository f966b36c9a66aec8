"""Every StructType oncolake writes or exchanges, in one place."""
from pyspark.sql.types import (BinaryType, DateType, DoubleType, IntegerType, LongType, MapType, StringType,
                               StructField, StructType, TimestampType)

#: bronze.images: one row per distinct image (by SHA-256 of its bytes) per dataset.
BRONZE_IMAGES = StructType([
    StructField("image_id", StringType(), False),
    StructField("dataset", StringType(), False),
    StructField("path", StringType(), False),
    StructField("relative_path", StringType(), False),
    StructField("label", StringType(), True),
    StructField("group_id", StringType(), True),
    StructField("attributes", MapType(StringType(), StringType()), True),
    StructField("format", StringType(), False),
    StructField("width", IntegerType(), False),
    StructField("height", IntegerType(), False),
    StructField("channels", IntegerType(), False),
    StructField("bit_depth", IntegerType(), False),
    StructField("size_bytes", LongType(), False),
    StructField("content", BinaryType(), False),
    StructField("ingested_at", TimestampType(), False),
    StructField("updated_at", TimestampType(), False),
    StructField("ingest_date", DateType(), False),
])
BRONZE_IMAGES_PARTITIONS = ("dataset", "ingest_date")

#: bronze.quarantine: one row per bad file (per dataset, path and content).
BRONZE_QUARANTINE = StructType([
    StructField("dataset", StringType(), False),
    StructField("path", StringType(), False),
    StructField("relative_path", StringType(), False),
    StructField("reason", StringType(), False),
    StructField("detail", StringType(), True),
    StructField("size_bytes", LongType(), False),
    StructField("content_sha256", StringType(), True),
    StructField("quarantined_at", TimestampType(), False),
    StructField("ingest_date", DateType(), False),
])
BRONZE_QUARANTINE_PARTITIONS = ("dataset",)

#: What ingest's validation step returns for each candidate file.
INSPECTION = StructType([
    StructField("path", StringType(), False),
    StructField("image_id", StringType(), True),
    StructField("format", StringType(), True),
    StructField("width", IntegerType(), True),
    StructField("height", IntegerType(), True),
    StructField("channels", IntegerType(), True),
    StructField("bit_depth", IntegerType(), True),
    StructField("reason", StringType(), True),
    StructField("detail", StringType(), True),
])

#: gold.predictions: one row per image per model version.
GOLD_PREDICTIONS = StructType([
    StructField("image_id", StringType(), False),
    StructField("dataset", StringType(), False),
    StructField("model_version", IntegerType(), False),
    StructField("probability", DoubleType(), True),
    StructField("predicted_label", IntegerType(), True),
    StructField("threshold", DoubleType(), False),
    StructField("error", StringType(), True),
    StructField("scored_at", TimestampType(), False),
    StructField("ingest_date", DateType(), False),
])
GOLD_PREDICTIONS_PARTITIONS = ("dataset", "ingest_date")
