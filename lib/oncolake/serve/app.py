"""The REST API and its web page (FastAPI): sign in, predict, read predictions, nights and models.

Every error is a JSON body ``{"error": "...", "status": N}`` with the right
status: 401 (no, expired or forged token), 403 (role), 404, 413 (upload over
``serve.max_upload_bytes``), 415 (not an image), 422 (a damaged image, an
empty file, bad parameters, a modality the model was not trained on), 429
(too many failed sign-ins), 503 (database or model unavailable). Bad input
never reaches a 500. For research and education only.
"""
from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import logging
import queue
import time
import zipfile
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from oncolake import explain, imaging, lake, postgres, predict, registry, session
from oncolake.config import Config
from oncolake.errors import InputError
from oncolake.report import NOTICE
from oncolake.serve import auth, models

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("page.html")
_bearer = HTTPBearer(auto_error=False)


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, {"WWW-Authenticate": "Bearer"})


class UploadLimit:
    """ASGI middleware: a /predict body over the limit is answered 413 without being kept.

    The declared Content-Length decides at once; a chunked body is counted as
    it arrives. Either way the rest is read and dropped (clients that send
    before reading the answer then still see the 413) and nothing is stored.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/predict":
            return await self.app(scope, receive, send)
        # multipart framing around the file: a few hundred bytes of headers and boundaries
        allowed = self.limit + 64 * 1024
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > allowed:
            return await self._refuse(receive, send)
        if declared is not None and declared.isdigit():
            return await self.app(scope, receive, send)  # uvicorn holds the body to its declared length
        seen = 0
        buffered: list[dict] = []
        while True:  # a chunked body: counted before the app sees a byte of it
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > allowed:
                return await self._refuse(receive, send, drained=not message.get("more_body", False))
            if not message.get("more_body", False):
                break

        async def replay():
            return buffered.pop(0) if buffered else await receive()
        return await self.app(scope, replay, send)

    async def _refuse(self, receive, send, drained: bool = False):
        while not drained:
            message = await receive()
            drained = message["type"] != "http.request" or not message.get("more_body", False)
        response = JSONResponse({"error": f"the upload is larger than the limit of {self.limit} bytes",
                                 "status": 413}, status_code=413)
        await response({"type": "http"}, receive, send)


class Connections:
    """A few reusable autocommit connections (a sign-in check per request must not cost a new one)."""

    def __init__(self, db: postgres.Database, keep: int = 8):
        self.db, self.keep = db, keep
        self._idle: queue.LifoQueue = queue.LifoQueue()

    @contextlib.contextmanager
    def get(self):
        conn = None
        while conn is None:
            try:
                conn = self._idle.get_nowait()
                if conn.closed or conn.broken:
                    conn = None
            except queue.Empty:
                try:
                    conn = self.db.connect(autocommit=True)
                except InputError as err:
                    raise ApiError(503, f"the database is unavailable: {err}") from err
        try:
            yield conn
        finally:
            if conn.closed or conn.broken or self._idle.qsize() >= self.keep:
                conn.close()
            else:
                self._idle.put(conn)


class SwaggerUi:
    """Swagger UI's files, read from the org.webjars:swagger-ui jar scripts/setup.sh resolves (conf/jvm.txt).

    FastAPI's own /docs loads them from a CDN, which hospital networks (and
    this project's machines) often cannot reach; the jar is on disk already.
    """

    FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
             "favicon-32x32.png": "image/png"}

    def __init__(self, jar: Path):
        self.jar, self._cache = jar, {}
        with zipfile.ZipFile(jar) as archive:
            found = {n.rsplit("/", 1)[-1]: n for n in archive.namelist() if n.rsplit("/", 1)[-1] in self.FILES}
        missing = set(self.FILES) - set(found)
        if missing:
            raise ValueError(f"{jar} lacks {', '.join(sorted(missing))}")
        self._members = found

    @classmethod
    def find(cls) -> "SwaggerUi | None":
        jars = sorted(session.jar_dir("web").glob("swagger-ui-*.jar"))
        try:
            return cls(jars[-1]) if jars else None
        except (OSError, ValueError, zipfile.BadZipFile) as err:  # a damaged cache: the API still starts
            log.warning("cannot read Swagger UI from %s: %s", jars[-1], err)
            return None

    def read(self, name: str) -> Response:
        if name not in self.FILES:
            raise ApiError(404, f"no such file: {name}")
        if name not in self._cache:
            with zipfile.ZipFile(self.jar) as archive:
                self._cache[name] = archive.read(self._members[name])
        return Response(self._cache[name], media_type=self.FILES[name],
                        headers={"Cache-Control": "public, max-age=86400"})


def _docs(app: FastAPI) -> None:
    """/docs from the local Swagger UI jar; without it (set-up not run) FastAPI's CDN page."""
    from fastapi.openapi.docs import get_swagger_ui_html

    ui = SwaggerUi.find()
    if ui is None:
        log.warning("no Swagger UI jar under %s (run scripts/setup.sh): /docs loads it from a CDN",
                    session.jar_dir("web"))
    title = "oncolake API (for research and education only; no substitute for a clinician)"

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if ui is None:
            return get_swagger_ui_html(openapi_url=app.openapi_url, title=title)
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=title,
                                   swagger_js_url="/docs/assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs/assets/swagger-ui.css",
                                   swagger_favicon_url="/docs/assets/favicon-32x32.png")

    @app.get("/docs/assets/{name}", include_in_schema=False)
    def asset(name: str) -> Response:
        if ui is None:
            raise ApiError(404, "Swagger UI's files are not installed here (run scripts/setup.sh)")
        return ui.read(name)


def create_app(cfg: Config, key: bytes | None = None) -> FastAPI:
    """The app for ``cfg``; refuses (ConfigError) without a usable signing key."""
    key = key if key is not None else auth.load_key(cfg.serve.jwt_key_file)
    db = postgres.database(cfg)
    pool = Connections(db)
    cache = models.Models(cfg)
    limiter = auth.LoginLimiter(cfg.serve.login_failures, cfg.serve.login_window_seconds)
    lake_uri = predict.lake_root(cfg)
    app = FastAPI(title="oncolake", version="1", description=f"**{NOTICE}**\n\nPredictions, models and nights of "
                  "the oncolake data lake. Sign in at `/auth/token` (OAuth2 password flow) and send the token "
                  "as `Authorization: Bearer ...`.", docs_url=None, redoc_url=None)
    _docs(app)
    app.add_middleware(UploadLimit, limit=cfg.serve.max_upload_bytes)
    app.state.models = cache

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, err: HTTPException):
        return JSONResponse({"error": str(err.detail), "status": err.status_code}, status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
                             for e in err.errors())
        return JSONResponse({"error": problems or "invalid request", "status": 422}, status_code=422)

    import psycopg

    @app.exception_handler(psycopg.OperationalError)
    async def database_down(_request: Request, err: psycopg.OperationalError):
        log.warning("database error: %s", str(err).strip().splitlines()[0] if str(err).strip() else err)
        return JSONResponse({"error": "the database is unavailable; try again", "status": 503}, status_code=503)

    @app.exception_handler(Exception)
    async def failure(_request: Request, err: Exception):  # a bug: logged whole, answered plainly
        log.exception("unhandled error")
        return JSONResponse({"error": "internal error", "status": 500}, status_code=500)

    connect = pool.get

    def user_from(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> auth.User:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise _unauthorized("sign in first: no bearer token")
        try:
            claimed = auth.verify(key, credentials.credentials)
        except auth.TokenError as err:
            raise _unauthorized(str(err)) from err
        with connect() as conn:
            role = auth.current_role(conn, claimed.name)
        if role is None:
            raise _unauthorized("the token's user no longer exists")
        return auth.User(claimed.name, role)  # a changed role applies at once

    def requires(*roles: str):
        def check(user: auth.User = Depends(user_from)) -> auth.User:
            if not user.may(*roles):
                raise ApiError(403, f"role {user.role} may not do this (needs {' or '.join(roles)})")
            return user
        return check

    readers = requires("analyst", "clinician", "operator")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8").replace("{{NOTICE}}", NOTICE))

    @app.get("/health")
    def health() -> dict[str, Any]:
        status = {"status": "ok", "notice": NOTICE, "models_loaded": cache.loaded()}
        try:
            with pool.get() as conn:
                conn.execute("SELECT 1")
            status["database"] = "ok"
        except (ApiError, psycopg.OperationalError) as err:
            status.update(status="degraded", database=str(getattr(err, "detail", err)).splitlines()[0])
        return status

    @app.post("/auth/token")
    def token(request: Request, username: str = Form(...), password: str = Form(...)) -> dict[str, Any]:
        client = request.client.host if request.client else "-"
        wait = limiter.retry_after(username, client)
        if wait:
            raise ApiError(429, f"too many failed sign-ins: try again in {wait} s", {"Retry-After": str(wait)})
        with connect() as conn:
            user = auth.authenticate(conn, username, password)
        if user is None:
            limiter.failed(username, client)
            raise _unauthorized("wrong user name or password")
        limiter.succeeded(username, client)
        return {"access_token": auth.issue(key, user, cfg.serve.session_minutes), "token_type": "bearer",
                "expires_in": auth.expires_in(cfg.serve.session_minutes), "role": user.role}

    @app.post("/predict")
    def predict_upload(dataset: str = Query(..., min_length=1, max_length=128),
                       explain_: bool = Query(False, alias="explain"),
                       file: UploadFile = File(...),
                       _user: auth.User = Depends(requires("clinician", "operator"))) -> dict[str, Any]:
        data = file.file.read(cfg.serve.max_upload_bytes + 1)
        if len(data) > cfg.serve.max_upload_bytes:
            raise ApiError(413, f"the upload is larger than the limit of {cfg.serve.max_upload_bytes} bytes")
        if not data:
            raise ApiError(422, "the file is empty")
        verdict = imaging.inspect(data, cfg.ingest.max_pixels, cfg.ingest.min_side)
        if not verdict.ok:
            status = 415 if verdict.reason in ("unsupported_format",) or imaging.sniff(data) is None else 422
            raise ApiError(status, f"not a usable image: {verdict.reason}: {verdict.detail}")
        try:
            loaded, batcher = cache.get(dataset)
        except InputError as err:
            raise ApiError(404, f"no model for dataset {dataset!r}: {err}") from err
        kind = imaging.dicom_modality(data) or cfg.ingest.modality(dataset)
        known = loaded.modalities(cfg)
        if kind not in known:
            raise ApiError(422, f"modality_mismatch: a {kind} image; model v{loaded.version} of {dataset} "
                                f"was trained on {', '.join(known)}")
        try:
            tensor = loaded.tensor(data)
        except imaging.ImageError as err:
            raise ApiError(422, f"not a usable image: {err.reason}: {err.detail}") from err
        probability = batcher.predict(tensor)
        result = {"dataset": dataset, "model_version": loaded.version, "probability": round(probability, 6),
                  "label": "malignant" if probability >= loaded.threshold else "benign",
                  "threshold": loaded.threshold, "calibrated": (loaded.record.get("calibration") or {}).get("method", "none") != "none",
                  "modality": kind, "modality_check": "ok", "image_sha256": hashlib.sha256(data).hexdigest(),
                  "explanation": None, "notice": NOTICE}
        if explain_:
            import cv2
            cam = explain.gradcam(loaded.model, tensor[None])[0]
            ok, png = cv2.imencode(".png", explain.overlay(tensor, cam)[:, :, ::-1])
            result["explanation"] = "data:image/png;base64," + base64.b64encode(png.tobytes()).decode() if ok else None
        if cfg.serve.store_uploads:
            _store(cfg, data, result["image_sha256"])
        return result

    @app.get("/predictions")
    def predictions(dataset: str | None = Query(None, max_length=128),
                    since: dt.date | None = Query(None, description="scored on or after this day (YYYY-MM-DD)"),
                    label: str | None = Query(None, pattern="^(malignant|benign)$"),
                    limit: int = Query(None, ge=1, le=1000), offset: int = Query(0, ge=0),
                    _user: auth.User = Depends(readers)) -> dict[str, Any]:
        limit = limit or cfg.serve.page_size
        where, params = ["true"], {}
        if dataset:
            where.append("dataset = %(dataset)s")
            params["dataset"] = dataset
        if since:
            where.append("scored_at >= %(since)s")
            params["since"] = since
        if label:
            where.append("predicted_label = %(label)s")
            params["label"] = 1 if label == "malignant" else 0
        sql = (f"SELECT dataset, image_id, model_version, probability, predicted_label, threshold, error, "
               f"scored_at, ingest_date, relative_path, modality, known_label FROM oncolake.predictions "
               f"WHERE {' AND '.join(where)} ORDER BY scored_at DESC, dataset, image_id, model_version "
               f"LIMIT %(limit)s OFFSET %(offset)s")
        with connect() as conn:
            try:
                rows = conn.execute(sql, {**params, "limit": limit + 1, "offset": offset}).fetchall()
            except psycopg.errors.UndefinedTable as err:
                raise ApiError(503, "no predictions exported yet: run scripts/submit.sh export") from err
        names = ("dataset", "image_id", "model_version", "probability", "predicted_label", "threshold", "error",
                 "scored_at", "ingest_date", "relative_path", "modality", "known_label")
        items = [dict(zip(names, r)) for r in rows[:limit]]
        for item in items:
            item["label"] = (None if item["predicted_label"] is None
                             else "malignant" if item["predicted_label"] else "benign")
        return {"items": items, "offset": offset, "limit": limit,
                "next_offset": offset + limit if len(rows) > limit else None, "notice": NOTICE}

    @app.get("/models")
    def list_models(_user: auth.User = Depends(readers)) -> dict[str, Any]:
        fs, root = lake.python_fs(f"{lake_uri}/models", cfg.hdfs)
        found = []
        datasets = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) if fs.isdir(root) else []
        for dataset in datasets:
            for version in predict.list_versions(cfg, lake.models_root(lake_uri, dataset)):
                found.append(_summary(cfg, lake_uri, dataset, version))
        return {"models": found, "notice": NOTICE}

    @app.get("/models/{dataset}/{version}")
    def model(dataset: str, version: int, _user: auth.User = Depends(readers)) -> dict[str, Any]:
        model_dir = _model_dir(cfg, lake_uri, dataset, version)
        out = {"dataset": dataset, "version": version, "notice": NOTICE}
        for name, key in (("model.json", "record"), ("metrics.json", "metrics")):
            out[key] = _json_file(cfg, f"{model_dir}/{name}")
        card = f"{model_dir}/model_card.md"
        out["model_card"] = predict.read_lake_file(cfg, card).decode() if _exists(cfg, card) else None
        out["report"] = f"/models/{dataset}/{version}/report" if _exists(cfg, f"{model_dir}/report.html") else None
        return out

    @app.get("/models/{dataset}/{version}/report", response_class=HTMLResponse)
    def model_report(dataset: str, version: int, _user: auth.User = Depends(readers)) -> Response:
        path = f"{_model_dir(cfg, lake_uri, dataset, version)}/report.html"
        if not _exists(cfg, path):
            raise ApiError(404, f"model v{version} of {dataset} has no report: run evaluate")
        return HTMLResponse(predict.read_lake_file(cfg, path).decode("utf-8", "replace"))

    @app.get("/nights")
    def nights(dataset: str | None = Query(None, max_length=128), limit: int = Query(30, ge=1, le=365),
               _user: auth.User = Depends(readers)) -> dict[str, Any]:
        return {"nights": _nights(cfg, lake_uri, dataset, limit), "notice": NOTICE}

    return app


def _exists(cfg: Config, uri: str) -> bool:
    fs, path = lake.python_fs(uri, cfg.hdfs)
    return fs.isfile(path)


def _json_file(cfg: Config, uri: str) -> Any:
    return json.loads(predict.read_lake_file(cfg, uri)) if _exists(cfg, uri) else None


def _model_dir(cfg: Config, lake_uri: str, dataset: str, version: int) -> str:
    if "/" in dataset or dataset in (".", "..") or not dataset:
        raise ApiError(404, f"no dataset {dataset!r}")
    model_dir = registry.version_uri(lake_uri, dataset, version)
    if not _exists(cfg, f"{model_dir}/model.json"):
        raise ApiError(404, f"no model v{version} of {dataset}")
    return model_dir


def _summary(cfg: Config, lake_uri: str, dataset: str, version: int) -> dict[str, Any]:
    model_dir = registry.version_uri(lake_uri, dataset, version)
    record = _json_file(cfg, f"{model_dir}/model.json") or {}
    metrics = _json_file(cfg, f"{model_dir}/metrics.json") or {}
    test = metrics.get("test", metrics) if isinstance(metrics, dict) else {}
    return {"dataset": dataset, "version": version, "created_at": record.get("created_at"),
            "architecture": record.get("architecture"), "size": record.get("size"),
            "evaluated": bool(metrics), "test_auc": test.get("auc") if isinstance(test, dict) else None,
            "threshold": metrics.get("threshold"),
            "report": f"/models/{dataset}/{version}/report" if _exists(cfg, f"{model_dir}/report.html") else None}


def _nights(cfg: Config, lake_uri: str, dataset: str | None, limit: int) -> list[dict[str, Any]]:
    """gold.nightly_runs through delta-rs (no Spark in the API)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError
    uri = lake.table_uri(lake_uri, "gold.nightly_runs")
    try:
        table = DeltaTable(uri[len("file:"):] if uri.startswith("file:") else uri)
    except TableNotFoundError:
        return []
    frame = table.to_pandas()
    if dataset:
        frame = frame[frame["dataset"] == dataset]
    frame = frame.sort_values("started_at", ascending=False).head(limit)
    return json.loads(frame.to_json(orient="records", date_format="iso"))


def _store(cfg: Config, data: bytes, digest: str) -> None:
    """Keep an upload (configured): images by content hash; DICOM only de-identified, never as sent."""
    folder = Path(cfg.serve.store_uploads)
    folder.mkdir(parents=True, exist_ok=True)
    fmt = imaging.sniff(data) or "bin"
    if fmt == "dicom":
        if not cfg.ingest.dicom.key_file:
            log.warning("upload %s not stored: DICOM is stored de-identified only (set ingest.dicom.key_file)",
                        digest[:12])
            return
        from oncolake.dicom import deid, read
        pseudonyms = deid.Pseudonyms(deid.load_key(cfg.ingest.dicom.key_file), cfg.ingest.dicom.patient_id_pattern)
        deidentifier = deid.Deidentifier(pseudonyms)
        ds, _ = deidentifier.deidentify(read.parse(data))
        data, digest = deidentifier.to_bytes(ds), pseudonyms.image_id(data)
    target = folder / f"{digest}.{'dcm' if fmt == 'dicom' else fmt}"
    if not target.exists():
        tmp = target.with_suffix(f".tmp-{time.time_ns()}")
        tmp.write_bytes(data)
        tmp.replace(target)
