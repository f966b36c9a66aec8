"""The night: ingest what landed (a folder, or a Kafka topic), score it, log the night, refresh the page.

Ingest is idempotent, so pointing it at the whole incoming folder adds only
the files that arrived since the last run; scoring then takes every
partition not yet scored. Each night is appended to the Delta table
``gold.nightly_runs`` and ``LAKE/reports/nightly.html`` is regenerated from it.
Each night also carries its drift and data-quality figures against the
model's reference (:mod:`oncolake.drift`) and an alert flag; with
``nightly.drift.gate``, a night with an alert exits 3 once it is logged.
With ``nightly.export``, the predictions then go to PostgreSQL (:mod:`oncolake.export`).
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import logging
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from oncolake import drift, evaluation, export, ingest, lake, registry, report, schema, scoring
from oncolake.config import Config, DriftConfig
from oncolake.errors import ConfigError, DataQualityError
from oncolake.stream import ingest as stream_ingest

log = logging.getLogger(__name__)


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
    predictions = spark.read.format("delta").load(scored["table"]).filter(
        (F.col("dataset") == nightly.dataset) & (F.col("model_version") == scored["model_version"])
        & F.col("ingest_date").isin(scored["partitions_scored"]) & (F.col("scored_at") >= F.lit(started)))
    rate = (predictions.agg(F.avg("predicted_label")).first()[0] if scored["partitions_scored"] else None)
    files = ingested["ingested"] + ingested["quarantine_added"]
    night = {
        "night": started.date().isoformat(), "started_at": started.isoformat(timespec="seconds"),
        "dataset": nightly.dataset, "ingested": ingested["ingested"], "quarantined": ingested["quarantine_added"],
        "model_version": scored["model_version"], "scored": scored["scored"], "errors": scored["errors"],
        "malignant_rate": None if rate is None else round(float(rate), 4),
        **_drift(spark, cfg, lake_uri, nightly.dataset, scored, predictions, files, ingested["quarantine_added"]),
    }
    runs_uri = lake.table_uri(lake_uri, "gold.nightly_runs")
    lake.ensure_delta_table(spark, runs_uri, schema.GOLD_NIGHTLY_RUNS)
    lake.add_missing_columns(spark, runs_uri, schema.GOLD_NIGHTLY_RUNS)  # a log begun before the drift figures
    lake.append(spark.createDataFrame([night], schema.GOLD_NIGHTLY_RUNS), runs_uri)
    page = lake.nightly_page(lake_uri)
    history = (spark.read.format("delta").load(runs_uri).filter(F.col("dataset") == nightly.dataset)
               .orderBy(F.col("started_at").desc()).limit(nightly.nights_shown).collect())
    lake.write_text(spark, page, _page(nightly.dataset, [r.asDict() for r in reversed(history)], nightly.drift))
    summary = {"job": "nightly", **night, "run_log": runs_uri, "page": page}
    if night["drift_alert"]:
        log.warning("data-quality alert for %s: %s", nightly.dataset, night["alerts"])
        if nightly.drift.gate:  # logged and on the page; nothing goes on to the applications
            raise DataQualityError(f"the night's data drifted from model v{scored['model_version']}'s reference "
                                   f"(nightly.drift.gate): {night['alerts']}", summary=summary)
    if nightly.export:  # applications read the night's predictions from PostgreSQL
        summary["exported"] = export.run(spark, cfg, dataset=nightly.dataset)["exported"]
    return summary


def _drift(spark, cfg: Config, lake_uri: str, dataset: str, scored: dict[str, Any], predictions,
           files: int, quarantined: int) -> dict[str, Any]:
    """The night's drift figures; the model's reference is built first if it has none (evaluated before drift)."""
    version = scored["model_version"]
    reference = drift.read_reference(spark, lake_uri, dataset, version)
    if reference is None and scored["scored"]:
        record = registry.read_record(spark, registry.version_uri(lake_uri, dataset, version))
        tensors = record.get("tensors_version")
        if tensors is None or not lake.exists(spark, f"{lake.tensors_uri(lake_uri, dataset, tensors)}/split=val"):
            # the night goes on: its figures are logged, only the comparison is missing
            log.warning("model v%d of %s records no tensor version it was trained on (or it is gone): "
                        "no drift reference, the night's figures are not compared", version, dataset)
        else:
            log.info("model v%d of %s has no drift reference yet: building it", version, dataset)
            reference = drift.write_reference(spark, cfg, lake_uri, dataset, version, record,
                                              evaluation.validation_scores(spark, cfg, lake_uri, dataset, version))
    return drift.night(spark, cfg, lake_uri, dataset, reference, predictions, files, quarantined)


_COLUMNS = ("started_at", "ingested", "quarantined", "quarantine_rate", "model_version", "scored", "errors",
            "malignant_rate", *(f"psi_{name}" for name in drift.FIGURES), "drift_alert", "alerts")


def _page(dataset: str, nights: list[dict[str, Any]], limits: DriftConfig) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (rates, shifts) = plt.subplots(2, 1, figsize=(8, 5.5), dpi=100, sharex=True)
    when = range(len(nights))  # nights in order; a night without a figure leaves a gap, never a reordering
    for name in ("malignant_rate", "quarantine_rate"):
        points = [(w, n.get(name)) for w, n in zip(when, nights) if n.get(name) is not None]
        if points:
            rates.plot([p[0] for p in points], [p[1] for p in points], "o-", label=name.replace("_", " "))
    rates.set(ylabel="share of the night", title=f"{dataset}: nightly rates and drift", ylim=(0, 1))
    rates.legend(fontsize=7, loc="upper left")
    for name in drift.FIGURES:
        points = [(w, n.get(f"psi_{name}")) for w, n in zip(when, nights) if n.get(f"psi_{name}") is not None]
        if points:
            shifts.plot([p[0] for p in points], [p[1] for p in points], ".-", label=name)
    shifts.axhline(limits.psi_alert, color="red", linestyle="--", linewidth=1, label="alert limit")
    for w, n in zip(when, nights):
        if n.get("drift_alert"):
            shifts.axvline(w, color="red", alpha=0.15, linewidth=8)
    shifts.set(ylabel="PSI against the model's reference", yscale="symlog")
    shifts.legend(fontsize=7, loc="upper left", ncol=3)
    shifts.set_xticks(list(when), [n["started_at"][:16] for n in nights])
    shifts.tick_params(axis="x", labelrotation=45, labelsize=7)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)

    def row(n: dict[str, Any]) -> str:
        style = " style='background:#f8d7da'" if n.get("drift_alert") else ""
        cells = "".join(f"<td>{'' if n.get(c) is None else html.escape(str(n.get(c)))}</td>" for c in _COLUMNS)
        return f"<tr{style}>{cells}</tr>"
    head = "".join(f"<th>{c}</th>" for c in _COLUMNS)
    latest = nights[-1] if nights else {}
    alert = (f"<p style='background:#f8d7da'><b>Data-quality alert on the latest night:</b> "
             f"{html.escape(latest.get('alerts') or '')}</p>" if latest.get("drift_alert") else "")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>oncolake nightly {html.escape(dataset)}"
            f"</title></head><body><h1>Nightly scoring: {html.escape(dataset)}</h1>"
            f"<p style='background:#fff3cd'>{html.escape(report.NOTICE)}</p>{alert}"
            f"<img alt='rates and drift per night' src='data:image/png;base64,"
            f"{base64.b64encode(buffer.getvalue()).decode()}'>"
            f"<p>PSI: population stability index of each figure against the model's training and validation "
            f"images (probability: its validation predictions); an alert needs PSI at least {limits.psi_alert} "
            f"and a two-sample test's p below {limits.alpha}, or a quarantine rate above "
            f"{limits.max_quarantine_rate}. docs/operations.md explains each figure.</p>"
            f"<table border='1' cellpadding='4'><tr>{head}</tr>{''.join(row(n) for n in reversed(nights))}</table>"
            f"<pre>{html.escape(json.dumps(latest, indent=1, default=str))}</pre></body></html>")
