"""What the driver JVM's start costs a job, and what the class archive and C1 save.

Runs ``scripts/submit.sh ingest`` into a fresh lake, as users do, with four
driver JVMs in turn (rounds interleave them, so the machine's noise falls
on all four alike):

- ``baseline``: the JDK's defaults (its own class archive, C1 and C2 compilers);
- ``archive``: the class archive scripts/setup.sh dumps (``.cache/jvm-classes.jsa``);
- ``c1``: the JDK's archive, C1 only (``-XX:TieredStopAtLevel=1``);
- ``both``: the archive and C1.

The default is the archive alone (docs/benchmarks.md: C1 only slows jobs
longer than about a minute).

Two inputs: an empty folder (what every job pays before its first image)
and ``--data`` (default HAM10000 with its labels). Each run's summary must
count the same valid images, or the benchmark fails.

    scripts/bench.sh jvm [--data ../shared/data/ham10000] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "lib"))

from oncolake import session  # noqa: E402


def _jdk_archive() -> str:
    """The class archive the JDK ships (what a JVM maps without -XX:SharedArchiveFile)."""
    out = subprocess.run(["java", "-XshowSettings:properties", "-version"], capture_output=True, text=True).stderr
    home = next(line.split("=", 1)[1].strip() for line in out.splitlines() if line.strip().startswith("java.home"))
    return str(Path(home) / "lib" / "server" / "classes.jsa")


def variants() -> dict[str, str]:
    """Driver options per variant: the configured ones come last on the JVM's line, so they win."""
    jdk = f"-XX:SharedArchiveFile={_jdk_archive()}"
    return {"baseline": f"{jdk} -XX:TieredStopAtLevel=4", "archive": "-XX:TieredStopAtLevel=4",
            "c1": f"{jdk} -XX:TieredStopAtLevel=1", "both": "-XX:TieredStopAtLevel=1"}


def run_once(options: str, lake: Path, job_args: list[str]) -> tuple[float, dict]:
    """One ingest through scripts/submit.sh; its wall time and JSON summary."""
    cmd = [str(ROOT / "scripts" / "submit.sh"), "ingest", "--lake", str(lake), *job_args,
           "--set", f"spark.conf.{session.DRIVER_JAVA_OPTIONS}={options}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"ingest failed ({options}): {done.stderr.strip().splitlines()[-1:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000"))
    p.add_argument("--labels", help="labels CSV (default: DATA/labels.csv if there)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    if not session.CLASS_ARCHIVE.is_file():
        print("bench jvm: no class archive at .cache/jvm-classes.jsa: run scripts/setup.sh", file=sys.stderr)
        return 1
    data = Path(args.data).resolve()
    labels = args.labels or (str(data / "labels.csv") if (data / "labels.csv").is_file() else None)
    options = variants()
    with tempfile.TemporaryDirectory(prefix="oncolake-bench-jvm-") as tmp:
        empty = Path(tmp) / "empty"
        empty.mkdir()
        inputs = {"empty": ["--dataset", "empty", "--input", str(empty)],
                  data.name: ["--dataset", "bench", "--input", str(data)] + (["--labels", labels] if labels else [])}
        seconds: dict[str, dict[str, list[float]]] = {name: {v: [] for v in options} for name in inputs}
        valid: dict[str, set[int]] = {name: set() for name in inputs}
        for r in range(args.rounds):
            for name, job_args in inputs.items():
                for variant, opts in options.items():
                    lake = Path(tmp) / f"lake-{name}-{variant}-{r}"
                    took, summary = run_once(opts, lake, job_args)
                    seconds[name][variant].append(round(took, 2))
                    valid[name].add(summary["valid"])
                    print(f"round {r + 1} {name} {variant}: {took:.1f} s, {summary['valid']} valid", file=sys.stderr)
        if any(len(v) != 1 for v in valid.values()):
            print(f"bench jvm: the variants ingested different counts: {valid}", file=sys.stderr)
            return 1
    medians = {name: {v: statistics.median(s) for v, s in per.items()} for name, per in seconds.items()}
    print(json.dumps({
        "bench": "jvm", "rounds": args.rounds, "seconds": seconds,
        "images": {name: next(iter(v)) for name, v in valid.items()},
        "speedup_vs_baseline": {name: {v: round(m["baseline"] / m[v], 3) for v in m if v != "baseline"}
                                for name, m in medians.items()},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
