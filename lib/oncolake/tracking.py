"""MLflow tracking: a file store inside a local lake, on the driver's disk for a lake on HDFS, or a
server if configured."""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping

from oncolake.config import Config

log = logging.getLogger(__name__)


def tracking_uri(cfg: Config, lake_uri: str) -> str | None:
    """The configured tracking URI, else ``LAKE/mlruns`` for a local lake, else a file store at
    ``mlflow.local_store`` on this machine (MLflow's file store cannot live on HDFS), else None."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if lake_uri.startswith("file:"):
        return "file://" + "/" + lake_uri[len("file:"):].lstrip("/") + "/mlruns"
    if cfg.mlflow.local_store:
        return Path(cfg.mlflow.local_store).resolve().as_uri()
    return None


def log_run(cfg: Config, lake_uri: str, name: str, params: Mapping[str, Any], metrics: Mapping[str, float],
            artifacts: Mapping[str, bytes] = (), history: Mapping[str, list[float]] | None = None,
            tags: Mapping[str, str] | None = None) -> str | None:
    """Record one run; returns its id (None when no tracking store is available)."""
    uri = tracking_uri(cfg, lake_uri)
    if uri is None:
        log.warning("no MLflow tracking URI for a lake at %s: set mlflow.tracking_uri", lake_uri)
        return None
    if not lake_uri.startswith("file:") and not cfg.mlflow.tracking_uri:
        log.info("MLflow: the lake is not on a local file system; tracking run %s at %s", name, uri)
    import mlflow
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.mlflow.experiment)
    with mlflow.start_run(run_name=name, tags=dict(tags or {})) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        for key, values in (history or {}).items():
            for step, value in enumerate(values):
                mlflow.log_metric(key, float(value), step=step)
        if artifacts:
            with tempfile.TemporaryDirectory() as folder:
                for file_name, data in dict(artifacts).items():
                    (Path(folder) / file_name).write_bytes(data)
                mlflow.log_artifacts(folder)
        return run.info.run_id
