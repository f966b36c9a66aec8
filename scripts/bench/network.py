"""Training speed of other networks against the configured one, as one Horovod rank here trains.

For the configured network (the baseline: ``train.*`` as resolved, with
``--dataset``'s entry) and each ``--network`` (space-separated ``train.*``
overrides on top of it, e.g. ``"train.stem=32 train.filters=[64,128,256]"``):
build it with ``training.build_model`` (augmentation included), compile it
with Adam and binary cross-entropy, warm it up on 128 random images, then time
``model.fit`` on ``--images`` random uint8 images of ``--size`` pixels (by
default the configured ``preprocess.size``), one epoch. One TensorFlow
thread, as each of the two Horovod processes on this 2-core machine has.
The networks take turns for ``--rounds`` rounds; the JSON line gives each
one's images/s per round, the ratio of its median to the baseline's, and
its weights. The data are random: this times the arithmetic, not learning.

    scripts/bench.sh network --dataset ham10000 --size 96 \\
        --network "train.stem=32 train.filters=[64,128,256]" --network "train.stem=32 train.filters=[48,96,192]"
"""
import dataclasses
import shlex
import statistics
import sys
import time

import numpy as np

from oncolake import cli, config, training


def main(argv=None) -> int:
    p = cli.parser("bench-network", __doc__)
    p.add_argument("--dataset", help="whose conf datasets entry to apply (e.g. ham10000)")
    p.add_argument("--size", type=int, help="pixels a side (default: the configured preprocess.size)")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", choices=["float32", "mixed_bfloat16"], default="mixed_bfloat16")
    p.add_argument("--network", action="append", default=[], metavar="OVERRIDES")
    args = p.parse_args(argv)
    return cli.run_bench("bench-network", args, lambda spark, cfg, work: _measure(args))


def _measure(args) -> dict:
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    networks = {"configured": []} | {spec: shlex.split(spec) for spec in args.network}
    loaded = {name: config.load(args.env, overrides=[*args.set, *extra], conf_dir=args.conf_dir,
                                dataset=args.dataset) for name, extra in networks.items()}
    configs = {name: dataclasses.replace(cfg.train, precision=args.precision) for name, cfg in loaded.items()}
    size = args.size or loaded["configured"].preprocess.size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, args.images).astype(np.float32)
    models = {}
    for name, tcfg in configs.items():
        model = training.build_model(size, [128.0] * 3, [64.0] * 3, tcfg)
        model.compile(optimizer=tf.keras.optimizers.Adam(tcfg.learning_rate), loss="binary_crossentropy")
        model.fit(images[:128], labels[:128], batch_size=tcfg.batch_size, epochs=1, verbose=0)  # traces the graph
        models[name] = model
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.fit(images, labels, batch_size=configs[name].batch_size, epochs=1, verbose=0)
            rates[name].append(args.images / (time.perf_counter() - start))
    base = statistics.median(rates["configured"])
    return {"bench": "network", "size": size, "images": args.images, "precision": args.precision,
            "threads": 1, "rounds": args.rounds,
            "networks": {name: {"filters": list(configs[name].filters), "stem": configs[name].stem,
                                "weights": int(models[name].count_params()),
                                "images_per_s": [round(r, 1) for r in rates[name]],
                                "ratio": round(statistics.median(rates[name]) / base, 3)}
                         for name in models}}


if __name__ == "__main__":
    sys.exit(main())
