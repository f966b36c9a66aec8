"""Score a dataset's bronze images that have no prediction yet (the nightly job).

Reads LAKE/bronze/images (only the ingest-date partitions not fully scored
for the model, or --ingest-date, or --all) and LAKE/models/NAME/v<M>/
(the newest unless --model; it needs evaluate's threshold); inserts into
LAKE/gold/predictions. A rerun adds nothing.

    scripts/submit.sh score --lake lake --dataset busi [--model 2] [--ingest-date 2026-11-21 | --all]
"""
import sys

from oncolake import cli, scoring


def main(argv=None) -> int:
    p = cli.parser("score", __doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", type=int, help="model version (default: the newest)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--ingest-date", help="score this partition only (YYYY-MM-DD)")
    which.add_argument("--all", action="store_true", help="look at every partition, scored or not")
    args = p.parse_args(argv)
    return cli.run_job("score", args, lambda spark, cfg: scoring.run(
        spark, cfg, dataset=args.dataset, model_version=args.model, ingest_date=args.ingest_date,
        score_all=args.all))


if __name__ == "__main__":
    sys.exit(main())
