"""Layered, typed, frozen configuration.

Layers, later wins: ``conf/base.yaml``, ``conf/<env>.yaml``, the
``datasets.<NAME>`` entry of those files for a job given ``--dataset NAME``
(the settings measured best on that data set), ``ONCOLAKE_*`` environment
variables (endpoints and secrets only, see ``ENVIRONMENT``), then ``--set
key=value`` overrides. Unknown keys are errors, in every dataset's entry too.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import re
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from oncolake.errors import ConfigError

log = logging.getLogger(__name__)

#: The only environment variables read, and the key each one sets.
ENVIRONMENT = {
    "ONCOLAKE_LAKE": "lake",
    "ONCOLAKE_SPARK_MASTER": "spark.master",
    "ONCOLAKE_WEBHDFS_URL": "hdfs.webhdfs_url",
    "ONCOLAKE_MLFLOW_TRACKING_URI": "mlflow.tracking_uri",
    "ONCOLAKE_DICOM_KEY_FILE": "ingest.dicom.key_file",
    "ONCOLAKE_KAFKA_BOOTSTRAP": "stream.bootstrap_servers",
    "ONCOLAKE_DATABASE_URL": "serve.database_url",
    "ONCOLAKE_DATABASE_PASSFILE": "serve.database_passfile",
    "ONCOLAKE_JWT_KEY_FILE": "serve.jwt_key_file",
}
#: The sections a ``datasets.<NAME>`` entry may set: how that data set's
#: images are taken, prepared, learnt and judged (not where anything runs).
PER_DATASET = ("ingest", "preprocess", "train", "evaluate", "score")
#: Keys whose values are never logged.
SECRET_MARKERS = ("password", "token", "secret")


@dataclasses.dataclass(frozen=True)
class SparkConfig:
    master: str = "local[*]"
    conf: Mapping[str, str] = dataclasses.field(default_factory=dict)
    batch_java_options: str = ""


@dataclasses.dataclass(frozen=True)
class HdfsConfig:
    webhdfs_url: str = "http://127.0.0.1:9870"
    user: str = "root"


@dataclasses.dataclass(frozen=True)
class DicomConfig:
    key_file: str = ""
    patient_id_pattern: str = ""
    accept_burned_in: bool = False


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
    group_columns: tuple[str, ...] = ("lesion_id", "patient_id")
    max_file_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 50_000_000
    min_side: int = 8
    batch_mb: int = 64
    decode_timeout_s: float = 60.0
    modalities: Mapping[str, str] = dataclasses.field(default_factory=dict)
    default_modality: str = "unspecified"
    dicom: DicomConfig = DicomConfig()

    def modality(self, dataset: str) -> str:
        """The modality of a dataset's non-DICOM images."""
        return self.modalities.get(dataset) or self.default_modality


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    size: int = 128
    resize: str = "stretch"
    split: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"train": 0.70, "val": 0.15, "test": 0.15})
    balance: str = "class_weight"
    seed: int = 42
    positive_labels: tuple[str, ...] = ("malignant", "1", "true", "yes")
    negative_labels: tuple[str, ...] = ("benign", "0", "false", "no", "normal")
    rows_per_row_group: int = 256
    mammo_flip_right: bool = True
    mammo_crop: bool = True
    reduced_decode: bool = True
    require_all_splits: bool = True
    shades_of_grey: int = 0
    aux_attribute: str = ""

    def pixels(self) -> dict[str, bool | int]:
        """The pixel options :func:`oncolake.imaging.prepare` takes; recorded with tensors and models.

        ``shades_of_grey`` appears only when on, so tensors made without it
        record what tensors made before it was added record.
        """
        options: dict[str, bool | int] = {"mammo_flip_right": self.mammo_flip_right,
                                          "mammo_crop": self.mammo_crop, "reduced": self.reduced_decode}
        if self.shades_of_grey:
            options["shades_of_grey"] = self.shades_of_grey
        return options


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    architecture: str = "cnn3"
    filters: tuple[int, ...] = (32, 64, 128)
    stem: int = 0
    dense_units: int = 128
    dropout: float = 0.3
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 0.001
    lr_schedule: str = "plateau"
    num_proc: int = 0
    patience: int = 8
    min_steps_per_epoch: int = 20
    ema_decay: float = 0.99
    bn_images: int = 512
    mixup: float = 0.0
    label_smoothing: float = 0.0
    rotation: float = 0.1
    zoom: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.1
    aux_weight: float = 0.0
    profile_steps: int = 0
    cache_mb: int = 2048
    precision: str = "auto"
    precision_cache: str = ""
    calibration: str = "platt"
    seed: int = 42
    threshold_rule: str = "youden"
    target_sensitivity: float = 0.9


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    subgroups: tuple[str, ...] = ("sex", "age", "age_approx", "localization")
    min_subgroup: int = 30


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    batch_size: int = 64
    arrow_batch_rows: int = 256
    rows_per_task: int = 1000


@dataclasses.dataclass(frozen=True)
class DriftConfig:
    psi_alert: float = 0.25
    alpha: float = 0.01
    min_images: int = 30
    max_quarantine_rate: float = 0.05
    gate: bool = False


@dataclasses.dataclass(frozen=True)
class NightlyConfig:
    dataset: str = ""
    incoming: str = ""
    topic: str = ""
    labels: str = ""
    nights_shown: int = 30
    export: bool = False
    drift: DriftConfig = DriftConfig()


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    datasets: tuple[str, ...] = ()
    max_offsets_per_trigger: int = 10000
    max_record_bytes: int = 1_000_000
    landing: str = ""
    starting_offsets: str = "earliest"
    kafka: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def accepts(self, dataset: str, known: Mapping[str, str]) -> bool:
        """Whether a record may name ``dataset``: listed in ``datasets``, or (none listed) in ``known``."""
        return dataset in (self.datasets or tuple(known))


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    database_url: str = "postgresql://oncolake@127.0.0.1:5432/oncolake"
    database_passfile: str = "var/postgres/pgpass"
    jwt_key_file: str = ""
    session_minutes: int = 30
    login_failures: int = 5
    login_window_seconds: int = 300
    max_upload_bytes: int = 67_108_864
    store_uploads: str = ""
    reload_seconds: float = 10.0
    page_size: int = 100
    batch_max: int = 32
    batch_wait_ms: float = 5.0


@dataclasses.dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str = ""
    experiment: str = "oncolake"
    local_store: str = "var/mlruns"


@dataclasses.dataclass(frozen=True)
class Config:
    lake: str = "lake"
    spark: SparkConfig = SparkConfig()
    hdfs: HdfsConfig = HdfsConfig()
    ingest: IngestConfig = IngestConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    score: ScoreConfig = ScoreConfig()
    mlflow: MlflowConfig = MlflowConfig()
    stream: StreamConfig = StreamConfig()
    nightly: NightlyConfig = NightlyConfig()
    serve: ServeConfig = ServeConfig()


def default_conf_dir() -> Path:
    """The repository's ``conf/`` folder (next to ``lib/``)."""
    return Path(__file__).resolve().parents[2] / "conf"


def load(env: str = "local", overrides: Sequence[str] = (),
         environ: Mapping[str, str] | None = None,
         conf_dir: str | Path | None = None, dataset: str | None = None) -> Config:
    """Resolve the configuration layers into a frozen :class:`Config`.

    ``dataset``: the data set the job works on; its ``datasets`` entry, if
    any, goes over the files' sections (and under the environment and ``--set``).
    """
    folder = Path(conf_dir) if conf_dir else default_conf_dir()
    raw: dict[str, Any] = {}
    for name in ("base", env):
        path = folder / f"{name}.yaml"
        if not path.is_file():
            if name == "base":
                continue
            raise ConfigError(f"no configuration for env {env!r}: {path} does not exist")
        try:
            layer = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(layer, dict):
            raise ConfigError(f"{path} must hold a mapping")
        _merge(raw, layer)
    per_dataset = _per_dataset(raw)
    if dataset is None:  # the nightly run names its data set in the configuration itself
        dataset = _build(Config, _over(copy.deepcopy(raw), environ, overrides), "").nightly.dataset
    if dataset in per_dataset:
        log.info("settings for dataset %s: %s", dataset, per_dataset[dataset])
        _merge(raw, copy.deepcopy(per_dataset[dataset]))
    return _build(Config, _over(raw, environ, overrides), "")


def _over(raw: dict, environ: Mapping[str, str] | None, overrides: Sequence[str]) -> dict:
    """``raw`` with the environment's keys and the ``--set`` overrides on top."""
    for var, key in ENVIRONMENT.items():
        if environ and environ.get(var):
            _set(raw, key, environ[var])
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes key=value, got {item!r}")
        if key.strip().startswith("datasets."):
            raise ConfigError(f"--set {key.strip()}: a job's --set already wins over its data set's entry; "
                              "set the key itself (e.g. preprocess.size=64)")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        _set(raw, key.strip(), value if parsed is None and value else parsed)
    return raw


def _per_dataset(raw: dict) -> dict[str, dict]:
    """Take the ``datasets`` section out of ``raw`` and check every entry, used or not."""
    entries = raw.pop("datasets", None) or {}
    if not isinstance(entries, Mapping):
        raise ConfigError(f"datasets must map data set names to settings, got {entries!r}")
    if entries:
        _build(Config, copy.deepcopy(raw), "")  # an error outside the entries is reported as itself
    for name, entry in entries.items():
        where = f"datasets.{name}"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {entry!r}")
        outside = sorted(set(entry) - set(PER_DATASET))
        if outside:
            raise ConfigError(f"{where} may set only {', '.join(PER_DATASET)}; not {', '.join(outside)}")
        trial = copy.deepcopy(raw)
        _merge(trial, copy.deepcopy(entry))
        try:
            _build(Config, trial, "")
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err
    return {str(name): entry for name, entry in entries.items()}


def describe(cfg: Config) -> dict[str, Any]:
    """The configuration as a plain dict with secrets hidden, for logging."""
    def hide(prefix: str, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: hide(f"{prefix}{k}.", v) for k, v in value.items()}
        if isinstance(value, tuple):
            return list(value)
        if any(m in prefix.lower() for m in SECRET_MARKERS):
            return "***"
        if isinstance(value, str):  # credentials inside a URI: scheme://user:pass@host
            return re.sub(r"(//)[^/@\s]+@", r"\1***@", value)
        return value
    return hide("", dataclasses.asdict(cfg))


def _merge(into: dict, layer: Mapping) -> None:
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def _set(raw: dict, dotted: str, value: Any) -> None:
    # spark.conf keys contain dots themselves: spark.conf.<anything> is one key.
    if dotted.startswith("spark.conf."):
        raw.setdefault("spark", {}).setdefault("conf", {})[dotted[len("spark.conf."):]] = str(value)
        return
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section")
    node[leaf] = value


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'configuration'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown configuration key(s): {', '.join(where + k for k in unknown)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, f"{where}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        inner = typing.get_args(hint)[0]
        return tuple(_coerce(inner, v, key) for v in items)
    if origin in (Mapping, dict) or hint is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping")
        inner = typing.get_args(hint)[1]
        return {str(k): _coerce(inner, v, f"{key}.{k}") for k, v in value.items()}
    if hint is str:
        return "" if value is None else str(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if hint is int and float(value) != int(value):
            raise ConfigError(f"{key} must be a whole number, got {value!r}")
        return hint(value)
    return value
