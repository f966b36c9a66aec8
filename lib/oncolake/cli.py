"""What every job's ``main`` shares: arguments, logging, summary, exit codes."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from oncolake import config
from oncolake.errors import OncolakeError

log = logging.getLogger("oncolake")


def parser(job: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every job takes."""
    p = argparse.ArgumentParser(prog=job, description=(doc or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", help="lake root URI (overrides the configured one)")
    p.add_argument("--env", default="local", help="configuration layer conf/<env>.yaml (default: local)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one configuration key, e.g. --set ingest.max_pixels=1e8")
    p.add_argument("--conf-dir", help="folder of base.yaml and <env>.yaml (default: the repository's conf/)")
    return p


def load_config(args: argparse.Namespace) -> config.Config:
    """Resolve the configuration for parsed ``args``, set up logging, log it."""
    setup_logging()
    overrides = list(args.set) + ([f"lake={args.lake}"] if args.lake else [])
    cfg = config.load(args.env, overrides=overrides, environ=os.environ, conf_dir=args.conf_dir,
                      dataset=getattr(args, "dataset", None))
    log.info("configuration: %s", json.dumps(config.describe(cfg), sort_keys=True))
    return cfg


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be swapped, as pytest does)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging() -> None:
    """Library logs to stderr; stdout is kept for the summary line.

    ``ONCOLAKE_LOG_LEVEL=DEBUG`` adds, among others, a failed job's whole trace.
    """
    root = logging.getLogger("oncolake")
    if not root.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        level = os.environ.get("ONCOLAKE_LOG_LEVEL", "INFO").upper()
        root.setLevel(level if level in logging.getLevelNamesMapping() else logging.INFO)
        root.propagate = False


def emit(summary: dict[str, Any]) -> None:
    """Print the job summary: one JSON line, the last line on stdout."""
    sys.stdout.flush()
    print(json.dumps(summary, sort_keys=False, default=str), flush=True)


_NO_SPACE = "No space left on device"
#: What the HDFS client says when no live DataNode has (or will take) a block.
_HDFS_LOST = ("BlockMissingException", "could only be written to 0 of the")


def fail(job: str, err: BaseException) -> int:
    """Log one clear line for ``err`` and return the job's exit code."""
    if isinstance(err, OncolakeError):
        log.error("%s failed: %s", job, err)
        return err.exit_code
    log.debug("%s failed", job, exc_info=err)
    if _NO_SPACE in str(err):  # deep in a Spark task's Java trace; the first line says "Job aborted"
        log.error("%s failed: no space left on device: a file system it writes to (the lake, or spark.local.dir) "
                  "is full; the step that failed committed nothing", job)
        return 1
    if any(sign in str(err) for sign in _HDFS_LOST):
        log.error("%s failed: HDFS could not read or write a block (no live DataNode holds or takes it): bring "
                  "the DataNodes back and run the job again (a rerun finishes what this one left)", job)
        return 1
    log.error("%s failed: %s: %s", job, type(err).__name__, first_line(err))
    return 1


def first_line(err: BaseException) -> str:
    """The line of ``err`` that says what went wrong: for an error from the JVM (py4j: "An error
    occurred while calling o687.execute." then ": the Java exception"), the Java exception's."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    java = [line[1:].strip() for line in lines[1:2] if line.startswith(":")]
    return ((java or lines) or [""])[0][:300]


def run_job(job: str, args: argparse.Namespace, work: Callable[[Any, config.Config], dict[str, Any]]) -> int:
    """What every job does around its one library call.

    Resolves and logs the configuration, builds the session, runs ``work``,
    prints its summary as the last stdout line, maps any failure to one
    error line and an exit code, and stops the session (if it started it) in
    ``finally``.
    """
    from oncolake import session
    spark = None
    try:
        cfg = load_config(args)
        spark = session.build(job, cfg)
        emit(work(spark, cfg))
        return 0
    except Exception as err:  # every failure ends as one line and an exit code
        if getattr(err, "summary", None):  # a gate that stopped a job after it recorded its work
            emit(err.summary)
        return fail(job, err)
    finally:
        if spark is not None:
            session.stop(spark)


def run_bench(name: str, args: argparse.Namespace,
              measure: Callable[[Any, config.Config, Path], dict[str, Any]]) -> int:
    """:func:`run_job` for a benchmark in ``scripts/bench/``: ``measure`` also gets a scratch folder.

    The folder (under the system's temporary directory) is removed when
    ``measure`` returns or fails; the figures it returns are the JSON line.
    """
    def with_scratch(spark, cfg: config.Config) -> dict[str, Any]:
        scratch = Path(tempfile.mkdtemp(prefix=f"oncolake-{name}-"))
        try:
            return measure(spark, cfg, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return run_job(name, args, with_scratch)
