"""Where a model's external gap comes from, measured on registered models without retraining.

For each registered model (``--model LAKE:DATASET:VERSION``, repeatable):

- its ROC AUC on its own test split, and on the part of it whose ``--attribute``
  (bronze's attributes, e.g. ``dx``) is one of ``--classes``: the internal
  figure for the external set's case mix (ISIC UDA-1 is melanoma against
  nevus only, HAM10000's test split has five other diagnoses);
- its ROC AUC on every labelled image of ``--external`` (a folder with a
  labels.csv, as ingest takes it), prepared as the model's record says
  (``recorded``), with each other resize policy, with the centred square
  zoomed in (``zoom_in_F``: that fraction of its side kept; ``zoom_in_1.0``
  is the plain centred square from the full-size decode, the zooms' own
  reference) and zoomed out
  (``zoom_out_F``: the square grown by reflecting its border; not black bars);
- for each variant, the paired bootstrap interval of its AUC minus the
  recorded one (the same resampled images for both).

A case-mix gap shows as a subset AUC near the external one; an aspect gap as
another policy doing better; a scale gap as a zoom doing better. The cost of
each variant is its AUC, not its time: nothing here is timed. One JSON line.

    scripts/bench.sh gap --model var/results-ham10000:ham10000:2 --external ../shared/data/isic_uda1
"""
import csv
from pathlib import Path

import numpy as np

from oncolake import cli, evaluation, imaging, lake, metrics, registry

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    p = cli.parser("bench-gap", __doc__)
    p.add_argument("--model", action="append", required=True, metavar="LAKE:DATASET:VERSION")
    p.add_argument("--external", default=str(ROOT.parent / "shared" / "data" / "isic_uda1"),
                   help="a folder with labels.csv (path, label) and the images")
    p.add_argument("--attribute", default="dx", help="the bronze attribute the subset is chosen by")
    p.add_argument("--classes", nargs="+", default=["mel", "nv"], help="the subset: the external set's case mix")
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args(argv)
    return cli.run_bench("bench-gap", args, lambda spark, cfg, work: _measure(spark, cfg, args))


def _external(folder: str, positive: set[str]) -> tuple[list[bytes], np.ndarray]:
    with open(Path(folder, "labels.csv"), newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("label")]
    return ([Path(folder, r["path"]).read_bytes() for r in rows],
            np.asarray([r["label"].lower() in positive for r in rows], np.int64))


def _square(image: np.ndarray, keep: float) -> np.ndarray:
    height, width = image.shape[:2]
    side = int(min(height, width) * keep)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top:top + side, left:left + side]


def _zoom_out(image: np.ndarray, grow: float) -> np.ndarray:
    import cv2
    square = _square(image, 1.0)
    border = int(square.shape[0] * (grow - 1) / 2)
    return cv2.copyMakeBorder(square, border, border, border, border, cv2.BORDER_REFLECT_101)


def _variants(record: dict) -> dict[str, tuple[str | None, object]]:
    """name -> (a resize policy, or None and a transform of the full-size image to a square)."""
    recorded = record["resize"]
    out = {"recorded": (recorded, None)}
    out |= {policy: (policy, None) for policy in imaging.RESIZE_POLICIES if policy != recorded}
    out |= {f"zoom_in_{f}": (None, lambda im, f=f: _square(im, f)) for f in (1.0, 0.9, 0.8, 0.7)}
    out |= {f"zoom_out_{f}": (None, lambda im, f=f: _zoom_out(im, f)) for f in (1.2, 1.4)}
    return out


def _paired_difference(labels, base, other, rounds: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(rounds):
        pick = rng.integers(0, len(labels), len(labels))
        if labels[pick].min() == labels[pick].max():
            continue
        differences.append(metrics.roc_auc(labels[pick], other[pick]) - metrics.roc_auc(labels[pick], base[pick]))
    return [round(float(q), 4) for q in np.percentile(differences, [2.5, 97.5])]


def _measure(spark, cfg, args) -> dict:
    from pyspark.sql import functions as F
    positive = {label.lower() for label in cfg.preprocess.positive_labels}
    external, labels = _external(args.external, positive)
    models = {}
    for name in args.model:
        lake_path, dataset, version = name.rsplit(":", 2)
        lake_uri = lake.qualify(spark, lake_path)
        model_dir = registry.version_uri(lake_uri, dataset, int(version))
        record = registry.read_record(spark, model_dir)
        model = registry.load_model(spark, model_dir)
        pixels = registry.pixel_options(record)

        url = registry.petastorm_url(f"{lake.tensors_uri(lake_uri, dataset, record['tensors_version'])}/split=test")
        ids, x, y = evaluation.read_split(url, lake.petastorm_filesystem(url, cfg.hdfs))
        test = model.predict(x, batch_size=cfg.score.batch_size, verbose=0).ravel()
        bronze = (spark.read.format("delta").load(lake.table_uri(lake_uri, "bronze.images"))
                  .filter(F.col("dataset") == dataset)
                  .select("image_id", F.col("attributes").getItem(args.attribute).alias("value")).collect())
        value = {r.image_id: r.value for r in bronze}
        subset = np.isin(np.asarray([value.get(i) for i in ids], dtype=object), args.classes)

        scores, result = {}, {}
        for variant, (policy, transform) in _variants(record).items():
            # the policies from the bytes as scoring prepares them; the zooms from the full-size decode
            tensors = np.stack([imaging.prepare(content, record["size"], policy, **pixels) if transform is None
                                else imaging.finish(transform(imaging.decode_rgb(content)), record["size"],
                                                    shades_of_grey=pixels.get("shades_of_grey", 0))
                                for content in external])
            scores[variant] = model.predict(tensors, batch_size=cfg.score.batch_size, verbose=0).ravel()
            result[variant] = {"auc": round(metrics.roc_auc(labels, scores[variant]), 4)}
            if variant != "recorded":
                result[variant]["minus_recorded_95ci"] = _paired_difference(labels, scores["recorded"],
                                                                            scores[variant], args.bootstrap)
        models[name] = {
            "resize": record["resize"], "shades_of_grey": pixels.get("shades_of_grey", 0),
            "seed": (record.get("hyperparameters") or {}).get("seed"),
            "test": {"images": len(y), "auc": round(metrics.roc_auc(y, test), 4)},
            "test_subset": {"classes": args.classes, "images": int(subset.sum()), "positives": int(y[subset].sum()),
                            "auc": round(metrics.roc_auc(y[subset], test[subset]), 4),
                            "auc_95ci": metrics.bootstrap_auc_ci(y[subset], test[subset], args.bootstrap)},
            "external": {"images": len(labels), "positives": int(labels.sum()), **result}}
    return {"external": args.external, "models": models}


if __name__ == "__main__":
    raise SystemExit(main())
