"""scripts/submit.sh: the spark-submit command, and one real run through it."""
import collections
import csv
import json
import os
import re
import subprocess

import pytest

from oncolake import session, submit
from oncolake.errors import ConfigError
from oncolake.synthetic import write_dataset
from tests.conftest import ROOT, class_sources


def test_command_carries_master_jars_zip_conf_and_job_args():
    cmd = submit.command("ingest", ["--master", "spark://h:7077", "--set", "spark.conf.spark.executor.memory=1g",
                                    "--dataset", "d", "--input", "/x"], "/tmp/o.zip", "/venv/bin/python", {})
    assert cmd[cmd.index("--master") + 1] == "spark://h:7077"
    assert cmd[cmd.index("--py-files") + 1] == "/tmp/o.zip"
    assert cmd[cmd.index("--jars") + 1] == ",".join(session.jars("spark"))
    assert "spark.executor.memory=1g" in cmd and "spark.sql.extensions=" + session.DELTA_CONF["spark.sql.extensions"] in cmd
    job = cmd.index(str(ROOT / "jobs" / "ingest.py"))
    assert cmd[job + 1:] == ["--env", "local", "--conf-dir", str(ROOT / "conf"),
                             "--set", "spark.conf.spark.executor.memory=1g", "--dataset", "d", "--input", "/x"]


def test_master_comes_from_configuration_unless_given():
    cmd = submit.command("ingest", ["--env", "cluster"], "/z", "/p", {})
    assert cmd[cmd.index("--master") + 1] == "spark://127.0.0.1:7077"
    cmd = submit.command("ingest", [], "/z", "/p", {"ONCOLAKE_SPARK_MASTER": "local[1]"})
    assert cmd[cmd.index("--master") + 1] == "local[1]"


def test_unknown_job_is_a_usage_error():
    with pytest.raises(ConfigError, match="no job 'nope'"):
        submit.command("nope", [], "/z", "/p", {})


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK", "SPARK_"))}


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    """One ingest through scripts/submit.sh (a real spark-submit), shared by the tests below."""
    root = tmp_path_factory.mktemp("submit")
    data = write_dataset(root / "in", groups=4, per_group=2, seed=0)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    result = subprocess.run(
        [str(ROOT / "scripts" / "submit.sh"), "ingest", "--master", "local[2]", "--lake", str(root / "lake"),
         "--dataset", "syn", "--input", str(data), "--labels", str(data / "labels.csv")],
        capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, data, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_submit_sh_runs_ingest_through_spark_submit(submitted):
    root, _, summary = submitted
    assert (summary["ingested"], summary["quarantined"]) == (8, 1)
    bad = subprocess.run([str(ROOT / "scripts" / "submit.sh"), "ingest", "--lake", str(root / "lake"),
                          "--dataset", "syn", "--input", str(root / "missing")],
                         capture_output=True, text=True, env=_env(), timeout=600)
    # spark-submit's PythonRunner merges the driver's stderr into its stdout:
    # the failure is the last line there, and no summary is printed.
    assert bad.returncode == 1
    last = bad.stdout.strip().splitlines()[-1]
    assert "ingest failed: input folder" in last and not last.startswith("{")


@pytest.mark.slow
def test_sql_sh_answers_a_count_and_a_join_from_the_hive_catalog(submitted):
    root, data, _ = submitted
    with open(data / "labels.csv", newline="") as handle:
        expected = collections.Counter(row["label"] for row in csv.DictReader(handle))
    query = ("SELECT i.label, count(*) AS n FROM oncolake.images i JOIN oncolake.images j "
             "ON i.image_id = j.image_id GROUP BY i.label ORDER BY i.label")
    result = subprocess.run([str(ROOT / "scripts" / "sql.sh"), "--lake", str(root / "lake"), query],
                            capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, result.stdout[-2000:]
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[-1])["rows"] == 2
    table = [line.replace(" ", "") for line in lines if line.startswith("|")]
    assert table == ["|label|n|"] + [f"|{label}|{n}|" for label, n in sorted(expected.items())]



def test_java_options_with_spaces_or_quotes_stay_one_word():
    assert submit.java_option("derby.system.home", "/opt/oncolake/var") == "-Dderby.system.home=/opt/oncolake/var"
    assert submit.java_option("derby.system.home", "/a b/c\"d") == '"-Dderby.system.home=/a b/c\\"d"'
    # run for real: tests/test_scoring.py submits one of its concurrent jobs from a checkout under "my projects/"


#: conf/local.yaml's and conf/cluster.yaml's spark.batch_java_options: C1 only, with the code
#: cache C1 and C2 would have had (C1 alone gets 48 MB, which a minute of Spark filled)
C1 = "-XX:TieredStopAtLevel=1 -XX:ReservedCodeCacheSize=240m"


def _driver_options(cmd: list[str]) -> str:
    assert not any(a.startswith(session.DRIVER_JAVA_OPTIONS + "=") for a in cmd)  # one place only
    return cmd[cmd.index("--driver-java-options") + 1]


def test_configured_driver_options_join_oncolakes_and_come_last(monkeypatch, tmp_path):
    monkeypatch.setattr(session, "CLASS_ARCHIVE", tmp_path / "none.jsa")
    ours = "-Dderby.system.home=" + str(ROOT / "var")
    plain = _driver_options(submit.command(submit.THRIFT, [], "/z", "/p", {}))
    assert plain.startswith("-Dlog4j2.configurationFile=") and plain.endswith(ours)
    for env in ("local", "cluster"):
        given = _driver_options(submit.command(
            "ingest", ["--env", env, "--set", "spark.conf.spark.driver.extraJavaOptions=-Xss4m -XX:+UseSerialGC"],
            "/z", "/p", {}))
        # not dropped, as spark-submit would; after the env's batch options
        assert given.endswith(ours + f" {C1} -Xss4m -XX:+UseSerialGC")


@pytest.mark.parametrize("job, args, batch", [
    ("ingest", [], True),
    ("stream_ingest", ["--topic", "t", "--available-now"], True),
    ("stream_ingest", ["--t", "t"], True),  # --topic, abbreviated
    ("stream_ingest", ["--topic", "t", "--trigger", "30s"], False),
    ("stream_ingest", ["--topic=t", "--trig=5s"], False),  # argparse's prefixes reach the job too
    (submit.THRIFT, [], False),
])
def test_batch_jobs_jvms_take_the_batch_options_and_long_lived_ones_do_not(monkeypatch, tmp_path, job, args, batch):
    monkeypatch.setattr(session, "CLASS_ARCHIVE", tmp_path / "none.jsa")
    executors = session.EXECUTOR_DEFAULT_JAVA_OPTIONS
    for env in ("local", "cluster"):  # both configure C1 only
        cmd = submit.command(job, ["--env", env, *args], "/z", "/p", {})
        assert _driver_options(cmd).endswith(f" {C1}") is batch
        assert _conf(cmd, executors) == ([C1] if batch else [])
    # set: a word with a space in it kept whole; the configured driver and executor options still last
    cmd = submit.command(job, ["--env", "cluster", "--set", "spark.batch_java_options=-Xss8m '-Dx=a b'",
                               "--set", "spark.conf.spark.driver.extraJavaOptions=-Xss4m",
                               "--set", f"spark.conf.{executors}=-Xss2m", *args], "/z", "/p", {})
    assert _driver_options(cmd).endswith(' -Xss8m "-Dx=a b" -Xss4m' if batch else str(ROOT / "var") + " -Xss4m")
    assert _conf(cmd, executors) == ['-Xss8m "-Dx=a b" -Xss2m' if batch else "-Xss2m"]


def test_the_class_archive_is_mapped_when_set_up_made_one(monkeypatch, tmp_path):
    archive = tmp_path / "a b" / "classes.jsa"  # a space: still one word
    monkeypatch.setattr(session, "CLASS_ARCHIVE", archive)
    assert session.driver_java_options("-Xss4m", "-Da=b") == "-Da=b -Xss4m"
    archive.parent.mkdir()
    archive.write_bytes(b"x")
    assert session.driver_java_options("-Xss4m", "-Da=b") == (
        f'-Da=b "-XX:SharedArchiveFile={archive}" -Xlog:disable -Xlog:all=warning:stderr -Xss4m')
    # dumping a new archive (scripts/setup.sh) never maps the old one
    assert session.driver_java_options("-XX:ArchiveClassesAtExit=/t/new.jsa") == "-XX:ArchiveClassesAtExit=/t/new.jsa"


def _conf(cmd: list[str], key: str) -> list[str]:
    return [cmd[i + 1][len(key) + 1:] for i, a in enumerate(cmd) if a == "--conf" and cmd[i + 1].startswith(key + "=")]


def test_executors_map_the_class_archive_before_their_configured_options(monkeypatch, tmp_path):
    archive = tmp_path / "a b" / "classes.jsa"
    monkeypatch.setattr(session, "CLASS_ARCHIVE", archive)
    default, extra = session.EXECUTOR_DEFAULT_JAVA_OPTIONS, "spark.executor.extraJavaOptions"
    configured = ["--env", "cluster", "--set", f"spark.conf.{extra}=-Xss4m -Dk=v",
                  "--set", f"spark.conf.{default}=-Dadmin=1", "--set", "spark.batch_java_options="]
    assert _conf(submit.command("ingest", ["--env", "cluster", "--set", "spark.batch_java_options="],
                                "/z", "/p", {}), default) == []
    cmd = submit.command("ingest", configured, "/z", "/p", {})
    assert (_conf(cmd, default), _conf(cmd, extra)) == (["-Dadmin=1"], ["-Xss4m -Dk=v"])
    archive.parent.mkdir()
    archive.write_bytes(b"x")
    mapped = f'"-XX:SharedArchiveFile={archive}" -Xlog:disable -Xlog:all=warning:stderr'
    assert _conf(submit.command("ingest", ["--env", "cluster"], "/z", "/p", {}), default) == [
        f"{mapped} {C1}"]  # conf/cluster.yaml's batch options
    # Spark puts the defaults first: the configured options, which the job's session sets again, come after
    cmd = submit.command("ingest", configured, "/z", "/p", {})
    assert (_conf(cmd, default), _conf(cmd, extra)) == ([mapped + " -Dadmin=1"], ["-Xss4m -Dk=v"])


@pytest.mark.slow
def test_a_job_s_jvm_loads_spark_and_delta_from_the_class_archive(tmp_path):
    """scripts/setup.sh dumped the archive; a real job's driver maps Spark's and Delta's classes from it."""
    if os.environ.get("ONCOLAKE_CLASS_ARCHIVE") == "0":
        pytest.skip("ONCOLAKE_CLASS_ARCHIVE=0: set-up made no class archive")
    if not session.CLASS_ARCHIVE.is_file():
        pytest.fail("no class archive at .cache/jvm-classes.jsa: scripts/setup.sh makes it")
    (tmp_path / "in").mkdir()
    loads = tmp_path / "loads.log"
    done = subprocess.run(
        [str(ROOT / "scripts" / "submit.sh"), "ingest", "--lake", str(tmp_path / "lake"), "--dataset", "d",
         "--input", str(tmp_path / "in"),
         "--set", f"spark.conf.spark.driver.extraJavaOptions=-Xlog:class+load=info:file={loads} -XX:+PrintFlagsFinal"],
        capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["files_seen"] == 0  # stdout still ends with the summary
    # the driver that ran was a batch job's: C1 only (conf/local.yaml's spark.batch_java_options)
    assert re.findall(r"\bTieredStopAtLevel\s+= (\d+)", done.stdout) == ["1"]
    assert re.findall(r"\bReservedCodeCacheSize\s+= (\d+)", done.stdout) == [str(240 << 20)]
    source, mapped = class_sources(loads)
    assert source["org.apache.spark.SparkContext"] == "shared objects file (top)"
    assert source["org.apache.spark.sql.delta.DeltaLog"] == "shared objects file (top)"  # a --jars class too
    assert mapped > 0.9, f"only {mapped:.0%} of the classes mapped from an archive"


def test_run_bench_prints_the_figures_and_removes_its_scratch_folder(spark, capsys):
    from oncolake import cli
    args = cli.parser("bench-x", None).parse_args([])
    seen = {}

    def measure(session_, cfg, work):
        (work / "tables").mkdir()
        seen["work"] = work
        return {"bench": "x", "spark": session_ is spark, "lake": cfg.lake}

    assert cli.run_bench("bench-x", args, measure) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1]) == {"bench": "x", "spark": True, "lake": "lake"}
    assert not seen["work"].exists()

    def broken(session_, cfg, work):
        seen["work"] = work
        raise RuntimeError("disk on fire\nsecond line")

    assert cli.run_bench("bench-x", args, broken) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("bench-x failed: RuntimeError: disk on fire") and not seen["work"].exists()
    assert spark.getActiveSession() is not None  # a borrowed session is never stopped
