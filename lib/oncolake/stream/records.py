"""The record format: one image per Kafka record.

key
    the image's path relative to the folder it was published from (UTF-8);
    it becomes ``relative_path`` in bronze, as a folder ingest would set it.
value
    the image's bytes; empty for a claim check (:data:`REF`).
headers (UTF-8 values)
    ``dataset``, ``label``, ``group_id``, ``source`` (the file's name) and
    ``source_time`` (its modification time, ISO 8601 UTC), ``sha256`` (of the image's bytes),
    ``ref`` (claim check: the image is the file LAKE/landing/<ref>), and
    ``attr.<column>`` for every other column of the labels CSV.

A record with no headers at all, a header given twice, or a ``ref`` that is
not a landing-area name is quarantined (:data:`REASONS`); so is a record
that names no dataset when the stream was not started for one.
"""
from __future__ import annotations

import re

DATASET, LABEL, GROUP, SHA256, REF = "dataset", "label", "group_id", "sha256", "ref"
SOURCE, SOURCE_TIME = "source", "source_time"
ATTRIBUTE_PREFIX = "attr."
#: Under the lake root unless ``stream.landing`` says otherwise: claim-checked
#: images, LANDING/<dataset>/<sha256><extension>.
LANDING = "landing"
#: What a ``ref`` header may be: a dataset folder and a content-addressed file name, nothing else.
REF_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,100}/[0-9a-f]{64}(\.[A-Za-z0-9]{1,10})?$")
DATASET_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,100}$")

#: Quarantine reasons of records refused before their bytes are looked at.
REASONS = {
    "no_headers": "the record has no headers (dataset, sha256, ... are expected)",
    "malformed_headers": "a header is given twice, or sha256 is not 64 hex digits",
    "missing_dataset": "no dataset header, and the stream was not started for one dataset",
    "unknown_dataset": "the dataset header names a dataset this stream does not take",
    "missing_key": "the record has no key (the image's relative path)",
    "bad_reference": "the ref header is not a landing-area file name",
    "missing_reference": "the claim-checked file is not in the landing area",
    "checksum_mismatch": "the bytes do not hash to the sha256 header",
}
#: Where quarantine rows of records that name no usable dataset are filed.
NO_DATASET = "_unknown"


def landing_root(lake_root: str, configured: str) -> str:
    """Where claim-checked images wait: ``stream.landing``, or LAKE/landing when that is empty."""
    return (configured or f"{lake_root.rstrip('/')}/{LANDING}").rstrip("/")


def landing_name(dataset: str, sha256: str, extension: str) -> str:
    """The ``ref`` of a claim-checked image: LANDING/<this> under the lake root."""
    ext = extension.lower() if re.fullmatch(r"\.[A-Za-z0-9]{1,10}", extension or "") else ""
    return f"{dataset}/{sha256}{ext}"
