"""Benchmark the API's /predict under concurrent clients against bare model.predict, in one run.

Set-up (not timed): a fresh lake with an untrained model of the configured
architecture registered for ``isic_uda1`` (the work per image does not
depend on the weights), PostgreSQL (scripts/postgres.sh, a private data
folder and port), a user, a signing key, and the API (scripts/serve.sh) as
its own process on a private port. Measured:

- bare ``model.predict`` on the images already decoded and resized, in this
  process (the ceiling the issue names), and ``imaging.prepare`` + predict;
- ``--clients`` threads (default 8) each posting ISIC UDA-1 images to
  /predict for ``--seconds`` (default 60): requests/s, p50/p95/max latency,
  errors (any answer but 200 counts).

    scripts/bench.sh serve [--data ../shared/data/isic_uda1] [--clients 8] [--seconds 60]
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from oncolake import cli, imaging, lake, registry, session, training

ROOT = Path(__file__).resolve().parents[2]
PG_PORT, API_PORT = 15442, 18042


def main(argv=None) -> int:
    p = cli.parser("bench-serve", __doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "isic_uda1"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--images", type=int, default=400, help="distinct images sent round-robin")
    args = p.parse_args(argv)
    cfg = cli.load_config(args)
    spark = session.build("bench-serve", cfg)
    work = Path(tempfile.mkdtemp(prefix="oncolake-bench-serve-"))
    work.chmod(0o755)  # PostgreSQL's data folder inside must be reachable by the postgres user
    pg_env = dict(os.environ, ONCOLAKE_PG_DIR=str(work / "pg"), ONCOLAKE_PG_PORT=str(PG_PORT))
    server = None
    try:
        import httpx
        files = sorted(f for f in Path(args.data).rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        blobs = [f.read_bytes() for f in files[: args.images]]
        if not blobs:
            raise SystemExit(f"no images under {args.data}")
        size, policy = cfg.preprocess.size, cfg.preprocess.resize
        model = training.build_model(size, [128.0] * 3, [64.0] * 3, cfg.train)
        model.save(work / "model.keras")
        lake_dir = str(work / "lake")
        registry.register(spark, lake.qualify(spark, lake_dir), "isic_uda1", {
            "model.keras": (work / "model.keras").read_bytes(),
            "model.json": json.dumps({"size": size, "resize": policy}).encode(),
            "metrics.json": json.dumps({"threshold": 0.5}).encode()})
        session.stop(spark)
        spark = None

        # the ceiling: bare model.predict on decoded tensors; and decode + predict
        tensors = np.stack([imaging.prepare(b, size, policy) for b in blobs])
        model.predict(tensors[:64], verbose=0)
        bare = _rate(lambda: model.predict(tensors, batch_size=64, verbose=0), len(tensors))
        decoded = _rate(lambda: model.predict(np.stack([imaging.prepare(b, size, policy) for b in blobs]),
                                              batch_size=64, verbose=0), len(blobs))
        cli.log.info("bare model.predict %.1f images/s; with decoding %.1f images/s", bare, decoded)

        url = subprocess.run([str(ROOT / "scripts" / "postgres.sh"), "start"], env=pg_env, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        sets = ["--lake", lake_dir, "--set", f"serve.database_url={url}",
                "--set", f"serve.database_passfile={work / 'pg' / 'pgpass'}"]
        subprocess.run([str(ROOT / "scripts" / "users.sh"), *sets, "add", "bench", "clinician"],
                       input="bench-password\n", text=True, check=True, capture_output=True)
        key = work / "jwt.key"
        key.write_text(os.urandom(32).hex())
        server = subprocess.Popen([str(ROOT / "scripts" / "serve.sh"), *sets, "--port", str(API_PORT)],
                                  stdout=open(work / "api.log", "w"), stderr=subprocess.STDOUT,
                                  env=dict(os.environ, ONCOLAKE_JWT_KEY_FILE=str(key)))
        base = f"http://127.0.0.1:{API_PORT}"
        _wait(base, server, work)
        token = httpx.post(f"{base}/auth/token", data={"username": "bench", "password": "bench-password"},
                           timeout=30).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(timeout=60) as client:  # warm-up: model load, first batches
            for blob in blobs[:16]:
                client.post(f"{base}/predict", params={"dataset": "isic_uda1"}, headers=headers,
                            files={"file": ("x.jpg", blob, "image/jpeg")})
        latencies, errors, lock = [], [], threading.Lock()
        stop_at = time.perf_counter() + args.seconds

        def client_loop(offset: int) -> None:
            with httpx.Client(timeout=60) as client:
                i = offset
                while time.perf_counter() < stop_at:
                    blob = blobs[i % len(blobs)]
                    i += args.clients
                    start = time.perf_counter()
                    try:
                        answer = client.post(f"{base}/predict", params={"dataset": "isic_uda1"}, headers=headers,
                                             files={"file": ("x.jpg", blob, "image/jpeg")})
                        ok = answer.status_code == 200
                        what = answer.status_code
                    except httpx.HTTPError as err:
                        ok, what = False, type(err).__name__
                    with lock:
                        (latencies if ok else errors).append(time.perf_counter() - start if ok else what)

        started = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        rps = len(latencies) / elapsed
        ordered = sorted(latencies)
        result = {"bench": "serve", "images": len(blobs), "clients": args.clients, "seconds": round(elapsed, 1),
                  "requests": len(latencies), "errors": len(errors), "error_kinds": sorted({str(e) for e in errors}),
                  "requests_per_sec": round(rps, 1),
                  "latency_p50_ms": round(1000 * statistics.median(ordered), 1) if ordered else None,
                  "latency_p95_ms": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 1) if ordered else None,
                  "latency_max_ms": round(1000 * ordered[-1], 1) if ordered else None,
                  "bare_predict_per_sec": round(bare, 1), "prepare_and_predict_per_sec": round(decoded, 1),
                  "ratio_to_bare_predict": round(rps / bare, 3),
                  "ratio_to_prepare_and_predict": round(rps / decoded, 3),
                  "size": size, "architecture": cfg.train.architecture}
        print(json.dumps(result), flush=True)
        return 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        subprocess.run([str(ROOT / "scripts" / "postgres.sh"), "stop"], env=pg_env, capture_output=True)
        if spark is not None:
            session.stop(spark)
        shutil.rmtree(work, ignore_errors=True)


def _rate(work, items: int, min_seconds: float = 10.0) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        work()
        done += items
    return done / (time.perf_counter() - start)


def _wait(base: str, server, work: Path) -> None:
    import httpx
    for _ in range(240):
        if server.poll() is not None:
            raise SystemExit("the API exited: " + (work / "api.log").read_text()[-2000:])
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the API did not come up")


if __name__ == "__main__":
    sys.exit(main())
