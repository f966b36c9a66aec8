"""The nightly run: ingest new images from nightly.incoming or nightly.topic, score them, log the night.

Reads the folder nightly.incoming (and nightly.labels if set), or what was
published to the Kafka topic nightly.topic since the last night; writes
bronze.images, gold.predictions, gold.nightly_runs and LAKE/reports/nightly.html.

    scripts/nightly.sh --lake lake --set nightly.dataset=busi --set nightly.incoming=/data/incoming
"""
import sys

from oncolake import cli, nightly


def main(argv=None) -> int:
    p = cli.parser("nightly", __doc__)
    p.add_argument("--model", type=int, help="model version (default: the newest)")
    args = p.parse_args(argv)
    return cli.run_job("nightly", args, lambda spark, cfg: nightly.run(spark, cfg, model_version=args.model))


if __name__ == "__main__":
    sys.exit(main())
