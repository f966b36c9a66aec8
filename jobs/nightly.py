"""The nightly run: ingest new images from nightly.incoming, score them, log the night.

Reads the folder nightly.incoming (and nightly.labels if set); writes
bronze.images, gold.predictions, gold.nightly_runs and LAKE/reports/nightly.html.

    scripts/nightly.sh --lake lake --set nightly.dataset=busi --set nightly.incoming=/data/incoming
"""
import sys

from oncolake import cli, nightly, session


def main(argv=None) -> int:
    p = cli.parser("nightly", __doc__)
    p.add_argument("--model", type=int, help="model version (default: the newest)")
    args = p.parse_args(argv)
    spark = None
    try:
        cfg = cli.load_config(args)
        spark = session.build("nightly", cfg)
        cli.emit(nightly.run(spark, cfg, model_version=args.model))
        return 0
    except Exception as err:  # every failure ends as one line and an exit code
        return cli.fail("nightly", err)
    finally:
        if spark is not None:
            session.stop(spark)


if __name__ == "__main__":
    sys.exit(main())
