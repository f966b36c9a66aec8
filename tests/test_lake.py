"""The lake's storage helpers where a race or a killed run meets them."""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import threading
import time

from oncolake import lake, schema


@contextlib.contextmanager
def _warnings_of_lake():
    """The warnings oncolake.lake logs in the block (its own handler: jobs' logging set-up stops propagation)."""
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("oncolake.lake")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def test_a_commit_to_a_local_table_waits_for_the_lock_another_process_holds_then_lands_after_its_commit(
        spark, tmp_path):
    """Two processes committing one local table cannot both write version N (LockingLocalLogStore).

    This process stands in for another job: it takes the table's commit lock (the same OS record
    lock the JVM's store takes), lets Spark's append reach its commit, and commits version 1 itself
    through delta-rs while Spark waits. Without the lock Spark's append would land as version 1
    inside the wait; with it, Spark finds version 1 taken when the lock is freed and commits as 2.
    """
    import pyarrow as pa
    from deltalake import write_deltalake

    folder = tmp_path / "t"
    uri = lake.qualify(spark, str(folder))
    spark.range(3).write.format("delta").save(uri)  # version 0: ids 0-2
    log_dir = folder / "_delta_log"
    appended: list[BaseException | None] = []

    def append() -> None:
        try:
            spark.range(10, 12).write.format("delta").mode("append").save(uri)
            appended.append(None)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            appended.append(err)

    with open(log_dir / "_oncolake_commit.lock", "a") as held:
        fcntl.lockf(held, fcntl.LOCK_EX)
        worker = threading.Thread(target=append, daemon=True)
        worker.start()
        worker.join(8.0)  # its files are written in a second or two; then it waits at the commit
        waited = worker.is_alive()
        committed_meanwhile = (log_dir / f"{1:020d}.json").exists()
        write_deltalake(str(folder), pa.table({"id": pa.array([100, 101, 102, 103], pa.int64())}), mode="append")
        fcntl.lockf(held, fcntl.LOCK_UN)
    worker.join(120.0)
    assert waited and not committed_meanwhile, "Spark committed while another process held the table's lock"
    assert appended == [None]
    assert sorted(p.name for p in log_dir.glob("*.json")) == [f"{v:020d}.json" for v in range(3)]
    ids = sorted(r.id for r in spark.read.format("delta").load(uri).collect())
    assert ids == [0, 1, 2, 10, 11, 100, 101, 102, 103]  # delta-rs's commit kept, Spark's on top of it


def test_a_table_whose_creation_was_killed_before_its_first_commit_is_created_again(spark, tmp_path):
    folder = tmp_path / "gold" / "predictions"
    (folder / "_delta_log").mkdir(parents=True)  # what a run killed between mkdir and version 0 leaves
    (folder / "_delta_log" / ".00000000000000000000.json.crc.tmp").write_bytes(b"")
    long_ago = time.time() - lake.STALE_PARTIAL_S - 30
    for path in (folder / "_delta_log", *(folder / "_delta_log").iterdir()):
        os.utime(path, (long_ago, long_ago))
    uri = lake.qualify(spark, str(folder))
    with _warnings_of_lake() as seen:
        table = lake.ensure_delta_table(spark, uri, schema.GOLD_PREDICTIONS, schema.GOLD_PREDICTIONS_PARTITIONS)
    assert table.toDF().schema.fieldNames() == schema.GOLD_PREDICTIONS.fieldNames()
    assert (folder / "_delta_log" / "00000000000000000000.json").is_file()
    assert any("left by a run killed while creating the table" in m for m in seen), seen


def test_a_run_that_meets_another_creating_the_table_waits_for_its_first_commit(spark, tmp_path):
    folder = tmp_path / "gold" / "predictions"
    (folder / "_delta_log").mkdir(parents=True)  # the other run has made the folder, not yet version 0
    uri = lake.qualify(spark, str(folder))
    rows = [("a" * 64, "syn", 1, 0.9, 1, 0.5, None, dt.datetime(2026, 5, 1, 2), dt.date(2026, 5, 1), 0.1, 0.2, 0.3)]
    other = threading.Thread(target=lambda: _commit_first(spark, uri, rows), daemon=True)
    other.start()
    try:
        with _warnings_of_lake() as seen:
            table = lake.ensure_delta_table(spark, uri, schema.GOLD_PREDICTIONS, schema.GOLD_PREDICTIONS_PARTITIONS)
    finally:
        other.join(timeout=60)
    assert table.toDF().count() == 1  # the other run's table, not a second one
    assert sorted(p.name for p in (folder / "_delta_log").iterdir() if p.suffix == ".json") == [
        "00000000000000000000.json"]
    assert any("another run is creating the table" in m for m in seen), seen


def _commit_first(spark, uri: str, rows) -> None:
    time.sleep(2.0)
    spark.createDataFrame(rows, schema.GOLD_PREDICTIONS).write.format("delta").partitionBy(
        *schema.GOLD_PREDICTIONS_PARTITIONS).save(uri)


def test_a_rerun_straight_after_a_killed_creation_waits_until_the_leftover_is_stale(spark, tmp_path, monkeypatch):
    monkeypatch.setattr(lake, "STALE_PARTIAL_S", 3.0)  # a minute in production
    folder = tmp_path / "gold" / "nightly_runs"
    (folder / "_delta_log").mkdir(parents=True)  # killed a moment ago, before version 0
    uri = lake.qualify(spark, str(folder))
    start = time.monotonic()
    with _warnings_of_lake() as seen:
        lake.ensure_delta_table(spark, uri, schema.GOLD_NIGHTLY_RUNS)
    assert time.monotonic() - start >= 3.0
    assert any("another run is creating the table" in m for m in seen), seen  # first it waited
    assert any("left by a run killed while creating the table" in m for m in seen), seen  # then removed it
    assert (folder / "_delta_log" / "00000000000000000000.json").is_file()
