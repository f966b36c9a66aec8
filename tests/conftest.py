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
               .config("spark.driver.extraJavaOptions", f"-Dderby.system.home={tmp}")
               .config("spark.ui.enabled", "false")
               .config("spark.driver.memory", "2g"))
    for key, value in {**session.DELTA_CONF, **config.load("local").spark.conf}.items():
        builder = builder.config(key, value)
    spark = builder.config("spark.sql.shuffle.partitions", "2").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    yield spark
    spark.stop()


@pytest.fixture()
def lake(tmp_path) -> str:
    return str(tmp_path / "lake")


def last_json(text: str) -> dict:
    """The job summary: the last line of stdout, parsed."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert lines, "the job printed nothing on stdout"
    return json.loads(lines[-1])
