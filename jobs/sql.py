"""Run one SQL query against the lake's catalog tables and print the result.

Declares oncolake.images, oncolake.predictions, oncolake.quarantine and
oncolake.latest_predictions over LAKE, runs QUERY, prints the rows as a
table, then the one-line JSON summary.

    scripts/sql.sh --lake lake "SELECT dataset, count(*) FROM oncolake.latest_predictions GROUP BY dataset"
"""
import sys

from oncolake import catalog, cli, lake


def main(argv=None) -> int:
    p = cli.parser("sql", __doc__)
    p.add_argument("query", help="a Spark SQL query")
    p.add_argument("--limit", type=int, default=1000, help="at most this many rows are printed")
    args = p.parse_args(argv)

    def query(spark, cfg) -> dict:
        declared = catalog.register(spark, lake.qualify(spark, cfg.lake))
        result = spark.sql(args.query)
        rows = result.limit(args.limit + 1).collect()
        print(result._jdf.showString(min(len(rows), args.limit), 0, False), end="")
        return {"job": "sql", "rows": min(len(rows), args.limit), "truncated": len(rows) > args.limit,
                "tables": declared}

    return cli.run_job("sql", args, query)


if __name__ == "__main__":
    sys.exit(main())
