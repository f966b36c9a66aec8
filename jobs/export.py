"""Export a dataset's predictions to PostgreSQL (applications read them there).

Upserts LAKE/gold/predictions joined to the images' metadata (never the
bytes) into oncolake.predictions, only the partitions new or changed since
the last export, one transaction per partition. A rerun writes nothing.
The URL carries no password (PGPASSWORD or serve.database_passfile).

    scripts/submit.sh export --lake lake --dataset busi [--to postgresql://oncolake@127.0.0.1:5432/oncolake]
"""
import sys

from oncolake import cli, export


def main(argv=None) -> int:
    p = cli.parser("export", __doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--to", help="postgresql://USER@HOST:PORT/DATABASE (default: serve.database_url)")
    args = p.parse_args(argv)
    return cli.run_job("export", args, lambda spark, cfg: export.run(spark, cfg, dataset=args.dataset, to=args.to))


if __name__ == "__main__":
    sys.exit(main())
