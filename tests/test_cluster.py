"""The whole pipeline on a real Spark standalone cluster with the lake on a real HDFS (slow).

Starts scripts/hdfs.sh (a NameNode and a DataNode) and scripts/cluster.sh (master and 2
workers of 1 core), uploads a real data set with scripts/lake.sh, runs every
job through scripts/submit.sh --env cluster, kills a worker while score runs,
checks the tables through WebHDFS, Spark and the Thrift server (scripts/thrift.sh
--env cluster, beeline), and stops them all, also on failure.
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pyspark
import pytest

from oncolake import lakectl
from tests.conftest import ROOT, class_sources, last_json, shared_dataset

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

NAMENODE = "hdfs://127.0.0.1:9000"
SCRIPTS = ROOT / "scripts"


def _script(name: str, *args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{name} {args}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def stack():
    """HDFS and the cluster, started here unless already up, stopped here if started here."""
    started = []
    try:
        for name in ("hdfs.sh", "cluster.sh"):
            if _script(name, "status", check=False).returncode != 0:
                _script(name, "start")
                started.append(name)
        yield
    finally:
        for name in reversed(started):
            _script(name, "stop", check=False)
    if "cluster.sh" in started:
        assert not any(_listening(p) for p in (7077, 8080, 8081, 8082)), "cluster.sh stop left a process"
    if "hdfs.sh" in started:
        assert not any(_listening(p) for p in (9000, 9870, 9864, 9866, 9867)), "hdfs.sh stop left a process"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK", "SPARK_"))}


def _submit(job: str, *args: str) -> dict:
    result = subprocess.run([str(SCRIPTS / "submit.sh"), job, "--env", "cluster", *args],
                            capture_output=True, text=True, env=_env(), timeout=900)
    assert result.returncode == 0, f"{job}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return last_json(result.stdout)


def _events(folder: Path) -> list[dict]:
    events = []
    for path in folder.glob("app-*"):
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:  # the line being written
                pass
    return events


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def _task_on_worker(ui: str, worker: int, min_running_s: float) -> bool:
    """True when a task has run for ``min_running_s`` on an executor of ``worker`` (driver's REST API)."""
    try:
        app = _get(f"{ui}/api/v1/applications")[0]["id"]
        api = f"{ui}/api/v1/applications/{app}"
        # a standalone executor's log URL names its worker's web UI port (8080 + N)
        mine = {e["id"] for e in _get(f"{api}/executors")
                if f":{8080 + worker}/" in json.dumps(e.get("executorLogs", {}))}
        now_ms = time.time() * 1000
        for stage in _get(f"{api}/stages?status=active"):
            tasks = _get(f"{api}/stages/{stage['stageId']}/{stage['attemptId']}/taskList?status=RUNNING")
            for task in tasks:
                launched = _launch_ms(task["launchTime"])
                if task["executorId"] in mine and now_ms - launched >= min_running_s * 1000:
                    return True
    except (OSError, ValueError, IndexError, KeyError):  # the driver is starting or finishing
        return False
    return False


def _launch_ms(stamp: str) -> float:
    # e.g. 2026-11-22T03:50:34.074GMT
    parsed = dt.datetime.strptime(stamp.replace("GMT", ""), "%Y-%m-%dT%H:%M:%S.%f")
    return parsed.replace(tzinfo=dt.timezone.utc).timestamp() * 1000


def _score_killing_worker(lake: str, events_dir: Path, worker: int) -> dict:
    """Run score; once a scoring task has run a while on ``worker``'s executor, SIGKILL that worker.

    Scoring tasks load TensorFlow and the model, so they run for seconds; the
    Delta log's tasks take milliseconds: a task running for 2 s is a scoring task.
    """
    ui = "http://127.0.0.1:4077"
    cmd = [str(SCRIPTS / "submit.sh"), "score", "--env", "cluster", "--lake", lake, "--dataset", "isic",
           "--set", "spark.conf.spark.ui.port=4077", "--set", "spark.conf.spark.eventLog.enabled=true",
           "--set", f"spark.conf.spark.eventLog.dir=file://{events_dir}"]
    log = events_dir / "score.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=_env())
    killed = False
    deadline = time.time() + 600
    try:
        while proc.poll() is None and time.time() < deadline:
            if not killed and "scoring " in log.read_text() and _task_on_worker(ui, worker, 2.0):
                _script("cluster.sh", "kill-worker", str(worker))
                killed = True
            time.sleep(0.3)
        proc.wait(timeout=max(1, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert killed, "no scoring task ever ran on worker %d:\n%s" % (worker, output[-3000:])
    assert proc.returncode == 0, output[-3000:]
    return last_json(output)


@pytest.fixture(scope="module")
def isic_on_hdfs(stack) -> str:
    """ISIC UDA-1 uploaded once to HDFS with scripts/lake.sh: the folder holding input/."""
    root = f"/it-{uuid.uuid4().hex[:8]}"
    _script("lake.sh", "put", str(shared_dataset("isic_uda1")), f"{root}/input", timeout=600)
    return root


def test_pipeline_on_cluster_with_lake_on_hdfs(isic_on_hdfs, spark, tmp_path):
    data, root = shared_dataset("isic_uda1"), isic_on_hdfs
    lake = f"{NAMENODE}{root}/lake"
    listed = _script("lake.sh", "--json", "ls", f"{root}/input").stdout.splitlines()
    assert {json.loads(line)["path"] for line in listed} >= {f"{root}/input/labels.csv", f"{root}/input/images"}

    ingest = _submit("ingest", "--lake", lake, "--dataset", "isic", "--input", f"{NAMENODE}{root}/input",
                     "--labels", f"{NAMENODE}{root}/input/labels.csv")
    assert (ingest["ingested"], ingest["duplicates"], ingest["quarantined"]) == (555, 2, 0)
    assert ingest["table"] == f"{lake}/bronze/images"

    loads = tmp_path / "loads"
    loads.mkdir()
    # each executor logs the classes it loads, and its final flags (LogVMOutput copies what it prints)
    pre = _submit("preprocess", "--lake", lake, "--dataset", "isic", "--size", "32", "--set",
                  f"spark.conf.spark.executor.extraJavaOptions=-Xlog:class+load=info:file={loads}/executor-%p.log"
                  f" -XX:+UnlockDiagnosticVMOptions -XX:+LogVMOutput -XX:LogFile={loads}/vm-%p.log"
                  " -XX:+PrintFlagsFinal")
    assert pre["output"] == f"{lake}/silver/tensors/isic/v1"
    assert pre["train"] + pre["val"] + pre["test"] == 555
    _assert_executors_mapped_the_class_archive(sorted(loads.glob("executor-*.log")))
    flags = [re.findall(r"\bTieredStopAtLevel\s+= (\d+)", log.read_text()) for log in sorted(loads.glob("vm-*.log"))]
    assert len(flags) >= 2 and all(f == ["1"] for f in flags), flags  # conf/cluster.yaml's batch_java_options

    train = _submit("train", "--lake", lake, "--dataset", "isic", "--epochs", "1", "--num-proc", "2",
                    "--batch-size", "16", "--set", "train.filters=[8, 16]", "--set", "train.dense_units=16")
    assert (train["model_version"], train["epochs_run"], train["num_proc"]) == (1, 1, 2)
    assert train["ranks_identical"] is True
    # the two ranks ran in executors of different workers (each works in var/cluster/workN)
    workers = {p.split("/var/cluster/")[1].split("/")[0] for p in train["placement"].values()}
    assert workers == {"work1", "work2"}, train["placement"]
    # MLflow's file store cannot live on HDFS: the run is tracked on the driver's disk (mlflow.local_store)
    with _client().read(f"{root}/lake/models/isic/v1/model.json") as reader:
        run_id = json.load(reader)["mlflow_run_id"]
    tracked = list((ROOT / "var" / "mlruns").glob(f"*/{run_id}/metrics/best_val_auc"))
    assert run_id and len(tracked) == 1, run_id
    assert float(tracked[0].read_text().split()[1]) == pytest.approx(train["best_val_auc"])

    evaluate = _submit("evaluate", "--lake", lake, "--dataset", "isic")
    assert evaluate["report"] == f"{lake}/models/isic/v1/report.html" and 0 <= evaluate["auc"] <= 1

    events = tmp_path / "events"
    events.mkdir()
    try:
        score = _score_killing_worker(lake, events, worker=2)
    finally:
        _script("cluster.sh", "start")  # bring the killed worker back for whatever runs next
    assert score["scored"] == 555 and score["errors"] == 0
    recorded = _events(events)
    assert any(e["Event"] == "SparkListenerExecutorRemoved" for e in recorded)
    # conf/cluster.yaml: Delta rebuilds a table's state in 2 tasks, not its default 50, on 2 cores
    delta_state = [e["Stage Info"]["Number of Tasks"] for e in recorded if e["Event"] == "SparkListenerStageSubmitted"
                   and e["Stage Info"]["Stage Name"].startswith("$anonfun$recordDeltaOperationInternal")]
    assert delta_state and max(delta_state) == 2, delta_state
    lost = [e for e in recorded if e["Event"] == "SparkListenerTaskEnd"
            and e["Task End Reason"]["Reason"] == "ExecutorLostFailure"]
    assert lost, "the killed worker's task was not lost and rerun"

    # through WebHDFS (the operators' view): tables, versions, model and checkpoints on HDFS
    tables = {row["table"]: row for row in lakectl.tables(_client(), f"{root}/lake")}
    assert set(tables) >= {f"{root}/lake/{t}" for t in ("bronze/images", "bronze/quarantine",
                                                          "silver/splits", "gold/predictions")}
    listed = _script("lake.sh", "--json", "ls", "-R", f"{root}/lake/models/isic").stdout
    paths = {json.loads(line)["path"] for line in listed.splitlines()}
    assert f"{root}/lake/models/isic/v1/model.keras" in paths
    assert any(p.endswith("/last.weights.h5") for p in paths) and any(p.endswith("/state.json") for p in paths)
    du = [json.loads(line) for line in _script("lake.sh", "--json", "du", f"{root}/lake").stdout.splitlines()]
    assert du[-1]["bytes"] >= sum(t["bytes"] for t in tables.values()) > 5_000_000

    # through Spark: the same tables, the same versions, every image labelled as the CSV says
    from delta.tables import DeltaTable
    for name, row in tables.items():
        history = DeltaTable.forPath(spark, f"{NAMENODE}{name}").history(1).first()
        assert history["version"] == row["version"], name
    with (data / "labels.csv").open() as handle:
        expected = {r["path"]: r["label"] for r in csv.DictReader(handle)}
    bronze = spark.read.format("delta").load(f"{lake}/bronze/images")
    rows = bronze.select("path", "relative_path", "label", "image_id").collect()
    assert len(rows) == 555 and len({r["image_id"] for r in rows}) == 555
    assert all(expected[r["relative_path"]] == r["label"] for r in rows)
    assert all(r["path"].startswith(f"{NAMENODE}{root}/input/images/") for r in rows)
    predictions = spark.read.format("delta").load(f"{lake}/gold/predictions")
    assert predictions.count() == 555
    assert predictions.select("image_id", "model_version").distinct().count() == 555
    assert predictions.filter("probability IS NULL").count() == 0

    # analysts' JDBC endpoint on the cluster, over the lake on HDFS
    env = {"ONCOLAKE_THRIFT_DIR": str(tmp_path / "thrift")}
    port = "10017"
    started = subprocess.run([str(SCRIPTS / "thrift.sh"), "start", "--env", "cluster", "--lake", lake,
                              "--port", port], capture_output=True, text=True, env={**_env(), **env}, timeout=300)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        beeline = subprocess.run([str(ROOT / ".venv" / "bin" / "beeline"), "-u", started.stdout.split()[-1],
                                  "--silent=true", "--outputformat=csv2", "--showHeader=false", "-e",
                                  "SELECT count(*), count(DISTINCT image_id) FROM oncolake.latest_predictions"],
                                 capture_output=True, text=True, timeout=300,
                                 env={**_env(), "SPARK_HOME": str(Path(pyspark.__file__).parent)})
        assert beeline.returncode == 0, beeline.stderr[-3000:]
        assert "555,555" in beeline.stdout.split(), beeline.stdout[-2000:]  # beeline echoes its prompt too
        app = (tmp_path / "thrift" / "thrift.log").read_text()
        assert "spark://127.0.0.1:7077" in app or "Connected to Spark cluster" in app, app[-3000:]
    finally:
        subprocess.run([str(SCRIPTS / "thrift.sh"), "stop", "--port", port], env={**_env(), **env}, timeout=120)
    assert not _listening(int(port))


def _assert_executors_mapped_the_class_archive(logs: list[Path]) -> None:
    """Each executor's -Xlog:class+load file: its core classes came from set-up's class archive."""
    from oncolake import session
    assert len(logs) >= 2, logs  # one executor on each worker, with the configured option kept
    if os.environ.get("ONCOLAKE_CLASS_ARCHIVE") == "0" or not session.CLASS_ARCHIVE.is_file():
        return  # set-up made no archive: nothing to map
    for log in logs:
        source, mapped = class_sources(log)
        # (the archive holds what a local-mode driver loaded: its Executor, not the executor backend's classes)
        assert source["org.apache.spark.executor.Executor"] == "shared objects file (top)", log
        assert mapped > 0.75, f"{log}: only {mapped:.0%} of the classes mapped"  # 86 % seen


def _client():
    from oncolake import config
    return lakectl.client(config.load("cluster"))


def _ingest_losing_the_datanode(args: list[str], log: Path, after_s: float, down_s: float) -> tuple[int, str]:
    """Run ingest; ``after_s`` after it starts reading, stop the DataNode for ``down_s``, then restart it."""
    cmd = [str(SCRIPTS / "submit.sh"), "ingest", "--env", "cluster", *args]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=_env())
    stopped = False
    try:
        deadline = time.time() + 300
        while proc.poll() is None and "ingest dataset=" not in log.read_text():
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(after_s)
        stopped = proc.poll() is None
        if stopped:
            _script("hdfs.sh", "stop-datanode")
            time.sleep(down_s)
    finally:
        _script("hdfs.sh", "start-datanode")
        try:
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert stopped, "ingest ended before the DataNode was stopped:\n" + log.read_text()[-3000:]
    return proc.returncode, log.read_text()


@pytest.mark.faults
def test_datanode_stopped_and_restarted_during_an_ingest_then_the_rerun_gives_the_exact_table(
        isic_on_hdfs, spark, tmp_path):
    data, root = shared_dataset("isic_uda1"), isic_on_hdfs
    lake = f"{NAMENODE}{root}/lake-datanode-lost"
    args = ["--lake", lake, "--dataset", "isic", "--input", f"{NAMENODE}{root}/input",
            "--labels", f"{NAMENODE}{root}/input/labels.csv"]

    code, output = _ingest_losing_the_datanode(args, tmp_path / "ingest.log", after_s=4.0, down_s=20.0)
    if code != 0:  # a clear error as its last line, not a stack trace
        last = output.strip().splitlines()[-1]
        assert "ingest failed: " in last and "An error occurred while calling" not in last, output[-3000:]
    rerun = _submit("ingest", *args)
    assert rerun["quarantined"] == 0, (code, output[-3000:])

    with (data / "labels.csv").open() as handle:
        expected = {r["path"]: r["label"] for r in csv.DictReader(handle)}
    bronze = spark.read.format("delta").load(f"{lake}/bronze/images")
    rows = bronze.select("relative_path", "label", "image_id").collect()
    assert len(rows) == len({r["image_id"] for r in rows}) == 555, (code, output[-3000:])
    assert all(expected[r["relative_path"]] == r["label"] for r in rows)
    quarantine = spark.read.format("delta").load(f"{lake}/bronze/quarantine")
    assert quarantine.count() == 0, quarantine.select("path", "reason").collect()[:5]
