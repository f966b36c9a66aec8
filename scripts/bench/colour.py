"""Shades-of-grey colour constancy: what it costs per image, and what it does to two sources' colours.

Measured in this one invocation on the same bytes (up to ``--limit`` images
of each folder, read once, not timed):

- ``imaging.prepare`` at ``--size`` without colour constancy (the baseline)
  and with ``shades_of_grey=--p``, alternating which goes first, ``--repeat``
  rounds; the medians and their ratio (``ratio``: baseline / with). Both
  are timed in this process's CPU time (one thread: OpenCV's are set to 1),
  which other work on a shared machine disturbs far less than wall time;
- each image's chromaticity (its mean R, G and B over their sum), averaged
  per folder: the distance between the two folders' means, and the mean
  distance of an image from its own folder's mean, without and with the
  correction. A lighting or camera difference between two sources shows as
  the first; the correction should shrink both.

    scripts/bench.sh colour [--data ../shared/data/ham10000] [--other ../shared/data/isic_uda1] [--size 96]
"""
import csv
import time
from pathlib import Path

import numpy as np

from oncolake import cli, imaging

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    p = cli.parser("bench-colour", __doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000"))
    p.add_argument("--other", default=str(ROOT.parent / "shared" / "data" / "isic_uda1"))
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--p", type=int, default=6, help="the Minkowski norm (preprocess.shades_of_grey)")
    p.add_argument("--limit", type=int, default=2000, help="images read from each folder")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    return cli.run_bench("bench-colour", args, lambda spark, cfg, work: _measure(args))


def _read(folder: str, limit: int) -> list[bytes]:
    with open(Path(folder, "labels.csv"), newline="") as handle:
        paths = [row["path"] for row in csv.DictReader(handle)][:limit]
    return [Path(folder, path).read_bytes() for path in paths]


def _chromaticity(tensors: list[np.ndarray]) -> np.ndarray:
    means = np.array([t.reshape(-1, 3).mean(axis=0) for t in tensors])
    return means / np.maximum(means.sum(axis=1, keepdims=True), 1e-9)


def _measure(args) -> dict:
    import cv2
    cv2.setNumThreads(1)  # as in the jobs' Python workers
    data, other = _read(args.data, args.limit), _read(args.other, args.limit)
    timings: dict[int, list[float]] = {0: [], args.p: []}
    for round_ in range(args.repeat):
        for p in ((0, args.p) if round_ % 2 == 0 else (args.p, 0)):
            start = time.process_time()
            for content in data:
                imaging.prepare(content, args.size, shades_of_grey=p)
            timings[p].append(time.process_time() - start)
    plain_s, corrected_s = float(np.median(timings[0])), float(np.median(timings[args.p]))
    colours = {}
    for name, p in (("without", 0), ("with", args.p)):
        first = _chromaticity([imaging.prepare(c, args.size, shades_of_grey=p) for c in data])
        second = _chromaticity([imaging.prepare(c, args.size, shades_of_grey=p) for c in other])
        colours[name] = {
            "means": [np.round(first.mean(axis=0), 4).tolist(), np.round(second.mean(axis=0), 4).tolist()],
            "between_sources": round(float(np.linalg.norm(first.mean(axis=0) - second.mean(axis=0))), 4),
            "within_source": [round(float(np.linalg.norm(c - c.mean(axis=0), axis=1).mean()), 4)
                              for c in (first, second)]}
    return {"images": [len(data), len(other)], "size": args.size, "p": args.p,
            "baseline_images_per_cpu_s": round(len(data) / plain_s, 1),
            "corrected_images_per_cpu_s": round(len(data) / corrected_s, 1),
            "ratio": round(plain_s / corrected_s, 3), "chromaticity": colours}


if __name__ == "__main__":
    raise SystemExit(main())
