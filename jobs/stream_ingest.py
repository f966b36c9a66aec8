"""Ingest images from a Kafka topic into the lake's bronze Delta table, exactly once.

Every record goes through the validation, quarantine and MERGE of folder
ingest (lib/oncolake/ingest.py); the record format is
lib/oncolake/stream/records.py (scripts/produce.sh writes it). The
checkpoint lives in the lake; a job killed at any point and started again
loses no record and writes none twice.

    scripts/submit.sh stream_ingest --lake lake --topic skin --dataset isic_uda1 --available-now
    scripts/submit.sh stream_ingest --lake lake --topic skin --trigger 30s

--available-now processes what has been published and stops (the nightly
mode); --trigger runs until SIGTERM or Ctrl-C, then reports. One JSON line
per micro-batch goes to stderr, the summary to stdout.
"""
import sys

from oncolake import cli
from oncolake.stream import ingest as stream_ingest


def main(argv=None) -> int:
    p = cli.parser("stream_ingest", __doc__)
    p.add_argument("--topic", required=True, help="Kafka topic")
    p.add_argument("--dataset", help="the topic's one dataset (default: each record's dataset header)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--available-now", action="store_true", help="process what is there, then stop (default)")
    mode.add_argument("--trigger", help="run continuously, a micro-batch every INTERVAL (30s, 500ms, 2m)")
    p.add_argument("--ingest-date", help="YYYY-MM-DD partition (default: the day each micro-batch runs, UTC)")
    args = p.parse_args(argv)
    return cli.run_job("stream_ingest", args, lambda spark, cfg: stream_ingest.run(
        spark, cfg, topic=args.topic, dataset=args.dataset, available_now=not args.trigger,
        trigger=args.trigger, ingest_date=args.ingest_date))


if __name__ == "__main__":
    sys.exit(main())
