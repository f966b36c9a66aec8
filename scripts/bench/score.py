"""Benchmark the scoring job against bare predict, predict_batch_udf, and itself incrementally.

Set-up (not timed): ingest --data into a fresh lake and register an untrained
model of the configured architecture, recorded with the configured size,
resize policy and pixel options as training records them (scoring cost does
not depend on the weights). Measured, in this one invocation:

- the score job over every image (decode, predict, MERGE into gold.predictions);
- bare ``model.predict`` on the already decoded tensors in one process (the ceiling);
- Spark's ``predict_batch_udf`` decoding with the same function and predicting;
- incremental: one new ingest date when 30 dates are already scored, against
  the same date scored alone in an empty predictions table;
- the compute ceiling (``profiling.compute_ceiling``): the model's forward
  FLOPs per image x the job's rate over it is ``fraction_of_matmul_ceiling``.

    scripts/bench.sh score [--data ../shared/data/ham10000]
    scripts/bench.sh score --set preprocess.size=96 --set preprocess.shades_of_grey=6   # HAM10000's default model
"""
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from oncolake import cli, imaging, ingest, lake, profiling, registry, scoring, training

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    p = cli.parser("bench-score", __doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000"))
    args = p.parse_args(argv)
    return cli.run_bench("bench-score", args, lambda spark, cfg, work: _measure(spark, cfg, work, args))


def _measure(spark, cfg, work: Path, args) -> dict:
    """The benchmark's runs in ``work`` (a scratch folder); returns the figures."""
    from pyspark.sql import functions as F
    data = Path(args.data).resolve()
    # the model is recorded as training records it: size, resize policy and
    # pixel options (reduced decoding, colour constancy) from the configuration,
    # so `--set preprocess.size=96 --set preprocess.shades_of_grey=6` times
    # HAM10000's default model; the baselines decode with the same options
    size, policy, pixels = cfg.preprocess.size, cfg.preprocess.resize, cfg.preprocess.pixels()
    full = dataclasses.replace(cfg, lake=str(work / "full"))
    ingest.run(spark, full, dataset="bench", source=str(data), labels=str(data / "labels.csv"),
               ingest_date="2026-01-01")
    model = training.build_model(size, [128.0] * 3, [64.0] * 3, cfg.train)
    model.save(work / "model.keras")
    files = {"model.keras": (work / "model.keras").read_bytes(),
             "model.json": json.dumps({"size": size, "resize": policy, "pixels": pixels}).encode(),
             "metrics.json": json.dumps({"threshold": 0.5}).encode()}

    def register(lake_dir: str) -> None:
        registry.register(spark, lake.qualify(spark, lake_dir), "bench", files)

    register(full.lake)
    images = scoring.run(spark, full, dataset="bench")["scored"]  # warm-up: workers, model load
    bronze = spark.read.format("delta").load(lake.table_uri(lake.qualify(spark, full.lake), "bronze.images"))
    timed_job = _time(lambda: _rescore(spark, full))

    blobs = [bytes(r.content) for r in bronze.select("content").collect()]
    tensors = np.stack([imaging.prepare(b, size, policy, **pixels) for b in blobs])
    loaded = registry.load_model_bytes(files["model.keras"])
    loaded.predict(tensors[:64], verbose=0)
    bare_s = _time(lambda: loaded.predict(tensors, batch_size=cfg.score.batch_size, verbose=0))
    del blobs, tensors

    udf_s = _time(lambda: _predict_batch_udf(bronze, files["model.keras"], size, policy, pixels,
                                             cfg.score.batch_size))

    dated = bronze.withColumn("ingest_date", F.expr("date_add(DATE'2026-01-01', CAST(pmod(xxhash64(image_id), 31) AS INT))"))
    history = dataclasses.replace(cfg, lake=str(work / "history"))
    alone = dataclasses.replace(cfg, lake=str(work / "alone"))
    bronze_path = lambda c: lake.table_uri(lake.qualify(spark, c.lake), "bronze.images")  # noqa: E731
    dated.filter("ingest_date < DATE'2026-01-31'").write.format("delta").partitionBy(
        "dataset", "ingest_date").save(bronze_path(history))
    register(history.lake)
    scoring.run(spark, history, dataset="bench")                     # 30 nights already scored
    new_night = dated.filter("ingest_date = DATE'2026-01-31'")
    new_night.write.format("delta").mode("append").save(bronze_path(history))
    new_night.write.format("delta").partitionBy("dataset", "ingest_date").save(bronze_path(alone))
    register(alone.lake)
    incremental = {}
    incremental_s = _time(lambda: incremental.update(scoring.run(spark, history, dataset="bench")))
    alone_s = _time(lambda: scoring.run(spark, alone, dataset="bench"))

    rates = {"score_job": images / timed_job, "bare_predict": images / bare_s, "predict_batch_udf": images / udf_s}
    ceiling = profiling.compute_ceiling()
    forward = profiling.training_flops(model)["forward"]
    return {"bench": "score", "images": images, "size": size, "pixels": pixels,
            "score_job_images_per_s": round(rates["score_job"], 1),
            "bare_predict_images_per_s": round(rates["bare_predict"], 1),
            "predict_batch_udf_images_per_s": round(rates["predict_batch_udf"], 1),
            "vs_bare_predict": round(rates["score_job"] / rates["bare_predict"], 3),
            "vs_predict_batch_udf": round(rates["score_job"] / rates["predict_batch_udf"], 3),
            "forward_gflop_per_image": round(forward / 1e9, 3), **ceiling,
            "fraction_of_matmul_ceiling": round(forward * rates["score_job"] / 1e9 / ceiling["ceiling_gflops"], 3),
            "precision": "float32" if cfg.train.precision == "auto" else cfg.train.precision,
            "incremental_new_night_images": incremental.get("scored"),
            "incremental_s": round(incremental_s, 2), "alone_s": round(alone_s, 2),
            "incremental_vs_alone": round(incremental_s / alone_s, 3),
            "targets": {"vs_bare_predict": ">= 0.8", "vs_predict_batch_udf": ">= 1.2",
                        "incremental_vs_alone": "<= 1.2"},
            "master": spark.sparkContext.master,
            "driver_memory": spark.conf.get("spark.driver.memory", "default")}


def _time(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _rescore(spark, cfg) -> None:
    """Score every image again into a fresh predictions table (the timed job run)."""
    uri = lake.table_uri(lake.qualify(spark, cfg.lake), "gold.predictions")
    lake.delete(spark, uri)
    scoring.run(spark, cfg, dataset="bench", score_all=True)


def _predict_batch_udf(bronze, model_bytes: bytes, size: int, policy: str, pixels: dict,
                       batch_size: int) -> None:
    """Spark's own batch inference: decode with the same function, then predict_batch_udf."""
    import pandas as pd
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, FloatType

    @F.pandas_udf(ArrayType(FloatType()))
    def decode(content: pd.Series) -> pd.Series:
        return pd.Series([imaging.prepare(bytes(c), size, policy, **pixels).ravel().astype(np.float32)
                          for c in content])

    def make_predict_fn():
        model = registry.load_model_bytes(model_bytes)

        def predict(inputs: np.ndarray) -> np.ndarray:
            return model.predict(inputs.reshape(-1, size, size, 3).astype(np.uint8), verbose=0).ravel()
        return predict

    classify = predict_batch_udf(make_predict_fn, return_type=FloatType(), batch_size=batch_size,
                                 input_tensor_shapes=[[size * size * 3]])
    (bronze.select(decode("content").alias("tensor")).select(classify("tensor").alias("p"))
     .write.format("noop").mode("overwrite").save())


if __name__ == "__main__":
    sys.exit(main())
