"""Small synthetic labelled image folders for demos and tests (no real patients).

Each "patient" has a few images of one lesion-like blob on skin-like noise;
malignant blobs are darker and irregular, benign ones lighter and round, so
a model can learn something. Shapes vary so resize policies matter.
"""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np


def lesion(rng: np.random.Generator, malignant: bool) -> np.ndarray:
    """One BGR uint8 image of random size with a blob in it."""
    h, w = int(rng.integers(24, 64)), int(rng.integers(24, 64))
    image = np.clip(rng.normal((150, 170, 200), 12, (h, w, 3)), 0, 255).astype(np.uint8)
    centre = (int(w / 2 + rng.integers(-3, 4)), int(h / 2 + rng.integers(-3, 4)))
    radius = max(3, int(min(h, w) * rng.uniform(0.2, 0.35)))
    if malignant:
        points = [(int(centre[0] + radius * rng.uniform(0.5, 1.4) * np.cos(a)),
                   int(centre[1] + radius * rng.uniform(0.5, 1.4) * np.sin(a)))
                  for a in np.linspace(0, 2 * np.pi, 9, endpoint=False)]
        cv2.fillPoly(image, [np.array(points, np.int32)], tuple(int(v) for v in rng.integers(20, 70, 3)))
    else:
        cv2.circle(image, centre, radius, tuple(int(v) for v in rng.integers(90, 140, 3)), -1)
    return image


def write_dataset(folder: str | Path, groups: int, per_group: int, seed: int, start: int = 0,
                  malignant_every: int = 4, with_groups: bool = True) -> Path:
    """Write (or extend) a folder of PNGs plus labels.csv (path, label[, patient_id]).

    Patient ``g`` is malignant when ``g % malignant_every == 0``. Without
    groups the CSV has no patient column (like BUSI).
    """
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    new = not (folder / "labels.csv").exists()
    with open(folder / "labels.csv", "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["path", "label", "patient_id"][:3 if with_groups else 2])
        for g in range(start, start + groups):
            malignant = g % malignant_every == 0
            for i in range(per_group):
                name = f"p{g:03d}_{i}.png"
                ok, buf = cv2.imencode(".png", lesion(rng, malignant))
                if not ok:
                    raise ValueError(f"could not encode {name}")
                (folder / name).write_bytes(buf.tobytes())
                row = [name, "malignant" if malignant else "benign", f"P{g:03d}"]
                writer.writerow(row[:3 if with_groups else 2])
    return folder


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="write a synthetic labelled image folder")
    p.add_argument("folder")
    p.add_argument("--groups", type=int, default=60)
    p.add_argument("--per-group", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    write_dataset(args.folder, args.groups, args.per_group, args.seed)
    print(args.folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
