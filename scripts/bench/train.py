"""Benchmark Horovod-on-Spark training against the machine's compute ceiling.

Set-up (not timed): ingest --data into a fresh lake, and preprocess it at
each ``--size``. In the same process, once: the compute ceiling (GFLOP/s of
a 2048 x 2048 fp32 matmul and of a large 3x3 convolution, the faster one).
Per size:

- job: ``training.run`` with 2 Horovod processes (each reads its shard
  through Petastorm); the training-step rate rank 0 times over every epoch
  after the first (which also traces the graph and fills the cache), and
  rank 0's profile of 10 steps of epoch 2, split by op kind;
- baseline: one process, the same model and precision, the training tensors
  already in memory, a warm-up epoch, then ``model.fit`` on both cores;
- ``ratio`` = job / baseline; ``fraction_of_matmul_ceiling`` = the model's
  training FLOPs per image (counted from its layers) x the job's rate /
  the ceiling; ``seconds_per_megapixel`` and, against the smallest size,
  ``pixel_cost_vs_smallest``.

One JSON line.

    scripts/bench.sh train [--data ../shared/data/ham10000] [--size 64 96 128] [--epochs 3]
"""
import dataclasses
import sys
import time
from pathlib import Path

from oncolake import cli, evaluation, ingest, preprocess, profiling, registry, training

ROOT = Path(__file__).resolve().parents[2]


def baseline_rate(images, labels, pre: dict, cfg, epochs: int) -> float:
    """Images/s of one process fitting the same model on tensors in memory."""
    import tensorflow as tf
    model = training.build_model(images.shape[1], pre["normalisation"]["mean"], pre["normalisation"]["std"],
                                 cfg.train)
    model.compile(optimizer=tf.keras.optimizers.Adam(cfg.train.learning_rate), loss="binary_crossentropy")
    model.fit(images[:256], labels[:256], batch_size=cfg.train.batch_size, epochs=1, verbose=0)  # warm-up
    start = time.perf_counter()
    model.fit(images, labels, batch_size=cfg.train.batch_size, epochs=epochs, verbose=0)
    return len(images) * epochs / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = cli.parser("bench-train", __doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "busi"))
    p.add_argument("--size", type=int, nargs="+", default=[64])
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)
    return cli.run_bench("bench-train", args, lambda spark, cfg, work: _measure(spark, cfg, work, args))


def _measure(spark, cfg, work: Path, args) -> dict:
    """The benchmark's runs in ``work`` (a scratch folder); returns the figures."""
    data = Path(args.data).resolve()
    cfg = dataclasses.replace(
        cfg, lake=str(work / "lake"),
        train=dataclasses.replace(cfg.train, epochs=args.epochs, num_proc=2, patience=args.epochs + 1,
                                  profile_steps=10))
    ingest.run(spark, cfg, dataset="bench", source=str(data), labels=str(data / "labels.csv"))
    ceiling = profiling.compute_ceiling()
    sizes = {}
    for size in sorted(args.size):
        sized = dataclasses.replace(cfg, preprocess=dataclasses.replace(cfg.preprocess, size=size))
        pre = preprocess.run(spark, sized, dataset="bench")
        job = training.run(spark, sized, dataset="bench", tensors_version=pre["version"])
        # the single process trains in the precision the job chose
        sized = dataclasses.replace(sized, train=dataclasses.replace(sized.train, precision=job["precision"]))
        _, images, labels = evaluation.read_split(registry.petastorm_url(pre["output"] + "/split=train"))
        single = baseline_rate(images, labels, pre, sized, args.epochs)
        flops = profiling.training_flops(
            training.build_model(size, pre["normalisation"]["mean"], pre["normalisation"]["std"], sized.train))
        rate = job["images_per_sec"]
        sizes[str(size)] = {
            "train_images": int(len(images)), "job_images_per_s": round(rate, 1),
            "in_memory_single_process_images_per_s": round(single, 1), "ratio": round(rate / single, 3),
            "training_gflop_per_image": round(flops["training"] / 1e9, 3),
            "job_gflops": round(flops["training"] * rate / 1e9, 1),
            "fraction_of_matmul_ceiling": round(flops["training"] * rate / 1e9 / ceiling["ceiling_gflops"], 3),
            "seconds_per_megapixel": round(1e6 / (rate * size * size), 3),
            "epoch_train_seconds": job["epoch_train_seconds"], "ranks_identical": job["ranks_identical"],
            "precision": job["precision"], "precision_chosen_by": job["precision_chosen_by"],
            "profile_fraction": job.get("profile", {}).get("fraction"),
            "profile_busy": job.get("profile", {}).get("busy")}
    smallest = sizes[str(min(args.size))]["seconds_per_megapixel"]
    for figures in sizes.values():
        figures["pixel_cost_vs_smallest"] = round(figures["seconds_per_megapixel"] / smallest, 3)
    return {"bench": "train", "data": data.name, "epochs": args.epochs,
            **ceiling,
            "targets": {"fraction_of_matmul_ceiling_96": 0.7, "ratio": 0.9, "pixel_cost_128_vs_64": 1.25},
            "sizes": sizes}


if __name__ == "__main__":
    sys.exit(main())
