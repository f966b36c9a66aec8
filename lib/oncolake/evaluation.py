"""The evaluate job: a registered model's scores on the validation and test splits, and what they mean.

The threshold is chosen on the validation split
(:func:`oncolake.metrics.choose_threshold`) and only then applied to the
test split, which is never used for model selection. The metrics themselves
are :mod:`oncolake.metrics`; the report is :mod:`oncolake.report`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from oncolake import metrics

# --- the evaluate job -----------------------------------------------------------

def read_split(url: str, filesystem=None, shard: tuple[int, int] | None = None, limit: int | None = None,
               seed: int | None = None):
    """(image ids, uint8 images, labels) of one tensor split, read through Petastorm.

    ``shard=(index, count)`` reads only that shard's row groups (each training
    process scores its own share of the validation split); a shard may be empty.
    ``limit`` stops after that many rows; with ``seed`` the row groups are read
    in a shuffled order, so a limited read is a sample of the whole shard.
    """
    from petastorm import make_reader
    ids, images, labels = [], [], []
    index, count = shard or (None, None)
    with make_reader(url, schema_fields=["image_id", "image", "label"], num_epochs=1,
                     shuffle_row_groups=seed is not None, seed=seed, reader_pool_type="dummy",
                     filesystem=filesystem, cur_shard=index, shard_count=count) as reader:
        for row in reader:
            if limit is not None and len(images) >= limit:
                break
            ids.append(row.image_id)
            images.append(row.image)
            labels.append(int(row.label))
    if not images:
        return ids, np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0, np.int64)
    return ids, np.stack(images), np.asarray(labels)


def validation_scores(spark, cfg, lake_uri: str, dataset: str, version: int) -> np.ndarray:
    """A registered model's probabilities on its validation split (for its drift reference)."""
    from oncolake import lake, registry
    model_dir = registry.version_uri(lake_uri, dataset, version)
    record = registry.read_record(spark, model_dir)
    url = registry.petastorm_url(f"{lake.tensors_uri(lake_uri, dataset, record['tensors_version'])}/split=val")
    _, images, _ = read_split(url, lake.petastorm_filesystem(url, cfg.hdfs))
    if not len(images):
        return np.zeros(0)
    return registry.load_model(spark, model_dir).predict(images, batch_size=cfg.score.batch_size, verbose=0).ravel()


def external_scores(spark, cfg, lake_uri: str, model_dir: str, record: dict[str, Any], dataset: str,
                    on: str) -> tuple[np.ndarray, np.ndarray, int, list[dict[str, str]]]:
    """(labels, probabilities, images left out, attributes) of every labelled ``on`` image in bronze.

    Images whose bytes are also in ``dataset`` (the model's own data) are left
    out, so none of them was seen in training. Scored on the executors by the
    scoring job's own function (decode at the model's size, predict in batches,
    the model loaded once per worker); an image that no longer decodes is left out.
    """
    from pyspark.sql import functions as F

    from oncolake import lake, preprocess, registry, scoring
    bronze = spark.read.format("delta").load(lake.table_uri(lake_uri, "bronze.images"))
    theirs = bronze.filter(F.col("dataset") == on)
    labelled = (preprocess._labelled(theirs, cfg.preprocess, cfg.ingest.modality(on)).filter("label IS NOT NULL")
                .join(theirs.select("image_id", "attributes", "ingest_date"), "image_id"))
    own = bronze.filter(F.col("dataset") == dataset).select("image_id")
    external = labelled.join(own, "image_id", "left_anti")
    left_out = labelled.count() - external.count()
    shipped = spark.sparkContext.broadcast(registry.read_model_bytes(spark, model_dir))
    size, policy, batch = record["size"], record["resize"], cfg.score.batch_size
    threads = max(1, int(spark.conf.get("spark.task.cpus", "1")))
    known, pixels = registry.modalities(record, cfg.ingest.modality(dataset)), registry.pixel_options(record)
    scored = (external.select("image_id", "ingest_date", "content", "modality")
              .repartition(spark.sparkContext.defaultParallelism)
              .mapInPandas(lambda batches: scoring._score_batches(batches, shipped, size, policy, batch, threads,
                                                                  pixels, known),
                           scoring._SCORED))
    rows = (scored.filter("probability IS NOT NULL").join(external.select("image_id", "label", "attributes"),
                                                          "image_id")
            .select("label", "probability", "attributes").collect())
    if not rows:
        from oncolake.errors import InputError
        raise InputError(f"no labelled images of dataset {on!r} in {lake_uri}: ingest them with labels first")
    return (np.asarray([int(r.label) for r in rows]), np.asarray([float(r.probability) for r in rows]), left_out,
            [r.attributes or {} for r in rows])


def run(spark, cfg, dataset: str, model_version: int | None = None, on: str | None = None) -> dict[str, Any]:
    """Evaluate a registered model: threshold on validation, metrics on test, report.

    With ``on``, also every labelled image of another dataset in the lake
    (external validation) at the same threshold, reported beside the model as
    ``external-ON.json`` and ``report-external-ON.html``.
    """
    import json as _json

    from oncolake import calibration as calibration_map
    from oncolake import drift, lake, modelcard, preprocess, registry, report, tracking
    lake_uri = lake.qualify(spark, cfg.lake)
    version = model_version or registry.latest(spark, lake_uri, dataset)
    model_dir = registry.version_uri(lake_uri, dataset, version)
    record = registry.read_record(spark, model_dir)
    model = registry.load_model(spark, model_dir)
    tensors = lake.tensors_uri(lake_uri, dataset, record["tensors_version"])
    scores = {}
    for split in ("val", "test"):
        url = registry.petastorm_url(f"{tensors}/split={split}")
        ids, images, labels = read_split(url, lake.petastorm_filesystem(url, cfg.hdfs))
        scores[split] = (labels, model.predict(images, batch_size=cfg.score.batch_size, verbose=0).ravel())
        if split == "test":
            test_images, test_ids = images, ids
    rule = cfg.train.threshold_rule
    threshold = metrics.choose_threshold(*scores["val"], rule=rule, target_sensitivity=cfg.train.target_sensitivity)
    test = metrics.summary(*scores["test"], threshold=threshold, seed=cfg.train.seed)
    val = metrics.summary(*scores["val"], threshold=threshold, bootstrap=200, seed=cfg.train.seed)
    result = {"dataset": dataset, "model_version": version, "threshold": threshold, "threshold_rule": rule,
              "target_sensitivity": cfg.train.target_sensitivity if rule == "sensitivity" else None,
              "val": val, "test": test, "calibration": metrics.calibration(*scores["test"]),
              # the registered weights are the selected epoch's: re-scoring validation gives its AUC again
              "selection": {"best_epoch": record.get("best_epoch"), "best_val_auc": record.get("best_val_auc"),
                            "val_auc_rescored": val["auc"]}}
    result["subgroups"] = metrics.subgroup_metrics(
        *scores["test"], _attributes(spark, lake_uri, dataset, test_ids, cfg.evaluate.subgroups),
        min_size=cfg.evaluate.min_subgroup, seed=cfg.train.seed)
    fitted = record.get("calibration") or {}
    uncalibrated = None
    if fitted.get("method", "none") != "none":
        uncalibrated = calibration_map.invert(scores["test"][1], fitted["a"], fitted["b"])
        result["calibration_fit"] = {**fitted, "test_ece_after": test["ece"],
                                     "test_ece_before": metrics.expected_calibration_error(scores["test"][0], uncalibrated)}
    if on:
        return _external(spark, cfg, lake_uri, dataset, version, model_dir, record, result, on)
    images = report.plots(*scores["test"], threshold, test, uncalibrated=uncalibrated)
    images["explanations.png"] = _explanations(model, test_images, *scores["test"], threshold)
    lineage = {k: record.get(k) for k in ("tensors_uri", "tensors_version", "source_table_version",
                                          "architecture", "epochs_run", "best_epoch", "best_val_auc",
                                          "selection", "num_proc", "size", "resize")}
    manifest = preprocess.read_manifest(spark, lake_uri, dataset, record["tensors_version"])
    card = modelcard.render(dataset, version, record, manifest, result, _externals(spark, model_dir))
    page = report.html_report(f"oncolake {dataset} model v{version}", result, images, lineage, card=card)
    files = {"metrics.json": _json.dumps(result, indent=2, sort_keys=True).encode(), "report.html": page.encode(),
             "model_card.md": card.encode(), **images}
    for name, data in files.items():
        lake.write_bytes(spark, f"{model_dir}/{name}", data)
    drift.write_reference(spark, cfg, lake_uri, dataset, version, record, scores["val"][1])
    run_id = tracking.log_run(cfg, lake_uri, f"evaluate-{dataset}-v{version}",
                              params={"dataset": dataset, "model_version": version, "threshold_rule": rule},
                              metrics={f"test_{k}": test[k] for k in ("auc", "pr_auc", "balanced_accuracy",
                                                                      "sensitivity", "specificity", "f1", "brier")},
                              artifacts=files)
    return {"job": "evaluate", "dataset": dataset, "model_version": version, "auc": test["auc"],
            "val_auc": val["auc"], "best_epoch": record.get("best_epoch"), "ece": test["ece"],
            "auc_ci95": test["auc_ci95"], "balanced_accuracy": test["balanced_accuracy"],
            "sensitivity": test["sensitivity"], "specificity": test["specificity"], "threshold": threshold,
            "report": f"{model_dir}/report.html", "mlflow_run_id": run_id}


def _externals(spark, model_dir: str) -> dict[str, dict[str, Any]]:
    """The external validations recorded beside a model, by dataset."""
    import json as _json

    from oncolake import lake
    return {name[len("external-"):-len(".json")]: _json.loads(lake.read_text(spark, f"{model_dir}/{name}"))
            for name in lake.list_dir(spark, model_dir) if name.startswith("external-") and name.endswith(".json")}


def _attributes(spark, lake_uri: str, dataset: str, ids: list[str], names) -> dict[str, list[str | None]]:
    """The named labels-CSV attributes of these images of ``dataset``, in the order of ``ids``."""
    from pyspark.sql import functions as F

    from oncolake import lake
    bronze = spark.read.format("delta").load(lake.table_uri(lake_uri, "bronze.images"))
    ids = [str(i) for i in ids]  # Petastorm gives numpy strings, which Spark cannot pickle
    wanted = spark.createDataFrame([(i,) for i in ids], "image_id string")
    found = {row.image_id: row.attributes or {} for row in
             bronze.filter(F.col("dataset") == dataset).join(wanted, "image_id").select("image_id", "attributes")
             .collect()}
    return {name: [found.get(i, {}).get(name) for i in ids] for name in names}


def _explanations(model, images, labels, scores, threshold: float) -> bytes:
    """Grad-CAM overlays of the most confident test images of each outcome, as one PNG."""
    from oncolake import explain, report
    picked = explain.pick_outcomes(labels, scores, threshold, per_outcome=4)
    chosen = sorted({i for indices in picked.values() for i in indices})
    cams = dict(zip(chosen, explain.gradcam(model, images[chosen]))) if chosen else {}
    return report.explanations({outcome: [(explain.overlay(images[i], cams[i]), float(scores[i])) for i in indices]
                                for outcome, indices in picked.items()})


def _external(spark, cfg, lake_uri, dataset, version, model_dir, record, internal, on) -> dict[str, Any]:
    import json as _json

    from oncolake import lake, modelcard, preprocess, report, tracking
    labels, scores, left_out, attributes = external_scores(spark, cfg, lake_uri, model_dir, record, dataset, on)
    threshold = internal["threshold"]
    external = metrics.summary(labels, scores, threshold=threshold, seed=cfg.train.seed)
    subgroups = metrics.subgroup_metrics(labels, scores, {name: [a.get(name) for a in attributes]
                                                  for name in cfg.evaluate.subgroups},
                                 min_size=cfg.evaluate.min_subgroup, seed=cfg.train.seed)
    gap = internal["test"]["auc"] - external["auc"]
    result = {**internal, "external_dataset": on, "external": external, "external_left_out_as_seen": left_out,
              "internal_test_auc": internal["test"]["auc"], "auc_gap": gap,
              "test": external, "calibration": metrics.calibration(labels, scores), "subgroups": subgroups}
    images = report.plots(labels, scores, threshold, external)
    lineage = {"model": model_dir, "trained_on": dataset, "evaluated_on": on,
               "images": int(len(labels)), "left_out_as_seen_in_training_data": left_out,
               "internal_test_auc": internal["test"]["auc"], "external_auc": external["auc"],
               "threshold": f"{threshold:.4f}, chosen on {dataset}'s validation split"}
    page = report.html_report(f"oncolake {dataset} model v{version}: external validation on {on}", result,
                              images, lineage)
    files = {f"external-{on}.json": _json.dumps(result, indent=2, sort_keys=True).encode(),
             f"report-external-{on}.html": page.encode()}
    for name, data in files.items():
        lake.write_bytes(spark, f"{model_dir}/{name}", data)
    # the model card gains the external results (with the internal ones evaluate recorded, or these)
    internal_metrics = (_json.loads(lake.read_text(spark, f"{model_dir}/metrics.json"))
                        if lake.exists(spark, f"{model_dir}/metrics.json") else internal)
    manifest = preprocess.read_manifest(spark, lake_uri, dataset, record["tensors_version"])
    lake.write_text(spark, f"{model_dir}/model_card.md", modelcard.render(
        dataset, version, record, manifest, internal_metrics, _externals(spark, model_dir)))
    run_id = tracking.log_run(cfg, lake_uri, f"evaluate-{dataset}-v{version}-on-{on}",
                              params={"dataset": dataset, "model_version": version, "external_dataset": on},
                              metrics={"external_auc": external["auc"], "internal_test_auc": internal["test"]["auc"],
                                       "auc_gap": gap}, artifacts=files)
    return {"job": "evaluate", "dataset": dataset, "model_version": version, "on": on,
            "images": int(len(labels)), "auc": external["auc"], "auc_ci95": external["auc_ci95"],
            "internal_test_auc": internal["test"]["auc"], "auc_gap": gap,
            "balanced_accuracy": external["balanced_accuracy"], "sensitivity": external["sensitivity"],
            "specificity": external["specificity"], "threshold": threshold, "ece": external["ece"],
            "left_out_as_seen": left_out, "report": f"{model_dir}/report-external-{on}.html",
            "mlflow_run_id": run_id}
