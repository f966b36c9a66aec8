"""Preprocess a dataset's labelled bronze images into a versioned tensor dataset.

Reads LAKE/bronze/images (one pinned Delta version); writes
LAKE/silver/tensors/NAME/v<N>/split=<train|val|test>/ (Petastorm datasets of
uint8 SIZE x SIZE x 3 tensors) with manifest.json, and LAKE/silver/splits
(image -> split lineage). Same data and configuration: nothing written, the
existing version reported. Exit 3 if there is nothing to learn from.

    scripts/submit.sh preprocess --lake lake --dataset busi --size 128 \\
        --set preprocess.balance=oversample
"""
import sys

from oncolake import cli, preprocess


def main(argv=None) -> int:
    p = cli.parser("preprocess", __doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--size", type=int, help="output side in pixels (preprocess.size)")
    args = p.parse_args(argv)
    if args.size is not None:
        args.set.append(f"preprocess.size={args.size}")
    return cli.run_job("preprocess", args, lambda spark, cfg: preprocess.run(
        spark, cfg, dataset=args.dataset))


if __name__ == "__main__":
    sys.exit(main())
