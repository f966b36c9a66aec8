"""The ingest job against real Spark and Delta: real data, bad data, idempotence."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import ingest as ingest_job
from oncolake import config, ingest, lake
from tests import hostile
from tests.conftest import ROOT, last_json, shared_dataset
from tests.test_imaging import encode, rgb_image

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def run(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = ingest_job.main(list(args))
    captured = capsys.readouterr()
    return code, (last_json(captured.out) if code == 0 else None), captured.err


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unreadable_file(target: Path) -> bool:
    """Make ``target`` a file that exists and has bytes but cannot be read.

    As a normal user, permissions do it. Root reads through permissions, but
    not a write-only sysfs attribute, so link to one of those.
    """
    if os.geteuid() != 0:
        target.write_bytes(b"\xff\xd8\xff" + b"\x00" * 100)
        target.chmod(0)
        return True
    for candidate in sorted(Path("/sys/devices").glob("**/rescan"))[:20]:
        try:
            candidate.read_bytes()
        except PermissionError:
            target.symlink_to(candidate)
            return True
        except OSError:
            continue
    return False


@pytest.mark.realdata
def test_real_folder_ingests_every_image_once_with_its_label(spark, lake, capsys):
    data = shared_dataset("isic_uda1")
    args = ["--lake", lake, "--dataset", "isic_uda1", "--input", str(data),
            "--labels", str(data / "labels.csv"), "--ingest-date", "2026-01-05"]
    code, summary, err = run(capsys, *args)
    assert code == 0, err

    files = [p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    by_id = {}
    for path in sorted(files):
        by_id.setdefault(sha(path.read_bytes()), path)
    assert (len(files), len(by_id)) == (557, 555)
    assert summary["files_seen"] == sum(1 for p in data.rglob("*") if p.is_file())
    assert summary["ingested"] == 555 and summary["duplicates"] == 2
    assert summary["quarantined"] == 0 and summary["labels_without_file"] == 0
    assert summary["skipped"] == summary["files_seen"] - 557

    with open(data / "labels.csv", newline="") as handle:
        expected_label = {row["path"]: row["label"] for row in csv.DictReader(handle)}
    table = spark.read.format("delta").load(summary["table"])
    rows = table.select("image_id", "relative_path", "label", "size_bytes", "channels").collect()
    assert len(rows) == 555
    assert {r.image_id for r in rows} == set(by_id)
    for r in rows:
        assert r.label == expected_label[r.relative_path]
        assert r.size_bytes == (data / r.relative_path).stat().st_size
    sample = table.filter(table.image_id == rows[0].image_id).select("content").first()[0]
    assert sha(bytes(sample)) == rows[0].image_id

    code, again, err = run(capsys, *args[:-1], "2026-01-06")
    assert code == 0, err
    assert again["ingested"] == 0 and again["already_present"] == 555
    assert again["table_version"] == summary["table_version"]
    assert spark.read.format("delta").load(summary["table"]).count() == 555


@pytest.fixture()
def bad_folder(tmp_path) -> tuple[Path, dict[str, str], set[str]]:
    """Awkward good files and every hostile kind (tests/hostile.py); returns (folder, expected reasons, good names)."""
    folder = tmp_path / "incoming"
    (folder / "nested" / "deeper").mkdir(parents=True)
    good = encode(rgb_image(40, 50, seed=1), ".png")
    files = {
        "good.png": good,
        "copy of good.png": good,
        "lésion (1) été.png": encode(rgb_image(30, 30, seed=4), ".png"),
        "nested/deeper/Upper.JPG": encode(rgb_image(32, 33, seed=5), ".jpg"),
        "gray.jpg": encode(rgb_image(40, 40, seed=6)[..., 0], ".jpg"),
        "rgba.png": encode(np.dstack([rgb_image(20, 20, seed=7), rgb_image(20, 20, seed=8)[..., :1]]), ".png"),
        "deep16.png": encode(rgb_image(20, 20, seed=9).astype(np.uint16) * 257, ".png"),
        "two\nlines.png": encode(rgb_image(24, 24, seed=10), ".png"),
        "readme.txt": b"notes\n",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    Image.new("CMYK", (24, 24), (0, 120, 200, 10)).save(folder / "cmyk.jpg")
    (folder / "nested" / "up").symlink_to("..", target_is_directory=True)  # a folder loop
    reasons = hostile.build(folder)
    if unreadable_file(folder / "unreadable.jpg"):
        reasons["unreadable.jpg"] = "unreadable"
    good_names = {"good.png", "lésion (1) été.png", "nested/deeper/Upper.JPG", "gray.jpg", "rgba.png",
                  "deep16.png", "cmyk.jpg", "two\nlines.png"}
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient_id", "site"])
        writer.writerow(["lésion (1) été.png", "malignant", "p1", "back, upper"])
        writer.writerow(["good.png", "benign", "p2", "arm"])
        writer.writerow(["two\nlines.png", "benign", "p3", "leg"])
        writer.writerow(["gone.png", "benign", "p4", "leg"])
    return folder, reasons, good_names


def test_bad_files_land_in_quarantine_and_no_good_image_is_lost(spark, lake, capsys, bad_folder):
    folder, reasons, good_names = bad_folder
    args = ["--lake", lake, "--dataset", "synthetic", "--input", str(folder),
            "--labels", str(folder / "labels.csv"), *[x for kv in hostile.SETTINGS for x in ("--set", kv)]]
    code, summary, err = run(capsys, *args)
    assert code == 0, err
    quarantine = spark.read.format("delta").load(summary["quarantine_table"]).collect()
    assert {r.relative_path: r.reason for r in quarantine} == reasons
    assert all(r.detail for r in quarantine)
    assert summary["quarantined"] == len(reasons) >= 25
    assert summary["ingested"] == len(good_names) and summary["duplicates"] == 1
    assert summary["skipped"] == 2  # readme.txt and labels.csv
    assert summary["labels_without_file"] == 1
    assert summary["linked_folders_skipped"] == 1  # nested/up -> ..: listed once, not 40 times

    images = {r.relative_path: r for r in spark.read.format("delta").load(summary["table"]).collect()}
    assert set(images) == good_names
    assert images["gray.jpg"].channels == 1
    assert images["rgba.png"].channels == 4
    assert (images["deep16.png"].channels, images["deep16.png"].bit_depth) == (3, 16)
    assert (images["cmyk.jpg"].format, images["cmyk.jpg"].channels) == ("jpeg", 4)
    assert images["lésion (1) été.png"].label == "malignant"
    assert images["lésion (1) été.png"].group_id == "p1"
    assert images["lésion (1) été.png"].attributes == {"site": "back, upper"}
    assert images["two\nlines.png"].label == "benign"
    assert images["gray.jpg"].label is None  # no CSV row: ingested unlabelled
    for name, row in images.items():
        assert bytes(row.content) == (folder / name).read_bytes()

    code, again, err = run(capsys, *args)
    assert code == 0, err
    assert (again["ingested"], again["quarantine_added"]) == (0, 0)
    assert again["table_version"] == summary["table_version"]
    assert spark.read.format("delta").load(summary["quarantine_table"]).count() == len(reasons)


def test_readme_lists_every_hostile_kind_with_its_reason():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("<!-- hostile-kinds -->"):readme.index("<!-- /hostile-kinds -->")]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| `")]
    assert [(name.strip().strip("`"), reason.strip().strip("`")) for name, _, reason in rows] == [
        (name, reason) for name, _, reason in hostile.KINDS]


def test_corrected_label_updates_the_row_and_new_images_append(spark, lake, capsys, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"img{i}.png").write_bytes(encode(rgb_image(20, 20, seed=20 + i), ".png"))
    labels = folder / "labels.csv"
    labels.write_text("path,label,lesion_id\nimg0.png,benign,L0\nimg1.png,benign,L1\nimg2.png,malignant,L1\n")
    args = ["--lake", lake, "--dataset", "derm", "--input", str(folder), "--labels", str(labels)]
    code, first, err = run(capsys, *args, "--ingest-date", "2026-02-01")
    assert code == 0 and first["ingested"] == 3, err

    labels.write_text("path,label,lesion_id\nimg0.png,malignant,L0\nimg1.png,benign,L1\nimg2.png,malignant,L1\n")
    (folder / "img3.png").write_bytes(encode(rgb_image(20, 20, seed=30), ".png"))
    code, second, err = run(capsys, *args, "--ingest-date", "2026-02-02")
    assert code == 0, err
    assert (second["ingested"], second["labels_updated"], second["already_present"]) == (1, 1, 3)
    table = spark.read.format("delta").load(second["table"])
    rows = {r.relative_path: (r.label, str(r.ingest_date), r.group_id) for r in table.collect()}
    assert rows == {"img0.png": ("malignant", "2026-02-01", "L0"), "img1.png": ("benign", "2026-02-01", "L1"),
                    "img2.png": ("malignant", "2026-02-01", "L1"), "img3.png": (None, "2026-02-02", None)}
    partitions = {r.ingest_date.isoformat() for r in table.select("ingest_date").distinct().collect()}
    assert partitions == {"2026-02-01", "2026-02-02"}


def test_each_file_is_read_once_so_a_file_rewritten_before_the_merge_is_stored_as_validated(
        spark, lake, tmp_path, monkeypatch):
    """The bytes validated and hashed are the bytes stored: nothing goes back to the files for the MERGE."""
    folder = tmp_path / "in"
    folder.mkdir()
    originals = {f"img{i}.png": encode(rgb_image(24, 24, seed=60 + i), ".png") for i in range(4)}
    for name, data in originals.items():
        (folder / name).write_bytes(data)
    meeting = tmp_path / "barrier"
    monkeypatch.setenv("ONCOLAKE_BARRIER", f"ingest.merge:2:{meeting}")  # the job waits there for this test
    result = {}

    def ingest_once():  # the library call: a job's main in another thread would stop the shared session
        cfg = dataclasses.replace(config.load("local"), lake=lake)
        try:
            result["summary"] = ingest.run(spark, cfg, dataset="once", source=str(folder))
        except Exception as err:  # reported by the assertion below
            result["error"] = err
    worker = threading.Thread(target=ingest_once)
    worker.start()
    try:
        deadline = time.monotonic() + 300
        while not (meeting.is_dir() and any(meeting.iterdir())):  # validated, and about to insert
            assert worker.is_alive() and time.monotonic() < deadline, \
                result.get("error", "ingest never reached its MERGE")
            time.sleep(0.05)
        (folder / "img0.png").write_bytes(originals["img0.png"][:20])  # truncated now
        (folder / "img1.png").write_bytes(encode(rgb_image(24, 24, seed=99), ".png"))  # another picture now
    finally:
        meeting.mkdir(exist_ok=True)
        (meeting / "test").touch()  # the second arrival: the job goes on
        worker.join(600)
    assert "summary" in result, result.get("error", "ingest did not finish")
    summary = result["summary"]
    assert (summary["valid"], summary["ingested"], summary["quarantined"]) == (4, 4, 0)
    stored = {r.relative_path: (bytes(r.content), r.image_id)
              for r in spark.read.format("delta").load(summary["table"]).filter("dataset = 'once'").collect()}
    assert stored == {name: (data, sha(data)) for name, data in originals.items()}


@pytest.mark.parametrize("case,expected_code,message", [
    ("missing_input", 1, "does not exist"),
    ("missing_csv", 1, "labels CSV"),
    ("csv_without_label", 1, "no label column"),
    ("bad_date", 2, "YYYY-MM-DD"),
])
def test_failures_exit_non_zero_with_one_clear_line(spark, lake, capsys, tmp_path, case, expected_code,
                                                    message):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(rgb_image(20, 20), ".png"))
    (folder / "nolabel.csv").write_text("path,diagnosis\na.png,benign\n")
    args = {"missing_input": ["--input", str(tmp_path / "nope")],
            "missing_csv": ["--input", str(folder), "--labels", str(tmp_path / "nope.csv")],
            "csv_without_label": ["--input", str(folder), "--labels", str(folder / "nolabel.csv")],
            "bad_date": ["--input", str(folder), "--ingest-date", "05/01/2026"]}[case]
    code, _, err = run(capsys, "--lake", lake, "--dataset", "d", *args)
    assert code == expected_code
    last = err.strip().splitlines()[-1]
    assert "ingest failed:" in last and message in last
    assert spark.getActiveSession() is not None  # a borrowed session is never stopped


def test_an_error_from_the_jvm_is_told_by_its_java_exception_not_by_the_py4j_call(spark):
    from py4j.protocol import Py4JJavaError

    from oncolake import cli
    with pytest.raises(Py4JJavaError) as raised:
        spark.sparkContext._jvm.java.io.FileInputStream("/no/such/file")
    assert str(raised.value).startswith("An error occurred while calling")
    assert cli.first_line(raised.value) == "java.io.FileNotFoundException: /no/such/file (No such file or directory)"
    assert cli.first_line(ValueError("one\ntwo")) == "one"


def test_busi_file_names_with_spaces_and_parentheses(spark, lake, capsys, tmp_path):
    data = shared_dataset("busi")
    subset = tmp_path / "busi"
    with open(data / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[:40:4]
    for row in rows:
        (subset / row["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data / row["path"], subset / row["path"])
    with open(subset / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    code, summary, err = run(capsys, "--lake", lake, "--dataset", "busi", "--input", str(subset),
                             "--labels", str(subset / "labels.csv"))
    assert code == 0, err
    assert any(" " in r["path"] and "(" in r["path"] for r in rows)
    table = spark.read.format("delta").load(summary["table"])
    assert {r.relative_path: r.label for r in table.collect()} == {r["path"]: r["label"] for r in rows}
    assert summary["labels_without_file"] == 0


@pytest.mark.parametrize("encoding", ["utf-8-sig", "latin-1"])
def test_hostile_label_files_are_read_refused_or_flagged_never_guessed(spark, lake, capsys, tmp_path, encoding):
    folder = tmp_path / "in"
    folder.mkdir()
    same = encode(rgb_image(30, 30, seed=1), ".png")
    blobs = {"a.png": same, "b copy.png": same,  # one picture, two diagnoses
             "c.png": encode(rgb_image(31, 31, seed=2), ".png"),  # one path, two labels
             "d.png": encode(rgb_image(32, 32, seed=3), ".png"),  # a row given twice
             "lésion é.png": encode(rgb_image(33, 33, seed=4), ".png")}
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
    (tmp_path / "secret.png").write_bytes(encode(rgb_image(34, 34, seed=5), ".png"))
    injection = "'; DROP TABLE images; --"
    rows = [("path", "label", "patient_id", "site"),
            ("a.png", "benign", "p1", "=cmd|' /C calc'!A0"),
            ("b copy.png", "malignant", "p2", injection),
            ("c.png", "benign", "p3", "arm"), ("c.png", "malignant", "p3", "arm"),
            ("d.png", "benign", "p4", "leg"), ("d.png", "benign", "p4", "leg"),
            ("lésion é.png", "malignant", "p5", "dos, haut"),
            ("../secret.png", "malignant", "p6", "x"), ("/etc/passwd", "benign", "p7", "x")]
    with open(folder / "labels.csv", "w", newline="", encoding=encoding) as handle:
        csv.writer(handle).writerows(rows)

    code, summary, err = run(capsys, "--lake", lake, "--dataset", "d", "--input", str(folder),
                             "--labels", str(folder / "labels.csv"))
    assert code == 0, err
    assert (summary["label_conflicts"], summary["labels_conflicting_paths"], summary["labels_refused"]) == (1, 1, 2)
    assert summary["ingested"] == 4 and summary["duplicates"] == 1 and summary["quarantined"] == 0
    table = {r.relative_path: r for r in spark.read.format("delta").load(summary["table"]).collect()}
    assert set(table) == {"a.png", "c.png", "d.png", "lésion é.png"}  # b copy.png is a.png's bytes
    assert table["a.png"].label is None and table["a.png"].attributes == {
        "site": "=cmd|' /C calc'!A0", "label_conflict": "benign|malignant"}  # kept as text, never evaluated
    assert table["c.png"].label is None
    assert table["d.png"].label == "benign" and table["lésion é.png"].label == "malignant"
    assert table["lésion é.png"].attributes == {"site": "dos, haut"}
    assert not any("secret" in p for p in table)
    assert len(table) == spark.read.format("delta").load(summary["table"]).count()


@pytest.mark.faults
def test_a_full_file_system_fails_with_one_clear_line_and_leaves_the_tables_as_they_were(spark, capsys, tmp_path):
    import subprocess

    from deltalake import DeltaTable
    lake_dir = tmp_path / "small-lake"
    lake_dir.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(lake_dir)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a 4 MB tmpfs needs root (CI runs as root)")
    try:
        small, large = tmp_path / "small", tmp_path / "large"
        small.mkdir()
        large.mkdir()
        for i in range(4):
            (small / f"s{i}.png").write_bytes(encode(rgb_image(40, 40, seed=100 + i), ".png"))
        for i in range(30):  # 30 x 192 KB of incompressible pixels: more than the 4 MB file system holds
            (large / f"l{i}.png").write_bytes(encode(rgb_image(256, 256, seed=200 + i), ".png"))
        args = ["--lake", str(lake_dir), "--dataset", "d", "--ingest-date", "2026-03-01"]
        code, first, err = run(capsys, *args, "--input", str(small))
        assert code == 0 and first["ingested"] == 4, err

        code, _, err = run(capsys, *args, "--input", str(large))
        assert code == 1
        last = err.strip().splitlines()[-1]
        assert "ingest failed:" in last and "no space left on device" in last.lower(), last
        assert spark.read.format("delta").load(first["table"]).count() == 4
        assert spark.read.format("delta").load(first["quarantine_table"]).count() == 0
        assert lake.table_version(spark, first["table"]) == first["table_version"]  # no half-written commit
        assert len(DeltaTable(first["table"].replace("file:", "")).to_pandas()) == 4  # delta-rs reads it too
    finally:
        subprocess.run(["umount", "-l", str(lake_dir)], capture_output=True)
