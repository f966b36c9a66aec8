"""Benchmark ingest against the plainest Spark copy of the same files.

Baseline: binaryFile read -> Delta write, no decoding, no validation.
Measured: oncolake's ingest (list, read, fully decode, hash, MERGE, quarantine).
Both run in this one invocation on the same session, alternating, each into a
fresh lake; prints one JSON line with images/s of both and their ratio.

    scripts/bench.sh ingest [--data ../shared/data/ham10000] [--repeat 3]
"""
import dataclasses
import statistics
import sys
import time
from pathlib import Path

from oncolake import cli, ingest

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    p = cli.parser("bench-ingest", __doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000"))
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    return cli.run_bench("bench-ingest", args, lambda spark, cfg, work: _measure(spark, cfg, work, args))


def _measure(spark, cfg, work: Path, args) -> dict:
    """The benchmark's runs in ``work`` (a scratch folder); returns the figures."""
    data = str(Path(args.data).resolve())
    labels = str(Path(data) / "labels.csv")
    files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
             .option("pathGlobFilter", "*.jpg").load(data))
    images = files.select("path").count()  # also warms the OS file cache
    base_s, ingest_s = [], []
    for i in range(args.repeat):
        start = time.perf_counter()
        files.write.format("delta").save(str(work / f"copy{i}"))
        base_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        summary = ingest.run(spark, dataclasses.replace(cfg, lake=str(work / f"lake{i}")),
                             dataset="bench", source=data, labels=labels)
        ingest_s.append(time.perf_counter() - start)
        assert summary["valid"] == images, summary
    base, measured = images / statistics.median(base_s), images / statistics.median(ingest_s)
    return {"bench": "ingest", "images": images, "repeat": args.repeat,
            "baseline_binaryfile_delta_images_per_s": round(base, 1),
            "ingest_images_per_s": round(measured, 1),
            "ratio": round(measured / base, 3), "target_ratio": 0.5,
            "baseline_s": [round(s, 2) for s in base_s], "ingest_s": [round(s, 2) for s in ingest_s],
            "master": spark.sparkContext.master,
            "driver_memory": spark.conf.get("spark.driver.memory", "default")}


if __name__ == "__main__":
    sys.exit(main())
