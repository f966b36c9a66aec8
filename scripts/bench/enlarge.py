"""Make a larger image folder from a labelled one, for benchmarks at scale.

Each image is written ``--copies`` times: as it is, then flipped left-right,
top-bottom and both (re-encoded as JPEG, quality 95), so every copy has
different bytes (ingest keeps each as a distinct image) and the same label
and group. The labels CSV is written to match. Output goes to a folder you
name, outside the repository; the source is only read.

    .venv/bin/python scripts/bench/enlarge.py ../shared/data/ham10000 /tmp/ham10000x4 --copies 4
"""
import argparse
import csv
import sys
from pathlib import Path

import cv2

FLIPS = (None, 1, 0, -1)  # as is; cv2.flip codes: left-right, top-bottom, both


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("--copies", type=int, default=4, choices=range(1, len(FLIPS) + 1))
    args = p.parse_args(argv)
    source, target = Path(args.source), Path(args.target)
    with open(source / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "path" not in rows[0]:
        print(f"enlarge: {source}/labels.csv has no path column", file=sys.stderr)
        return 2
    out = []
    for row in rows:
        data = (source / row["path"]).read_bytes() if (source / row["path"]).is_file() else None
        if data is None:
            continue
        image = cv2.imread(str(source / row["path"]), cv2.IMREAD_COLOR)
        for copy, flip in enumerate(FLIPS[:args.copies]):
            rel = Path(row["path"])
            rel = rel.with_name(f"{rel.stem}_f{copy}{rel.suffix}") if copy else rel
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if flip is None:
                path.write_bytes(data)
            else:
                cv2.imwrite(str(path), cv2.flip(image, flip), [cv2.IMWRITE_JPEG_QUALITY, 95])
            out.append({**row, "path": rel.as_posix()})
    with open(target / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(out)
    print(f"{len(out)} images in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
