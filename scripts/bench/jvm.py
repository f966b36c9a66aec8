"""What the driver JVM's start costs a job, and what the class archive and C1 save.

Runs ``scripts/submit.sh ingest`` into a fresh lake, as users do, with four
driver JVMs in turn (rounds interleave them, so the machine's noise falls
on all four alike):

- ``baseline``: the JDK's defaults (its own class archive, C1 and C2 compilers);
- ``archive``: the class archive scripts/setup.sh dumps (``.cache/jvm-classes.jsa``);
- ``c1``: the JDK's archive, C1 only (``-XX:TieredStopAtLevel=1``);
- ``both``: the archive and C1.

Every driver maps the archive, and a batch job's driver and executors also
run C1 only (``spark.batch_java_options``, with a 240 MB code cache, which
every variant keeps): ``both`` is the default.

Two inputs: an empty folder (what every job pays before its first image)
and ``--data`` (default HAM10000 with its labels), which is then also
preprocessed (the dataset's defaults) in the same lake with the same driver
options. Each variant must count the same valid images and tensors, or the
benchmark fails.

    scripts/bench.sh jvm [--data ../shared/data/ham10000] [--rounds 2]

``--cluster`` times the executors' side instead: ``ingest`` and then
``preprocess --size 32`` of ``--data`` (default ISIC UDA-1) through
``scripts/submit.sh --env cluster``, on scripts/cluster.sh's 2 workers with
the lake and the input on scripts/hdfs.sh's HDFS (both started and stopped
here unless already up), in these configurations (``--variants`` picks some;
the speed-ups are against the first one run):

- ``delta_default``: Delta's 50 state partitions, executors without the archive,
  C1 and C2 everywhere (oncolake before session 33);
- ``partitions_2``: ``conf/cluster.yaml``'s 2 state partitions, executors without the archive;
- ``archive``: 2 partitions and the archive (``spark.executor.defaultJavaOptions``):
  session 33's configuration;
- ``c1_driver``: as ``archive``, and the driver C1 only;
- ``configured``: ``conf/cluster.yaml`` as it is: since session 34, driver and
  executors C1 only (``spark.batch_java_options``).

    scripts/bench.sh jvm --cluster [--data ../shared/data/isic_uda1] [--rounds 2] [--variants archive,configured]
"""
from __future__ import annotations

import argparse
import json
import shutil
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


def cluster_variants() -> dict[str, list[str]]:
    """``--set`` arguments per cluster variant (configured options come after oncolake's, so they win)."""
    jdk = ["--set", f"spark.conf.{session.EXECUTOR_DEFAULT_JAVA_OPTIONS}=-XX:SharedArchiveFile={_jdk_archive()}"]
    delta = "spark.conf.spark.databricks.delta.snapshotPartitions"
    c2 = ["--set", "spark.batch_java_options=-XX:TieredStopAtLevel=4"]  # the JDK's own tiers
    return {"delta_default": ["--set", f"{delta}=50", *jdk, *c2], "partitions_2": ["--set", f"{delta}=2", *jdk, *c2],
            "archive": c2,
            "c1_driver": [*c2, "--set", f"spark.conf.{session.DRIVER_JAVA_OPTIONS}=-XX:TieredStopAtLevel=1"],
            "configured": []}


def run_cluster(data: Path, labels: str, rounds: int, chosen: dict[str, list[str]]) -> dict:
    """ingest, then preprocess, of ``data`` on the cluster per variant, rounds interleaved."""
    import uuid
    from urllib.parse import urlparse

    from oncolake import config, lakectl
    scripts = ROOT / "scripts"
    started = []
    root = f"/bench-jvm-{uuid.uuid4().hex[:8]}"
    cfg = config.load("cluster")
    hdfs, uploading = lakectl.client(cfg), False
    try:
        for name in ("hdfs.sh", "cluster.sh"):
            if subprocess.run([str(scripts / name), "status"], capture_output=True).returncode != 0:
                subprocess.run([str(scripts / name), "start"], check=True, capture_output=True)
                started.append(name)
        uploading = True
        subprocess.run([str(scripts / "lake.sh"), "put", str(data), f"{root}/input"], check=True, capture_output=True)
        lake_url = urlparse(cfg.lake)
        namenode = f"{lake_url.scheme}://{lake_url.netloc}"
        source = ["--input", f"{namenode}{root}/input"] + (
            ["--labels", f"{namenode}{root}/input/{Path(labels).name}"] if labels else [])
        seconds = {v: {"ingest": [], "preprocess": []} for v in chosen}
        counts = set()
        for r in range(rounds):
            for variant, sets in chosen.items():
                lake = ["--env", "cluster", "--lake", f"{namenode}{root}/lake-{variant}-{r}", "--dataset", "bench"]
                for job, args in (("ingest", source), ("preprocess", ["--size", "32"])):
                    took, summary = _submit(job, [*lake, *args, *sets])
                    seconds[variant][job].append(round(took, 2))
                    if job == "preprocess":
                        counts.add(summary["train"] + summary["val"] + summary["test"])
                    print(f"round {r + 1} {variant} {job}: {took:.1f} s", file=sys.stderr)
        if len(counts) != 1:
            raise RuntimeError(f"the variants preprocessed different counts: {counts}")
    finally:
        if uploading:  # HDFS is up: the input and the lakes go
            hdfs.delete(root, recursive=True)
        for name in reversed(started):
            subprocess.run([str(scripts / name), "stop"], capture_output=True)
    both = {v: [i + p for i, p in zip(s["ingest"], s["preprocess"])] for v, s in seconds.items()}
    first = next(iter(chosen))
    base = statistics.median(both[first])
    return {"bench": "jvm", "cluster": True, "rounds": rounds, "images": counts.pop(), "seconds": seconds,
            f"speedup_vs_{first}": {v: round(base / statistics.median(t), 3) for v, t in both.items() if v != first}}


def _submit(job: str, args: list[str]) -> tuple[float, dict]:
    """One job through scripts/submit.sh; its wall time and JSON summary."""
    start = time.perf_counter()
    done = subprocess.run([str(ROOT / "scripts" / "submit.sh"), job, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        # the job's one-line error is its driver's last log line, on stdout under spark-submit
        raise RuntimeError(f"{job} {args} failed: {(done.stdout.strip() or done.stderr.strip()).splitlines()[-1:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def run_once(job: str, options: str, lake: Path, job_args: list[str]) -> tuple[float, dict]:
    """One ``job`` with the driver JVM's ``options`` (configured options come last: they win)."""
    return _submit(job, ["--lake", str(lake), *job_args, "--set", f"spark.conf.{session.DRIVER_JAVA_OPTIONS}={options}"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="default: ../shared/data/ham10000, or isic_uda1 with --cluster")
    p.add_argument("--labels", help="labels CSV (default: DATA/labels.csv if there)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cluster", action="store_true", help="time executors on scripts/cluster.sh instead")
    p.add_argument("--variants", help="with --cluster: comma-separated names of the configurations to run (default: all)")
    args = p.parse_args(argv)
    if not session.CLASS_ARCHIVE.is_file():
        print("bench jvm: no class archive at .cache/jvm-classes.jsa: run scripts/setup.sh", file=sys.stderr)
        return 1
    data = Path(args.data or ROOT.parent / "shared" / "data" / ("isic_uda1" if args.cluster else "ham10000")).resolve()
    labels = args.labels or (str(data / "labels.csv") if (data / "labels.csv").is_file() else None)
    if args.cluster:
        if labels and Path(labels).parent != data:
            print("bench jvm --cluster: the labels must sit in DATA (it is uploaded whole)", file=sys.stderr)
            return 2
        known = cluster_variants()
        names = args.variants.split(",") if args.variants else list(known)
        if not names or any(n not in known for n in names):
            print(f"bench jvm --cluster: --variants takes names among {', '.join(known)}", file=sys.stderr)
            return 2
        print(json.dumps(run_cluster(data, labels, args.rounds, {n: known[n] for n in names})))
        return 0
    options = variants()
    with tempfile.TemporaryDirectory(prefix="oncolake-bench-jvm-") as tmp:
        empty = Path(tmp) / "empty"
        empty.mkdir()
        # the data set keeps its name: preprocess then takes its datasets entry (HAM10000: 96 px), as users get
        inputs = {"empty": ["--dataset", "empty", "--input", str(empty)],
                  data.name: ["--dataset", data.name, "--input", str(data)] + (["--labels", labels] if labels else [])}
        runs = {"empty": ["ingest"], data.name: ["ingest", "preprocess"]}
        seconds = {f"{name} {job}": {v: [] for v in options} for name in inputs for job in runs[name]}
        counts: dict[str, set[int]] = {key: set() for key in seconds}
        for r in range(args.rounds):
            for name, job_args in inputs.items():
                for variant, opts in options.items():
                    lake = Path(tmp) / f"lake-{name}-{variant}-{r}"
                    for job in runs[name]:
                        took, summary = run_once(job, opts, lake, job_args if job == "ingest" else job_args[:2])
                        count = summary["valid"] if job == "ingest" else summary["train"] + summary["val"] + summary["test"]
                        seconds[f"{name} {job}"][variant].append(round(took, 2))
                        counts[f"{name} {job}"].add(count)
                        print(f"round {r + 1} {name} {job} {variant}: {took:.1f} s, {count} images", file=sys.stderr)
                    shutil.rmtree(lake, ignore_errors=True)
        if any(len(v) != 1 for v in counts.values()):
            print(f"bench jvm: the variants counted different images: {counts}", file=sys.stderr)
            return 1
    medians = {name: {v: statistics.median(s) for v, s in per.items()} for name, per in seconds.items()}
    print(json.dumps({
        "bench": "jvm", "rounds": args.rounds, "seconds": seconds,
        "images": {key: next(iter(v)) for key, v in counts.items()},
        "speedup_vs_baseline": {name: {v: round(m["baseline"] / m[v], 3) for v in m if v != "baseline"}
                                for name, m in medians.items()},
        # what C1 adds to a driver that maps the archive: the default (spark.batch_java_options) against session 22's
        "c1_speedup_with_archive": {name: round(m["archive"] / m["both"], 3) for name, m in medians.items()},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
