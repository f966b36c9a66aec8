"""The preprocess job: grouped stratified stable splits, balancing, Petastorm tensors."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from jobs import ingest as ingest_job
from jobs import preprocess as preprocess_job
from oncolake import lake as lakefs
from oncolake import cli, config, imaging, preprocess, synthetic
from tests.conftest import last_json, shared_dataset, with_column


def run(job, capsys, *args):
    code = job.main(list(args))
    captured = capsys.readouterr()
    return code, (last_json(captured.out) if code == 0 else None), captured.err


make_folder = synthetic.write_dataset


def ingest(capsys, lake, folder, dataset, date="2026-03-01"):
    code, summary, err = run(ingest_job, capsys, "--lake", lake, "--dataset", dataset, "--input", str(folder),
                             "--labels", str(folder / "labels.csv"), "--ingest-date", date)
    assert code == 0, err
    return summary


def splits_of(spark, lake, dataset, version):
    rows = (spark.read.format("delta").load(lakefs.table_uri(lakefs.qualify(spark, lake), "silver.splits"))
            .filter(f"dataset = '{dataset}' AND version = {version}").collect())
    return {r.image_id: (r.group_key, r.split, r.label) for r in rows}


def assert_grouped_and_stratified(assignments, tolerance=0.03):
    by_group = {}
    for group, split, _ in assignments.values():
        by_group.setdefault(group, set()).add(split)
    assert all(len(s) == 1 for s in by_group.values()), "a group spans two splits"
    labels = [label for _, _, label in assignments.values()]
    whole = sum(labels) / len(labels)
    for name in preprocess.SPLITS:
        part = [label for _, split, label in assignments.values() if split == name]
        assert part, f"empty {name} split"
        assert abs(sum(part) / len(part) - whole) <= tolerance, (name, sum(part) / len(part), whole)


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["busi", "isic_uda1"])
def test_real_data_splits_are_grouped_stratified_and_repeatable(spark, tmp_path, capsys, name):
    data = shared_dataset(name)
    lake = str(tmp_path / "lake")
    ingest(capsys, lake, data, name)
    code, first, err = run(preprocess_job, capsys, "--lake", lake, "--dataset", name, "--size", "32")
    assert code == 0, err
    assert first["created"] and first["version"] == 1
    assignments = splits_of(spark, lake, name, 1)
    assert_grouped_and_stratified(assignments)
    total = len(assignments)
    for split, share in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        assert abs(first[split] / total - share) < 0.02

    code, again, err = run(preprocess_job, capsys, "--lake", lake, "--dataset", name, "--size", "32")
    assert code == 0, err
    assert (again["created"], again["version"]) == (False, 1)
    assert preprocess.published_versions(spark, lakefs.qualify(spark, lake), name) == [1]


def test_a_data_sets_configured_settings_reach_its_job_and_no_other(spark, tmp_path, capsys):
    conf = tmp_path / "conf"
    conf.mkdir()
    shutil.copy(config.default_conf_dir() / "base.yaml", conf)
    (conf / "local.yaml").write_text((config.default_conf_dir() / "local.yaml").read_text()
                                     + "\ndatasets:\n  syn: {preprocess: {size: 20, resize: pad}}\n")
    folder, lake = tmp_path / "in", str(tmp_path / "lake")
    make_folder(folder, groups=10, per_group=2, seed=5)
    ingest(capsys, lake, folder, "syn")
    code, out, err = run(preprocess_job, capsys, "--lake", lake, "--dataset", "syn", "--conf-dir", str(conf))
    assert code == 0, err
    manifest = json.loads(Path(out["output"].removeprefix("file:"), "manifest.json").read_text())
    assert (manifest["size"], manifest["resize"]) == (20, "pad")
    # every job resolves its configuration the same way: another data set gets
    # the files' settings, and a job's own flags (--size is a --set) still win
    parser = cli.parser("any", None)
    parser.add_argument("--dataset")

    def resolved(*argv):
        return cli.load_config(parser.parse_args(["--conf-dir", str(conf), *argv]))
    assert resolved("--dataset", "syn2").preprocess.size == config.PreprocessConfig().size
    assert resolved("--dataset", "syn", "--set", "preprocess.size=24").preprocess.size == 24


def test_new_images_never_move_old_ones(spark, tmp_path, capsys):
    folder, lake = tmp_path / "in", str(tmp_path / "lake")
    make_folder(folder, groups=40, per_group=3, seed=1)
    ingest(capsys, lake, folder, "syn")
    code, first, err = run(preprocess_job, capsys, "--lake", lake, "--dataset", "syn", "--size", "16")
    assert code == 0, err
    before = splits_of(spark, lake, "syn", 1)
    assert_grouped_and_stratified(before, tolerance=0.06)

    make_folder(folder, groups=20, per_group=3, seed=2, start=40)      # new patients
    make_folder(folder, groups=5, per_group=1, seed=3, start=0)        # new images of old patients
    ingest(capsys, lake, folder, "syn", date="2026-03-02")
    code, second, err = run(preprocess_job, capsys, "--lake", lake, "--dataset", "syn", "--size", "16")
    assert code == 0, err
    assert (second["created"], second["version"]) == (True, 2)
    after = splits_of(spark, lake, "syn", 2)
    assert len(after) == len(before) + 65
    assert all(after[image][1] == split for image, (_, split, _) in before.items())
    assert_grouped_and_stratified(after, tolerance=0.06)


def independent_tensor(data: bytes, size: int, policy: str) -> np.ndarray:
    """What the tensor should be, computed here with OpenCV directly."""
    image = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    h, w = image.shape[:2]
    if policy == "crop":
        side = min(h, w)
        image = image[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    elif policy == "pad":  # the long side to size, then centred on black
        scale = size / max(h, w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale <= 1 else cv2.INTER_LINEAR)
        canvas = np.zeros((size, size, 3), np.uint8)
        canvas[(size - nh) // 2:(size - nh) // 2 + nh, (size - nw) // 2:(size - nw) // 2 + nw] = small
        return canvas
    shrink = image.shape[0] >= size and image.shape[1] >= size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def ingested_content(spark, capsys, tmp_path, dataset, groups, seed):
    """A synthetic folder ingested into a new lake: the lake and each image's stored bytes by id."""
    folder, lake = tmp_path / "in", str(tmp_path / "lake")
    make_folder(folder, groups=groups, per_group=2, seed=seed, malignant_every=3)
    summary = ingest(capsys, lake, folder, dataset)
    return lake, {r.image_id: bytes(r.content) for r in
                  spark.read.format("delta").load(summary["table"]).select("image_id", "content").collect()}


def tensor_rows(summary):
    """Every row of a preprocess run's tensors, split by split, through Petastorm."""
    from petastorm import make_reader
    for split in preprocess.SPLITS:
        url = "file://" + summary["output"].removeprefix("file:") + f"/split={split}"
        with make_reader(url, num_epochs=1, reader_pool_type="dummy") as reader:
            yield from reader


def test_petastorm_tensors_equal_an_independent_decode_for_each_policy(spark, tmp_path, capsys):
    from petastorm import make_batch_reader
    lake, content = ingested_content(spark, capsys, tmp_path, "pol", groups=12, seed=4)
    for version, policy in enumerate(("stretch", "crop", "pad"), start=1):
        code, out, err = run(preprocess_job, capsys, "--lake", lake, "--dataset", "pol", "--size", "20",
                             "--set", f"preprocess.resize={policy}")
        assert code == 0 and out["version"] == version, err
        manifest = json.loads(Path(out["output"].removeprefix("file:"), "manifest.json").read_text())
        assert manifest["resize"] == policy and manifest["size"] == 20
        seen = 0
        for row in tensor_rows(out):
            assert row.image.dtype == np.uint8 and row.image.shape == (20, 20, 3)
            np.testing.assert_array_equal(row.image, independent_tensor(content[row.image_id], 20, policy))
            seen += 1
        assert seen == len(content)
    url = "file://" + out["output"].removeprefix("file:") + "/split=test"
    with make_batch_reader(url, num_epochs=1, reader_pool_type="dummy") as reader:
        # one batch per row group; each split has several files, so several batches
        assert sum(len(batch.image_id) for batch in reader) == out["test"]


def test_colour_constancy_is_made_recorded_and_replayed_and_off_keeps_the_old_fingerprint(spark, tmp_path, capsys):
    from oncolake import registry
    lake, content = ingested_content(spark, capsys, tmp_path, "cc", groups=8, seed=6)
    argv = ("--lake", lake, "--dataset", "cc", "--size", "20")
    code, plain, err = run(preprocess_job, capsys, *argv)
    assert code == 0 and plain["version"] == 1, err
    code, out, err = run(preprocess_job, capsys, *argv, "--set", "preprocess.shades_of_grey=6")
    assert code == 0 and out["version"] == 2 and out["created"], err
    code, again, err = run(preprocess_job, capsys, *argv, "--set", "preprocess.shades_of_grey=6")
    assert code == 0 and (again["version"], again["created"]) == (2, False), err
    manifests = [json.loads(Path(o["output"].removeprefix("file:"), "manifest.json").read_text()) for o in (plain, out)]
    assert "shades_of_grey" not in manifests[0]["pixels"] and manifests[1]["pixels"]["shades_of_grey"] == 6
    replay = registry.pixel_options({"pixels": manifests[1]["pixels"]})  # what scoring and predict pass on
    moved = []
    for row in tensor_rows(out):
        # shades of grey computed here: each channel over its p=6 norm, times the norms' RMS
        raw = independent_tensor(content[row.image_id], 20, "stretch").astype(np.float64)
        light = (raw ** 6).mean(axis=(0, 1)) ** (1 / 6)
        expected = np.clip(np.rint(raw * np.sqrt((light ** 2).mean()) / light), 0, 255)
        assert np.abs(row.image - expected).max() <= 1, row.image_id
        np.testing.assert_array_equal(imaging.prepare(content[row.image_id], 20, "stretch", **replay), row.image)
        moved.append(np.abs(row.image - raw).mean())
    assert len(moved) == len(content) and np.median(moved) > 2  # the synthetic lesions are coloured
    # train takes the newest tensors by default; made otherwise than the settings say, it says so
    from oncolake import training
    now = dataclasses.replace(config.PreprocessConfig(), size=20)
    assert preprocess.differences(manifests[0], now) == {}
    assert preprocess.differences(manifests[1], now) == {"pixels": (manifests[1]["pixels"], now.pixels())}
    assert set(preprocess.differences(manifests[0], dataclasses.replace(now, size=24))) == {"size"}
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("oncolake.training").addHandler(handler)
    try:
        training._warn_if_made_otherwise(spark, lakefs.qualify(spark, lake), "cc", [1, 2], manifests[1], now)
        training._warn_if_made_otherwise(spark, lakefs.qualify(spark, lake), "cc", [1], manifests[0], now)
    finally:
        logging.getLogger("oncolake.training").removeHandler(handler)
    assert len(said) == 1 and "newest tensors, v2" in said[0] and "--tensors-version 1" in said[0], said
    # off, it is not part of the fingerprint: tensors made before it existed are found again
    before = dataclasses.make_dataclass("PreprocessConfig", [
        (f.name, f.type, dataclasses.field(default_factory=lambda d=f.default_factory: d())
         if f.default is dataclasses.MISSING else dataclasses.field(default=f.default))
        for f in dataclasses.fields(config.PreprocessConfig) if f.name != "shades_of_grey"])()
    assert preprocess._fingerprint(before, "d") == preprocess._fingerprint(config.PreprocessConfig(), "d")
    assert preprocess._fingerprint(config.PreprocessConfig(shades_of_grey=6), "d") != \
        preprocess._fingerprint(config.PreprocessConfig(), "d")
    code, _, err = run(preprocess_job, capsys, *argv, "--set", "preprocess.shades_of_grey=-1")
    assert code != 0 and "shades_of_grey" in err


def test_an_aux_attribute_becomes_each_tensors_class_index_and_off_keeps_the_old_fingerprint(spark, tmp_path, capsys):
    folder, lake = tmp_path / "in", str(tmp_path / "lake")
    make_folder(folder, groups=12, per_group=2, seed=9, malignant_every=3)
    # a 7-class-like attribute of the labels CSV, as HAM10000's dx; one image without a value
    kinds = ["nv", "mel", "bkl", "bcc"]
    dx = with_column(folder / "labels.csv", "dx", lambda i, _: "" if i == 5 else kinds[i % len(kinds)])
    ingest(capsys, lake, folder, "aux")
    argv = ("--lake", lake, "--dataset", "aux", "--size", "16")
    code, plain, err = run(preprocess_job, capsys, *argv)
    assert code == 0 and plain["version"] == 1, err
    code, out, err = run(preprocess_job, capsys, *argv, "--set", "preprocess.aux_attribute=dx")
    assert code == 0 and (out["version"], out["created"]) == (2, True), err
    manifest = json.loads(Path(out["output"].removeprefix("file:"), "manifest.json").read_text())
    classes = sorted(kinds)
    assert manifest["aux"]["attribute"] == "dx" and manifest["aux"]["classes"] == classes
    ids = {r.image_id: r.relative_path for r in spark.read.format("delta").load(
        lakefs.table_uri(lakefs.qualify(spark, lake), "bronze.images")).collect()}
    seen, train = {}, {}
    for row in tensor_rows(out):
        value = dx[ids[row.image_id]]
        assert row.aux == (classes.index(value) if value else -1), (row.image_id, value)
        seen[row.image_id] = row.aux
    assert len(seen) == len(dx) and -1 in seen.values()
    for image_id, (_, split, _) in splits_of(spark, lake, "aux", 2).items():
        if split == "train":
            train[str(seen[image_id])] = train.get(str(seen[image_id]), 0) + 1
    assert {k: v for k, v in manifest["aux"]["train_counts"].items() if v} == train
    # the Petastorm schema has the column, and a version made without it does not
    from petastorm.etl import dataset_metadata
    for summary, names in ((out, ["image_id", "label", "group_id", "image", "aux"]),
                           (plain, ["image_id", "label", "group_id", "image"])):
        url = "file://" + summary["output"].removeprefix("file:") + "/split=train"
        assert list(dataset_metadata.get_schema_from_dataset_url(url).fields) == names
    # reruns change nothing; off again, the plain version is found: off, it is not in the fingerprint
    code, again, err = run(preprocess_job, capsys, *argv, "--set", "preprocess.aux_attribute=dx")
    assert code == 0 and (again["version"], again["created"]) == (2, False), err
    code, again, err = run(preprocess_job, capsys, *argv)
    assert code == 0 and (again["version"], again["created"]) == (1, False), err
    # the attribute's values are part of what a version holds: one image's dx changed makes a new one
    first = min(dx)
    with_column(folder / "labels.csv", "dx", lambda _, row: "df" if row["path"] == first else row["dx"])
    ingest(capsys, lake, folder, "aux", date="2026-03-02")
    code, changed, err = run(preprocess_job, capsys, *argv, "--set", "preprocess.aux_attribute=dx")
    assert code == 0 and (changed["version"], changed["created"]) == (3, True), err
    manifest = json.loads(Path(changed["output"].removeprefix("file:"), "manifest.json").read_text())
    assert manifest["aux"]["classes"] == sorted([*kinds, "df"])
    # an attribute no image has, or a name that is no column name, is refused clearly
    code, _, err = run(preprocess_job, capsys, *argv, "--set", "preprocess.aux_attribute=site")
    assert code == 3 and "aux_attribute 'site' takes 0 value(s)" in err, err
    code, _, err = run(preprocess_job, capsys, *argv, "--set", "preprocess.aux_attribute=a b")
    assert code != 0 and "preprocess.aux_attribute must be" in err, err


@pytest.mark.parametrize("method", ["none", "undersample", "oversample", "class_weight"])
def test_balancing_touches_only_the_training_split(spark, tmp_path, capsys, method):
    folder, lake = tmp_path / "in", str(tmp_path / "lake")
    make_folder(folder, groups=40, per_group=2, seed=5, malignant_every=4)
    ingest(capsys, lake, folder, "bal")
    code, out, err = run(preprocess_job, capsys, "--lake", lake, "--dataset", "bal", "--size", "16",
                         "--set", f"preprocess.balance={method}")
    assert code == 0, err
    root = Path(out["output"].removeprefix("file:"))
    on_disk = {}
    for split in preprocess.SPLITS:
        labels = spark.read.parquet(str(root / f"split={split}")).groupBy("label").count().collect()
        on_disk[split] = {str(r["label"]): r["count"] for r in labels}
    before = out["class_counts"]["train"]
    manifest = json.loads((root / "manifest.json").read_text())
    if method == "undersample":
        assert on_disk["train"] == {"0": min(before.values()), "1": min(before.values())}
    elif method == "oversample":
        assert on_disk["train"] == {"0": max(before.values()), "1": max(before.values())}
    else:
        assert on_disk["train"] == before
    if method == "class_weight":
        weights = manifest["balancing"]["class_weight"]
        n = sum(before.values())
        assert weights == {k: pytest.approx(n / (2 * v), rel=1e-5) for k, v in before.items()}
    for split in ("val", "test"):
        assert on_disk[split] == out["class_counts"][split]
    assert out["train_after_balancing"] == sum(on_disk["train"].values())
    if method == "undersample":
        return  # statistics cover the whole training split, not the subset kept on disk
    train_pixels = np.stack([np.load(__import__("io").BytesIO(bytes(r.image))) for r in
                             spark.read.parquet(str(root / "split=train")).dropDuplicates(["image_id"]).collect()])
    np.testing.assert_allclose(manifest["normalisation"]["mean"],
                               train_pixels.reshape(-1, 3).mean(axis=0), atol=0.01)
    np.testing.assert_allclose(manifest["normalisation"]["std"],
                               train_pixels.reshape(-1, 3).astype(np.float64).std(axis=0), atol=0.01)


def test_a_run_killed_half_way_leaves_no_readable_version(spark, tmp_path, capsys, monkeypatch):
    folder, lake = tmp_path / "in", str(tmp_path / "lake")
    make_folder(folder, groups=10, per_group=2, seed=6, malignant_every=2)
    ingest(capsys, lake, folder, "kill")

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt("killed")  # like SIGKILL: no cleanup runs after this point
    monkeypatch.setattr(preprocess, "_record_splits", killed)
    monkeypatch.setattr(lakefs, "delete", lambda *_a, **_k: None)
    with pytest.raises(KeyboardInterrupt):
        preprocess_job.main(["--lake", lake, "--dataset", "kill", "--size", "16"])
    capsys.readouterr()
    root = Path(lake) / "silver" / "tensors" / "kill"
    leftovers = [p.name for p in root.iterdir()]
    assert leftovers and all(name.startswith("_tmp-") for name in leftovers)
    assert preprocess.published_versions(spark, lakefs.qualify(spark, lake), "kill") == []
    monkeypatch.undo()

    # a second killed run, a day ago: the next run deletes its leftovers, not the fresh ones
    stale = root / "_tmp-v1-stale"
    shutil.copytree(root / leftovers[0], stale)
    day_ago = time.time() - lakefs.ABANDONED_AFTER_S - 60
    os.utime(stale, (day_ago, day_ago))
    code, out, err = run(preprocess_job, capsys, "--lake", lake, "--dataset", "kill", "--size", "16")
    assert code == 0 and out["version"] == 1, err
    assert spark.read.parquet(out["output"] + "/split=train").count() == out["train"]
    assert sorted(p.name for p in root.iterdir()) == sorted(leftovers + ["v1"])


def test_scratch_of_an_ended_process_or_a_day_old_is_swept_and_a_live_runs_is_kept(spark, tmp_path):
    import socket
    import subprocess
    import sys
    root = tmp_path / "tensors"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = socket.gethostname()
    names = {
        "ended": f"_tmp-v1-0a0b0c0d-pid{ended.pid}@{host}",     # its process is gone: a killed run
        "live": lakefs.scratch_name("v1"),                      # this process: a run still going
        "elsewhere": f"_tmp-v1-0a0b0c0d-pid{ended.pid}@another-host",  # cannot tell: kept
        "old elsewhere": f"_tmp-v1-1a1b1c1d-pid{ended.pid}@another-host",
        "old style": "_tmp-v2-1a1b1c1d",
        "published": "v1",
    }
    assert names["live"].endswith(f"-pid{os.getpid()}@{host}")
    for name in names.values():
        (root / name).mkdir(parents=True)
        (root / name / "part-0.parquet").write_bytes(b"x")
    day_ago = time.time() - lakefs.ABANDONED_AFTER_S - 60
    for key in ("old elsewhere", "old style"):
        os.utime(root / names[key], (day_ago, day_ago))
    swept = lakefs.sweep_scratch(spark, lakefs.qualify(spark, str(root)))
    assert sorted(swept) == sorted(names[k] for k in ("ended", "old elsewhere", "old style"))
    assert sorted(p.name for p in root.iterdir()) == sorted(names[k] for k in ("live", "elsewhere", "published"))


def test_an_image_that_fails_to_decode_is_counted_and_left_out(spark, tmp_path, capsys):
    from pyspark.sql import functions as F
    folder, lake = tmp_path / "in", str(tmp_path / "lake")
    make_folder(folder, groups=12, per_group=2, seed=8, malignant_every=3)
    summary = ingest(capsys, lake, folder, "rot")
    # Bytes that rotted in the lake after ingest validated them: a labelled row that no longer decodes.
    bad_id = "f" * 64
    (spark.read.format("delta").load(summary["table"]).filter("dataset = 'rot'").limit(1)
     .withColumn("image_id", F.lit(bad_id)).withColumn("content", F.lit(b"\xff\xd8\xff\xe0 not a jpeg"))
     .withColumn("group_id", F.lit("rotten")).write.format("delta").mode("append").save(summary["table"]))
    code, out, err = run(preprocess_job, capsys, "--lake", lake, "--dataset", "rot", "--size", "16",
                         "--set", "preprocess.balance=oversample")
    assert code == 0, err
    assert out["decode_failures"] == 1
    assert out["train"] + out["val"] + out["test"] == summary["valid"]  # the rotten row is in none
    lineage = splits_of(spark, lake, "rot", out["version"])
    assert bad_id not in lineage and len(lineage) == summary["valid"]
    written = spark.read.parquet(out["output"].removeprefix("file:") + "/split=*").select("image_id")
    assert written.filter(F.col("image_id") == bad_id).count() == 0
    assert {r.image_id for r in written.distinct().collect()} == set(lineage)


def test_no_labels_or_one_class_exits_3(spark, tmp_path, capsys):
    folder, lake = tmp_path / "in", str(tmp_path / "lake")
    make_folder(folder, groups=4, per_group=1, seed=7, start=1, malignant_every=100)  # benign only
    ingest(capsys, lake, folder, "one")
    code, _, err = run(preprocess_job, capsys, "--lake", lake, "--dataset", "one")
    assert code == 3 and "single class" in err.strip().splitlines()[-1]
    code, _, err = run(preprocess_job, capsys, "--lake", lake, "--dataset", "absent")
    assert code == 3 and "no labelled images" in err.strip().splitlines()[-1]
    code, _, err = run(preprocess_job, capsys, "--lake", lake, "--dataset", "one",
                       "--set", "preprocess.balance=smote")
    assert code == 2 and "preprocess.balance" in err


def test_petastorm_metadata_lists_every_files_row_groups_and_its_schema(spark, tmp_path, capsys):
    import pyarrow.parquet as pq
    from petastorm import make_reader
    from petastorm.etl import dataset_metadata
    folder, lake = tmp_path / "in", str(tmp_path / "lake")
    make_folder(folder, groups=40, per_group=2, seed=8)
    ingest(capsys, lake, folder, "rg")
    # row groups of about 4 tensors (Parquet cuts them by size): each file holds several
    code, out, err = run(preprocess_job, capsys, "--lake", lake, "--dataset", "rg", "--size", "32",
                         "--set", "preprocess.rows_per_row_group=4")
    assert code == 0, err
    root = Path(out["output"].removeprefix("file:"))
    groups_seen = []
    for split in preprocess.SPLITS:
        folder_ = root / f"split={split}"
        files = sorted(p.name for p in folder_.glob("*.parquet"))
        footers = {name: pq.ParquetFile(folder_ / name).metadata.num_row_groups for name in files}
        common = pq.read_metadata(folder_ / "_common_metadata").metadata
        assert json.loads(common[dataset_metadata.ROW_GROUPS_PER_FILE_KEY]) == footers
        groups_seen.extend(footers.values() if split == "train" else [])
        assert [f.name for f in dataset_metadata.get_schema_from_dataset_url(f"file://{folder_}").fields.values()] \
            == [f.name for f in preprocess.tensor_schema(32).fields.values()]
        with make_reader(f"file://{folder_}", num_epochs=1, reader_pool_type="dummy") as reader:
            assert sum(1 for _ in reader) == out[split]
    assert len(list((root / "split=train").glob("*.parquet"))) >= preprocess.MIN_FILES
    assert min(groups_seen) > 1, groups_seen  # every training file: several row groups


def test_decode_tasks_are_bronzes_read_splits_when_enough_else_spread_by_image(spark, tmp_path, capsys):
    folder, lake = tmp_path / "in", str(tmp_path / "lake")
    make_folder(folder, groups=30, per_group=2, seed=9)
    ingest(capsys, lake, folder, "tasks")
    bronze = spark.read.format("delta").load(lakefs.table_uri(lakefs.qualify(spark, lake), "bronze.images"))
    cores = spark.sparkContext.defaultParallelism
    few = bronze.coalesce(1)
    spread = preprocess._decode_input(spark, few, 60, 1000)
    assert spread.rdd.getNumPartitions() == max(preprocess.MIN_FILES, cores)
    many = bronze.repartition(8)
    assert preprocess._decode_input(spark, many, 60, 1000) is many
    # more than twice the planned tasks' tensor bytes each: spread out
    tasks = preprocess._tasks(spark, 60, 40 * preprocess.TASK_BYTES)
    assert preprocess._decode_input(spark, many, 60, 40 * preprocess.TASK_BYTES).rdd.getNumPartitions() == tasks
    # and the tensors are the same either way: bronze read whole, or in splits of a few images each

    def tensors():
        code, out, err = run(preprocess_job, capsys, "--lake", lake, "--dataset", "tasks", "--size", "16")
        assert code == 0, err
        root = Path(out["output"].removeprefix("file:"))
        rows = {(r.image_id, r.split, bytes(r.image)) for r in spark.read.parquet(str(root)).collect()}
        shutil.rmtree(root.parent)  # the next run makes version 1 again
        return rows
    coarse = tensors()
    with lakefs.spark_conf(spark, {"spark.sql.files.maxPartitionBytes": "4k", "spark.sql.files.openCostInBytes": "1"}):
        assert bronze.filter("dataset = 'tasks'").rdd.getNumPartitions() >= max(preprocess.MIN_FILES, cores)
        fine = tensors()
    assert len(coarse) == 60 and fine == coarse
