"""Benchmark streaming ingest against folder ingest of the same images, and its latency.

1. Throughput: HAM10000 is published once to a fresh topic; then, alternating
   in this one session, folder ``ingest`` of the folder and
   ``stream_ingest --available-now`` of the topic, each into a fresh lake.
   Images/s of both and their ratio (target >= 0.8).
2. Latency: a continuous stream (``--latency-trigger``) while a producer
   thread publishes at a steady ``--rate`` images/s for ``--seconds``; for
   every image, the time from its publish call to the Delta commit that made
   its row visible (commit timestamps from the table's log), p50 and p95.

Needs the broker (scripts/bench.sh stream starts one if none is running).

    scripts/bench.sh stream [--data ../shared/data/ham10000] [--repeat 2] [--rate 50] [--seconds 60]
"""
import dataclasses
import hashlib
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote

from oncolake import cli, ingest
from oncolake.stream import ingest as stream_ingest
from oncolake.stream import produce, records

ROOT = Path(__file__).resolve().parents[2]


def visible_at(table: Path) -> dict[str, float]:
    """relative_path -> the time (s since the epoch) of the commit that added its row."""
    import pyarrow.parquet as pq
    out: dict[str, float] = {}
    for commit in sorted((table / "_delta_log").glob("*.json")):
        actions = [json.loads(line) for line in commit.read_text().splitlines() if line.strip()]
        stamp = next((a["commitInfo"]["timestamp"] for a in actions if "commitInfo" in a), None)
        for action in actions:
            if "add" in action and stamp is not None:
                names = pq.read_table(table / unquote(action["add"]["path"]), columns=["relative_path"])
                for name in names.column("relative_path").to_pylist():
                    out.setdefault(name, stamp / 1000)
    return out


def main(argv=None) -> int:
    p = cli.parser("bench-stream", __doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ham10000"))
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--rate", type=float, default=50.0, help="images/s published during the latency run")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the latency run's publishing")
    p.add_argument("--latency-trigger", default="1 second")
    args = p.parse_args(argv)
    return cli.run_bench("bench-stream", args, lambda spark, cfg, work: _measure(spark, cfg, work, args))


def _measure(spark, cfg, work: Path, args) -> dict:
    """The benchmark's runs in ``work`` (a scratch folder); returns the figures."""
    data = Path(args.data).resolve()
    labels = str(data / "labels.csv")
    topic = f"bench-{int(time.time())}"
    sent = produce.publish(dataclasses.replace(cfg, lake=str(work / "landing-lake")), topic, "ham10000",
                           str(data), labels)
    cli.log.info("published %d records (%s records/s)", sent["records_sent"], sent["records_per_s"])
    folder_s, stream_s, counts = [], [], set()
    for i in range(args.repeat):
        start = time.perf_counter()
        folder = ingest.run(spark, dataclasses.replace(cfg, lake=str(work / f"folder{i}")),
                            dataset="ham10000", source=str(data), labels=labels)
        folder_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        streamed = stream_ingest.run(spark, dataclasses.replace(cfg, lake=str(work / f"stream{i}")),
                                     topic=topic, dataset="ham10000", available_now=True)
        stream_s.append(time.perf_counter() - start)
        counts.add((folder["valid"], streamed["valid"], folder["ingested"], streamed["ingested"]))
    (valid, streamed_valid, ingested, streamed_ingested), = counts
    assert (valid, ingested) == (streamed_valid, streamed_ingested), counts

    # Latency: a continuous stream fed at a steady rate.
    live = f"{topic}-live"
    lake_dir = work / "live"
    live_cfg = dataclasses.replace(cfg, lake=str(lake_dir))
    stop = threading.Event()
    result: dict = {}

    def run_stream():
        try:
            result["summary"] = stream_ingest.run(spark, live_cfg, topic=live, dataset="ham10000",
                                                  available_now=False, trigger=args.latency_trigger,
                                                  stop_event=stop)
        except Exception as err:  # reported below
            result["error"] = err

    from confluent_kafka import Producer
    producer = Producer({"bootstrap.servers": cfg.stream.bootstrap_servers, "acks": "all",
                         "enable.idempotence": True, "linger.ms": 0})
    producer.produce(live, key=b"warm-up", value=b"", headers=[("dataset", "ham10000")])
    producer.flush(30)  # the topic exists before the stream starts
    runner = threading.Thread(target=run_stream, daemon=True)
    runner.start()
    time.sleep(20)  # the stream's first (empty) batches
    images, digests = [], set()
    for path in sorted((data / "images").glob("*.jpg")):  # distinct images: a repeat never becomes a row
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest not in digests and len(images) < int(args.rate * args.seconds):
            digests.add(digest)
            images.append(path)
    published: dict[str, float] = {}
    t0 = time.time()
    for n, path in enumerate(images):
        wait = t0 + n / args.rate - time.time()
        if wait > 0:
            time.sleep(wait)
        rel = path.relative_to(data).as_posix()
        blob = path.read_bytes()
        headers = [(records.DATASET, b"ham10000"), (records.SHA256, hashlib.sha256(blob).hexdigest().encode())]
        published[rel] = time.time()
        producer.produce(live, key=rel.encode(), value=blob, headers=headers)
        producer.poll(0)
    producer.flush(60)
    achieved = len(images) / (time.time() - t0)
    table = lake_dir / "bronze" / "images"
    deadline = time.time() + 300
    while time.time() < deadline:  # until every image is visible (or 5 minutes)
        time.sleep(5)
        if table.exists() and set(published) <= set(visible_at(table)):
            break
    stop.set()
    runner.join(120)
    if "error" in result:
        raise result["error"]
    seen = visible_at(table)
    latencies = sorted(seen[k] - t for k, t in published.items() if k in seen)
    missing = len(published) - len(latencies)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    base = valid / statistics.median(folder_s)
    measured = valid / statistics.median(stream_s)
    return {"bench": "stream", "images": valid, "records": sent["records_sent"], "repeat": args.repeat,
            "folder_ingest_images_per_s": round(base, 1), "stream_ingest_images_per_s": round(measured, 1),
            "ratio": round(measured / base, 3), "target_ratio": 0.8,
            "folder_s": [round(s, 2) for s in folder_s], "stream_s": [round(s, 2) for s in stream_s],
            "max_offsets_per_trigger": cfg.stream.max_offsets_per_trigger,
            "latency_rate_target": args.rate, "latency_rate_achieved": round(achieved, 1),
            "latency_images": len(latencies), "latency_missing": missing,
            "latency_trigger": args.latency_trigger,
            "latency_p50_s": round(q[49], 2), "latency_p95_s": round(q[94], 2),
            "latency_max_s": round(latencies[-1], 2),
            "live_batches": result.get("summary", {}).get("batches"),
            "master": spark.sparkContext.master}


if __name__ == "__main__":
    sys.exit(main())
