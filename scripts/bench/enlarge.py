"""Make a larger image folder from a labelled one, for benchmarks at scale.

Each image is written ``--copies`` times: as it is, then flipped left-right,
top-bottom and both (re-encoded as JPEG, quality 95), so every copy has
different bytes (ingest keeps each as a distinct image) and the same label
and group. The labels CSV is written to match. Output goes to a folder you
name, outside the repository; the source is only read.

``--resize WxH`` instead writes every copy at that size (bicubic, JPEG
``--quality``), the many-megapixel images real dermoscopy arrives as;
``--limit N`` keeps the first N source images (labels.csv order).

    .venv/bin/python scripts/bench/enlarge.py ../shared/data/ham10000 /tmp/ham10000x4 --copies 4
    .venv/bin/python scripts/bench/enlarge.py ../shared/data/ham10000 /tmp/ham12mp --copies 1 \
        --resize 4000x3000 --quality 90 --limit 2000
"""
import argparse
import csv
import sys
from pathlib import Path

import cv2

FLIPS = (None, 1, 0, -1)  # as is; cv2.flip codes: left-right, top-bottom, both


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit()) or int(width) < 1 or int(height) < 1:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 4000x3000, got {text!r}")
    return int(width), int(height)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("--copies", type=int, default=4, choices=range(1, len(FLIPS) + 1))
    p.add_argument("--resize", type=_size, default=None, metavar="WxH")
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args(argv)
    source, target = Path(args.source), Path(args.target)
    with open(source / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:args.limit]
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
            if flip is None and args.resize is None:
                path.write_bytes(data)
            else:
                copy_image = image if flip is None else cv2.flip(image, flip)
                if args.resize is not None:
                    copy_image = cv2.resize(copy_image, args.resize, interpolation=cv2.INTER_CUBIC)
                cv2.imwrite(str(path.with_suffix(".jpg")), copy_image, [cv2.IMWRITE_JPEG_QUALITY, args.quality])
                rel = rel.with_suffix(".jpg")
            out.append({**row, "path": rel.as_posix()})
    with open(target / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(out)
    print(f"{len(out)} images in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
