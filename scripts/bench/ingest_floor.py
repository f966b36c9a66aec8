"""The floor of any ingest that validates in Python: bare passes, nothing else.

Not the ingest job: four bare Spark passes over the same JPEGs, each into a
fresh folder, in rounds (the first round pays JVM warm-up). It measures the
cheapest pass an ingest could make that still fully decodes every image in
Python, against the benchmark's baseline copy, so the ingest target can be
argued from numbers:

- baseline copy: ``binaryFile`` -> Delta (the ingest benchmark's baseline);
- one pass: ``binaryFile`` -> ``imaging.inspect`` + SHA-256 in
  ``mapInPandas``, the bytes handed back -> the good rows to Delta (no
  listing, labels, dedup, MERGE, quarantine or counts);
- verdicts only: ingest's own validation ``mapInPandas`` -> no-op sink, in the
  Python worker (``ingest.decode_timeout_s`` 0), then isolated as ingest runs
  it (each file in a child process, :mod:`oncolake.isolation`);
- JVM re-read: ``binaryFile`` -> ``sha2`` -> Delta (the second read the job's
  MERGE makes).

    scripts/submit.sh scripts/bench/ingest_floor.py --conf-dir conf \\
        --set spark.conf.spark.driver.memory=1g [--data ../shared/data/ham10000] [--rounds 3]
"""
import hashlib
import sys
import time
from functools import partial
from pathlib import Path

from pyspark.sql import functions as F

from oncolake import cli, imaging, ingest, schema

ROOT = Path(__file__).resolve().parents[2]


def _validate_keeping_bytes(batches, max_pixels: int, min_side: int):
    import cv2
    cv2.setNumThreads(1)
    for batch in batches:
        ids, reasons = [], []
        for data in batch["content"]:
            data = bytes(data)
            ids.append(hashlib.sha256(data).hexdigest())
            reasons.append(imaging.inspect(data, max_pixels=max_pixels, min_side=min_side).reason)
        out = batch[["path", "content"]].copy()
        out["image_id"], out["reason"] = ids, reasons
        yield out


def one_pass(files, limits: dict, out: str) -> None:
    """The one-pass floor: validate and hash in Python, the good rows with their bytes to Delta at ``out``."""
    (files.mapInPandas(partial(_validate_keeping_bytes, **limits),
                       "path string, content binary, image_id string, reason string")
     .filter("reason IS NULL").write.format("delta").save(out))


def main(argv=None) -> int:
    p = cli.parser("bench-ingest-floor", __doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000"))
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    return cli.run_bench("bench-ingest-floor", args, lambda spark, cfg, work: _measure(spark, cfg, work, args))


def _measure(spark, cfg, work: Path, args) -> dict:
    """The benchmark's runs in ``work`` (a scratch folder); returns the figures."""
    limits = {"max_pixels": cfg.ingest.max_pixels, "min_side": cfg.ingest.min_side}
    def files():
        return (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
                .option("pathGlobFilter", "*.jpg").load(str(Path(args.data).resolve())))
    images = files().count()
    passes = {
        "baseline_copy": lambda out: files().write.format("delta").save(out),
        "one_pass": lambda out: one_pass(files(), limits, out),
        "verdicts_only": lambda out: (files().mapInPandas(partial(ingest._inspect_batches, **limits),
                                                          schema.INSPECTION)
                                      .write.format("noop").mode("overwrite").save()),
        # the same, each file in the child process ingest uses (oncolake.isolation)
        "verdicts_isolated": lambda out: (
            files().mapInPandas(partial(ingest._inspect_batches, **limits,
                                        timeout_s=cfg.ingest.decode_timeout_s), schema.INSPECTION)
            .write.format("noop").mode("overwrite").save()),
        "jvm_reread_sha2": lambda out: (files().select("path", "content", F.sha2("content", 256).alias("id"))
                                        .write.format("delta").save(out)),
    }
    rounds = []
    for i in range(args.rounds):
        seconds = {}
        for name, run in passes.items():
            start = time.perf_counter()
            run(str(work / f"{name}-{i}"))
            seconds[name] = round(time.perf_counter() - start, 2)
        rounds.append(seconds)
    last = rounds[-1]
    return {"bench": "ingest_floor", "images": images, "rounds_s": rounds,
            "one_pass_ratio_last_round": round(last["baseline_copy"] / last["one_pass"], 3),
            "isolation_ratio_last_round": round(last["verdicts_only"] / last["verdicts_isolated"], 3),
            "master": spark.sparkContext.master}


if __name__ == "__main__":
    sys.exit(main())
