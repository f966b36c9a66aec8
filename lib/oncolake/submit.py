"""Build and run the spark-submit command for one job (scripts/submit.sh).

    python -m oncolake.submit JOB|SCRIPT.py [--master URL] [--env ENV] [--set K=V ...] [JOB ARGS...]

Master, Spark conf and jars come from the resolved configuration and the
jar cache; the package reaches executors only as the --py-files zip.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from oncolake import cli, config, session
from oncolake.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


#: Spark's JDBC/ODBC server (scripts/thrift.sh): its class ships inside pyspark's jars.
THRIFT = "thriftserver"
THRIFT_CLASS = "org.apache.spark.sql.hive.thriftserver.HiveThriftServer2"


def command(job: str, args: Sequence[str], zip_path: str, python: str,
            environ: dict[str, str]) -> list[str]:
    """The spark-submit argument list for ``job`` with its ``args``.

    ``thriftserver`` is Spark's Thrift JDBC/ODBC server with the same master,
    jars, conf and catalog as the jobs, on ``--host`` (default 127.0.0.1
    only) and ``--port`` (default 10000).
    """
    if job == THRIFT:
        script = None
    else:
        script = Path(job).resolve() if job.endswith(".py") else ROOT / "jobs" / f"{job}.py"
        if not script.is_file():
            known = sorted(p.stem for p in (ROOT / "jobs").glob("*.py"))
            raise ConfigError(f"no job {job!r}; jobs: {', '.join(known)}")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--master")
    pre.add_argument("--env", default="local")
    pre.add_argument("--set", action="append", default=[])
    pre.add_argument("--lake")
    if script is None:
        pre.add_argument("--port", type=int, default=10000)
        pre.add_argument("--host", default="127.0.0.1")
    known, rest = pre.parse_known_args(list(args))
    overrides = known.set + ([f"lake={known.lake}"] if known.lake else [])
    cfg = config.load(known.env, overrides=overrides, environ=environ)
    jars = session.jars("spark")
    if not jars:
        raise ConfigError(f"no jars in {session.jar_dir('spark')}: run scripts/setup.sh first")
    # the configured driver options join oncolake's in --driver-java-options, which
    # spark-submit would otherwise let win over --conf spark.driver.extraJavaOptions
    conf = {**session.DELTA_CONF, **cfg.spark.conf}
    batch = [] if long_lived(job, rest) else [session.java_word(w) for w in shlex.split(cfg.spark.batch_java_options)]
    cmd = [str(Path(python).parent / "spark-submit"),
           "--master", known.master or cfg.spark.master,
           "--name", f"oncolake-{job}",
           "--jars", ",".join(jars),
           "--py-files", zip_path,
           "--conf", f"spark.pyspark.python={python}",
           "--conf", f"spark.pyspark.driver.python={python}",
           # an embedded Derby metastore in var/ unless the configuration names a shared one
           "--conf", "spark.sql.catalogImplementation=hive",
           "--conf", f"spark.sql.warehouse.dir={ROOT / 'var' / 'warehouse'}",
           "--driver-java-options", session.driver_java_options(
               conf.pop(session.DRIVER_JAVA_OPTIONS, ""),
               java_option("log4j2.configurationFile", (ROOT / "conf" / "log4j2.properties").as_uri()),
               java_option("derby.system.home", str(ROOT / "var")), *batch)]
    # the executors' too (a standalone cluster's: local mode has none), before their configured defaults
    executor_options = session.executor_java_options(
        " ".join([*batch, conf.pop(session.EXECUTOR_DEFAULT_JAVA_OPTIONS, "")]))
    if executor_options:
        conf[session.EXECUTOR_DEFAULT_JAVA_OPTIONS] = executor_options
    for key, value in conf.items():
        cmd += ["--conf", f"{key}={value}"]
    if script is None:
        if rest:
            raise ConfigError(f"{THRIFT} takes --master, --env, --set, --lake, --host and --port only, not {rest}")
        # Hive's session threads load the catalog through the system class
        # loader, which --jars never reaches (delta-io/delta#1332).
        return cmd + ["--driver-class-path", ":".join(jars), "--class", THRIFT_CLASS, "spark-internal",
                      "--hiveconf", f"hive.server2.thrift.bind.host={known.host}",
                      "--hiveconf", f"hive.server2.thrift.port={known.port}",
                      "--hiveconf", "hive.server2.transport.mode=binary"]
    job_args = ["--env", known.env, "--conf-dir", str(ROOT / "conf")] + [a for s in known.set for a in ("--set", s)]
    if known.lake:
        job_args += ["--lake", known.lake]
    return cmd + [str(script)] + job_args + rest


def long_lived(job: str, args: Sequence[str]) -> bool:
    """Whether ``job ARGS`` runs until it is stopped (the Thrift server, a stream with
    ``--trigger``) rather than to the end of its input: its driver and executors then
    do without ``spark.batch_java_options``."""
    if job == THRIFT:
        return True
    # argparse takes any unambiguous prefix: --tr, --trig, ... (--t is also --topic's)
    return job == "stream_ingest" and any(
        len(name) >= 4 and "--trigger".startswith(name) for name in (a.split("=", 1)[0] for a in args))


def java_option(name: str, value: str) -> str:
    """``-Dname=value`` as one word of spark-submit's ``--driver-java-options`` (:func:`session.java_word`)."""
    return session.java_word(f"-D{name}={value}")


#: Jobs that must see the scheduler's SIGTERM themselves (a continuous stream
#: finishes its batch and reports): the Python driver is the process started,
#: and Spark's JVM its child, which ignores SIGINT (as PySpark launches it).
SIGNALLED = frozenset({"stream_ingest"})


def driver_first(cmd: list[str], env: dict[str, str], python: str) -> tuple[list[str], dict[str, str]]:
    """The same spark-submit arguments, launched the other way round: ``python JOB.py ARGS``
    with the options in ``PYSPARK_SUBMIT_ARGS`` (PySpark starts spark-submit as the child gateway).

    spark-submit's own process would otherwise take a SIGTERM meant for the
    job and exit at once, leaving the Python driver no chance to stop cleanly.
    """
    script = next(i for i, a in enumerate(cmd) if a.endswith(".py") and i > 0 and cmd[i - 1] != "--py-files")
    options, job = cmd[1:script], cmd[script:]
    zip_path = options[options.index("--py-files") + 1]
    env = dict(env, PYSPARK_SUBMIT_ARGS=shlex.join(options + ["pyspark-shell"]),
               PYTHONPATH=os.pathsep.join(p for p in (zip_path, env.get("PYTHONPATH", "")) if p))
    return [python, *job], env


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli.setup_logging()
    if not argv or argv[0].startswith("-"):
        print("usage: scripts/submit.sh JOB [--master URL] [--env ENV] [--set K=V] [JOB ARGS...]",
              file=sys.stderr)
        return 2
    try:
        cmd = command(argv[0], argv[1:], os.environ["ONCOLAKE_ZIP"], sys.executable, dict(os.environ))
    except ConfigError as err:
        return cli.fail("submit", err)
    import pyspark  # the installed Spark is the one spark-submit must use
    env = dict(os.environ, SPARK_HOME=str(Path(pyspark.__file__).parent),
               PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    if argv[0] in SIGNALLED:
        cmd, env = driver_first(cmd, env, sys.executable)
    cli.log.info("running: %s", shlex.join(cmd))
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
