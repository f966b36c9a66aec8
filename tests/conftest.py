"""One session-scoped Delta-enabled SparkSession (local[2]) for the whole suite."""
from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

# TensorFlow's absl logging binds sys.stderr when it is first imported. Imported
# inside a test, that is the test's capture stream, closed when the test ends,
# and a later TensorFlow log line then kills the interpreter ("lost
# sys.stderr"). Imported here, it binds the session's stream. MLflow does the
# same with its logging handler (evaluate logs a run).
import mlflow  # noqa: E402,F401
import tensorflow  # noqa: E402,F401


def shared_dataset(name: str) -> Path:
    """A real data set from ../shared/data, or skip where this checkout has none."""
    path = SHARED_DATA / name
    if not (path / "labels.csv").is_file():
        pytest.skip(f"real data {path} is not present")
    return path


@pytest.fixture(scope="session")
def package_zip(tmp_path_factory) -> str:
    """lib/oncolake zipped, shipped to the Python workers like spark-submit --py-files."""
    out = tmp_path_factory.mktemp("pkg") / "oncolake.zip"
    with zipfile.ZipFile(out, "w") as zf:
        for path in sorted((ROOT / "lib" / "oncolake").rglob("*.py")):
            zf.write(path, path.relative_to(ROOT / "lib"))
    return str(out)


@pytest.fixture(scope="session")
def spark(tmp_path_factory, package_zip):
    from pyspark.sql import SparkSession

    from oncolake import config, session

    jars = session.jars("spark")
    if not jars:
        pytest.fail(f"no Delta jars in {session.jar_dir('spark')}: run scripts/setup.sh")
    tmp = tmp_path_factory.mktemp("spark")
    builder = (SparkSession.builder.master("local[2]").appName("oncolake-tests")
               .config("spark.jars", ",".join(jars))
               .config("spark.submit.pyFiles", package_zip)
               .config("spark.sql.warehouse.dir", str(tmp / "warehouse"))
               .config("spark.ui.enabled", "false")
               .config("spark.driver.memory", "2g"))
    conf = {**session.DELTA_CONF, **config.load("local").spark.conf}
    builder = builder.config(session.DRIVER_JAVA_OPTIONS, session.driver_java_options(
        conf.pop(session.DRIVER_JAVA_OPTIONS, ""), session.java_word(f"-Dderby.system.home={tmp}")))
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.config("spark.sql.shuffle.partitions", "2").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    yield spark
    spark.stop()


@pytest.fixture()
def lake(tmp_path) -> str:
    return str(tmp_path / "lake")


def with_column(labels_csv: Path, name: str, value_of) -> dict[str, str]:
    """Add (or replace) column ``name`` of a labels CSV, ``value_of(row number, row)`` for each row.

    Returns path -> value, as written.
    """
    import csv
    with open(labels_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for i, row in enumerate(rows):
        row[name] = value_of(i, row)
    with open(labels_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {row["path"]: row[name] for row in rows}


def last_json(text: str) -> dict:
    """The job summary: the last line of stdout, parsed."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert lines, "the job printed nothing on stdout"
    return json.loads(lines[-1])


def submit_killed(args: list[str], seconds: float | None,
                  marker: str = "started Spark session") -> tuple[list[str], float]:
    """Run ``scripts/submit.sh ARGS``; SIGKILL it ``seconds`` after ``marker`` appears (unless it ends first).

    The job gets its own process group, so the kill takes the JVM and its
    Python workers too, as a lost machine or the OOM killer would. Returns
    the job's output lines and how long it ran after the marker; with
    ``seconds`` None it runs to its end and must succeed.
    """
    import signal
    import subprocess
    import threading
    import time
    proc = subprocess.Popen([str(ROOT / "scripts" / "submit.sh"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any(marker in line for line in list(lines)) and proc.poll() is None:
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.05)
        started = time.monotonic()
        try:
            proc.wait(timeout=600 if seconds is None else seconds)
        except subprocess.TimeoutExpired:
            pass
        ran = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        reader.join(timeout=60)
    if seconds is None:
        assert proc.returncode == 0, "".join(lines)[-3000:]
    return lines, ran


def seeded_moments(work_s: float, seed: int, count: int = 3) -> list[float]:
    """``count`` moments drawn uniformly from ``[0, work_s)`` with a fixed seed."""
    import random
    rng = random.Random(seed)
    return [rng.uniform(0.0, 1.0) * work_s for _ in range(count)]


def last_step(lines: list[str]) -> str:
    """The last oncolake log line of a job's output (where a killed job had got to)."""
    steps = [line.strip() for line in lines if " INFO oncolake" in line]
    return steps[-1] if steps else "(before its first log line)"


def killed_three_times_then_rerun(job: str, args: list[str], twin_args: list[str],
                                  seed: int) -> tuple[list, float, dict]:
    """Run ``job TWIN_ARGS`` whole (its timing), then ``job ARGS`` SIGKILLed at three seeded moments
    of that run, then ``job ARGS`` whole; all through spark-submit.

    Returns where each killed run had got to, when the rerun started, and its summary.
    """
    import time
    _, work = submit_killed([job, *twin_args], None)
    reached = [(round(m, 1), last_step(submit_killed([job, *args], m)[0])) for m in seeded_moments(work, seed)]
    rerun_started = time.time()
    lines, _ = submit_killed([job, *args], None)
    return reached, rerun_started, last_json("".join(lines))


def class_sources(log: Path) -> tuple[dict[str, str], float]:
    """A JVM's ``-Xlog:class+load`` file: where each class came from, and the share of
    those read from a jar or the JDK's image that were mapped from a class archive instead."""
    source = {}
    for line in log.read_text().splitlines():  # "[...] org.x.Y source: shared objects file (top)"
        parts = line.split("] ", 1)[-1].split(" source: ", 1)
        if len(parts) == 2:
            source[parts[0]] = parts[1]
    mapped = sum(s.startswith("shared objects file") for s in source.values())
    read = sum(s.startswith(("file:", "jar:", "jrt:")) for s in source.values())  # not generated at run time
    return source, mapped / max(mapped + read, 1)


def no_leftovers(root, since: float) -> list[str]:
    """Scratch folders anywhere under ``root``, and partial files made after ``since``."""
    from oncolake import lake
    return [str(p) for p in root.rglob("*")
            if (p.is_dir() and (p.name.startswith(lake.SCRATCH) or p.name == "_temporary"))
            or (lake.PARTIAL in p.name and p.stat().st_mtime >= since)]
