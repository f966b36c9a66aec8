"""Benchmark the CNN's training step in float32 against mixed bfloat16, on this CPU.

Whether mixed bfloat16 is faster depends on the CPU, the size and the
threads, not on a CPU flag: ``train.precision: auto`` times a few steps of
each at the start of a run (``training.measure_precision``) and keeps the
faster. This measures the same thing at more length. In one process,
for each ``--size``: the model ``training.build_model`` builds from the
configuration, compiled with Adam, a warm-up epoch, then ``--steps`` training
steps of ``train.batch_size`` random uint8 images on every core, once per
precision (float32 first, then alternating, ``--rounds`` times each; the best
round counts). ``ratio`` = bfloat16's step rate / float32's: above 1,
bfloat16 is the faster one here.

One JSON line.

    scripts/bench.sh precision [--size 64 96 128] [--steps 24] [--rounds 2]
"""
import dataclasses
import time

import numpy as np

from oncolake import cli, training


def step_rate(cfg, size: int, precision: str, steps: int) -> float:
    """Training steps per second of the configured CNN at ``size`` px in ``precision``."""
    import tensorflow as tf
    tcfg = dataclasses.replace(cfg.train, precision=precision)
    model = training.build_model(size, [128.0] * 3, [50.0] * 3, tcfg)
    model.compile(optimizer=tf.keras.optimizers.Adam(tcfg.learning_rate), loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (tcfg.batch_size * steps, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 2, (len(x), 1)).astype("float32")
    model.fit(x, y, batch_size=tcfg.batch_size, epochs=1, verbose=0)  # warm-up: traces the graph
    start = time.perf_counter()
    model.fit(x, y, batch_size=tcfg.batch_size, epochs=1, verbose=0)
    return steps / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = cli.parser("bench-precision", __doc__)
    p.add_argument("--size", type=int, nargs="+", default=[64, 96, 128])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    return cli.run_bench("bench-precision", args, lambda spark, cfg, work: _measure(cfg, args))


def _measure(cfg, args) -> dict:
    cpu = open("/proc/cpuinfo").read()
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name")),
                      "unknown")
    sizes = {}
    for size in args.size:
        rates = {"float32": [], "mixed_bfloat16": []}
        for _ in range(args.rounds):
            for precision in rates:
                rates[precision].append(step_rate(cfg, size, precision, args.steps))
        best = {k: max(v) for k, v in rates.items()}
        sizes[str(size)] = {"float32_steps_per_s": round(best["float32"], 3),
                            "bfloat16_steps_per_s": round(best["mixed_bfloat16"], 3),
                            "ratio": round(best["mixed_bfloat16"] / best["float32"], 3)}
    return {"cpu": model_name,
            "batch_size": cfg.train.batch_size, "steps": args.steps, "sizes": sizes}


if __name__ == "__main__":
    raise SystemExit(main())
