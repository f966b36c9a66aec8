"""Benchmark ingest against the plainest Spark copy of the same files.

Baseline: binaryFile read -> Delta write, no decoding, no validation.
Measured: oncolake's ingest (list, read, fully decode, hash, MERGE, quarantine).
Floor: the bare one-pass validate-and-write of ``ingest_floor.py`` (the
cheapest pass that still validates every image in Python), whose rate the
ingest target is set against (``floor_ratio``; issue 16: at least 0.6 at
5,984 images, 0.8 at 23,936).
All three run in this one invocation on the same session, alternating, each
into a fresh folder; prints one JSON line with images/s and the ratios.

    scripts/bench.sh ingest [--data ../shared/data/ham10000] [--repeat 3]
"""
import dataclasses
import statistics
import sys
import time
from pathlib import Path

from oncolake import cli, ingest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest_floor  # noqa: E402  (a sibling script: its one-pass floor)
from pyspark import cloudpickle  # noqa: E402

cloudpickle.register_pickle_by_value(ingest_floor)  # executors cannot import a script beside this one

ROOT = Path(__file__).resolve().parents[2]
#: The issue's targets for ingest / one-pass floor, by size of the set.
FLOOR_TARGETS = ((20_000, 0.8), (0, 0.6))


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
    base_s, ingest_s, floor_s = [], [], []
    limits = {"max_pixels": cfg.ingest.max_pixels, "min_side": cfg.ingest.min_side}
    for i in range(args.repeat):
        start = time.perf_counter()
        files.write.format("delta").save(str(work / f"copy{i}"))
        base_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        ingest_floor.one_pass(files, limits, str(work / f"floor{i}"))
        floor_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        summary = ingest.run(spark, dataclasses.replace(cfg, lake=str(work / f"lake{i}")),
                             dataset="bench", source=data, labels=labels)
        ingest_s.append(time.perf_counter() - start)
        assert summary["valid"] == images, summary
    base, measured = images / statistics.median(base_s), images / statistics.median(ingest_s)
    floor = images / statistics.median(floor_s)
    return {"bench": "ingest", "images": images, "repeat": args.repeat,
            "baseline_binaryfile_delta_images_per_s": round(base, 1),
            "one_pass_floor_images_per_s": round(floor, 1),
            "ingest_images_per_s": round(measured, 1),
            "ratio": round(measured / base, 3),
            "floor_ratio": round(measured / floor, 3),
            "target_floor_ratio": next(t for n, t in FLOOR_TARGETS if images >= n),
            "baseline_s": [round(s, 2) for s in base_s], "floor_s": [round(s, 2) for s in floor_s],
            "ingest_s": [round(s, 2) for s in ingest_s],
            "master": spark.sparkContext.master,
            "driver_memory": spark.conf.get("spark.driver.memory", "default")}


if __name__ == "__main__":
    sys.exit(main())
