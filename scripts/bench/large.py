"""Benchmark many-megapixel JPEGs: decoding at reduced DCT scale against full-size decoding.

Set-up (not timed): ``--count`` HAM10000 images enlarged to ``--resize``
(4000x3000, JPEG quality 90, by ``enlarge.py``) unless ``--large`` names such
a folder already, then ingested into a fresh lake. Measured in this one
invocation, each pair on the same lake and bytes:

- the preprocess job with ``preprocess.reduced_decode`` false, then true;
- the score job (every image, a fresh predictions table) with a model whose
  record says full-size decoding, then one whose record says reduced;
- ingest's validation (``imaging.inspect``, 1/8-scale luma decode) against the
  full-size decode it replaced, in this process;
- ``tensor_mad``: the mean absolute difference, in grey levels, between the
  reduced and the full-size tensors of the same images (and its maximum);
- memory: during each job, the peak resident set of the Spark JVM (driver
  and, in local mode, executor) and of its Python processes, sampled from
  /proc every 0.2 s (``peak_rss_mb``, :class:`oncolake.profiling.PeakRss`).

    scripts/bench.sh large [--count 2000] [--resize 4000x3000] [--large DIR] [--size 128]
"""
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from oncolake import cli, imaging, ingest, lake, preprocess, profiling, registry, scoring, training

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    p = cli.parser("bench-large", __doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000"))
    p.add_argument("--large", default=None, help="a folder of large JPEGs with labels.csv (made if absent)")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--resize", default="4000x3000")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--sample", type=int, default=200, help="images for the in-process comparisons")
    args = p.parse_args(argv)
    return cli.run_bench("bench-large", args, lambda spark, cfg, work: _measure(spark, cfg, work, args))


def _measure(spark, cfg, work: Path, args) -> dict:
    """The benchmark's runs in ``work`` (a scratch folder); returns the figures."""
    folder = Path(args.large).resolve() if args.large else work / "large"
    if not args.large:
        cli.log.info("writing %d images of %s into %s", args.count, args.resize, folder)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / "enlarge.py"), args.data, str(folder),
                        "--copies", "1", "--resize", args.resize, "--quality", "90",
                        "--limit", str(args.count)], check=True, stdout=sys.stderr)
    files = sorted(folder.rglob("*.jpg"))
    mean_bytes = sum(f.stat().st_size for f in files) / max(len(files), 1)
    cfg = dataclasses.replace(cfg, lake=str(work / "lake"),
                              preprocess=dataclasses.replace(cfg.preprocess, size=args.size))
    size, policy = cfg.preprocess.size, cfg.preprocess.resize
    peaks, jvm = {}, int(spark.sparkContext._jvm.ProcessHandle.current().pid())
    start = time.perf_counter()
    with profiling.PeakRss(jvm) as peak:
        ingested = ingest.run(spark, cfg, dataset="large", source=str(folder), labels=str(folder / "labels.csv"))
    ingest_s = time.perf_counter() - start
    peaks["ingest"] = peak.result()
    cli.log.info("ingested %s in %.1f s", ingested.get("ingested"), ingest_s)

    times, images = {}, {}
    for reduced in (False, True):
        run_cfg = dataclasses.replace(cfg, preprocess=dataclasses.replace(cfg.preprocess, reduced_decode=reduced))
        start = time.perf_counter()
        with profiling.PeakRss(jvm) as peak:
            summary = preprocess.run(spark, run_cfg, dataset="large")
        times[("preprocess", reduced)] = time.perf_counter() - start
        peaks[f"preprocess_{'reduced' if reduced else 'full'}"] = peak.result()
        images["preprocess"] = summary["train"] + summary["val"] + summary["test"]
        cli.log.info("preprocess reduced=%s: %.1f s", reduced, times[("preprocess", reduced)])

    model = training.build_model(size, [128.0] * 3, [64.0] * 3, cfg.train)
    model.save(work / "model.keras")
    root = lake.qualify(spark, cfg.lake)
    for reduced in (False, True):
        registry.register(spark, root, "large", {
            "model.keras": (work / "model.keras").read_bytes(),
            "model.json": json.dumps({"size": size, "resize": policy, "pixels": {"reduced": reduced}}).encode(),
            "metrics.json": json.dumps({"threshold": 0.5}).encode()})
        lake.delete(spark, lake.table_uri(root, "gold.predictions"))
        start = time.perf_counter()
        with profiling.PeakRss(jvm) as peak:
            images["score"] = scoring.run(spark, cfg, dataset="large", score_all=True)["scored"]
        times[("score", reduced)] = time.perf_counter() - start
        peaks[f"score_{'reduced' if reduced else 'full'}"] = peak.result()
        cli.log.info("score reduced=%s: %.1f s", reduced, times[("score", reduced)])

    sample = [f.read_bytes() for f in files[:args.sample]]
    full_s = _time(lambda: [_inspect_full_size(b) for b in sample])
    reduced_s = _time(lambda: [imaging.inspect(b, cfg.ingest.max_pixels, cfg.ingest.min_side) for b in sample])
    mads = [np.abs(imaging.prepare(b, size, policy).astype(np.int16)
                   - imaging.prepare(b, size, policy, reduced=False).astype(np.int16)).mean() for b in sample]
    header = imaging.read_header(sample[0])

    speedup = lambda job: times[(job, False)] / times[(job, True)]  # noqa: E731
    return {"bench": "large", "images": len(files), "width": header.width, "height": header.height,
            "mean_file_mb": round(mean_bytes / 1e6, 2), "size": size, "policy": policy,
            "reduction": imaging.reduction(header.width, header.height, size, policy),
            "ingest_images_per_s": round(len(files) / ingest_s, 2),
            "preprocess_full_s": round(times[("preprocess", False)], 1),
            "preprocess_reduced_s": round(times[("preprocess", True)], 1),
            "preprocess_speedup": round(speedup("preprocess"), 2),
            "score_full_s": round(times[("score", False)], 1),
            "score_reduced_s": round(times[("score", True)], 1),
            "score_speedup": round(speedup("score"), 2),
            "validation_speedup": round(full_s / reduced_s, 2),
            "tensor_mad": round(float(np.mean(mads)), 3), "tensor_mad_max": round(float(np.max(mads)), 3),
            "targets": {"preprocess_speedup": ">= 3", "score_speedup": ">= 3", "tensor_mad": "<= 2"},
            "peak_rss_mb": peaks, "driver_memory": spark.conf.get("spark.driver.memory", "default"),
            "images_scored": images["score"], "tensors": images["preprocess"],
            "master": spark.sparkContext.master}


def _inspect_full_size(data: bytes) -> bool:
    """What ingest's validation decoded before: every pixel at full size."""
    import cv2
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is not None


def _time(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
