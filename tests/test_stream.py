"""Streaming ingest against a real Kafka broker (KRaft, scripts/kafka.sh), real Spark and Delta."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from jobs import ingest as ingest_job
from jobs import stream_ingest as stream_job
from oncolake.stream import produce as produce_mod
from tests.conftest import ROOT, last_json, no_leftovers, shared_dataset
from tests.test_imaging import encode, rgb_image

PORT = 19092  # not the default: a developer's broker on 9092 is left alone
BOOTSTRAP = f"127.0.0.1:{PORT}"
pytestmark = [pytest.mark.slow, pytest.mark.kafka]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def kafka_sh(state: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ONCOLAKE_KAFKA_DIR=str(state), ONCOLAKE_KAFKA_PORT=str(PORT))
    return subprocess.run([str(ROOT / "scripts" / "kafka.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=180)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    state = tmp_path_factory.mktemp("kafka")
    started = kafka_sh(state, "start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        again = kafka_sh(state, "start")  # idempotent
        assert again.returncode == 0 and "already running" in again.stdout
        assert kafka_sh(state, "status").returncode == 0
        yield state
    finally:
        stopped = kafka_sh(state, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not port_open(PORT) and not port_open(PORT + 1), "the broker's ports are still open after stop"
    assert kafka_sh(state, "status").returncode == 3


def sets(lake: str, *extra: str) -> list[str]:
    return ["--lake", lake, "--set", f"stream.bootstrap_servers={BOOTSTRAP}", *extra]


def produce(capsys, lake: str, topic: str, dataset: str, folder: Path, labels: Path | None = None,
            *extra: str) -> dict:
    args = sets(lake, "--topic", topic, "--dataset", dataset, "--input", str(folder), *extra)
    if labels:
        args += ["--labels", str(labels)]
    code = produce_mod.main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return last_json(captured.out)


def stream(capsys, lake: str, topic: str, *extra: str) -> tuple[dict, list[dict]]:
    code = stream_job.main(sets(lake, "--topic", topic, "--available-now", *extra))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    batches = [json.loads(line)["stream_ingest_batch"] for line in captured.err.splitlines()
               if line.startswith('{"stream_ingest_batch"')]
    return last_json(captured.out), batches


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.realdata
def test_real_topic_lands_every_image_once_and_as_folder_ingest_would(spark, broker, tmp_path, capsys):
    data = shared_dataset("isic_uda1")
    lake, folder_lake = str(tmp_path / "lake"), str(tmp_path / "folder-lake")
    sent = produce(capsys, lake, "isic", "isic_uda1", data, data / "labels.csv")
    assert (sent["records_sent"], sent["acknowledged"], sent["failures"]) == (557, 557, 0)
    assert sent["skipped"] == 3  # labels.csv, LICENSE.txt, ATTRIBUTION.txt

    summary, batches = stream(capsys, lake, "isic", "--dataset", "isic_uda1")
    images = sorted(p for p in (data / "images").iterdir())
    distinct = {sha(p.read_bytes()) for p in images}
    assert (len(images), len(distinct)) == (557, 555)
    assert summary["records"] == 557 and summary["ingested"] == 555 and summary["quarantined"] == 0
    assert sum(b["records"] for b in batches) == 557 and all(set(b["lag"]) == {"0", "1"} for b in batches)
    assert batches[-1]["lag"] == {"0": 0, "1": 0}

    with open(data / "labels.csv", newline="") as handle:
        expected = {row["path"]: row["label"] for row in csv.DictReader(handle)}
    table = spark.read.format("delta").load(summary["table"])
    rows = table.select("image_id", "relative_path", "label").collect()
    assert len(rows) == 555 and {r.image_id for r in rows} == distinct
    assert all(r.label == expected[r.relative_path] for r in rows)

    # published again, streamed again: nothing new, no commit
    produce(capsys, lake, "isic", "isic_uda1", data, data / "labels.csv")
    again, _ = stream(capsys, lake, "isic", "--dataset", "isic_uda1")
    assert again["records"] == 557 and again["ingested"] == 0 and again["already_present"] == 555
    assert again["table_version"] == summary["table_version"]
    assert spark.read.format("delta").load(summary["table"]).count() == 555

    # the same folder through folder ingest: the same bronze rows, but for where they came from and when
    code = ingest_job.main(["--lake", folder_lake, "--dataset", "isic_uda1", "--input", str(data),
                            "--labels", str(data / "labels.csv")])
    assert code == 0, capsys.readouterr().err[-3000:]
    folder_summary = last_json(capsys.readouterr().out)
    origin = {"path", "ingested_at", "updated_at", "ingest_date"}
    from pyspark.sql import functions as F
    # set operations take no maps: attributes compared as their sorted entries
    columns = [F.to_json(F.array_sort(F.map_entries(c))).alias(c) if c == "attributes" else c
               for c in table.columns if c not in origin]
    from_topic = spark.read.format("delta").load(summary["table"]).select(*columns)
    from_folder = spark.read.format("delta").load(folder_summary["table"]).select(*columns)
    assert from_folder.count() == 555
    assert from_topic.exceptAll(from_folder).count() == 0 and from_folder.exceptAll(from_topic).count() == 0
    paths = {r.path for r in spark.read.format("delta").load(summary["table"]).select("path").collect()}
    assert all(p.startswith("kafka:/isic/") for p in paths)

    # the topic streamed into the folder's lake: the same images, labels and attributes: nothing to write
    crossed, _ = stream(capsys, folder_lake, "isic", "--dataset", "isic_uda1")
    assert (crossed["ingested"], crossed["labels_updated"], crossed["already_present"]) == (0, 0, 555)
    assert crossed["table_version"] == folder_summary["table_version"]


def test_bad_records_are_quarantined_and_the_good_ones_around_them_land(spark, broker, tmp_path, capsys):
    from confluent_kafka import Producer
    lake, topic = str(tmp_path / "lake"), "mixed"
    folder = tmp_path / "good"
    (folder / "sub").mkdir(parents=True)
    good = {f"sub/good{i}.png": encode(rgb_image(40 + i, 50, seed=i), ".png") for i in range(6)}
    big = encode(rgb_image(300, 300, seed=99), ".png")  # above the claim-check limit below
    good["big.png"] = big
    for name, blob in good.items():
        (folder / name).write_bytes(blob)
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id", "site"])
        writer.writerows([[name, "malignant" if i % 2 else "benign", f"p{i}", f"site {i}"]
                          for i, name in enumerate(sorted(good))])
    limit = len(big) - 1
    assert max(len(b) for n, b in good.items() if n != "big.png") < limit

    producer = Producer({"bootstrap.servers": BOOTSTRAP, "acks": "all", "enable.idempotence": True})
    jpeg = encode(rgb_image(60, 60, seed=2), ".jpg")
    text = b"this is not an image\n" * 20
    random_bytes = np.random.default_rng(11).bytes(3000)

    def send(key, value, headers):
        producer.produce(topic, key=key, value=value, headers=headers)

    def h(dataset="mixed", **more):
        out = [("dataset", dataset)] if dataset else []
        return out + [(k, v) for k, v in more.items()]

    # good records before, between and after the bad ones
    first = produce(capsys, lake, topic, "mixed", folder, folder / "labels.csv", "--max-record-bytes", str(limit))
    assert first["references"] == 1 and first["records_sent"] == 7
    bad = {
        "empty.jpg": (b"", h()),
        "random.jpg": (random_bytes, h()),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], h()),
        "notes.txt": (text, h()),
        "noheaders.png": (good["sub/good0.png"], None),
        "unknown.png": (encode(rgb_image(30, 30, seed=50), ".png"), h(dataset="nosuchset")),
        "missing-ref.png": (b"", h(ref="mixed/" + "ab" * 32 + ".png", sha256="ab" * 32)),
        "escape-ref.png": (b"", h(ref="../../../../etc/passwd")),
        "twice.png": (encode(rgb_image(31, 31, seed=51), ".png"), h() + [("label", "benign"), ("label", "x")]),
        "altered.png": (encode(rgb_image(32, 32, seed=52), ".png"), h(sha256=sha(b"something else"))),
        None: (encode(rgb_image(33, 33, seed=53), ".png"), h()),
        "nodataset.png": (encode(rgb_image(34, 34, seed=54), ".png"), h(dataset=None, label="benign")),
    }
    for key, (value, headers) in bad.items():
        send(key.encode() if key else None, value, headers)
    assert producer.flush(30) == 0
    late = tmp_path / "late"
    late.mkdir()
    (late / "late.png").write_bytes(encode(rgb_image(45, 45, seed=77), ".png"))
    produce(capsys, lake, topic, "mixed", late)

    summary, _ = stream(capsys, lake, topic, "--set", "stream.datasets=[mixed]")
    expected_reasons = {
        "empty.jpg": "empty", "random.jpg": "corrupt", "truncated.jpg": "truncated",
        "notes.txt": "unsupported_format", "noheaders.png": "no_headers", "unknown.png": "unknown_dataset",
        "missing-ref.png": "missing_reference", "escape-ref.png": "bad_reference",
        "twice.png": "malformed_headers", "altered.png": "checksum_mismatch", "": "missing_key",
        "nodataset.png": "missing_dataset",
    }
    quarantine = spark.read.format("delta").load(summary["quarantine_table"])
    got = {r.relative_path: r.reason for r in quarantine.select("relative_path", "reason").collect()}
    assert got == expected_reasons
    assert {r.dataset for r in quarantine.filter("relative_path = 'unknown.png'").collect()} == {"_unknown"}
    assert summary["quarantined"] == len(expected_reasons) and summary["ingested"] == 8

    table = spark.read.format("delta").load(summary["table"])
    rows = {r.relative_path: r for r in table.collect()}
    assert set(rows) == set(good) | {"late.png"}
    for name, blob in good.items():
        assert rows[name].image_id == sha(blob) and bytes(rows[name].content) == blob
    with open(folder / "labels.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            r = rows[row["path"]]
            assert (r.label, r.group_id, r.attributes) == (row["label"], row["patient_id"], {"site": row["site"]})
    assert rows["late.png"].label is None and rows["big.png"].format == "png"

    # the stream's poison records stay where they are: a second run adds nothing anywhere
    again, _ = stream(capsys, lake, topic, "--set", "stream.datasets=[mixed]")
    assert again["records"] == 0 and again["batches"] == 0
    assert quarantine.count() == len(expected_reasons)


@pytest.mark.realdata
def test_a_stream_killed_at_three_seeded_moments_and_restarted_lands_every_image_exactly_once(
        spark, broker, tmp_path, capsys):
    from deltalake import DeltaTable as RustDeltaTable

    data = shared_dataset("ham10000")
    lake, topic = str(tmp_path / "lake"), "ham"
    subset = tmp_path / "ham"
    (subset / "images").mkdir(parents=True)
    with open(data / "labels.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [row for _, row in zip(range(240), reader)]
        fields = reader.fieldnames
    for row in rows:
        (subset / row["path"]).symlink_to((data / row["path"]).resolve())
    with open(subset / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    distinct = {sha((subset / row["path"]).read_bytes()) for row in rows}
    sent = produce(capsys, lake, topic, "ham10000", subset, subset / "labels.csv")
    assert sent["acknowledged"] == 240

    # batches of 40: each killed run lands its first batch and maybe a few more; the rerun has some left
    args = [str(ROOT / "scripts" / "submit.sh"), "stream_ingest", *sets(lake, "--topic", topic,
            "--dataset", "ham10000", "--available-now", "--set", "stream.max_offsets_per_trigger=40")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK", "SPARK_"))}
    bronze_dir = tmp_path / "lake" / "bronze" / "images"
    rng, counts = random.Random(7), []
    for kill in range(3):
        # killed a seeded moment after its first batch, somewhere inside the next one(s)
        job = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
        seen, deadline = [], time.monotonic() + 600
        try:
            for line in job.stdout:
                if line.startswith('{"stream_ingest_batch"'):
                    seen.append(json.loads(line)["stream_ingest_batch"])
                    break
                assert time.monotonic() < deadline, "the stream made no progress"
            time.sleep(rng.uniform(0.2, 2.5))
        finally:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        assert seen, f"run {kill + 1} ended before it landed a batch"
        counts.append(spark.read.format("delta").load(str(bronze_dir)).count())
    assert counts == sorted(set(counts)) and counts[-1] < len(distinct), counts

    rerun_started = time.time()
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = last_json(result.stdout)
    table = spark.read.format("delta").load(summary["table"])
    ids = [r.image_id for r in table.select("image_id").collect()]
    assert len(ids) == len(set(ids)) == len(distinct) and set(ids) == distinct, counts
    assert summary["ingested"] == len(distinct) - counts[-1]
    labels = {row["path"]: row["label"] for row in rows}
    assert all(r.label == labels[r.relative_path] for r in table.select("relative_path", "label").collect())
    assert spark.read.format("delta").load(summary["quarantine_table"]).count() == 0
    assert RustDeltaTable(str(bronze_dir)).to_pyarrow_table().num_rows == len(distinct)
    assert no_leftovers(tmp_path / "lake", rerun_started) == [], counts


def test_without_a_reachable_broker_both_sides_fail_fast_with_one_line(spark, tmp_path, capsys):
    lake = str(tmp_path / "lake")
    closed = ["--set", "stream.bootstrap_servers=127.0.0.1:19999"]  # nothing listens there
    assert not port_open(19999)
    code = produce_mod.main(["--lake", lake, *closed, "--topic", "t", "--dataset", "d",
                             "--input", str(tmp_path / "no-such-folder")])
    assert code != 0 and "does not exist" in capsys.readouterr().err
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(rgb_image(20, 20), ".png"))
    for main, args in ((produce_mod.main, ["--topic", "t", "--dataset", "d", "--input", str(folder)]),
                       (stream_job.main, ["--topic", "t", "--dataset", "d", "--available-now"])):
        started = time.monotonic()
        code = main(["--lake", lake, *closed, *args])
        err = capsys.readouterr().err
        assert code != 0 and time.monotonic() - started < 60
        failed = [line for line in err.splitlines() if " failed: " in line]
        assert len(failed) == 1 and "cannot be reached" in failed[0], err[-2000:]
    assert not (tmp_path / "lake" / "bronze").exists()


def test_a_continuous_stream_takes_images_as_they_come_and_stops_cleanly_on_sigterm(spark, broker, tmp_path,
                                                                                    capsys):
    from confluent_kafka import Producer
    lake, topic = str(tmp_path / "lake"), "live"
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "acks": "all", "enable.idempotence": True})

    def publish(first: int, n: int) -> None:
        for i in range(first, first + n):
            blob = encode(rgb_image(30 + i, 30, seed=100 + i), ".png")
            producer.produce(topic, key=f"img{i}.png".encode(), value=blob,
                             headers=[("dataset", "live"), ("sha256", sha(blob))])
        assert producer.flush(30) == 0

    publish(0, 3)
    args = [str(ROOT / "scripts" / "submit.sh"), "stream_ingest", *sets(lake, "--topic", topic, "--dataset", "live",
                                                                         "--trigger", "1 second")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK", "SPARK_"))}
    job = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                           start_new_session=True)
    lines, ingested = [], 0
    try:
        for line in job.stdout:
            lines.append(line)
            if line.startswith('{"stream_ingest_batch"'):
                ingested += json.loads(line)["stream_ingest_batch"]["ingested"]
                if ingested == 3:
                    publish(3, 2)  # while it runs
            elif ingested == 3 and "ingest step read and validate" in line:
                break  # the batch with the 2 new images is half done
        assert ingested == 3, "".join(lines)[-3000:]
        job.send_signal(signal.SIGTERM)  # the scheduler's stop: finish the batch, report, exit 0
        rest, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 0, "".join(lines)[-3000:] + (rest or "")[-3000:]
    summary = last_json(rest)
    assert summary["job"] == "stream_ingest" and summary["ingested"] == 5 and summary["quarantined"] == 0
    assert spark.read.format("delta").load(summary["table"]).count() == 5


def test_claim_checked_dicom_lands_de_identified_and_its_original_leaves_the_lake(spark, broker, tmp_path, capsys):
    from tests import test_dicom
    data = tmp_path / "in"
    files = test_dicom._write_folder(data)
    key = tmp_path / "dicom.key"
    key.write_bytes(test_dicom.KEY)
    lake_dir = tmp_path / "lake"
    dicom = ["--set", f"ingest.dicom.key_file={key}", "--set", r"ingest.dicom.patient_id_pattern=MRN-(\d+)"]
    sent = produce(capsys, str(lake_dir), "pacs", "mammo", data, data / "labels.csv",
                   "--max-record-bytes", "100", *dicom)  # every DICOM goes through the landing area
    # 10 .dcm or extension-less DICOM files and the DICOMDIR; not the README (no extension, not DICOM)
    assert sent["references"] == sent["records_sent"] == 11 and sent["skipped"] == 2
    assert test_dicom._lake_phi(lake_dir), "the originals wait in LAKE/landing, with their PHI"

    summary, _ = stream(capsys, str(lake_dir), "pacs", "--dataset", "mammo", *dicom)
    assert (summary["ingested"], summary["quarantined"]) == (6, 4)
    assert summary["quarantine_reasons"] == {"burned_in_phi": 1, "no_pixel_data": 1, "not_an_image": 1,
                                             "truncated": 1}
    assert not [p for p in (lake_dir / "landing").rglob("*.dcm")], "DICOM originals left in the landing area"
    assert test_dicom._lake_phi(lake_dir) == {}
    rows = spark.read.format("delta").load(summary["table"]).collect()
    expected_ids = {test_dicom.deid.Pseudonyms(test_dicom.KEY).image_id(p.read_bytes()) for p in files.values()
                    if "burned" not in str(p)}
    assert {r.image_id for r in rows} == expected_ids and {r.modality for r in rows} == {"MG"}
    assert all(r.group_id.startswith("PSN-") for r in rows)
