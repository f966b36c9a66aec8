"""Assembles the SparkSession: app name, Delta extensions, configured conf.

The only module that builds or stops a session. A session that was already
active when a job started (a test's, a notebook's) is used and left running.
"""
from __future__ import annotations

import logging
from pathlib import Path

from pyspark.sql import SparkSession

from oncolake.config import Config

log = logging.getLogger(__name__)

DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
    # Commits to a lake on local disk take a lock file, so two jobs writing one table at
    # once cannot both write version N (lib/jvm/io/oncolake/delta/LockingLocalLogStore.java).
    "spark.delta.logStore.file.impl": "io.oncolake.delta.LockingLocalLogStore",
}
#: oncolake's own JVM classes, compiled by scripts/setup.sh from lib/jvm.
OWN_JAR = Path(__file__).resolve().parents[2] / ".cache" / "oncolake-jvm" / "oncolake-jvm.jar"
#: The classes a job's JVM loads, dumped by scripts/setup.sh (class data
#: sharing; one per clone, since it holds only for this class path): later
#: JVMs map them instead of loading and verifying them again. The JVM ignores
#: a missing or stale archive.
CLASS_ARCHIVE = Path(__file__).resolve().parents[2] / ".cache" / "jvm-classes.jsa"
#: Spark's key for the driver JVM's options; spark-submit takes them as one string.
DRIVER_JAVA_OPTIONS = "spark.driver.extraJavaOptions"
#: Spark's key for the options it puts before the executors' configured
#: ``spark.executor.extraJavaOptions`` (which a job's session may set again).
EXECUTOR_DEFAULT_JAVA_OPTIONS = "spark.executor.defaultJavaOptions"
_owned: set[int] = set()


def jar_dir(group: str = "spark") -> Path:
    """Where scripts/setup.sh linked the resolved jars of ``group`` (conf/jvm.txt)."""
    return Path(__file__).resolve().parents[2] / ".cache" / "jars" / group


def jars(group: str = "spark") -> list[str]:
    """The resolved jar files of ``group``, sorted; empty if set-up has not run.

    The ``spark`` group also holds oncolake's own jar (:data:`OWN_JAR`): the
    Delta conf names its log store, so a session without it could not commit.
    """
    folder = jar_dir(group)
    if not folder.is_dir() or (group == "spark" and not OWN_JAR.is_file()):
        return []
    return sorted(str(p) for p in folder.glob("*.jar")) + ([str(OWN_JAR)] if group == "spark" else [])


def java_word(option: str) -> str:
    """``option`` as one word of a JVM options string (``--driver-java-options``,
    ``spark.driver.extraJavaOptions``).

    Spark splits that string on spaces unless they are quoted, so a checkout
    under a folder with a space in its name would hand the JVM a stray
    argument; double quotes (backslash-escaped inside) keep it whole.
    """
    if not any(c in option for c in " \t\"'\\"):
        return option
    return '"' + option.replace("\\", "\\\\").replace('"', '\\"') + '"'


def driver_java_options(configured: str, *own: str) -> str:
    """The driver JVM's options: ``own`` words, the class archive if set-up
    made one (the JVM's own warnings then go to stderr: stdout ends with the
    job's JSON line), then the configured ``spark.driver.extraJavaOptions`` as
    written, last so that they win (``-XX:SharedArchiveFile=`` another archive,
    ``-Xshare:off``).
    """
    options = list(own)
    if CLASS_ARCHIVE.is_file() and "ArchiveClassesAtExit" not in configured:
        options += [java_word(f"-XX:SharedArchiveFile={CLASS_ARCHIVE}"), "-Xlog:disable", "-Xlog:all=warning:stderr"]
    return " ".join(options + ([configured.strip()] if configured.strip() else []))


def executor_java_options(configured: str) -> str:
    """The executors' default JVM options: the class archive, as for the driver, then
    the configured ``spark.executor.defaultJavaOptions``.

    A standalone worker starts each executor on Spark's own class path, the
    one the archive was dumped with, so a new executor maps most of what it
    loads instead of reading and verifying it (docs/benchmarks.md). Local mode
    has no executor JVMs; a host without the file, or with another class
    path, runs without it (the JVM ignores a missing archive and warns once on
    stderr about a mismatched one). Spark puts these before the configured
    ``spark.executor.extraJavaOptions``, so those still win.
    """
    return driver_java_options(configured)


def build(app: str, cfg: Config) -> SparkSession:
    """The active session if there is one, else a new Delta-enabled session.

    Master, jars and memory come from spark-submit (scripts/submit.sh passes
    the configured ones); ``cfg.spark.conf`` is applied on top.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        log.info("using the active Spark session (%s)", active.sparkContext.master)
        return active
    builder = SparkSession.builder.appName(f"oncolake-{app}")
    for key, value in {**DELTA_CONF, **cfg.spark.conf}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    _owned.add(id(spark))
    log.info("started Spark session %s on %s", spark.sparkContext.applicationId, spark.sparkContext.master)
    return spark


def stop(spark: SparkSession) -> None:
    """Stop ``spark`` if :func:`build` created it; leave a borrowed session alone."""
    if id(spark) in _owned:
        _owned.discard(id(spark))
        spark.stop()
