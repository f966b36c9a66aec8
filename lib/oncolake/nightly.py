"""The night: ingest what landed (a folder, or a Kafka topic), score it, log the night, refresh the page.

Ingest is idempotent, so pointing it at the whole incoming folder adds only
the files that arrived since the last run; scoring then takes every
partition not yet scored. Each night is appended to the Delta table
``gold.nightly_runs`` and ``LAKE/reports/nightly.html`` is regenerated from it.
With ``nightly.export``, the predictions then go to PostgreSQL (:mod:`oncolake.export`).
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from oncolake import export, ingest, lake, report, scoring
from oncolake.config import Config
from oncolake.errors import ConfigError
from oncolake.stream import ingest as stream_ingest



def run(spark: SparkSession, cfg: Config, model_version: int | None = None) -> dict[str, Any]:
    """Run one night for ``cfg.nightly``; returns the night's summary."""
    nightly = cfg.nightly
    if not nightly.dataset or not (nightly.incoming or nightly.topic):
        raise ConfigError("set nightly.dataset and nightly.incoming or nightly.topic (conf/<env>.yaml or --set)")
    if nightly.incoming and nightly.topic:
        raise ConfigError("set one of nightly.incoming (a folder) and nightly.topic (Kafka), not both")
    lake_uri = lake.qualify(spark, cfg.lake)
    started = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    if nightly.topic:  # what was published since the last night, then stop
        ingested = stream_ingest.run(spark, cfg, topic=nightly.topic, dataset=nightly.dataset, available_now=True)
    else:
        ingested = ingest.run(spark, cfg, dataset=nightly.dataset, source=nightly.incoming,
                              labels=nightly.labels or None)
    scored = scoring.run(spark, cfg, dataset=nightly.dataset, model_version=model_version)
    rate = None
    if scored["partitions_scored"]:
        predictions = spark.read.format("delta").load(scored["table"]).filter(
            (F.col("dataset") == nightly.dataset) & (F.col("model_version") == scored["model_version"])
            & F.col("ingest_date").isin(scored["partitions_scored"]) & (F.col("scored_at") >= F.lit(started)))
        rate = predictions.agg(F.avg("predicted_label")).first()[0]
    night = {
        "night": started.date().isoformat(), "started_at": started.isoformat(timespec="seconds"),
        "dataset": nightly.dataset, "ingested": ingested["ingested"], "quarantined": ingested["quarantine_added"],
        "model_version": scored["model_version"], "scored": scored["scored"], "errors": scored["errors"],
        "malignant_rate": None if rate is None else round(float(rate), 4),
    }
    runs_uri = lake.table_uri(lake_uri, "gold.nightly_runs")
    frame = spark.createDataFrame([night], "night string, started_at string, dataset string, ingested long, "
                                           "quarantined long, model_version int, scored long, errors long, "
                                           "malignant_rate double")
    lake.append(frame, runs_uri)
    page = lake.nightly_page(lake_uri)
    history = (spark.read.format("delta").load(runs_uri).filter(F.col("dataset") == nightly.dataset)
               .orderBy(F.col("started_at").desc()).limit(nightly.nights_shown).collect())
    lake.write_text(spark, page, _page(nightly.dataset, [r.asDict() for r in reversed(history)]))
    summary = {"job": "nightly", **night, "run_log": runs_uri, "page": page}
    if nightly.export:  # applications read the night's predictions from PostgreSQL
        summary["exported"] = export.run(spark, cfg, dataset=nightly.dataset)["exported"]
    return summary


def _page(dataset: str, nights: list[dict[str, Any]]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3), dpi=100)
    points = [(n["started_at"], n["malignant_rate"]) for n in nights if n["malignant_rate"] is not None]
    if points:
        ax.plot([p[0][:16] for p in points], [p[1] for p in points], "o-")
    ax.set(ylabel="predicted malignant rate", title=f"{dataset}: nightly predicted-malignant rate", ylim=(0, 1))
    ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    columns = ["started_at", "ingested", "quarantined", "model_version", "scored", "errors", "malignant_rate"]
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(n[c]))}</td>" for c in columns) + "</tr>"
                   for n in reversed(nights))
    head = "".join(f"<th>{c}</th>" for c in columns)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>oncolake nightly {html.escape(dataset)}"
            f"</title></head><body><h1>Nightly scoring: {html.escape(dataset)}</h1>"
            f"<p style='background:#fff3cd'>{html.escape(report.NOTICE)}</p>"
            f"<img alt='malignant rate per night' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"
            f"<table border='1' cellpadding='4'><tr>{head}</tr>{rows}</table>"
            f"<pre>{html.escape(json.dumps(nights[-1] if nights else {}, indent=1))}</pre></body></html>")
