"""Serving, against real servers: PostgreSQL (scripts/postgres.sh), the export job,
Spark's Thrift server over JDBC (scripts/thrift.sh, beeline), the API under
uvicorn (scripts/serve.sh, httpx) and its page in headless Chromium."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from jobs import export as export_job
from jobs import ingest as ingest_job
from jobs import preprocess as preprocess_job
from jobs import score as score_job
from oncolake import config, lake, registry, synthetic, training
from tests import dicomfiles
from tests.conftest import ROOT, last_json
from tests.test_scoring import _quiet

pytestmark = [pytest.mark.slow, pytest.mark.serve]
PG_PORT = 15432     # not the defaults: a developer's servers are left alone
API_PORT = 18000
THRIFT_PORT = 10016
ARTIFACTS = ROOT / "var" / "test-artifacts"


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def script(name: str, *args: str, env: dict | None = None, stdin: str | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / name), *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), input=stdin, timeout=timeout)


@pytest.fixture(scope="module")
def postgres():
    # Under /tmp, open to the `postgres` user the server runs as (pytest's own
    # temporary folders are private to root).
    state = Path(tempfile.mkdtemp(prefix="oncolake-pg-"))
    state.chmod(0o755)
    env = {"ONCOLAKE_PG_DIR": str(state), "ONCOLAKE_PG_PORT": str(PG_PORT)}
    try:
        started = script("postgres.sh", "start", env=env)
        assert started.returncode == 0, started.stderr
        url = started.stdout.strip().splitlines()[-1]
        assert url == f"postgresql://oncolake@127.0.0.1:{PG_PORT}/oncolake"  # no password in it
        again = script("postgres.sh", "start", env=env)  # idempotent: roles and database already there
        assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == url, again.stderr
        assert oct((state / "pgpass").stat().st_mode & 0o777) == "0o600"
        yield {"url": url, "passfile": str(state / "pgpass"), "env": env,
               "sets": ["--set", f"serve.database_url={url}", "--set", f"serve.database_passfile={state / 'pgpass'}"]}
    finally:
        stopped = script("postgres.sh", "stop", env=env)
        shutil.rmtree(state, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr
    assert not port_open(PG_PORT), "PostgreSQL still listens after stop"


def connect(postgres):
    import psycopg
    password = Path(postgres["passfile"]).read_text().strip().split(":", 4)[4]
    return psycopg.connect(postgres["url"], password=password, autocommit=True)


@pytest.fixture(scope="module")
def served_lake(spark, tmp_path_factory):
    """Two ingest dates of a synthetic dataset, tensors, a registered and 'evaluated' model, scored;
    and a mammography model (modality MG) with no images."""
    root = tmp_path_factory.mktemp("serve")
    lake_dir = str(root / "lake")
    for day, (start, seed) in {"2026-06-01": (0, 1), "2026-06-02": (10, 2)}.items():
        folder = synthetic.write_dataset(root / day, groups=10, per_group=2, seed=seed, start=start,
                                         malignant_every=2)
        _quiet(ingest_job, "--lake", lake_dir, "--dataset", "syn", "--input", str(folder),
               "--labels", str(folder / "labels.csv"), "--ingest-date", day)
    _quiet(preprocess_job, "--lake", lake_dir, "--dataset", "syn", "--size", "16")
    lake_uri = lake.qualify(spark, lake_dir)
    for dataset, record in (("syn", {"size": 16, "resize": "stretch", "tensors_version": 1}),
                            ("mammo", {"size": 16, "resize": "stretch", "modalities": ["MG"],
                                       "pixels": {"mammo_flip_right": True, "mammo_crop": True}})):
        _register(spark, lake_uri, dataset, record, root, seed=3)
    scored = _quiet(score_job, "--lake", lake_dir, "--dataset", "syn")
    assert scored["scored"] == 40
    return {"dir": lake_dir, "uri": lake_uri, "root": root, "predictions": scored["table"]}


def _register(spark, lake_uri, dataset, record, root: Path, seed: int, threshold: float = 0.5) -> int:
    import tensorflow as tf
    tf.keras.utils.set_random_seed(seed)
    model = training.build_model(16, [120.0] * 3, [50.0] * 3, config.TrainConfig(filters=(4,), dense_units=4))
    path = root / f"{dataset}-{seed}.keras"
    model.save(path)
    version, _ = registry.register(spark, lake_uri, dataset, {
        "model.keras": path.read_bytes(), "model.json": json.dumps(record).encode(),
        "metrics.json": json.dumps({"threshold": threshold, "test": {"auc": 0.61}}).encode(),
        "report.html": b"<html><body><p>For research and education only.</p><h1>report</h1></body></html>",
        "model_card.md": b"# Model card\n\nFor research and education only.\n"})
    return version


# --- PostgreSQL export ----------------------------------------------------------------------------


def _table(postgres) -> list[tuple]:
    with connect(postgres) as conn:
        return conn.execute("SELECT dataset, image_id, model_version, probability, predicted_label, threshold, "
                            "ingest_date, relative_path, known_label FROM oncolake.predictions "
                            "ORDER BY image_id, model_version").fetchall()


def _export_process(served_lake, postgres, fault: str) -> subprocess.CompletedProcess:
    return script("submit.sh", "export", "--lake", served_lake["dir"], "--dataset", "syn",
                  "--to", postgres["url"], "--set", f"serve.database_passfile={postgres['passfile']}",
                  env={"ONCOLAKE_FAULTS": fault})


def test_export_is_incremental_idempotent_and_survives_a_kill(spark, capsys, served_lake, postgres):
    # Killed right after its first partition committed: that partition is there whole, the other not at all.
    killed = _export_process(served_lake, postgres, "export.partition_committed@1")
    # spark-submit passes on the Python driver's fate as 128 + SIGKILL (its last stderr line may be lost with it).
    assert killed.returncode == 137, killed.stderr[-2000:]
    with connect(postgres) as conn:
        per_date = dict(conn.execute("SELECT ingest_date::text, count(*) FROM oncolake.predictions "
                                     "GROUP BY 1").fetchall())
        recorded = conn.execute("SELECT count(*) FROM oncolake.export_partitions").fetchone()[0]
    assert per_date == {"2026-06-01": 20} and recorded == 1

    # Killed inside the second partition's transaction, after its rows were written: none of them shows.
    killed = _export_process(served_lake, postgres, "export.before_commit@1")
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert len(_table(postgres)) == 20

    code = export_job.main(["--lake", served_lake["dir"], "--dataset", "syn", "--to", postgres["url"],
                            "--set", f"serve.database_passfile={postgres['passfile']}"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    summary = last_json(out.out)
    assert (summary["partitions_exported"], summary["exported"]) == (1, 20)
    assert "password" not in out.out + out.err and Path(postgres["passfile"]).read_text().split(":")[4].strip() \
        not in out.out + out.err

    # the table equals the lake's predictions joined to bronze, computed here with delta-rs
    from deltalake import DeltaTable
    predictions = DeltaTable(served_lake["uri"].replace("file:", "") + "/gold/predictions").to_pandas()
    bronze = DeltaTable(served_lake["uri"].replace("file:", "") + "/bronze/images").to_pandas(
        columns=["image_id", "relative_path", "label"])
    expected = predictions.merge(bronze, on="image_id").sort_values(["image_id", "model_version"])
    rows = _table(postgres)
    assert len(rows) == len(expected) == 40
    for row, (_, want) in zip(rows, expected.iterrows()):
        assert row[1] == want["image_id"] and row[2] == want["model_version"]
        assert row[3] == pytest.approx(want["probability"]) and row[4] == want["predicted_label"]
        assert str(row[6]) == str(want["ingest_date"])[:10] and row[7] == want["relative_path"]
        assert row[8] == want["label"]

    # a rerun writes nothing, and empties the stage a killed export left rows in
    with connect(postgres) as conn:
        conn.execute("INSERT INTO oncolake.export_stage (dataset, image_id, model_version) "
                     "SELECT dataset, image_id, model_version FROM oncolake.predictions LIMIT 3")
    code = export_job.main(["--lake", served_lake["dir"], "--dataset", "syn", "--to", postgres["url"],
                            "--set", f"serve.database_passfile={postgres['passfile']}"])
    again = last_json(capsys.readouterr().out)
    assert code == 0 and (again["partitions_exported"], again["exported"]) == (0, 0)
    assert _table(postgres) == rows
    with connect(postgres) as conn:
        assert conn.execute("SELECT count(*) FROM oncolake.export_stage").fetchone()[0] == 0

    # a URL with a password in it is refused before anything runs
    code = export_job.main(["--lake", served_lake["dir"], "--dataset", "syn",
                            "--to", f"postgresql://oncolake:hunter2@127.0.0.1:{PG_PORT}/oncolake"])
    err = capsys.readouterr().err
    assert code != 0 and "must not carry a password" in err and "hunter2" not in err


def _partitions(postgres) -> tuple[dict, dict, int]:
    """The partitions export recorded, the prediction rows per partition, and the rows left in its stage."""
    with connect(postgres) as conn:
        recorded = {(r[0], str(r[1])): r[2] for r in conn.execute(
            "SELECT model_version, ingest_date, row_count FROM oncolake.export_partitions WHERE dataset = 'syn'")}
        present = {(r[0], str(r[1])): r[2] for r in conn.execute(
            "SELECT model_version, ingest_date, count(*) FROM oncolake.predictions WHERE dataset = 'syn' "
            "GROUP BY 1, 2")}
        staged = conn.execute("SELECT count(*) FROM oncolake.export_stage").fetchone()[0]
    return recorded, present, staged


def _clear_export(postgres) -> None:
    from oncolake import export
    with connect(postgres) as conn:
        export.ensure_schema(conn)  # when this test runs alone, before any export made the tables
        conn.execute("DELETE FROM oncolake.predictions WHERE dataset = 'syn'")
        conn.execute("DELETE FROM oncolake.export_partitions WHERE dataset = 'syn'")


@pytest.mark.faults
def test_export_killed_at_three_seeded_moments_then_rerun_leaves_the_table_one_export_does(served_lake, postgres):
    from tests.conftest import last_step, seeded_moments, submit_killed
    args = ["export", "--lake", served_lake["dir"], "--dataset", "syn", "--to", postgres["url"],
            "--set", f"serve.database_passfile={postgres['passfile']}"]
    # Moments are drawn from the export's writing (from its "exporting ..." line on): before it, it
    # only reads the lake.
    marker = "oncolake.export: exporting "
    _clear_export(postgres)
    _, work = submit_killed(args, None, marker)  # uninterrupted: the table to match, how long it writes
    want = _table(postgres)
    assert len(want) == 40 and _partitions(postgres)[:2] == ({(1, "2026-06-01"): 20, (1, "2026-06-02"): 20},) * 2

    _clear_export(postgres)
    reached = []
    for moment in seeded_moments(work, 19):
        reached.append((round(moment, 1), last_step(submit_killed(args, moment, marker)[0])))
        # whatever a kill interrupted, each partition is in the table whole or not at all
        recorded, present, _ = _partitions(postgres)
        assert present == recorded, reached
    before = _partitions(postgres)[0]
    lines, _ = submit_killed(args, None)
    summary = last_json("".join(lines))

    assert _table(postgres) == want, f"killed at {reached} of {work:.0f} s"
    assert _partitions(postgres) == ({(1, "2026-06-01"): 20, (1, "2026-06-02"): 20},) * 2 + (0,), reached
    assert summary["partitions_exported"] == 2 - len(before), reached  # only what the kills left undone


# --- Thrift JDBC server ---------------------------------------------------------------------------


def test_thrift_server_answers_jdbc_like_delta_rs(served_lake, tmp_path):
    from deltalake import DeltaTable
    env = {"ONCOLAKE_THRIFT_DIR": str(tmp_path / "thrift")}
    started = script("thrift.sh", "start", "--lake", served_lake["dir"], "--port", str(THRIFT_PORT), env=env)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        url = started.stdout.strip().splitlines()[-1]
        assert url == f"jdbc:hive2://127.0.0.1:{THRIFT_PORT}"
        query = ("SELECT count(*) FROM oncolake.latest_predictions; "
                 "SELECT i.label, count(*), round(sum(p.probability), 6) FROM oncolake.predictions p "
                 "JOIN oncolake.images i ON p.image_id = i.image_id GROUP BY i.label ORDER BY i.label;")
        beeline = subprocess.run([str(ROOT / ".venv" / "bin" / "beeline"), "-u", url, "--silent=true",
                                  "--outputformat=csv2", "--showHeader=false", "-e", query],
                                 capture_output=True, text=True, timeout=180)
        assert beeline.returncode == 0, beeline.stderr[-3000:]
        lines = [line for line in beeline.stdout.splitlines() if line.strip()]
        predictions = DeltaTable(served_lake["uri"].replace("file:", "") + "/gold/predictions").to_pandas()
        bronze = DeltaTable(served_lake["uri"].replace("file:", "") + "/bronze/images").to_pandas(
            columns=["image_id", "label"])
        joined = predictions.merge(bronze, on="image_id")
        assert int(lines[0]) == len(predictions) == 40
        by_label = joined.groupby("label")["probability"].agg(["count", "sum"]).sort_index()
        got = [line.split(",") for line in lines[1:]]
        assert [g[0] for g in got] == list(by_label.index)
        for g, (_, want) in zip(got, by_label.iterrows()):
            assert int(g[1]) == want["count"] and float(g[2]) == pytest.approx(want["sum"], abs=1e-5)
        assert script("thrift.sh", "status", "--port", str(THRIFT_PORT), env=env).returncode == 0
    finally:
        stopped = script("thrift.sh", "stop", "--port", str(THRIFT_PORT), env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert not port_open(THRIFT_PORT)


# --- the API ----------------------------------------------------------------------------------------

USERS = {"ana": ("analyst", "analyst-pass-1"), "cleo": ("clinician", "clinician-pass-1"),
         "otto": ("operator", "operator-pass-1")}


@pytest.fixture(scope="module")
def api(served_lake, postgres, tmp_path_factory, spark):
    import httpx
    # the predictions the API serves come from PostgreSQL
    assert export_job.main(["--lake", served_lake["dir"], "--dataset", "syn", "--to", postgres["url"],
                            "--set", f"serve.database_passfile={postgres['passfile']}"]) == 0
    folder = tmp_path_factory.mktemp("api")
    key = folder / "jwt.key"
    key.write_bytes(os.urandom(48).hex().encode())
    sets = ["--lake", served_lake["dir"], *postgres["sets"]]
    for name, (role, password) in USERS.items():
        added = script("users.sh", *sets, "add", name, role, stdin=password + "\n")
        assert added.returncode == 0 and last_json(added.stdout)["created"], added.stderr
    listed = script("users.sh", *sets, "list")
    assert listed.returncode == 0 and last_json(listed.stdout)["users"] == 3
    assert "$argon2" not in listed.stdout
    with connect(postgres) as conn:  # only Argon2 hashes are stored
        hashes = [r[0] for r in conn.execute("SELECT password_hash FROM oncolake.users").fetchall()]
    assert all(h.startswith("$argon2id$") for h in hashes) and not any("pass-1" in h for h in hashes)

    refused = script("serve.sh", *sets, "--port", str(API_PORT), timeout=120)  # no key: no server
    assert refused.returncode != 0 and "signing key" in refused.stderr

    log = open(folder / "api.log", "w")
    process = subprocess.Popen(
        [str(ROOT / "scripts" / "serve.sh"), *sets, "--port", str(API_PORT),
         "--set", "serve.login_failures=3", "--set", "serve.reload_seconds=0.5",
         "--set", "serve.max_upload_bytes=10000000"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, ONCOLAKE_JWT_KEY_FILE=str(key)))
    base = f"http://127.0.0.1:{API_PORT}"
    try:
        for _ in range(120):
            assert process.poll() is None, (folder / "api.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the API did not come up: " + (folder / "api.log").read_text()[-3000:])
        yield {"base": base, "key": key.read_bytes().strip(), "lake": served_lake, "folder": folder,
               "sets": sets}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    assert not port_open(API_PORT)


def token(base: str, name: str) -> str:
    import httpx
    answer = httpx.post(f"{base}/auth/token", data={"username": name, "password": USERS[name][1]}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"] == "bearer" and body["role"] == USERS[name][0]
    return body["access_token"]


def bearer(value: str) -> dict:
    return {"Authorization": f"Bearer {value}"}


def png_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def test_tokens_roles_and_failed_sign_ins(api):
    import httpx
    import jwt
    base = api["base"]
    clinician = token(base, "cleo")
    models = httpx.get(f"{base}/models", headers=bearer(clinician), timeout=30)
    assert models.status_code == 200 and {m["dataset"] for m in models.json()["models"]} == {"syn", "mammo"}

    for headers, why in (({}, "no bearer token"), (bearer("not.a.token"), "invalid token")):
        answer = httpx.get(f"{base}/models", headers=headers, timeout=30)
        assert answer.status_code == 401 and why in answer.json()["error"]
        assert answer.headers["www-authenticate"] == "Bearer"
    # expired: signed with the right key, exp in the past
    now = time.time() - 3600
    expired = jwt.encode({"sub": "cleo", "role": "clinician", "iss": "oncolake", "aud": "oncolake-api",
                          "iat": int(now), "exp": int(now + 60)}, api["key"], algorithm="HS256")
    answer = httpx.get(f"{base}/models", headers=bearer(expired), timeout=30)
    assert answer.status_code == 401 and "expired" in answer.json()["error"]
    # tampered: the analyst's token with its role raised to operator, signature kept
    analyst = token(base, "ana")
    head, payload, signature = analyst.split(".")
    claims = jwt.decode(analyst, options={"verify_signature": False})
    import base64
    forged_payload = base64.urlsafe_b64encode(json.dumps({**claims, "role": "operator"}).encode()).rstrip(b"=")
    forged = f"{head}.{forged_payload.decode()}.{signature}"
    answer = httpx.get(f"{base}/models", headers=bearer(forged), timeout=30)
    assert answer.status_code == 401
    # signed with another key
    other = jwt.encode({**claims, "role": "operator"}, "x" * 48, algorithm="HS256")
    assert httpx.get(f"{base}/models", headers=bearer(other), timeout=30).status_code == 401
    # wrong role: an analyst may read but not predict
    answer = httpx.post(f"{base}/predict", params={"dataset": "syn"}, headers=bearer(analyst),
                        files={"file": ("a.png", png_bytes(1), "image/png")}, timeout=30)
    assert answer.status_code == 403 and "analyst" in answer.json()["error"]
    assert httpx.get(f"{base}/predictions", headers=bearer(analyst), timeout=30).status_code == 200
    # failed sign-ins: 3 allowed (serve.login_failures=3), then 429 even with the right password
    for _ in range(3):
        answer = httpx.post(f"{base}/auth/token", data={"username": "otto", "password": "wrong"}, timeout=30)
        assert answer.status_code == 401 and answer.json()["error"] == "wrong user name or password"
    answer = httpx.post(f"{base}/auth/token", data={"username": "otto", "password": USERS["otto"][1]}, timeout=30)
    assert answer.status_code == 429 and int(answer.headers["retry-after"]) > 0
    unknown = httpx.post(f"{base}/auth/token", data={"username": "nobody", "password": "whatever1"}, timeout=30)
    assert unknown.status_code == 401 and unknown.json()["error"] == "wrong user name or password"
    missing = httpx.post(f"{base}/auth/token", data={"username": "ana"}, timeout=30)
    assert missing.status_code == 422 and "password" in missing.json()["error"]
    # a removed user's token stops working at once
    script("users.sh", *api["sets"], "add", "temp", "analyst", stdin="temporary-pass\n")
    temp = httpx.post(f"{base}/auth/token", data={"username": "temp", "password": "temporary-pass"}, timeout=30)
    removed = script("users.sh", *api["sets"], "remove", "temp")
    assert removed.returncode == 0, removed.stderr
    answer = httpx.get(f"{base}/models", headers=bearer(temp.json()["access_token"]), timeout=30)
    assert answer.status_code == 401 and "no longer exists" in answer.json()["error"]


def test_uploads_are_predicted_like_predict_sh_and_bad_ones_refused(api, served_lake, spark):
    import httpx
    base = api["base"]
    headers = bearer(token(base, "cleo"))
    image = png_bytes(7)
    path = api["folder"] / "upload.png"
    path.write_bytes(image)
    answer = httpx.post(f"{base}/predict", params={"dataset": "syn", "explain": "true"}, headers=headers,
                        files={"file": ("upload.png", image, "image/png")}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == 1 and body["modality_check"] == "ok" and "research" in body["notice"]
    assert body["label"] == ("malignant" if body["probability"] >= 0.5 else "benign")
    assert body["explanation"].startswith("data:image/png;base64,")
    cli = script("predict.sh", "--lake", served_lake["dir"], "--dataset", "syn", str(path), timeout=180)
    assert cli.returncode == 0, cli.stderr[-2000:]
    line = cli.stdout.splitlines()[0].split("\t")
    assert float(line[1]) == pytest.approx(body["probability"], abs=1e-4) and line[2] == body["label"]

    # a DICOM mammogram to the mammography model; the PNG to it is the wrong modality
    dicom = dicomfiles.write(dicomfiles.phi_dataset(dicomfiles.gradient(96, 64)), api["folder"] / "mg.dcm")
    answer = httpx.post(f"{base}/predict", params={"dataset": "mammo"}, headers=headers,
                        files={"file": ("mg.dcm", dicom.read_bytes(), "application/dicom")}, timeout=60)
    assert answer.status_code == 200 and answer.json()["modality"] == "MG", answer.text
    cli = script("predict.sh", "--lake", served_lake["dir"], "--dataset", "mammo", str(dicom), timeout=180)
    assert float(cli.stdout.splitlines()[0].split("\t")[1]) == pytest.approx(answer.json()["probability"], abs=1e-4)
    answer = httpx.post(f"{base}/predict", params={"dataset": "mammo"}, headers=headers,
                        files={"file": ("a.png", image, "image/png")}, timeout=60)
    assert answer.status_code == 422 and "modality_mismatch" in answer.json()["error"]

    truncated = image[: len(image) // 2]
    for name, data, status, words in (("empty.png", b"", 422, "empty"),
                                      ("notes.txt", b"patient notes, not an image\n" * 20, 415, "text"),
                                      ("half.png", truncated, 422, "not a usable image"),
                                      ("noise.bin", os.urandom(5000), 415, "not a usable image")):
        answer = httpx.post(f"{base}/predict", params={"dataset": "syn"}, headers=headers,
                            files={"file": (name, data, "application/octet-stream")}, timeout=60)
        assert answer.status_code == status and words in answer.json()["error"], (name, answer.text)
    answer = httpx.post(f"{base}/predict", params={"dataset": "nope"}, headers=headers,
                        files={"file": ("a.png", image, "image/png")}, timeout=60)
    assert answer.status_code == 404
    answer = httpx.post(f"{base}/predict", headers=headers, files={"file": ("a.png", image, "image/png")}, timeout=60)
    assert answer.status_code == 422 and "dataset" in answer.json()["error"]
    big = api["folder"] / "big.bin"  # 100 MB, over the 10 MB limit of this server
    with open(big, "wb") as out:
        out.truncate(100 * 2 ** 20)
    with open(big, "rb") as data:
        answer = httpx.post(f"{base}/predict", params={"dataset": "syn"}, headers=headers,
                            files={"file": ("big.png", data, "image/png")}, timeout=120)
    assert answer.status_code == 413 and "limit" in answer.json()["error"]
    big.unlink()

    # a newer registered version is picked up without a restart
    version = _register(spark, served_lake["uri"], "syn", {"size": 16, "resize": "stretch"},
                        served_lake["root"], seed=11)
    time.sleep(1.0)
    answer = httpx.post(f"{base}/predict", params={"dataset": "syn"}, headers=headers,
                        files={"file": ("upload.png", image, "image/png")}, timeout=60)
    assert answer.status_code == 200 and answer.json()["model_version"] == version == 2
    health = httpx.get(f"{base}/health", timeout=30).json()
    assert health["status"] == "ok" and health["models_loaded"]["syn"] == 2


def test_predictions_models_and_nights_read_through_the_api(api, postgres):
    import httpx
    base = api["base"]
    headers = bearer(token(base, "ana"))
    seen, offset = [], 0
    while offset is not None:
        page = httpx.get(f"{base}/predictions", params={"dataset": "syn", "limit": 7, "offset": offset},
                         headers=headers, timeout=30).json()
        assert len(page["items"]) <= 7
        seen += [(i["image_id"], i["model_version"]) for i in page["items"]]
        offset = page["next_offset"]
    with connect(postgres) as conn:
        expected = conn.execute("SELECT image_id, model_version FROM oncolake.predictions").fetchall()
        malignant = conn.execute("SELECT count(*) FROM oncolake.predictions WHERE predicted_label = 1").fetchone()[0]
    assert sorted(seen) == sorted(expected) and len(seen) == 40
    labelled = httpx.get(f"{base}/predictions", params={"label": "malignant", "limit": 1000}, headers=headers,
                         timeout=30).json()["items"]
    assert len(labelled) == malignant and all(i["label"] == "malignant" for i in labelled)
    assert httpx.get(f"{base}/predictions", params={"since": "2999-01-01"}, headers=headers,
                     timeout=30).json()["items"] == []
    for params in ({"since": "yesterday"}, {"label": "maybe"}, {"limit": 0}, {"limit": 5000}):
        answer = httpx.get(f"{base}/predictions", params=params, headers=headers, timeout=30)
        assert answer.status_code == 422 and answer.json()["error"], params

    model = httpx.get(f"{base}/models/syn/1", headers=headers, timeout=30).json()
    assert model["metrics"]["threshold"] == 0.5 and model["model_card"].startswith("# Model card")
    report = httpx.get(f"{base}{model['report']}", headers=headers, timeout=30)
    assert report.status_code == 200 and "research and education" in report.text
    for path in ("/models/syn/99", "/models/nothing/1", "/models/syn/1/report/x"):
        assert httpx.get(f"{base}{path}", headers=headers, timeout=30).status_code == 404
    assert httpx.get(f"{base}/models/syn/v1", headers=headers, timeout=30).status_code == 422
    assert httpx.get(f"{base}/nights", headers=headers, timeout=30).json()["nights"] == []
    docs = httpx.get(f"{base}/openapi.json", timeout=30).json()
    assert {"/auth/token", "/predict", "/predictions", "/models", "/health"} <= set(docs["paths"])
    assert "research and education" in docs["info"]["description"]
    swagger = httpx.get(f"{base}/docs", timeout=30).text
    assert "/docs/assets/swagger-ui-bundle.js" in swagger and "cdn" not in swagger  # no CDN needed
    bundle = httpx.get(f"{base}/docs/assets/swagger-ui-bundle.js", timeout=30)
    assert bundle.status_code == 200 and bundle.headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{base}/docs/assets/page.html", timeout=30).status_code == 404


def test_web_page_signs_in_uploads_and_shows_the_prediction(api):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "Debian's chromium and chromium-driver: scripts/test.sh installs them"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1400"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    image = api["folder"] / "page-upload.png"
    image.write_bytes(png_bytes(21))
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(api["base"] + "/")
        assert "research and education" in browser.find_element(By.ID, "notice").text
        browser.find_element(By.ID, "username").send_keys("cleo")
        browser.find_element(By.ID, "password").send_keys("wrong password")
        browser.find_element(By.ID, "signin-button").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "signin-error"), "wrong user name"))
        browser.find_element(By.ID, "password").clear()
        browser.find_element(By.ID, "password").send_keys(USERS["cleo"][1])
        browser.find_element(By.ID, "signin-button").click()
        wait.until(ready.visibility_of_element_located((By.ID, "app")))
        assert browser.find_element(By.ID, "role").text == "clinician"
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#models tbody tr")) >= 3)
        dataset = browser.find_element(By.ID, "dataset")
        dataset.clear()
        dataset.send_keys("syn")
        browser.find_element(By.ID, "file").send_keys(str(image))
        browser.find_element(By.ID, "upload").click()
        wait.until(ready.visibility_of_element_located((By.ID, "result")))
        probability = float(browser.find_element(By.ID, "probability").text)
        label = browser.find_element(By.ID, "label").text
        assert label in ("malignant", "benign")  # the value itself is compared with the API's below
        wait.until(ready.visibility_of_element_located((By.ID, "overlay")))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "serve-page.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        # /docs renders Swagger UI from the local jar: no CDN is reachable here
        browser.get_log("browser")  # drops the page's console so far (the wrong password's 401)
        browser.get(api["base"] + "/docs")
        wait.until(lambda b: any("/predict" in e.text.replace("\u200b", "")
                                 for e in b.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")))
        assert "research and education" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui .info").text
        assert "research and education" in browser.title
        browser.save_screenshot(str(ARTIFACTS / "serve-docs.png"))
        assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        browser.quit()
    import httpx
    direct = httpx.post(f"{api['base']}/predict", params={"dataset": "syn"}, headers=bearer(token(api["base"], "cleo")),
                        files={"file": ("p.png", image.read_bytes(), "image/png")}, timeout=60).json()
    assert probability == pytest.approx(direct["probability"], abs=5e-4) and label == direct["label"]


# --- the nightly job, exporting (last: it adds a night and a date to the served lake) ----------------


def test_nightly_exports_the_nights_predictions_when_configured(api, served_lake, postgres, tmp_path):
    import httpx
    from deltalake import DeltaTable
    from jobs import nightly as nightly_job
    incoming = synthetic.write_dataset(tmp_path / "incoming", groups=3, per_group=2, seed=31, start=90)
    before = {(r[1], r[2]) for r in _table(postgres)}
    args = ["--lake", served_lake["dir"], "--set", "nightly.dataset=syn", "--set", f"nightly.incoming={incoming}",
            "--set", "nightly.export=true", *postgres["sets"]]
    night = _quiet(nightly_job, *args)
    # version 2, registered by the upload test, scores every date, tonight's among them
    assert (night["ingested"], night["errors"]) == (6, 0) and night["scored"] >= 6
    # the uploaded model records no tensors it was trained on: the night's figures, no comparison
    assert night["brightness"] is not None and night["psi_brightness"] is None and night["drift_alert"] is False

    # PostgreSQL now holds exactly the lake's predictions (delta-rs), tonight's among them
    predictions = DeltaTable(served_lake["uri"].replace("file:", "") + "/gold/predictions").to_pandas()
    after = {(r[1], r[2]) for r in _table(postgres)}
    assert after == set(zip(predictions["image_id"], predictions["model_version"]))
    assert night["exported"] == night["scored"] == len(after - before)
    names = {r[7].split("/")[-1] for r in _table(postgres) if (r[1], r[2]) in after - before}
    assert names >= {p.name for p in incoming.rglob("*.png")} and len(names) == night["scored"]

    again = _quiet(nightly_job, *args)  # nothing new tonight: nothing scored, nothing exported
    assert (again["ingested"], again["scored"], again["exported"]) == (0, 0, 0)
    assert {(r[1], r[2]) for r in _table(postgres)} == after

    nights = httpx.get(f"{api['base']}/nights", params={"dataset": "syn"}, headers=bearer(token(api["base"], "ana")),
                       timeout=30).json()["nights"]
    assert [(n["ingested"], n["scored"]) for n in nights] == [(0, 0), (6, night["scored"])]  # newest first
