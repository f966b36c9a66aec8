"""Publish a folder of images to a Kafka topic, one record per image (no Spark).

    scripts/produce.sh --topic skin --dataset isic_uda1 --input ../shared/data/isic_uda1 \\
        --labels ../shared/data/isic_uda1/labels.csv

The files taken are those folder ingest would read (``ingest.extensions``,
no extension, or named by the labels CSV); the record format is
:mod:`oncolake.stream.records`. An image larger than ``stream.max_record_bytes``
is copied to the landing area (``stream.landing``, default LAKE/landing/)
under its SHA-256 and published as a reference (claim check); stream_ingest
deletes a DICOM original there once its de-identified copy is committed. The producer is idempotent with ``acks=all``: it returns
once the broker has every record, and prints a JSON summary (records sent,
bytes, references, failures) as its last line. Publishing the same folder
twice sends every record twice; ingest keeps one copy of each image.
"""
from __future__ import annotations

import csv
import datetime as dt
import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from oncolake import cli, config, lake
from oncolake.errors import ConfigError, InputError
from oncolake.stream import records

log = logging.getLogger("oncolake.produce")


def read_labels(path: Path, group_columns: Sequence[str]) -> dict[str, dict[str, Any]]:
    """relative path -> label, group and attributes, as folder ingest reads the same CSV."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"labels CSV {path} cannot be read: {err}") from err
    missing = {"path", "label"} - set(columns)
    if missing:
        raise InputError(f"labels CSV {path} has no {' or '.join(sorted(missing))} column (columns: {', '.join(columns)})")
    group = next((c for c in group_columns if c in columns), None)
    extra = [c for c in columns if c not in ("path", "label", group)]
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        rel = (row.get("path") or "").strip().replace("\\", "/")
        while rel.startswith("./"):
            rel = rel[2:]
        if not rel:
            continue
        entry = {"label": (row.get("label") or "").strip() or None,
                 "group_id": ((row.get(group) or "").strip() or None) if group else None,
                 "attributes": {c: row.get(c) or "" for c in extra}}
        if rel in out:  # as folder ingest: a path given two labels keeps none; empty cells do not count
            kept = out[rel]
            if entry["label"] is not None and kept["label"] is not None and entry["label"] != kept["label"]:
                kept["label"], kept["conflict"] = None, True
            elif kept["label"] is None and not kept.get("conflict"):
                kept["label"] = entry["label"]
            continue
        out[rel] = entry
    return out


def candidates(root: Path, extensions: Sequence[str], named: set[str]) -> tuple[list[Path], int]:
    """The files folder ingest would take under ``root`` (sorted), and how many others were skipped.

    As folder ingest: image extensions, files the labels CSV names, and files
    without an extension that are DICOM.
    """
    exts = {e.lower() for e in extensions}
    taken, skipped = [], 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.suffix.lower() in exts or rel in named or ("." not in name and _has_dicom_preamble(path)):
                taken.append(path)
            else:
                skipped += 1
    return taken, skipped


def _has_dicom_preamble(path: Path) -> bool:
    """A file without an extension is published only if it is DICOM (as folder ingest takes it)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return True  # published, and its read failure reported with the others


def headers_for(dataset: str, meta: dict[str, Any] | None, name: str, mtime: float, digest: str,
                ref: str | None) -> list[tuple[str, bytes]]:
    """The record headers (:mod:`records`) of one image."""
    meta = meta or {}
    stamp = dt.datetime.fromtimestamp(mtime, dt.timezone.utc).isoformat(timespec="seconds")
    out = [(records.DATASET, dataset), (records.SOURCE, name), (records.SOURCE_TIME, stamp),
           (records.SHA256, digest)]
    if meta.get("label") is not None:
        out.append((records.LABEL, meta["label"]))
    if meta.get("group_id") is not None:
        out.append((records.GROUP, meta["group_id"]))
    out += [(records.ATTRIBUTE_PREFIX + k, v) for k, v in (meta.get("attributes") or {}).items()]
    if ref:
        out.append((records.REF, ref))
    return [(k, str(v).encode("utf-8")) for k, v in out]


def publish(cfg: config.Config, topic: str, dataset: str, source: str, labels: str | None = None,
            max_record_bytes: int | None = None) -> dict[str, Any]:
    """Publish every candidate image under ``source`` to ``topic``; the summary."""
    from confluent_kafka import KafkaException, Producer
    if not records.DATASET_PATTERN.match(dataset or ""):
        raise ConfigError(f"dataset must be letters, digits, - or _, got {dataset!r}")
    if not topic or not all(c.isalnum() or c in "._-" for c in topic):
        raise ConfigError(f"topic must be letters, digits, '.', '_' or '-', got {topic!r}")
    root = Path(source)
    if not root.is_dir():
        raise InputError(f"input folder {source} does not exist or is not a folder")
    meta = read_labels(Path(labels), cfg.ingest.group_columns) if labels else {}
    files, skipped = candidates(root, cfg.ingest.extensions, set(meta))
    limit = max_record_bytes or cfg.stream.max_record_bytes
    landing_uri = records.landing_root(cfg.lake, cfg.stream.landing)
    landing_fs, landing_root = lake.python_fs(landing_uri, cfg.hdfs)
    if lake.is_local(landing_uri):
        landing_root = os.path.abspath(landing_root)
    failures: list[str] = []
    acked = [0]

    def delivered(err, msg) -> None:
        if err is None:
            acked[0] += 1
        else:
            failures.append(f"{msg.key().decode('utf-8', 'replace')}: {err}")

    producer = Producer({
        "bootstrap.servers": cfg.stream.bootstrap_servers,
        "enable.idempotence": True, "acks": "all",
        "message.max.bytes": max(limit, 1_000_000) + 64 * 1024,  # the record's headers on top
        "linger.ms": 20, "compression.type": "none",  # JPEG and DICOM do not compress
        "client.id": f"oncolake-produce-{dataset}",
        **dict(cfg.stream.kafka),
    })
    try:
        producer.list_topics(timeout=15)
    except KafkaException as err:
        raise InputError(f"Kafka at {cfg.stream.bootstrap_servers} cannot be reached within 15 s "
                         f"({err.args[0].str() if err.args else err}); is the broker up (scripts/kafka.sh status)?") from err
    sent = sent_bytes = refs = 0
    started = time.monotonic()
    log.info("publishing %d files from %s to topic %s (%s)", len(files), root, topic, cfg.stream.bootstrap_servers)
    try:
        for n, path in enumerate(files, 1):
            rel = path.relative_to(root).as_posix()
            try:
                data = path.read_bytes()
                mtime = path.stat().st_mtime
            except OSError as err:
                failures.append(f"{rel}: cannot be read ({err.strerror})")
                continue
            digest = hashlib.sha256(data).hexdigest()
            ref = None
            if len(data) > limit:  # claim check: the bytes go to the lake, the record carries the name
                ref = records.landing_name(dataset, digest, path.suffix)
                target = f"{landing_root}/{ref}"
                if not landing_fs.exists(target):
                    landing_fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                    with landing_fs.open(target + ".part", "wb") as out:
                        out.write(data)
                    landing_fs.mv(target + ".part", target)
                refs += 1
            value = b"" if ref else data
            headers = headers_for(dataset, meta.get(rel), path.name, mtime, digest, ref)
            while True:
                try:
                    producer.produce(topic, key=rel.encode("utf-8"), value=value, headers=headers,
                                     on_delivery=delivered)
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    producer.poll(0.5)
            producer.poll(0)
            sent += 1
            sent_bytes += len(data)
            if n % 1000 == 0:
                log.info("%d/%d records queued", n, len(files))
        remaining = producer.flush(120)
    except KafkaException as err:
        raise InputError(f"Kafka at {cfg.stream.bootstrap_servers}: {err}") from err
    if remaining:
        failures.append(f"{remaining} records not acknowledged within 120 s")
    seconds = time.monotonic() - started
    for line in failures[:20]:
        log.error("not sent: %s", line)
    return {"job": "produce", "topic": topic, "dataset": dataset, "input": str(root),
            "files_seen": len(files) + skipped, "skipped": skipped, "records_sent": sent,
            "acknowledged": acked[0], "bytes": sent_bytes, "references": refs,
            "failures": len(failures), "seconds": round(seconds, 2),
            "records_per_s": round(sent / seconds, 1) if seconds else None}


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("produce", __doc__)
    p.add_argument("--topic", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--input", required=True, help="local folder of images")
    p.add_argument("--labels", help="labels CSV (path relative to --input in its path column)")
    p.add_argument("--max-record-bytes", type=int, help="claim-check threshold (default stream.max_record_bytes)")
    args = p.parse_args(argv)
    try:
        cfg = cli.load_config(args)
        summary = publish(cfg, args.topic, args.dataset, args.input, args.labels, args.max_record_bytes)
    except Exception as err:  # one clear line (and the exit code of an OncolakeError), whatever went wrong
        return cli.fail("produce", err)
    cli.emit(summary)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
