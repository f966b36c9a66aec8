"""Benchmark Horovod-on-Spark training against a plain single-process model.fit.

Set-up (not timed): ingest and preprocess --data into a fresh lake. Measured:
training images/s of ``training.run`` with 2 Horovod processes, as rank 0
times its training steps (every epoch after the first, which also traces the
graph; validation excluded). Baseline: one process, the same model, tensors
already in memory (read once through Petastorm), one warm-up epoch on 64
images, then ``model.fit`` with all cores, timed whole. Same epochs and batch
size; one JSON line with both rates and the ratio.

    scripts/bench.sh train [--data ../shared/data/busi] [--size 64] [--epochs 4]
"""
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

from oncolake import cli, evaluation, ingest, preprocess, registry, session, training

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    p = cli.parser("bench-train", __doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "busi"))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=4)
    args = p.parse_args(argv)
    cfg = cli.load_config(args)
    spark = session.build("bench-train", cfg)
    work = Path(tempfile.mkdtemp(prefix="oncolake-bench-"))
    try:
        data = Path(args.data).resolve()
        cfg = dataclasses.replace(
            cfg, lake=str(work / "lake"), preprocess=dataclasses.replace(cfg.preprocess, size=args.size),
            train=dataclasses.replace(cfg.train, epochs=args.epochs, num_proc=2, patience=args.epochs + 1))
        ingest.run(spark, cfg, dataset="bench", source=str(data), labels=str(data / "labels.csv"))
        pre = preprocess.run(spark, cfg, dataset="bench")

        summary = training.run(spark, cfg, dataset="bench")
        horovod_rate = summary["images_per_sec"]

        import tensorflow as tf
        _, images, labels = evaluation.read_split(registry.petastorm_url(pre["output"] + "/split=train"))
        model = training.build_model(args.size, pre["normalisation"]["mean"], pre["normalisation"]["std"],
                                     cfg.train)
        model.compile(optimizer=tf.keras.optimizers.Adam(cfg.train.learning_rate), loss="binary_crossentropy")
        model.fit(images[:64], labels[:64], batch_size=cfg.train.batch_size, epochs=1, verbose=0)  # warm-up
        start = time.perf_counter()
        model.fit(images, labels, batch_size=cfg.train.batch_size, epochs=args.epochs, verbose=0)
        single_rate = len(images) * args.epochs / (time.perf_counter() - start)
        cli.emit({"bench": "train", "train_images": int(len(images)), "size": args.size, "epochs": args.epochs,
                  "horovod_2proc_images_per_s": round(horovod_rate, 1),
                  "single_process_fit_images_per_s": round(single_rate, 1),
                  "ratio": round(horovod_rate / single_rate, 3), "target_ratio": 0.9,
                  "ranks_identical": summary["ranks_identical"],
                  "horovod_fit_seconds_whole": summary["fit_seconds"],
                  "horovod_epoch_train_seconds": summary["epoch_train_seconds"]})
        return 0
    except Exception as err:
        return cli.fail("bench-train", err)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        session.stop(spark)


if __name__ == "__main__":
    sys.exit(main())
