"""Every StructType oncolake writes or exchanges, in one place."""
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (ArrayType, BinaryType, BooleanType, DateType, DoubleType, IntegerType, LongType,
                               MapType, StringType, StructField, StructType, TimestampType)

#: What a DICOM image's header says, as bronze keeps it (never anything identifying;
#: study and series are keyed pseudonyms).
DICOM_FACTS = StructType([
    StructField("body_part", StringType(), True),
    StructField("laterality", StringType(), True),
    StructField("view_position", StringType(), True),
    StructField("manufacturer", StringType(), True),
    StructField("photometric", StringType(), True),
    StructField("bits_stored", IntegerType(), True),
    StructField("frames", IntegerType(), True),
    StructField("pixel_spacing", ArrayType(DoubleType()), True),
    StructField("transfer_syntax", StringType(), True),
    StructField("study", StringType(), True),
    StructField("series", StringType(), True),
])

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
    # Added with DICOM support; null in rows written before it (read as default_modality).
    StructField("modality", StringType(), True),
    StructField("dicom", DICOM_FACTS, True),
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
    # DICOM only: the patient pseudonym, the header's modality and facts (flat;
    # ingest builds the struct).
    StructField("patient", StringType(), True),
    StructField("modality", StringType(), True),
    *[StructField(f"dicom_{f.name}", f.dataType, True) for f in DICOM_FACTS.fields],
    # the bytes a good image is stored with: the file's own, or a DICOM's
    # de-identified file (null for every other verdict)
    StructField("content", BinaryType(), True),
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
    # Added with drift monitoring (oncolake.drift); null in rows scored before it, and for errors.
    StructField("brightness", DoubleType(), True),
    StructField("contrast", DoubleType(), True),
    StructField("sharpness", DoubleType(), True),
])
GOLD_PREDICTIONS_PARTITIONS = ("dataset", "ingest_date")

#: gold.nightly_runs: one row per nightly run (oncolake.nightly); the drift
#: columns (oncolake.drift) are null in rows written before them.
GOLD_NIGHTLY_RUNS = StructType([
    StructField("night", StringType(), True),
    StructField("started_at", StringType(), True),
    StructField("dataset", StringType(), True),
    StructField("ingested", LongType(), True),
    StructField("quarantined", LongType(), True),
    StructField("model_version", IntegerType(), True),
    StructField("scored", LongType(), True),
    StructField("errors", LongType(), True),
    StructField("malignant_rate", DoubleType(), True),
    StructField("quarantine_rate", DoubleType(), True),
    StructField("brightness", DoubleType(), True),
    StructField("contrast", DoubleType(), True),
    StructField("sharpness", DoubleType(), True),
    StructField("input_mix", StringType(), True),
    StructField("psi_brightness", DoubleType(), True),
    StructField("psi_contrast", DoubleType(), True),
    StructField("psi_sharpness", DoubleType(), True),
    StructField("psi_megapixels", DoubleType(), True),
    StructField("psi_format", DoubleType(), True),
    StructField("psi_modality", DoubleType(), True),
    StructField("psi_probability", DoubleType(), True),
    StructField("drift_alert", BooleanType(), True),
    StructField("alerts", StringType(), True),
])


def modality(bronze: DataFrame, default: str) -> Column:
    """An image's modality; ``default`` (the dataset's) for rows ingested before modalities were kept."""
    if "modality" not in bronze.columns:
        return F.lit(default)
    return F.coalesce(F.col("modality"), F.lit(default))
