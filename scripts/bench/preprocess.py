"""Benchmark preprocess against a bare OpenCV loop over the same bytes.

Set-up (not timed): ingest --data into a fresh lake, then a warm-up (a 2 %
sample through the floor's UDF) that starts the Python workers. The job and
the floor then run ``--rounds`` times each, alternating (the job's tensors
and lineage table removed before each of its runs); the best of each counts. Measured: the preprocess
job (split, decode, resize, balance, write Petastorm tensors). Baseline: a
plain Python loop that decodes and resizes the same bytes with OpenCV in 2
processes. One JSON line with both rates and their ratio; also, for
comparison, the same loop when it also writes its tensors as Parquet (npy
bytes, as the job stores them) and the job's ratio to that. Floor: the
decode-and-write stage alone in Spark (read the bronze rows, the same
``imaging.prepare`` in ``mapInPandas``, npy bytes to Parquet; no split,
balance, Petastorm or manifest), whose rate the preprocess target is set
against (``floor_ratio``; issue 16: at least 0.7).

    scripts/bench.sh preprocess [--data ../shared/data/ham10000] [--size 128] [--rounds 2]
"""
import dataclasses
import multiprocessing
import sys
import time
from functools import partial
from pathlib import Path

from pyspark.sql import functions as F

from oncolake import cli, imaging, ingest, lake, preprocess

ROOT = Path(__file__).resolve().parents[2]


def _prepare_all(chunk: list[bytes], size: int) -> int:
    import cv2
    cv2.setNumThreads(1)
    return sum(imaging.prepare(data, size).shape[0] > 0 for data in chunk)


def _prepare_and_write(job: tuple[list[bytes], str], size: int) -> int:
    """The loop, keeping its tensors and writing them as one Parquet file."""
    import io

    import cv2
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    cv2.setNumThreads(1)
    chunk, path = job
    tensors = []
    for data in chunk:
        buffer = io.BytesIO()
        np.save(buffer, imaging.prepare(data, size))
        tensors.append(buffer.getvalue())
    pq.write_table(pa.table({"image": pa.array(tensors, pa.binary())}), path)
    return len(tensors)


def _prepare_batches(batches, size: int):
    import io

    import cv2
    import numpy as np
    cv2.setNumThreads(1)
    for batch in batches:
        tensors = []
        for data in batch["content"]:
            buffer = io.BytesIO()
            np.save(buffer, imaging.prepare(bytes(data), size))
            tensors.append(buffer.getvalue())
        yield batch[["image_id"]].assign(image=tensors)


def main(argv=None) -> int:
    p = cli.parser("bench-preprocess", __doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000"))
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="job and floor runs, alternating; the best of each counts")
    args = p.parse_args(argv)
    return cli.run_bench("bench-preprocess", args, lambda spark, cfg, work: _measure(spark, cfg, work, args))


def _measure(spark, cfg, work: Path, args) -> dict:
    """The benchmark's runs in ``work`` (a scratch folder); returns the figures."""
    data = Path(args.data).resolve()
    cfg = dataclasses.replace(cfg, lake=str(work / "lake"),
                              preprocess=dataclasses.replace(cfg.preprocess, size=args.size))
    ingest.run(spark, cfg, dataset="bench", source=str(data), labels=str(data / "labels.csv"))
    bronze = spark.read.format("delta").load(lake.table_uri(lake.qualify(spark, cfg.lake), "bronze.images"))
    rows = bronze.filter("dataset = 'bench'").select("image_id", "content")
    # Warm-up (untimed): a 2 % sample through the floor's UDF in every task, so
    # neither timed run pays for starting the Python workers and importing OpenCV.
    (rows.filter(F.abs(F.xxhash64("image_id")) % 50 == 0)
     .mapInPandas(partial(_prepare_batches, size=args.size), "image_id string, image binary")
     .write.format("noop").mode("overwrite").save())

    lake_uri = lake.qualify(spark, cfg.lake)
    job_runs, floor_runs = [], []
    for _ in range(args.rounds):
        # each job run makes version 1 and the lineage table afresh, as the first run on a lake does
        for folder in (lake.tensors_root(lake_uri, "bench"), lake.table_uri(lake_uri, "silver.splits")):
            lake.delete(spark, folder)
        spark._jvm.org.apache.spark.sql.delta.DeltaLog.clearCache()
        start = time.perf_counter()
        summary = preprocess.run(spark, cfg, dataset="bench")
        job_runs.append(time.perf_counter() - start)

        lake.delete(spark, str(work / "floor"))
        start = time.perf_counter()
        (rows.mapInPandas(partial(_prepare_batches, size=args.size), "image_id string, image binary")
         .write.parquet(str(work / "floor")))
        floor_runs.append(time.perf_counter() - start)
    job_s, floor_s = min(job_runs), min(floor_runs)
    images = summary["train"] + summary["val"] + summary["test"]
    floor = spark.read.parquet(str(work / "floor")).count() / floor_s

    blobs = [p.read_bytes() for p in sorted(data.rglob("*.jpg"))]
    chunks = [blobs[i::8] for i in range(8)]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        done = sum(pool.map(partial(_prepare_all, size=args.size), chunks))
    loop_s = time.perf_counter() - start
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        written = sum(pool.map(partial(_prepare_and_write, size=args.size),
                               [(c, str(work / f"loop-{i}.parquet")) for i, c in enumerate(chunks)]))
    write_s = time.perf_counter() - start
    job, loop = images / job_s, done / loop_s
    return {"bench": "preprocess", "images": images, "size": args.size,
            "preprocess_images_per_s": round(job, 1), "opencv_loop_2proc_images_per_s": round(loop, 1),
            "ratio": round(job / loop, 3), "target_ratio": 0.8,
            "spark_decode_write_floor_images_per_s": round(floor, 1),
            "floor_ratio": round(job / floor, 3), "target_floor_ratio": 0.7,
            "loop_and_parquet_images_per_s": round(written / write_s, 1),
            "ratio_to_loop_and_parquet": round(job / (written / write_s), 3),
            "job_s": round(job_s, 2), "floor_s": round(floor_s, 2), "loop_s": round(loop_s, 2),
            "job_runs_s": [round(t, 2) for t in job_runs], "floor_runs_s": [round(t, 2) for t in floor_runs],
            "loop_and_parquet_s": round(write_s, 2),
            "master": spark.sparkContext.master}


if __name__ == "__main__":
    sys.exit(main())
