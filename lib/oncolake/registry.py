"""The model registry: LAKE/models/NAME/v<N>/ with model.keras and model.json.

A version is assembled under ``_tmp-*`` and renamed into place, so a listed
version is always complete. Models load with Keras' safe mode: no code from
the file is executed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping

from pyspark.sql import SparkSession

from oncolake import lake
from oncolake.errors import DataQualityError, InputError

log = logging.getLogger(__name__)


def version_uri(lake_uri: str, dataset: str, version: int) -> str:
    return f"{lake.models_root(lake_uri, dataset)}/v{version}"


def versions(spark: SparkSession, lake_uri: str, dataset: str) -> list[int]:
    """Registered model versions of ``dataset``, oldest first."""
    names = lake.list_dir(spark, lake.models_root(lake_uri, dataset))
    return sorted(int(n[1:]) for n in names if n.startswith("v") and n[1:].isdigit())


def latest(spark: SparkSession, lake_uri: str, dataset: str) -> int:
    """The newest registered version (the default model for evaluate and score)."""
    found = versions(spark, lake_uri, dataset)
    if not found:
        raise InputError(f"no registered model for {dataset} under {lake.models_root(lake_uri, dataset)}: train first")
    return found[-1]


def read_record(spark: SparkSession, model_dir: str) -> dict[str, Any]:
    if not lake.exists(spark, f"{model_dir}/model.json"):
        raise InputError(f"no model at {model_dir}")
    return json.loads(lake.read_text(spark, f"{model_dir}/model.json"))


def modalities(record: Mapping[str, Any], default: str) -> list[str]:
    """The modalities a model was trained on; ``default`` (its dataset's) for a model recorded before them."""
    return list(record.get("modalities") or [default])


def pixel_options(record: Mapping[str, Any]) -> dict[str, bool]:
    """The :func:`oncolake.imaging.prepare` options the model's tensors were made with.

    Tensors made before JPEGs were decoded at reduced scale record no
    ``reduced``: their models keep the full-size decode they were trained on.
    """
    options = dict(record.get("pixels") or {})
    options.setdefault("reduced", False)
    return options


#: The file beside each version that holds the SHA-256 of the model file as registered.
CHECKSUMS = "checksums.json"


def verified(data: bytes, checksums: bytes | None, model_dir: str) -> bytes:
    """``data`` (a version's model.keras) if it is the file registered; else :class:`InputError`.

    A version registered before checksums were kept (no ``checksums.json``)
    is loaded with a warning: there is nothing to check it against.
    """
    if checksums is None:
        log.warning("%s has no %s (registered before models were checksummed): not verified", model_dir,
                    CHECKSUMS)
        return data
    try:
        expected = json.loads(checksums)["model.keras"]
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{model_dir}/{CHECKSUMS} is unreadable: refusing to load the model") from err
    if hashlib.sha256(data).hexdigest() != expected:
        raise InputError(f"{model_dir}/model.keras is not the file registered (SHA-256 differs from "
                         f"{CHECKSUMS}): refusing to load it")
    return data


def read_model_bytes(spark: SparkSession, model_dir: str) -> bytes:
    """A version's model.keras, verified against the checksum taken at registration."""
    checksums = f"{model_dir}/{CHECKSUMS}"
    return verified(lake.read_bytes(spark, f"{model_dir}/model.keras"),
                    lake.read_bytes(spark, checksums) if lake.exists(spark, checksums) else None, model_dir)


def load_model(spark: SparkSession, model_dir: str):
    """The Keras model of a version, verified, loaded in safe mode."""
    return load_model_bytes(read_model_bytes(spark, model_dir))


def load_model_bytes(data: bytes):
    """A Keras model from ``.keras`` bytes, in safe mode (usable on executors, no Spark)."""
    import tensorflow as tf
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        path.write_bytes(data)
        return tf.keras.models.load_model(path, safe_mode=True, compile=False)


def model_bytes(model) -> bytes:
    """A Keras model as ``.keras`` file contents."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.keras"
        model.save(path)
        return path.read_bytes()


def find(spark: SparkSession, lake_uri: str, dataset: str, training_key: str) -> tuple[int, str] | None:
    """The newest registered version whose ``model.json`` has this ``training_key``, and its folder."""
    for version in reversed(versions(spark, lake_uri, dataset)):
        model_dir = version_uri(lake_uri, dataset, version)
        if read_record(spark, model_dir).get("training_key") == training_key:
            return version, model_dir
    return None


def register(spark: SparkSession, lake_uri: str, dataset: str, files: Mapping[str, bytes],
             lake_dirs: Mapping[str, str] = ()) -> tuple[int, str]:
    """Register the next version from file contents and folders already in the lake (TensorBoard logs).

    The model file's SHA-256 goes to ``checksums.json`` beside it; every load
    checks it (:func:`read_model_bytes`).
    """
    root = lake.models_root(lake_uri, dataset)
    lake.sweep_scratch(spark, root)  # killed registrations' _tmp-* folders
    tmp = f"{root}/{lake.scratch_name('model')}"
    if "model.keras" in files:
        files = {**files, CHECKSUMS: json.dumps(
            {"model.keras": hashlib.sha256(files["model.keras"]).hexdigest()}, indent=2).encode()}
    try:
        for name, data in files.items():
            lake.write_bytes(spark, f"{tmp}/{name}", data)
        for name, folder in dict(lake_dirs).items():
            if lake.is_dir(spark, folder):
                lake.copy(spark, folder, f"{tmp}/{name}")
        for _ in range(5):
            version = (versions(spark, lake_uri, dataset) or [0])[-1] + 1
            target = version_uri(lake_uri, dataset, version)
            if lake.rename(spark, tmp, target):
                log.info("registered %s", target)
                return version, target
        raise DataQualityError(f"could not register a version under {root}: concurrent registrations")
    finally:
        if lake.exists(spark, tmp):
            lake.delete(spark, tmp)


def petastorm_url(uri: str) -> str:
    """Hadoop's ``file:/a/b`` as Petastorm wants it (``file:///a/b``); other URIs unchanged."""
    return "file://" + uri[len("file:"):] if uri.startswith("file:/") and not uri.startswith("file://") else uri
