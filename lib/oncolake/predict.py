"""Predict single images with a registered model, without Spark (scripts/predict.sh).

    scripts/predict.sh --lake lake --dataset busi [--model 2] [--explain] IMAGE [IMAGE ...]

Prints one line per image (probability of malignant, label at the model's
stored threshold, model version; with --explain, the path of a Grad-CAM
overlay PNG) and a JSON summary last. Uses the same
validation and preprocessing as the pipeline. An image of a modality the
model was not trained on (a DICOM file's own Modality; --modality, else the
dataset's, for other files) is refused: `modality_mismatch`. Research use only.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from oncolake import cli, explain, imaging, lake, registry
from oncolake.config import Config
from oncolake.errors import InputError


def read_lake_file(cfg: Config, uri: str) -> bytes:
    """A small file of the lake: local path, file: URI, or hdfs: through WebHDFS."""
    fs, path = _fs(cfg, uri)
    if not fs.isfile(path):
        raise InputError(f"{uri} does not exist")
    return fs.cat_file(path)


def _fs(cfg: Config, uri: str):
    try:
        return lake.python_fs(uri, cfg.hdfs)
    except ValueError as err:
        raise InputError(f"cannot read {uri} without Spark: {err}") from err


def list_versions(cfg: Config, root: str) -> list[int]:
    fs, path = _fs(cfg, root)
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)] if fs.isdir(path) else []
    return sorted(int(n[1:]) for n in names if n.startswith("v") and n[1:].isdigit())


@dataclass(frozen=True)
class Registered:
    """A registered model, verified and loaded, with what predicting needs."""
    dataset: str
    version: int
    model_dir: str
    record: dict[str, Any]
    metrics: dict[str, Any]
    model: Any

    @property
    def threshold(self) -> float:
        return float(self.metrics["threshold"])

    def modalities(self, cfg: Config) -> list[str]:
        return registry.modalities(self.record, cfg.ingest.modality(self.dataset))

    def tensor(self, data: bytes) -> np.ndarray:
        """The model's input for an image's bytes: the pipeline's own preprocessing."""
        return imaging.prepare(data, self.record["size"], self.record["resize"], **registry.pixel_options(self.record))


def lake_root(cfg: Config) -> str:
    """The configured lake as a URI the Python file systems take (a plain path made absolute)."""
    return cfg.lake if "://" in cfg.lake or cfg.lake.startswith("file:") else str(Path(cfg.lake).resolve())


def newest_evaluated(cfg: Config, dataset: str) -> int:
    """The newest version with an operating threshold (evaluate has run on it)."""
    root = lake.models_root(lake_root(cfg), dataset)
    found = list_versions(cfg, root)
    if not found:
        raise InputError(f"no registered model under {root}")
    fs, path = _fs(cfg, root)
    for version in reversed(found):
        if fs.isfile(f"{path}/v{version}/metrics.json"):
            return version
    raise InputError(f"no model under {root} has been evaluated (no threshold): run evaluate first")


def load(cfg: Config, dataset: str, version: int | None = None) -> Registered:
    """The dataset's model ``version`` (default the newest with a threshold), checksum-verified."""
    root = lake.models_root(lake_root(cfg), dataset)
    version = version or newest_evaluated(cfg, dataset)
    model_dir = f"{root}/v{version}"
    record = json.loads(read_lake_file(cfg, f"{model_dir}/model.json"))
    metrics = json.loads(read_lake_file(cfg, f"{model_dir}/metrics.json"))
    checksums = f"{model_dir}/{registry.CHECKSUMS}"
    fs, path = _fs(cfg, checksums)
    model = registry.load_model_bytes(registry.verified(
        read_lake_file(cfg, f"{model_dir}/model.keras"),
        read_lake_file(cfg, checksums) if fs.isfile(path) else None, model_dir))
    return Registered(dataset, version, model_dir, record, metrics, model)


def _write_overlay(model, tensor: np.ndarray, folder: Path, stem: str, written: set[Path]) -> Path:
    """Grad-CAM over the model's input image, as NAME.gradcam.png (NAME-2... when names repeat)."""
    import cv2
    folder.mkdir(parents=True, exist_ok=True)
    target, n = folder / f"{stem}.gradcam.png", 1
    while target in written:
        n += 1
        target = folder / f"{stem}-{n}.gradcam.png"
    written.add(target)
    image = explain.overlay(tensor, explain.gradcam(model, np.expand_dims(tensor, 0))[0])
    if not cv2.imwrite(str(target), image[:, :, ::-1]):
        raise InputError(f"could not write {target}")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("predict", __doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", type=int, help="model version (default: the newest)")
    p.add_argument("--explain", action="store_true",
                   help="also write a Grad-CAM overlay PNG per image (NAME.gradcam.png in --explain-dir)")
    p.add_argument("--explain-dir", default=".", help="where --explain writes its PNGs (default: here)")
    p.add_argument("--modality", help="modality of non-DICOM images (default: the dataset's, ingest.modalities)")
    p.add_argument("images", nargs="+")
    args = p.parse_args(argv)
    try:
        cfg = cli.load_config(args)
        loaded = load(cfg, args.dataset, args.model)
    except Exception as err:  # every failure ends as one line and an exit code
        return cli.fail("predict", err)
    version, threshold, model = loaded.version, loaded.threshold, loaded.model
    known = loaded.modalities(cfg)
    failures = mismatched = 0
    results = []
    written: set[Path] = set()
    for name in args.images:
        path = Path(name)
        data = path.read_bytes() if path.is_file() else b""
        verdict = imaging.inspect(data, cfg.ingest.max_pixels, cfg.ingest.min_side) if data else None
        if verdict is None or not verdict.ok:
            reason = "not a readable file" if verdict is None else f"{verdict.reason}: {verdict.detail}"
            print(f"{name}\terror\t{reason}", flush=True)
            failures += 1
            continue
        kind = imaging.dicom_modality(data) or args.modality or cfg.ingest.modality(args.dataset)
        if kind not in known:
            print(f"{name}\terror\tmodality_mismatch: a {kind} image; model v{version} was trained on "
                  f"{', '.join(known)}", flush=True)
            failures += 1
            mismatched += 1
            continue
        tensor = loaded.tensor(data)
        probability = float(model.predict(np.expand_dims(tensor, 0), verbose=0).ravel()[0])
        label = "malignant" if probability >= threshold else "benign"
        result = {"image": name, "probability": round(probability, 4), "label": label}
        line = f"{name}\t{probability:.4f}\t{label}\tmodel v{version}"
        if args.explain:
            result["explanation"] = str(_write_overlay(model, tensor, Path(args.explain_dir), path.stem, written))
            line += f"\t{result['explanation']}"
        results.append(result)
        print(line, flush=True)
    cli.emit({"job": "predict", "dataset": args.dataset, "model_version": version, "threshold": threshold,
              "predicted": len(results), "errors": failures, "modality_mismatch": mismatched,
              "notice": "research use only; not a diagnosis"})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
