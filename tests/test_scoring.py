"""The score job: incremental partitions, idempotence, predictions equal model.predict."""
import contextlib
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from pyspark.sql import functions as F

from jobs import ingest as ingest_job
from jobs import preprocess as preprocess_job
from jobs import score as score_job
from oncolake import config, evaluation, imaging, lake, registry, synthetic, training
from tests.conftest import (ROOT, killed_three_times_then_rerun, last_json, last_step, no_leftovers, seeded_moments,
                            submit_killed)
from tests.test_stream import broker  # noqa: F401  (a fixture: the Kafka broker)


def run(job, capsys, *args):
    code = job.main(list(args))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return last_json(captured.out)


def _quiet(job, *args) -> dict:
    """Run a job outside a test (no capsys): its summary from a captured stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = job.main(list(args))
    assert code == 0, out.getvalue()[-3000:]
    return last_json(out.getvalue())


@pytest.fixture(scope="module")
def template(spark, tmp_path_factory):
    """Built once: two ingest dates, a tensor version, a registered (untrained) model with a threshold."""
    root = tmp_path_factory.mktemp("scoring-template")
    lake_dir = str(root / "lake")
    for day, (start, seed) in {"2026-05-01": (0, 1), "2026-05-02": (10, 2)}.items():
        folder = synthetic.write_dataset(root / day, groups=10, per_group=2, seed=seed, start=start,
                                         malignant_every=2)
        _quiet(ingest_job, "--lake", lake_dir, "--dataset", "syn", "--input", str(folder),
               "--labels", str(folder / "labels.csv"), "--ingest-date", day)
    _quiet(preprocess_job, "--lake", lake_dir, "--dataset", "syn", "--size", "16")
    model = training.build_model(16, [120.0] * 3, [50.0] * 3, config.TrainConfig(filters=(4,), dense_units=4))
    path = root / "model.keras"
    model.save(path)
    # what training records, as far as evaluate and scoring read it (no selection: not trained)
    record = {"size": 16, "resize": "stretch", "tensors_version": 1, "architecture": "cnn3", "num_proc": 1,
              "epochs_run": 0, "source_table_version": json.loads(
                  (root / "lake" / "silver" / "tensors" / "syn" / "v1" / "manifest.json").read_text())[
                  "source_table_version"]}
    registry.register(spark, lake.qualify(spark, lake_dir), "syn", {
        "model.keras": path.read_bytes(), "model.json": json.dumps(record).encode(),
        "metrics.json": json.dumps({"threshold": 0.5}).encode()})
    return root


@pytest.fixture()
def scored_lake(spark, tmp_path, template):
    """A private copy of the template (Delta and Petastorm paths inside a table are relative)."""
    shutil.copytree(template, tmp_path, dirs_exist_ok=True)
    lake_dir = str(tmp_path / "lake")
    lake_uri = lake.qualify(spark, lake_dir)
    return lake_dir, lake_uri, registry.version_uri(lake_uri, "syn", 1)


def test_partitions_are_scored_once_and_a_new_date_alone(spark, tmp_path, capsys, scored_lake):
    lake_dir, lake_uri, _ = scored_lake
    first = run(score_job, capsys, "--lake", lake_dir, "--dataset", "syn")
    assert first["partitions_scored"] == ["2026-05-01", "2026-05-02"]
    assert (first["scored"], first["errors"], first["model_version"]) == (40, 0, 1)

    again = run(score_job, capsys, "--lake", lake_dir, "--dataset", "syn")
    assert (again["partitions_scored"], again["scored"]) == ([], 0)

    folder = synthetic.write_dataset(tmp_path / "third", groups=5, per_group=1, seed=9, start=50)
    run(ingest_job, capsys, "--lake", lake_dir, "--dataset", "syn", "--input", str(folder),
        "--ingest-date", "2026-05-03")
    third = run(score_job, capsys, "--lake", lake_dir, "--dataset", "syn")
    assert (third["partitions_scored"], third["scored"]) == (["2026-05-03"], 5)
    forced = run(score_job, capsys, "--lake", lake_dir, "--dataset", "syn", "--all")
    assert forced["scored"] == 0 and forced["already_scored"] == 45

    table = spark.read.format("delta").load(first["table"])
    assert table.count() == 45
    assert table.select("image_id", "model_version").distinct().count() == 45


def test_predictions_equal_model_predict_on_the_preprocessed_tensors(spark, capsys, scored_lake):
    lake_dir, lake_uri, model_dir = scored_lake
    summary = run(score_job, capsys, "--lake", lake_dir, "--dataset", "syn")
    predicted = {r.image_id: (r.probability, r.predicted_label, r.threshold) for r in
                 spark.read.format("delta").load(summary["table"]).collect()}
    model = registry.load_model(spark, model_dir)
    tensors = lake_uri + "/silver/tensors/syn/v1"
    seen = 0
    for split in ("train", "val", "test"):
        ids, images, _ = evaluation.read_split(registry.petastorm_url(f"{tensors}/split={split}"))
        expected = model.predict(images, verbose=0).ravel()
        for image_id, value in zip(ids, expected):
            probability, label, threshold = predicted[image_id]
            assert probability == pytest.approx(float(value), abs=1e-6)
            assert label == int(value >= 0.5) and threshold == 0.5
            seen += 1
    assert seen == len(predicted)


def test_training_tensors_are_the_images_as_an_independent_decoder_sees_them(spark, capsys, scored_lake):
    """Pillow decodes (RGB) and box-filters each stored PNG to 16 x 16; the tensors
    preprocess wrote, and what scoring's imaging.prepare makes of the same bytes, agree
    with it to within resampling differences. A channel swap (OpenCV decodes BGR) or
    another crop fails here."""
    import io

    from PIL import Image
    lake_dir, lake_uri, _ = scored_lake
    content = {r.image_id: bytes(r.content) for r in
               spark.read.format("delta").load(lake_uri + "/bronze/images").select("image_id", "content").collect()}
    ids, images, _ = evaluation.read_split(registry.petastorm_url(lake_uri + "/silver/tensors/syn/v1/split=train"))
    assert len(ids) > 10
    for image_id, tensor in zip(ids, images):
        with Image.open(io.BytesIO(content[image_id])) as picture:
            reference = np.asarray(picture.convert("RGB").resize((16, 16), Image.BOX), dtype=np.int16)
        for made in (tensor, imaging.prepare(content[image_id], 16, "stretch")):
            diff = np.abs(made.astype(np.int16) - reference)
            # The two area filters weigh pixels differently at fractional scales (noisy
            # images: a few levels on average); a channel swap moves the background by 50.
            swapped = np.abs(made.astype(np.int16) - reference[..., ::-1]).mean()
            assert made.shape == (16, 16, 3) and diff.mean() < 4 and swapped > 15, (image_id, diff.mean(), swapped)


def test_an_undecodable_image_is_recorded_not_fatal(spark, tmp_path, capsys, scored_lake):
    lake_dir, lake_uri, _ = scored_lake
    from delta.tables import DeltaTable
    table = DeltaTable.forPath(spark, lake_uri + "/bronze/images")
    victim = table.toDF().filter("ingest_date = '2026-05-02'").select("image_id").first()[0]
    table.update(f"image_id = '{victim}'", {"content": "X'00010203'"})
    summary = run(score_job, capsys, "--lake", lake_dir, "--dataset", "syn")
    assert summary["scored"] == 40 and summary["errors"] == 1
    row = spark.read.format("delta").load(summary["table"]).filter(f"image_id = '{victim}'").first()
    assert row.probability is None and row.predicted_label is None and row.error


def test_catalog_views_answer_counts_and_joins_and_delta_rs_agrees(spark, capsys, scored_lake):
    from deltalake import DeltaTable as RustDeltaTable

    from oncolake import catalog
    lake_dir, lake_uri, _ = scored_lake
    run(score_job, capsys, "--lake", lake_dir, "--dataset", "syn")
    declared = catalog.register(spark, lake_uri, database="oncolake_test")
    assert set(declared) == {f"oncolake_test.{n}" for n in ("images", "predictions", "quarantine",
                                                            "latest_predictions")}
    assert "content" not in spark.table("oncolake_test.images").columns
    counts = {r["ingest_date"].isoformat(): r["n"] for r in spark.sql(
        "SELECT ingest_date, count(*) AS n FROM oncolake_test.latest_predictions GROUP BY ingest_date").collect()}
    assert counts == {"2026-05-01": 20, "2026-05-02": 20}
    joined = spark.sql("SELECT known_label, predicted_label FROM oncolake_test.latest_predictions").collect()
    assert len(joined) == 40 and {r.known_label for r in joined} == {"benign", "malignant"}

    # the same tables without Spark, through delta-rs
    local = lake_uri.removeprefix("file:")
    predictions = RustDeltaTable(local + "/gold/predictions").to_pyarrow_table()
    images = RustDeltaTable(local + "/bronze/images").to_pyarrow_table(columns=["image_id", "dataset"])
    assert predictions.num_rows == 40 and images.num_rows == 40
    assert set(predictions.column("image_id").to_pylist()) == set(images.column("image_id").to_pylist())


def test_predict_sh_prints_probability_label_and_version(spark, tmp_path, capsys, scored_lake):
    import subprocess


    lake_dir, lake_uri, model_dir = scored_lake
    image = next(p for p in (tmp_path / "2026-05-01").glob("*.png"))
    text = tmp_path / "note.png"
    text.write_text("not an image")
    result = subprocess.run([str(ROOT / "scripts" / "predict.sh"), "--lake", lake_dir, "--dataset", "syn",
                             "--explain", "--explain-dir", str(tmp_path / "why"), str(image), str(text)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1  # one file was not an image
    lines = result.stdout.strip().splitlines()
    name, probability, label, version, overlay = lines[0].split("\t")
    model = registry.load_model(spark, model_dir)
    expected = float(model.predict(imaging.prepare(image.read_bytes(), 16, "stretch")[None], verbose=0)[0, 0])
    assert float(probability) == pytest.approx(expected, abs=1e-4)
    assert label == ("malignant" if expected >= 0.5 else "benign") and version == "model v1"
    # the overlay is the 16 x 16 model input blended with its Grad-CAM heat map
    from oncolake import explain
    assert overlay == str(tmp_path / "why" / f"{image.stem}.gradcam.png")
    tensor = imaging.prepare(image.read_bytes(), 16, "stretch")
    want = explain.overlay(tensor, explain.gradcam(model, tensor[None])[0])
    got = cv2.imread(overlay)[:, :, ::-1]
    assert got.shape == (16, 16, 3) and np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert lines[1].startswith(str(text)) and "unsupported_format" in lines[1]
    assert json.loads(lines[-1])["errors"] == 1


def test_nightly_ingests_new_images_scores_them_and_logs_the_night(spark, tmp_path, capsys, scored_lake):
    from jobs import nightly as nightly_job
    lake_dir, lake_uri, _ = scored_lake
    incoming = synthetic.write_dataset(tmp_path / "incoming", groups=3, per_group=2, seed=21, start=70)
    args = ["--lake", lake_dir, "--set", "nightly.dataset=syn", "--set", f"nightly.incoming={incoming}"]
    first = run(nightly_job, capsys, *args)
    # the earlier two dates are caught up too (nothing was scored before), plus tonight's 6 images
    assert (first["ingested"], first["scored"], first["errors"]) == (6, 46, 0)
    tonight = spark.read.format("delta").load(lake_uri + "/gold/predictions").filter(
        F.col("scored_at") >= F.lit(first["started_at"]).cast("timestamp")).select("predicted_label").collect()
    assert len(tonight) == 46
    assert first["malignant_rate"] == pytest.approx(sum(r.predicted_label for r in tonight) / 46, abs=1e-4)
    # the same images as the model's reference (built on first use): figures, no alert
    assert first["psi_brightness"] is not None and first["drift_alert"] is False and first["alerts"] == ""
    assert first["quarantine_rate"] == 0.0 and json.loads(first["input_mix"]) == {
        "format": {"png": 46}, "modality": {"unspecified": 46}}
    second = run(nightly_job, capsys, *args)
    assert (second["ingested"], second["scored"], second["malignant_rate"]) == (0, 0, None)
    assert (second["psi_brightness"], second["quarantine_rate"], second["drift_alert"]) == (None, None, False)
    nights = spark.read.format("delta").load(first["run_log"]).orderBy("started_at").collect()
    assert [(n.ingested, n.scored) for n in nights] == [(6, 46), (0, 0)]
    page = (tmp_path / "lake" / "reports" / "nightly.html").read_text()
    assert "data:image/png;base64," in page and "research" in page and "psi_brightness" in page


def _darken(folder, factor: float) -> None:
    for path in folder.glob("*.png"):
        cv2.imwrite(str(path), (cv2.imread(str(path)) * factor).astype(np.uint8))


def _brightness(folder) -> float:
    """Mean grey level in [0, 1] of a folder's PNGs, at full size (a resize keeps the mean)."""
    return float(np.mean([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2GRAY).mean() / 255
                          for p in folder.glob("*.png")]))


def test_a_darkened_night_raises_the_drift_alert_and_the_gate_stops_it(spark, tmp_path, capsys, scored_lake):
    from jobs import nightly as nightly_job
    lake_dir, lake_uri, model_dir = scored_lake
    gated = ["--lake", lake_dir, "--set", "nightly.dataset=syn", "--set", "nightly.drift.gate=true"]
    calm = synthetic.write_dataset(tmp_path / "calm", groups=16, per_group=2, seed=31, start=100)
    first = run(nightly_job, capsys, *gated, "--set", f"nightly.incoming={calm}")
    assert (first["scored"], first["drift_alert"]) == (72, False), first["alerts"]  # 40 caught up + 32
    reference = json.loads(lake.read_text(spark, f"{model_dir}/reference.json"))
    tensors = spark.read.parquet(f"{lake_uri}/silver/tensors/syn/v1/split=train",
                                 f"{lake_uri}/silver/tensors/syn/v1/split=val")
    assert reference["images"] == tensors.select("image_id").distinct().count()
    assert len(reference["values"]["probability"]) == spark.read.parquet(
        f"{lake_uri}/silver/tensors/syn/v1/split=val").count()

    dark = synthetic.write_dataset(tmp_path / "dark", groups=16, per_group=2, seed=32, start=200)
    _darken(dark, 0.35)
    code = nightly_job.main([*gated, "--set", f"nightly.incoming={dark}"])
    captured = capsys.readouterr()
    assert code == 3, captured.err[-3000:]
    night = last_json(captured.out)  # the gate still prints what the night did
    assert (night["ingested"], night["scored"], night["drift_alert"]) == (32, 32, True)
    assert "brightness: PSI" in night["alerts"] and night["psi_brightness"] >= 0.25
    assert night["brightness"] == pytest.approx(_brightness(dark), abs=0.01)
    assert first["brightness"] > 2 * night["brightness"]
    logged = spark.read.format("delta").load(night["run_log"]).orderBy("started_at").collect()
    assert [(n.scored, n.drift_alert) for n in logged] == [(72, False), (32, True)]
    # the night's predictions landed (only export is held back); each carries its image's figures
    tonight = spark.read.format("delta").load(lake_uri + "/gold/predictions").filter(
        F.col("scored_at") >= F.lit(night["started_at"]).cast("timestamp"))
    assert tonight.filter(F.col("brightness").isNotNull() & F.col("sharpness").isNotNull()).count() == 32
    page = (tmp_path / "lake" / "reports" / "nightly.html").read_text()
    assert "Data-quality alert on the latest night" in page and "brightness: PSI" in page


def test_a_dicom_night_scored_by_a_model_of_another_modality_is_refused_row_by_row(spark, tmp_path, capsys,
                                                                                    scored_lake):
    import subprocess

    from tests import dicomfiles

    lake_dir, lake_uri, _ = scored_lake  # the model knows the synthetic images' modality, "unspecified"
    folder = tmp_path / "mammo-night"
    for i in range(3):
        dicomfiles.write(dicomfiles.phi_dataset(dicomfiles.gradient(seed=i), patient=str(900 + i), instance=i),
                         folder / f"m{i}.dcm")
    key = tmp_path / "dicom.key"
    key.write_bytes(b"s" * 40)
    ingested = run(ingest_job, capsys, "--lake", lake_dir, "--dataset", "syn", "--input", str(folder),
                   "--ingest-date", "2026-05-09", "--set", f"ingest.dicom.key_file={key}")
    assert (ingested["dicom"], ingested["ingested"]) == (3, 3)
    summary = run(score_job, capsys, "--lake", lake_dir, "--dataset", "syn", "--ingest-date", "2026-05-09")
    assert (summary["scored"], summary["errors"], summary["modality_mismatch"]) == (3, 3, 3)
    assert summary["model_modalities"] == ["unspecified"]
    rows = (spark.read.format("delta").load(summary["table"]).filter("ingest_date = '2026-05-09'")
            .select("probability", "predicted_label", "error").collect())
    assert [tuple(r) for r in rows] == [(None, None, "modality_mismatch")] * 3
    # the other nights still score: the guard is per image, not per job
    rest = run(score_job, capsys, "--lake", lake_dir, "--dataset", "syn")
    assert (rest["scored"], rest["modality_mismatch"]) == (40, 0)

    result = subprocess.run([str(ROOT / "scripts" / "predict.sh"), "--lake", lake_dir, "--dataset", "syn",
                             str(folder / "m0.dcm")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    line = result.stdout.strip().splitlines()[0]
    assert line.startswith(f"{folder / 'm0.dcm'}\terror\tmodality_mismatch: a MG image")
    assert json.loads(result.stdout.strip().splitlines()[-1])["modality_mismatch"] == 1


def test_a_tampered_model_file_is_refused_before_it_is_loaded(spark, tmp_path, capsys, scored_lake):
    import hashlib
    import subprocess


    lake_dir, lake_uri, model_dir = scored_lake
    folder = Path(model_dir.removeprefix("file:"))
    original = (folder / "model.keras").read_bytes()
    assert json.loads((folder / "checksums.json").read_text()) == {
        "model.keras": hashlib.sha256(original).hexdigest()}
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    (folder / "model.keras").write_bytes(bytes(tampered))

    # On local disk, Hadoop's own .crc beside the file notices first
    code = score_job.main(["--lake", lake_dir, "--dataset", "syn"])
    err = capsys.readouterr().err
    assert code == 1 and "fails Hadoop's checksum" in err.strip().splitlines()[-1]
    # ... and with that gone too (a store without it, or a careful attacker), the registry's SHA-256
    (folder / ".model.keras.crc").unlink()
    code = score_job.main(["--lake", lake_dir, "--dataset", "syn"])
    err = capsys.readouterr().err
    assert code == 1 and "model.keras is not the file registered" in err.strip().splitlines()[-1]
    image = next((tmp_path / "2026-05-01").glob("*.png"))
    result = subprocess.run([str(ROOT / "scripts" / "predict.sh"), "--lake", lake_dir, "--dataset", "syn",
                             str(image)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "is not the file registered" in result.stderr.strip().splitlines()[-1]
    assert not spark.read.format("delta").load(lake_uri + "/bronze/images").isEmpty()  # nothing else touched
    (folder / "model.keras").write_bytes(original)  # restored (still without its .crc): scores again
    assert run(score_job, capsys, "--lake", lake_dir, "--dataset", "syn")["scored"] == 40


@pytest.mark.slow
@pytest.mark.kafka
def test_nightly_takes_the_nights_images_from_a_kafka_topic(spark, tmp_path, capsys, scored_lake, broker):
    from jobs import nightly as nightly_job
    from tests.test_stream import BOOTSTRAP, produce
    lake_dir, _, _ = scored_lake
    incoming = synthetic.write_dataset(tmp_path / "incoming", groups=3, per_group=2, seed=21, start=70)
    sent = produce(capsys, lake_dir, "nightly-syn", "syn", incoming)
    assert sent["acknowledged"] == 6
    args = ["--lake", lake_dir, "--set", "nightly.dataset=syn", "--set", "nightly.topic=nightly-syn",
            "--set", f"stream.bootstrap_servers={BOOTSTRAP}"]
    first = run(nightly_job, capsys, *args)
    assert (first["ingested"], first["scored"], first["errors"]) == (6, 46, 0)
    second = run(nightly_job, capsys, *args)  # nothing published since: nothing ingested or scored
    assert (second["ingested"], second["scored"]) == (0, 0)


def _spaced_checkout(folder):
    """This checkout's code under a folder whose names hold spaces (environment and jars linked)."""
    checkout = folder / "my projects" / "onco lake"
    for part in ("lib", "jobs", "conf", "scripts"):
        shutil.copytree(ROOT / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
    (checkout / ".venv").symlink_to(ROOT / ".venv")
    (checkout / ".cache").symlink_to(ROOT / ".cache")
    return checkout


def _together(barrier: str, folder, *commands: list[str], roots=()) -> list[tuple[int, dict | None, str]]:
    """Run spark-submit jobs at once (the i-th from checkout ``roots[i]``, default this one);
    each waits at the named barrier until all are there."""
    import os
    import subprocess
    env = {**os.environ, "ONCOLAKE_BARRIER": f"{barrier}:{len(commands)}:{folder}"}
    roots = list(roots) + [ROOT] * (len(commands) - len(roots))
    # Each job's output goes to a file: read through pipes one after the other,
    # a job that filled its pipe (64 kB of logs) would block before the barrier
    # while the other waited there for it.
    logs = [Path(f"{folder}-{i}.log") for i in range(len(commands))]
    procs = []
    for root, cmd, log in zip(roots, commands, logs):
        with log.open("w") as out:  # spark-submit's PythonRunner merges the driver's stderr into its stdout
            procs.append(subprocess.Popen([str(root / "scripts" / "submit.sh"), *cmd], stdout=out,
                                          stderr=subprocess.STDOUT, text=True, env=env))
    results = []
    for proc, log in zip(procs, logs):
        try:
            proc.wait(timeout=600)
        finally:
            proc.kill()
        out = log.read_text()
        results.append((proc.returncode, last_json(out) if proc.returncode == 0 else None, out))
    return results


@pytest.mark.slow
@pytest.mark.faults
def test_two_ingests_and_two_scorings_at_once_commit_every_row_exactly_once(spark, tmp_path, scored_lake):
    lake_dir, lake_uri, _ = scored_lake
    night = synthetic.write_dataset(tmp_path / "night", groups=15, per_group=2, seed=5, start=100)
    names = sorted(p.name for p in night.glob("*.png"))
    halves = [tmp_path / "first", tmp_path / "second"]
    for half, chosen in zip(halves, (names[:20], names[10:])):  # 10 images in both
        half.mkdir()
        for name in chosen:
            shutil.copyfile(night / name, half / name)

    # One of the two is submitted from a checkout under "my projects/onco lake": paths with
    # spaces reach spark-submit's --driver-java-options (unquoted, the JVM took "projects.onco"
    # for its main class).
    ingests = _together("ingest.merge", tmp_path / "barrier-ingest", *[
        ["ingest", "--lake", lake_dir, "--dataset", "syn", "--input", str(half), "--ingest-date", "2026-05-03"]
        for half in halves], roots=[_spaced_checkout(tmp_path)])
    for code, _, err in ingests:
        assert code == 0, "\n--- the other ingest ---\n".join(e[-3000:] for _, _, e in ingests)
    assert any("lost a concurrent commit" in err for _, _, err in ingests)  # they did collide, and retried
    bronze = spark.read.format("delta").load(f"{lake_uri}/bronze/images").filter("ingest_date = '2026-05-03'")
    assert bronze.count() == bronze.select("image_id").distinct().count() == 30
    assert sum(s["ingested"] for _, s, _ in ingests) == 30  # each counts its own commits, not the other's

    scorings = _together("score.merge", tmp_path / "barrier-score",
                         *[["score", "--lake", lake_dir, "--dataset", "syn"]] * 2)
    for code, _, err in scorings:
        assert code == 0, "\n--- the other scoring ---\n".join(e[-3000:] for _, _, e in scorings)
    assert any("lost a concurrent commit" in err for _, _, err in scorings)
    predictions = spark.read.format("delta").load(f"{lake_uri}/gold/predictions")
    keys = predictions.select("image_id", "model_version", "ingest_date")
    assert predictions.count() == keys.distinct().count() == 40 + 30
    assert sum(s["scored"] for _, s, _ in scorings) == 70


def _night_tables(spark, lake_uri: str, tables=("bronze", "quarantine", "predictions")) -> dict[str, list]:
    """What a night leaves in the lake, without its timestamps."""
    def load(table):
        return spark.read.format("delta").load(f"{lake_uri}/{table}").filter(F.col("dataset") == "syn").collect()
    rows = {
        "bronze": lambda: sorted((r.image_id, r.relative_path, r.label, str(r.ingest_date))
                                 for r in load("bronze/images")),
        "quarantine": lambda: sorted((r.relative_path, r.reason) for r in load("bronze/quarantine")),
        "predictions": lambda: sorted((r.image_id, r.model_version, str(r.ingest_date), r.predicted_label, r.error,
                                       None if r.probability is None else round(r.probability, 6),
                                       None if r.brightness is None else round(r.brightness, 6))
                                      for r in load("gold/predictions")),
    }
    return {table: rows[table]() for table in tables}


@pytest.mark.slow
@pytest.mark.faults
def test_a_night_killed_at_three_seeded_moments_then_rerun_ends_as_one_uninterrupted_night(spark, tmp_path,
                                                                                          scored_lake):
    import subprocess
    import time

    from deltalake import DeltaTable as RustDeltaTable

    from jobs import nightly as nightly_job

    lake_dir, lake_uri, model_dir = scored_lake
    twin = tmp_path / "twin"
    shutil.copytree(tmp_path / "lake", twin / "lake")  # the same lake, for one uninterrupted night
    incoming = synthetic.write_dataset(tmp_path / "incoming", groups=20, per_group=2, seed=41, start=300)
    (incoming / "cut.png").write_bytes((incoming / "p300_0.png").read_bytes()[:200])
    (incoming / "notes.png").write_text("not an image\n")

    def night(lake: str) -> list[str]:
        return ["nightly", "--lake", lake, "--set", "nightly.dataset=syn", "--set", f"nightly.incoming={incoming}"]

    # the same night, uninterrupted and in this process: the tables to match, and how long the work takes
    start = time.monotonic()
    run_quiet = _quiet(nightly_job, *night(str(twin / "lake"))[1:])
    work = time.monotonic() - start
    assert run_quiet["ingested"] == 40
    moments = seeded_moments(work, 14)
    reached = [last_step(submit_killed(night(lake_dir), moment)[0]) for moment in moments]
    rerun_started = time.time()
    rerun = subprocess.run([str(ROOT / "scripts" / "submit.sh"), *night(lake_dir)], capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:]

    # every table as after the one uninterrupted night: rows, keys, labels, no duplicates
    want, got = _night_tables(spark, lake.qualify(spark, str(twin / "lake"))), _night_tables(spark, lake_uri)
    assert got == want, f"killed at {moments} s of {work:.0f} s, after {reached}"
    assert len(got["bronze"]) == len({r[0] for r in got["bronze"]}) == 40 + 40
    assert len(got["predictions"]) == len({r[:3] for r in got["predictions"]}) == 80
    assert len(got["quarantine"]) == 2
    # the model's reference, if a run got to build it (the one that scores builds it), is whole and the same
    if lake.exists(spark, f"{model_dir}/reference.json"):
        reference = json.loads(lake.read_text(spark, f"{model_dir}/reference.json"))
        twin_reference = json.loads((twin / "lake" / "models" / "syn" / "v1" / "reference.json").read_text())
        assert reference["values"] == twin_reference["values"]
    # delta-rs reads every table the night writes, row for row
    for table in ("bronze/images", "bronze/quarantine", "gold/predictions", "gold/nightly_runs"):
        path = tmp_path / "lake" / table
        assert RustDeltaTable(str(path)).to_pyarrow_table().num_rows == spark.read.format("delta").load(
            str(path)).count(), table
    # no temporary folder left behind; the last run left no partial file of its own
    assert no_leftovers(tmp_path / "lake", rerun_started) == []
    assert (tmp_path / "lake" / "reports" / "nightly.html").read_text().rstrip().endswith("</html>")


@pytest.mark.slow
@pytest.mark.faults
def test_ingest_then_score_each_killed_at_three_seeded_moments_then_rerun_leave_what_uninterrupted_runs_do(
        spark, tmp_path, scored_lake):
    from deltalake import DeltaTable as RustDeltaTable

    lake_dir, lake_uri, _ = scored_lake
    twin = tmp_path / "twin" / "lake"
    shutil.copytree(lake_dir, twin)
    incoming = synthetic.write_dataset(tmp_path / "incoming", groups=20, per_group=2, seed=43, start=500,
                                       malignant_every=3)
    (incoming / "cut.png").write_bytes((incoming / "p500_0.png").read_bytes()[:200])
    (incoming / "notes.png").write_text("not an image\n")

    def same(tables: tuple[str, ...], reached) -> dict:
        want = _night_tables(spark, lake.qualify(spark, str(twin)), tables)
        got = _night_tables(spark, lake_uri, tables)
        for table in tables:
            assert got[table] == want[table], (table, reached)
        return got

    ingest = ["--lake", lake_dir, "--dataset", "syn", "--input", str(incoming), "--labels",
              str(incoming / "labels.csv"), "--ingest-date", "2026-05-07"]
    reached, rerun_started, summary = killed_three_times_then_rerun(
        "ingest", ingest, ["--lake", str(twin), *ingest[2:]], 20)
    got = same(("bronze", "quarantine"), reached)
    assert len(got["bronze"]) == len({r[0] for r in got["bronze"]}) == 40 + 40, reached
    assert sorted(p for p, _ in got["quarantine"]) == ["cut.png", "notes.png"]
    assert summary["ingested"] <= 40  # the rerun counts only the rows it committed itself
    ingest_leftovers = no_leftovers(tmp_path / "lake", rerun_started)

    score = ["--lake", lake_dir, "--dataset", "syn"]
    reached, rerun_started, summary = killed_three_times_then_rerun(
        "score", score, ["--lake", str(twin), *score[2:]], 21)
    got = same(("predictions",), reached)
    assert len(got["predictions"]) == len({r[:3] for r in got["predictions"]}) == 80, reached
    for table in ("bronze/images", "bronze/quarantine", "gold/predictions"):
        path = tmp_path / "lake" / table
        assert RustDeltaTable(str(path)).to_pyarrow_table().num_rows == spark.read.format("delta").load(
            str(path)).count(), table
    assert ingest_leftovers == [] and no_leftovers(tmp_path / "lake", rerun_started) == [], reached


def _tensor_state(spark, lake_uri: str) -> dict:
    """What preprocess leaves: versions, manifests (without their time), tensors and recorded splits."""
    import hashlib

    from oncolake import preprocess
    versions = preprocess.published_versions(spark, lake_uri, "syn")
    state = {"versions": versions}
    for version in versions:
        manifest = preprocess.read_manifest(spark, lake_uri, "syn", version)
        manifest.pop("created_at"), manifest.pop("source_table")  # when, and which lake
        state[f"manifest v{version}"] = manifest
        tensors = spark.read.parquet(lake.tensors_uri(lake_uri, "syn", version))
        state[f"tensors v{version}"] = sorted(
            (r.image_id, r.label, r.split, hashlib.sha256(bytes(r.image)).hexdigest()) for r in tensors.collect())
    splits = spark.read.format("delta").load(lake.table_uri(lake_uri, "silver.splits"))
    state["splits"] = sorted(tuple(r) for r in splits.collect())
    return state


@pytest.mark.slow
@pytest.mark.faults
def test_preprocess_killed_at_three_seeded_moments_then_rerun_builds_the_one_version_an_uninterrupted_run_does(
        spark, tmp_path, scored_lake):
    from deltalake import DeltaTable as RustDeltaTable

    lake_dir, lake_uri, _ = scored_lake
    folder = synthetic.write_dataset(tmp_path / "more", groups=10, per_group=2, seed=23, start=400, malignant_every=2)
    _quiet(ingest_job, "--lake", lake_dir, "--dataset", "syn", "--input", str(folder),
           "--labels", str(folder / "labels.csv"), "--ingest-date", "2026-05-04")
    twin = tmp_path / "twin" / "lake"
    shutil.copytree(lake_dir, twin)
    args = ["--lake", lake_dir, "--dataset", "syn", "--size", "16"]

    reached, rerun_started, _ = killed_three_times_then_rerun("preprocess", args, ["--lake", str(twin), *args[2:]], 16)

    want, got = _tensor_state(spark, lake.qualify(spark, str(twin))), _tensor_state(spark, lake_uri)
    assert got == want, f"killed after {reached}"
    assert got["versions"] == [1, 2]
    # the killed runs' scratch folders are gone too: their driver processes have ended
    assert no_leftovers(tmp_path / "lake", rerun_started) == [], reached
    path = tmp_path / "lake" / "silver" / "splits"
    assert RustDeltaTable(str(path)).to_pyarrow_table().num_rows == len(got["splits"])


@pytest.mark.slow
@pytest.mark.faults
def test_evaluate_killed_at_three_seeded_moments_then_rerun_leaves_what_an_uninterrupted_run_does(
        spark, tmp_path, scored_lake):
    lake_dir, lake_uri, model_dir = scored_lake
    twin = tmp_path / "twin" / "lake"
    shutil.copytree(lake_dir, twin)
    args = ["--lake", lake_dir, "--dataset", "syn"]
    reached, rerun_started, _ = killed_three_times_then_rerun("evaluate", args, ["--lake", str(twin), *args[2:]], 17)

    mine, theirs = tmp_path / "lake" / "models" / "syn" / "v1", twin / "models" / "syn" / "v1"
    def files(folder):
        return sorted(p.name for p in folder.iterdir() if lake.PARTIAL not in p.name)
    assert files(mine) == files(theirs), reached
    for name in ("metrics.json", "reference.json"):  # whole, and the same figures
        got, want = (json.loads((folder / name).read_text()) for folder in (mine, theirs))
        got.pop("built_at", None), want.pop("built_at", None)
        assert got == want, (name, reached)
    assert (mine / "report.html").read_text().rstrip().endswith("</html>")
    assert no_leftovers(tmp_path / "lake", rerun_started) == [], reached
