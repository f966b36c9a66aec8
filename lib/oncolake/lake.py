"""The lake's layout and storage: URIs, Hadoop file system calls, Delta writes.

Every path is a URI resolved by Hadoop on the driver (file: or hdfs:), so
the same code runs with the lake on local disk or on HDFS. Object stores
(s3a:, gs:, abfs:) are not supported: no Hadoop connector is shipped, the
Python side has no client for them, and nothing here is tested against one.
Python code outside the JVM (Petastorm readers, Horovod ranks) reaches the same URIs
through :func:`python_fs`: the local disk, or HDFS over WebHDFS, which needs
no Hadoop client or libhdfs on the machine.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
import uuid
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlparse

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructType

from oncolake.config import HdfsConfig
from oncolake.errors import InputError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Table name -> location under the lake root. Every path under the lake is
#: made here: these tables, and the folders of files below.
TABLES = {
    "bronze.images": "bronze/images",
    "bronze.quarantine": "bronze/quarantine",
    "silver.splits": "silver/splits",
    "gold.predictions": "gold/predictions",
    "gold.nightly_runs": "gold/nightly_runs",
}


def tensors_root(lake_uri: str, dataset: str) -> str:
    """The versions of a dataset's tensors (``v<N>/split=...``, Petastorm)."""
    return f"{lake_uri.rstrip('/')}/silver/tensors/{dataset}"


def tensors_uri(lake_uri: str, dataset: str, version: int) -> str:
    """One tensor version of a dataset (``split=train|val|test`` and ``manifest.json`` under it)."""
    return f"{tensors_root(lake_uri, dataset)}/v{version}"


def models_root(lake_uri: str, dataset: str) -> str:
    """The registered model versions of a dataset (``v<N>/``), and ``_runs/`` of training in progress."""
    return f"{lake_uri.rstrip('/')}/models/{dataset}"


def checkpoint_uri(lake_uri: str, topic: str) -> str:
    """Where the stream of ``topic`` keeps its offsets: in the lake, next to the bronze tables."""
    return f"{lake_uri.rstrip('/')}/bronze/_checkpoints/stream_ingest/{topic}"


def nightly_page(lake_uri: str) -> str:
    """The nightly run's HTML page, regenerated from ``gold.nightly_runs``."""
    return f"{lake_uri.rstrip('/')}/reports/nightly.html"


def _hadoop_path(spark: SparkSession, uri: str):
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    return path, path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())


def qualify(spark: SparkSession, uri: str) -> str:
    """An absolute, scheme-qualified URI for ``uri`` (a relative path is taken from the cwd)."""
    path, fs = _hadoop_path(spark, uri)
    return str(fs.makeQualified(path).toString()).rstrip("/")


def sql_string(value: str) -> str:
    """``value`` as a Spark SQL string literal: quotes and backslashes escaped.

    Every name that reaches SQL text (a dataset in a MERGE condition or a
    replaceWhere) goes through here, whatever validated it before.
    """
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def sql_path(uri: str) -> str:
    """``delta.`uri``` with any backtick in the URI doubled, as Spark SQL quotes identifiers."""
    return "delta.`" + uri.replace("`", "``") + "`"


def table_uri(lake: str, table: str) -> str:
    """The URI of one of :data:`TABLES` under the lake root ``lake``."""
    return f"{lake.rstrip('/')}/{TABLES[table]}"


def exists(spark: SparkSession, uri: str) -> bool:
    path, fs = _hadoop_path(spark, uri)
    return bool(fs.exists(path))


def is_dir(spark: SparkSession, uri: str) -> bool:
    path, fs = _hadoop_path(spark, uri)
    return bool(fs.exists(path) and fs.getFileStatus(path).isDirectory())


def read_text(spark: SparkSession, uri: str) -> str:
    """A small text file's content (manifests, model metadata)."""
    path, fs = _hadoop_path(spark, uri)
    stream = fs.open(path)
    try:
        jvm = spark.sparkContext._jvm
        return str(jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8"))
    finally:
        stream.close()


def write_text(spark: SparkSession, uri: str, text: str) -> None:
    """Write a small text file, replacing any file already there."""
    write_bytes(spark, uri, text.encode("utf-8"))


#: Marks the hidden sibling a small file is written to before it is renamed into place.
PARTIAL = ".partial-"
#: A partial file this old is a killed writer's: the next write of the same file deletes it.
STALE_PARTIAL_S = 60.0


def write_bytes(spark: SparkSession, uri: str, data: bytes) -> None:
    """Write a small file (metrics, a reference, a plot, a page), replacing any file already there.

    The bytes go to a hidden sibling (``.NAME.partial-ID``) that is then
    renamed over ``uri``, so a reader, or the rerun of a job killed while
    writing, never finds half a file: on local disk the rename replaces the
    file atomically; on HDFS (whose rename will not replace) the old file is
    deleted first, so for a moment there is none. A killed writer's sibling
    is deleted by the next write of the same file once it is a minute old.
    """
    path, fs = _hadoop_path(spark, uri)
    parent, name = path.getParent(), str(path.getName())
    jvm = spark.sparkContext._jvm
    partial = jvm.org.apache.hadoop.fs.Path(parent, f".{name}{PARTIAL}{uuid.uuid4().hex[:12]}")
    stream = fs.create(partial, True)
    try:
        stream.write(bytearray(data))
    finally:
        stream.close()
    if not fs.rename(partial, path):
        fs.delete(path, False)
        if not fs.rename(partial, path):
            fs.delete(partial, False)
            raise OSError(f"could not move the written file into place at {uri}")
    now_ms = time.time() * 1000
    for status in fs.listStatus(parent):
        other = str(status.getPath().getName())
        if other.startswith(f".{name}{PARTIAL}") and (now_ms - status.getModificationTime()) / 1000 > STALE_PARTIAL_S:
            fs.delete(status.getPath(), False)


def read_bytes(spark: SparkSession, uri: str) -> bytes:
    """A small file's bytes (a model file)."""
    from py4j.protocol import Py4JJavaError
    path, fs = _hadoop_path(spark, uri)
    stream = fs.open(path)
    try:
        return bytes(spark.sparkContext._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
    except Py4JJavaError as err:
        if "ChecksumException" in str(err.java_exception.getClass().getName()):
            raise InputError(f"{uri} fails Hadoop's checksum: it was changed outside the lake") from err
        raise
    finally:
        stream.close()


def read_head(spark: SparkSession, uri: str, limit: int) -> bytes:
    """Up to ``limit`` bytes from the start of a file (to sniff its encoding)."""
    path, fs = _hadoop_path(spark, uri)
    stream = fs.open(path)
    try:
        jvm = spark.sparkContext._jvm
        return bytes(jvm.org.apache.commons.io.IOUtils.toByteArray(jvm.org.apache.commons.io.input.BoundedInputStream(
            stream, limit)))
    finally:
        stream.close()


def rename(spark: SparkSession, src: str, dst: str) -> bool:
    """Atomic rename on HDFS and local disk; False if ``dst`` exists or ``src`` doesn't."""
    src_path, fs = _hadoop_path(spark, src)
    dst_path, _ = _hadoop_path(spark, dst)
    return bool(fs.rename(src_path, dst_path))


def delete(spark: SparkSession, uri: str) -> None:
    path, fs = _hadoop_path(spark, uri)
    fs.delete(path, True)


def list_dir(spark: SparkSession, uri: str) -> list[str]:
    """Names of the entries directly under ``uri`` (empty if it does not exist)."""
    return sorted(ages(spark, uri))


def ages(spark: SparkSession, uri: str) -> dict[str, float]:
    """Seconds since each entry directly under ``uri`` was last modified (empty if it does not exist)."""
    path, fs = _hadoop_path(spark, uri)
    if not fs.exists(path):
        return {}
    now_ms = time.time() * 1000
    return {str(s.getPath().getName()): (now_ms - s.getModificationTime()) / 1000 for s in fs.listStatus(path)}


#: The prefix of a run's work in progress under a lake folder: readers skip it.
SCRATCH = "_tmp-"
#: A ``_tmp-*`` folder this old was left by a killed run wherever it was made
#: (a live run finishes far sooner).
ABANDONED_AFTER_S = 24 * 3600


def scratch_name(what: str) -> str:
    """A fresh ``_tmp-WHAT-RANDOM-pidPID@HOST`` name for a run's work in progress.

    The driver's process id and host are in the name so that the next run on
    the same host can tell a killed run's leftovers (process gone) from a run
    still going (:func:`sweep_scratch`).
    """
    return f"{SCRATCH}{what}-{uuid.uuid4().hex[:8]}-{owner_tag()}"


def owner_tag() -> str:
    """``pidPID@HOST`` of this process: ends a name that :func:`owner_gone` can judge."""
    return f"pid{os.getpid()}@{socket.gethostname()}"


def owner_gone(name: str) -> bool:
    """True if ``name`` (ending ``-pidPID@HOST``, as :func:`scratch_name`'s do) was made on this host
    by a process that has ended."""
    rest, _, host = name.rpartition("@")
    _, _, pid = rest.rpartition("-pid")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def sweep_scratch(spark: SparkSession, root: str, max_age_s: float = ABANDONED_AFTER_S) -> list[str]:
    """Delete the ``_tmp-*`` entries under ``root`` left by killed runs; returns their names.

    An entry goes when the process that made it on this host has ended, or,
    wherever it was made, when it is older than ``max_age_s`` (a live run
    finishes far sooner). Younger entries from other hosts, or from a process
    still running, may belong to a run in progress and are left alone.
    """
    swept = []
    for name, age in ages(spark, root).items():
        if name.startswith(SCRATCH) and (owner_gone(name) or age > max_age_s):
            log.info("deleting %s/%s, left by a killed run (%.0f s old)", root, name, age)
            delete(spark, f"{root}/{name}")
            swept.append(name)
    return swept


def copy(spark: SparkSession, src: str, dst: str) -> None:
    """Copy a file or folder within the lake (or between Hadoop file systems)."""
    src_path, src_fs = _hadoop_path(spark, src)
    dst_path, dst_fs = _hadoop_path(spark, dst)
    spark.sparkContext._jvm.org.apache.hadoop.fs.FileUtil.copy(
        src_fs, src_path, dst_fs, dst_path, False, spark.sparkContext._jsc.hadoopConfiguration())


def python_fs(uri: str, hdfs: HdfsConfig) -> tuple[Any, str]:
    """An fsspec file system and the path within it for ``uri``, usable without Spark.

    ``file:`` URIs (and plain paths) map to the local disk; ``hdfs:`` URIs to
    WebHDFS at ``hdfs.webhdfs_url`` (the NameNode's HTTP address) as ``hdfs.user``.
    The file system pickles, so Spark tasks and Horovod ranks can carry it.
    """
    import fsspec
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return fsspec.filesystem("file"), parsed.path or uri
    if parsed.scheme == "hdfs":
        http = urlparse(hdfs.webhdfs_url)
        return (fsspec.filesystem("webhdfs", host=http.hostname, port=http.port or 9870, user=hdfs.user or None,
                                  use_https=http.scheme == "https"), parsed.path)
    raise ValueError(f"no Python file system for {uri!r}: the lake must be on file: or hdfs:")


def petastorm_filesystem(uri: str, hdfs: HdfsConfig) -> Any | None:
    """The file system to hand Petastorm for ``uri``: None (its own) for a local lake.

    For ``hdfs:`` Petastorm's default needs libhdfs and a Hadoop install on
    every machine that reads; WebHDFS needs neither.
    """
    return None if is_local(uri) else python_fs(uri, hdfs)[0]


def is_local(uri: str) -> bool:
    """True for a ``file:`` URI or a plain path."""
    return urlparse(uri).scheme in ("", "file")


def ensure_delta_table(spark: SparkSession, uri: str, schema: StructType,
                       partition_by: tuple[str, ...] = ()) -> DeltaTable:
    """The Delta table at ``uri``, created empty with ``schema`` if it does not exist.

    Two runs creating the same table at once are safe: the loser of the first
    commit retries. A run that finds ``_delta_log`` without a commit yet (the
    other run has made the folder and is writing version 0; Delta then says
    the table does not exist) waits for that commit; such a folder older than
    :data:`STALE_PARTIAL_S` was left by a run killed while creating the table,
    holds nothing readable, and is removed. A rerun straight after such a kill
    therefore waits about a minute, then creates the table.
    """
    def create() -> DeltaTable:
        (DeltaTable.createIfNotExists(spark).location(uri).addColumns(schema)
         .partitionedBy(*partition_by).execute())
        return DeltaTable.forPath(spark, uri)
    from pyspark.errors import AnalysisException
    deadline = time.monotonic() + STALE_PARTIAL_S + 30  # long enough for a killed creation to go stale
    attempt = 0
    while True:
        try:
            return with_retry(create, f"create {uri}")
        except AnalysisException as err:
            if "DELTA_TABLE_NOT_FOUND" not in str(err) or time.monotonic() > deadline:
                raise
        attempt += 1
        age = _uncommitted_log_age(spark, uri)
        if age is not None and age > STALE_PARTIAL_S:
            log.warning("%s/_delta_log holds no commit and is %.0f s old: left by a run killed while creating "
                        "the table; removing it", uri, age)
            delete(spark, f"{uri}/_delta_log")
        else:
            log.warning("create %s lost a concurrent commit (another run is creating the table, or one killed "
                        "while creating it left _delta_log without a commit); retry %d", uri, attempt)
            time.sleep(min(0.5 * attempt, 5.0))


#: A Delta commit or checkpoint file in ``_delta_log``.
_COMMIT = re.compile(r"^\d{20}\.(json|checkpoint\..*parquet)$")


def _uncommitted_log_age(spark: SparkSession, uri: str) -> float | None:
    """Seconds since ``uri``'s ``_delta_log`` (or anything in it) last changed, if it holds no commit; else None."""
    path, fs = _hadoop_path(spark, f"{uri}/_delta_log")
    if not fs.exists(path):
        return None
    entries = ages(spark, f"{uri}/_delta_log")
    if any(_COMMIT.match(name) for name in entries):
        return None
    return min([(time.time() * 1000 - fs.getFileStatus(path).getModificationTime()) / 1000, *entries.values()])


def add_missing_columns(spark: SparkSession, uri: str, schema: StructType) -> list[str]:
    """Add ``schema``'s nullable columns the table at ``uri`` lacks (a table made by an older oncolake).

    Returns the names added; one ALTER TABLE commit, none when nothing is missing.
    """
    have = set(spark.read.format("delta").load(uri).columns)
    missing = [f for f in schema.fields if f.name not in have]
    if not missing:
        return []
    if any(not f.nullable for f in missing):
        raise ValueError(f"{uri} lacks non-nullable columns {[f.name for f in missing]}: cannot add them")
    columns = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in missing)
    with_retry(lambda: spark.sql(f"ALTER TABLE {sql_path(uri)} ADD COLUMNS ({columns})"), f"add columns to {uri}")
    return [f.name for f in missing]


def table_version(spark: SparkSession, uri: str) -> int:
    """The table's current Delta version."""
    return int(DeltaTable.forPath(spark, uri).history(1).select("version").first()[0])


#: Delta copies this session setting into each commit's ``userMetadata``.
COMMIT_TAG = "spark.databricks.delta.commitInfo.userMetadata"


@contextlib.contextmanager
def own_commits(spark: SparkSession) -> Iterator[str]:
    """Tag the Delta commits made in this block as this run's (:func:`commit_metrics` counts only those).

    Another run writing the same table at the same time commits between our
    ``before`` version and ours; without the tag its rows would be counted as ours.
    """
    tag = f"oncolake-run-{uuid.uuid4().hex}"
    with spark_conf(spark, {COMMIT_TAG: tag}):
        yield tag


def commit_metric(table: DeltaTable, after_version: int, name: str) -> int:
    """Sum of an operation metric over this run's commits made after ``after_version``.

    A MERGE with nothing to do may not commit at all, so reading only the
    latest commit could report another run's numbers; inside
    :func:`own_commits`, another writer's commits are left out too.
    """
    return commit_metrics(table, after_version, name)[name]


def commit_metrics(table: DeltaTable, after_version: int, *names: str) -> dict[str, int]:
    """:func:`commit_metric` of several metrics from one read of the table's history."""
    history = table.history().filter(f"version > {after_version}")
    tag = history.sparkSession.conf.get(COMMIT_TAG, None)
    if tag and tag.startswith("oncolake-run-"):
        history = history.filter(history["userMetadata"] == tag)
    rows = history.select("operationMetrics").collect()
    return {name: sum(int((r[0] or {}).get(name, 0)) for r in rows) for name in names}


def current_version(table: DeltaTable) -> int:
    return int(table.history(1).select("version").first()[0])


def append(df: DataFrame, uri: str, partition_by: tuple[str, ...] = ()) -> None:
    """Append ``df`` to the Delta table at ``uri`` (schema must match exactly)."""
    with_retry(lambda: df.write.format("delta").mode("append").partitionBy(*partition_by).save(uri),
               f"append to {uri}")


def arrow_batch_rows(largest: int, batch_mb: int, most: int = 256) -> int:
    """Rows per Arrow batch (at most ``most``) so that a batch of the largest images, ``largest``
    bytes each, is about ``batch_mb``: a few mammograms, hundreds of dermoscopy JPEGs."""
    return max(1, min(most, (batch_mb << 20) // (largest or 1)))


@contextlib.contextmanager
def spark_conf(spark: SparkSession, settings: dict[str, str]) -> Iterator[None]:
    """Set session conf for the duration of a block, then restore what was there."""
    previous = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)


def with_retry(action: Callable[[], T], what: str, attempts: int = 5, backoff_s: float = 0.5) -> T:
    """Run a Delta commit, retrying when a concurrent writer won the race.

    Delta's optimistic concurrency makes the losing commit fail with a
    concurrent-modification error; the action is re-run against the new
    snapshot (callers make it idempotent: MERGE on keys, inserts guarded).
    """
    conflicts = _concurrent_exceptions()
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except conflicts as err:
            if attempt == attempts:
                raise
            log.warning("%s lost a concurrent commit (%s); retry %d/%d",
                        what, type(err).__name__, attempt, attempts - 1)
            time.sleep(backoff_s * attempt)
    raise AssertionError("unreachable")


def _concurrent_exceptions() -> tuple[type[Exception], ...]:
    """Every Python class delta-spark raises for a lost commit race.

    In delta-spark 3.3 they are siblings, not subclasses of
    ``DeltaConcurrentModificationException``: catching that alone misses a
    ``ConcurrentAppendException`` (two ingests into one partition).
    """
    from delta import exceptions
    return tuple(getattr(exceptions, name) for name in (
        "DeltaConcurrentModificationException", "ConcurrentWriteException", "MetadataChangedException",
        "ProtocolChangedException", "ConcurrentAppendException", "ConcurrentDeleteReadException",
        "ConcurrentDeleteDeleteException", "ConcurrentTransactionException"))
