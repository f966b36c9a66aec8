"""Train the CNN across Spark executors with Horovod, reading tensors through Petastorm.

``horovod.spark.run`` starts ``num_proc`` training processes as Spark tasks.
Each reads its own shard of the training split (``cur_shard``/``shard_count``)
and the whole validation split; the optimizer is Horovod's
DistributedOptimizer with the learning rate scaled by the number of
processes, rank 0's initial weights are broadcast, metrics are averaged, and
only rank 0 writes checkpoints, TensorBoard logs and the model.

TensorFlow is imported inside the functions that need it, so importing this
module (on the driver, in Spark tasks) stays cheap.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

# Module-level: Horovod's rank processes get these pickled by value with the training
# function; an import inside it would look for an installed oncolake, which executors lack.
from oncolake import calibration, evaluation, lake, preprocess, profiling, registry, selection, tracking
from oncolake.config import Config, PreprocessConfig, TrainConfig
from oncolake.errors import ConfigError, DataQualityError

log = logging.getLogger(__name__)

ARCHITECTURES = ("cnn3", "separable")
LR_SCHEDULES = ("plateau", "cosine")
CHECKPOINT = "last.weights.h5"
BEST = "best.weights.h5"
#: In each run folder: the training_key of the model it is training.
KEY = "key"


def build_model(size: int, mean: list[float], std: list[float], tcfg: TrainConfig):
    """The CNN: uint8 images in, probability of malignant out.

    Normalisation (the dataset's training-split statistics) and augmentation
    (flips, then rotation, zoom, brightness and contrast by up to ``tcfg``'s
    factors, each 0 to leave it out; active in training only) are layers of
    the model, so it takes uint8 images as stored and as scored.

    Augmentation works on 0-255 pixel values and normalisation comes after it:
    Keras' RandomContrast clips its output to [0, 255], so placed after
    normalisation it zeroed every below-mean value in training only, and the
    model met different inputs at inference (BUSI scored below chance).
    """
    import tensorflow as tf
    layers = tf.keras.layers
    if tcfg.architecture not in ARCHITECTURES:
        raise ConfigError(f"train.architecture must be one of {ARCHITECTURES}, got {tcfg.architecture!r}")
    inputs = tf.keras.Input((size, size, 3), dtype=tf.uint8, name="image")
    # The preprocessing layers cast the uint8 input to float themselves: no
    # Lambda layer, so the saved model loads with safe_mode (no code from the file is run).
    check_augmentation(tcfg)
    x = layers.RandomFlip("horizontal_and_vertical", seed=tcfg.seed)(inputs)
    if tcfg.rotation:
        x = layers.RandomRotation(tcfg.rotation, seed=tcfg.seed)(x)
    if tcfg.zoom:
        x = layers.RandomZoom(tcfg.zoom, seed=tcfg.seed)(x)
    if tcfg.brightness:
        x = layers.RandomBrightness(tcfg.brightness, value_range=(0.0, 255.0), seed=tcfg.seed)(x)
    if tcfg.contrast:
        x = layers.RandomContrast(tcfg.contrast, seed=tcfg.seed)(x)
    x = layers.Normalization(mean=mean, variance=[s * s for s in std], name="normalise")(x)
    conv = layers.SeparableConv2D if tcfg.architecture == "separable" else layers.Conv2D
    # In mixed bfloat16 the network computes in bfloat16 (variables stay float32);
    # augmentation, normalisation and the output stay float32. "auto" builds float32:
    # the training job resolves it by measurement (choose_precision) before building.
    dtype = "mixed_bfloat16" if check_precision(tcfg.precision) == "mixed_bfloat16" else None
    if tcfg.stem:
        # A stride-2 convolution first: the blocks then work on a quarter of
        # the pixels, so the same time buys deeper, wider blocks.
        x = layers.Conv2D(tcfg.stem, 3, strides=2, padding="same", use_bias=False, dtype=dtype)(x)
        x = layers.BatchNormalization(dtype=dtype)(x)
        x = layers.Activation("relu", dtype=dtype)(x)
    for filters in tcfg.filters:
        for _ in range(2):
            x = conv(filters, 3, padding="same", use_bias=False, dtype=dtype)(x)
            x = layers.BatchNormalization(dtype=dtype)(x)
            x = layers.Activation("relu", dtype=dtype)(x)
        x = layers.MaxPooling2D(dtype=dtype)(x)
        x = layers.Dropout(tcfg.dropout / 2, dtype=dtype)(x)
    x = layers.GlobalAveragePooling2D(dtype=dtype)(x)
    x = layers.Dense(tcfg.dense_units, activation="relu", dtype=dtype)(x)
    x = layers.Dropout(tcfg.dropout, dtype=dtype)(x)
    outputs = layers.Dense(1, activation="sigmoid", name="malignant", dtype="float32")(x)
    return tf.keras.Model(inputs, outputs, name=f"oncolake_{tcfg.architecture}")


def with_aux_head(model, classes: int):
    """A model to train: ``model``'s layers and output, and an auxiliary head.

    The head (a softmax over ``classes``, named ``aux``) reads the features
    the malignant output reads. Both share ``model``'s layers, so training
    this trains ``model``, which alone is selected and registered.
    """
    import tensorflow as tf
    features = model.get_layer("malignant").input
    head = tf.keras.layers.Dense(classes, activation="softmax", name="aux", dtype="float32")(features)
    return tf.keras.Model(model.inputs, [model.output, head], name=f"{model.name}_with_aux")


def compiled(model, tcfg: TrainConfig, optimizer, aux_classes: int = 0):
    """The model to fit, compiled: ``model`` itself, or with ``aux_classes`` an aux head on it.

    The aux head's cross-entropy is weighted ``tcfg.aux_weight`` against the
    malignant output's binary cross-entropy; ``model`` (the malignant output,
    the same layers) is what is selected and saved either way.
    """
    import tensorflow as tf
    loss = tf.keras.losses.BinaryCrossentropy(label_smoothing=tcfg.label_smoothing)
    if not aux_classes:
        model.compile(optimizer=optimizer, loss=loss, experimental_run_tf_function=False)
        return model
    fitted = with_aux_head(model, aux_classes)
    fitted.compile(optimizer=optimizer, experimental_run_tf_function=False,
                   loss={"malignant": loss, "aux": tf.keras.losses.SparseCategoricalCrossentropy()},
                   loss_weights={"malignant": 1.0, "aux": tcfg.aux_weight})
    return fitted


def check_aux(tcfg: TrainConfig, manifest: dict[str, Any]) -> int:
    """The number of aux classes the model learns beside malignant (0: none); a ConfigError if it cannot."""
    if tcfg.aux_weight < 0:
        raise ConfigError(f"train.aux_weight must be >= 0 (0: off), got {tcfg.aux_weight}")
    if not tcfg.aux_weight:
        return 0
    if tcfg.mixup:
        raise ConfigError("train.aux_weight and train.mixup cannot both be on: mixup mixes labels, "
                          "and an aux class cannot be mixed")
    aux = manifest.get("aux")
    if not aux:
        raise ConfigError(f"train.aux_weight={tcfg.aux_weight} needs tensors made with preprocess.aux_attribute; "
                          f"tensors v{manifest.get('version')} carry no aux classes (run preprocess with "
                          f"it first, or set train.aux_weight=0)")
    return len(aux["classes"])


def check_augmentation(tcfg: TrainConfig) -> None:
    """A ConfigError unless each augmentation factor is one its Keras layer takes."""
    # rotation is a fraction of a full turn (0.5: any angle); zoom, brightness and contrast fractions of 1
    for name, high in (("rotation", 0.5), ("zoom", 0.9), ("brightness", 1.0), ("contrast", 0.9)):
        value = getattr(tcfg, name)
        if not 0.0 <= value <= high:
            raise ConfigError(f"train.{name} must be in [0, {high}] (0: off), got {value}")


PRECISIONS = ("auto", "float32", "mixed_bfloat16")


def check_precision(precision: str) -> str:
    """``precision`` if it is one ``train.precision`` takes, else a ConfigError."""
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def measure_precision(size: int, tcfg: TrainConfig, steps: int = 4, rounds: int = 2,
                      give_up: float = 3.0) -> dict[str, Any]:
    """Training steps per second of the configured CNN in float32 and in mixed bfloat16, here; the faster.

    Which is faster depends on the CPU, the image size and the threads, not on a
    CPU flag: two hosts this project has run on report ``avx512_bf16``, yet
    bfloat16 trained 1.8x faster than float32 on one (AMD EPYC) and 0.5-1.0x
    on the other (an Intel Xeon; docs/benchmarks.md). So a few steps of each
    on one batch of random images, warm (traced, two steps), alternating
    ``rounds`` times, each precision's best round counting. Ties go to float32.

    On a CPU without bfloat16 instructions a bfloat16 step is emulated, 10x
    float32's or more (an AMD EPYC without ``avx512_bf16``: 22 s a step at
    96 px, the whole measurement 258 s of a 30-minute training). So bfloat16's
    warm-up calls are timed against float32's, call for call (tracing
    included in both): one that takes more than ``give_up`` times as long
    cannot win and is timed no further. Its ``steps_per_s`` is then its warm-up
    calls over their time (tracing included), and ``given_up`` says so.
    """
    import numpy as np
    import tensorflow as tf
    began = time.perf_counter()
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 256, (tcfg.batch_size, size, size, 3), dtype=np.uint8))
    y = tf.constant(rng.integers(0, 2, (tcfg.batch_size, 1)).astype("float32"))
    models, rates, given_up, warm = {}, {}, {}, {}
    for precision in PRECISIONS[1:]:  # float32 first: the others are held to its warm-up
        model = build_model(size, [128.0] * 3, [50.0] * 3, dataclasses.replace(tcfg, precision=precision))
        model.compile(optimizer=tf.keras.optimizers.Adam(tcfg.learning_rate), loss="binary_crossentropy")
        start, warm[precision] = time.perf_counter(), []
        for call in range(2):
            model.train_on_batch(x, y)
            warm[precision].append(time.perf_counter() - start)
            reference = warm["float32"][call]
            if precision != "float32" and warm[precision][-1] > give_up * reference:
                given_up[precision] = (f"{call + 1} warm-up call(s) took {warm[precision][-1]:.1f} s, "
                                       f"float32's {reference:.1f} s")
                rates[precision] = (call + 1) / warm[precision][-1]
                break
        else:
            models[precision] = model
            rates[precision] = 0.0
    for _ in range(rounds):
        for precision, model in models.items():
            start = time.perf_counter()
            for _ in range(steps):
                model.train_on_batch(x, y)  # returns the loss as a number: the step has finished
            rates[precision] = max(rates[precision], steps / (time.perf_counter() - start))
    measured = {"precision": max(rates, key=rates.get), "chosen_by": "measurement",
                "steps_per_s": {p: round(r, 3) for p, r in rates.items()},
                "seconds": round(time.perf_counter() - began, 1)}
    if given_up:
        measured["given_up"] = given_up
    return measured


def precision_cache_file(tcfg: TrainConfig) -> Path:
    """Where measured precisions are kept on the host where rank 0 runs."""
    if tcfg.precision_cache:
        return Path(tcfg.precision_cache)
    root = os.environ.get("ONCOLAKE_CACHE") or Path.home() / ".cache" / "oncolake"
    return Path(root) / "precision.json"


def precision_key(size: int, tcfg: TrainConfig, threads: int, cpuinfo: str = "/proc/cpuinfo") -> str:
    """What a measured precision holds for: this CPU (model and flags), TensorFlow, the network, the
    image size, the batch and the threads of a rank."""
    import tensorflow as tf
    try:
        first = Path(cpuinfo).read_text().split("\n\n")[0]
    except OSError:
        first = ""
    cpu = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())
           if k.strip() in ("vendor_id", "model name", "cpu family", "model", "flags")}
    what = {"cpu": cpu, "cores": os.cpu_count(), "tensorflow": tf.__version__, "size": size, "threads": threads,
            "network": [tcfg.architecture, list(tcfg.filters), tcfg.dense_units, *([tcfg.stem] if tcfg.stem else [])],
            "batch_size": tcfg.batch_size}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _cached_precision(path: Path, key: str) -> dict[str, Any] | None:
    try:
        known = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return {**known, "chosen_by": "cache"} if isinstance(known, dict) and known.get("precision") in PRECISIONS[1:] \
        else None


def _cache_precision(path: Path, key: str, measured: dict[str, Any]) -> None:
    """Add ``measured`` under ``key``; a cache that cannot be written is only logged."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        known = known if isinstance(known, dict) else {}
        known[key] = {k: v for k, v in measured.items() if k != "chosen_by"}
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(known, indent=1, sort_keys=True))
        os.replace(partial, path)
    except OSError as e:
        log.warning("could not keep the measured precision in %s: %s", path, e)


def choose_precision(size: int, tcfg: TrainConfig, threads: int, state: dict[str, Any], rank: int,
                     broadcast) -> dict[str, Any]:
    """The precision this run trains in, and why: ``{"precision", "chosen_by"[, "steps_per_s"]}``.

    A configured precision stands. ``auto`` keeps what the run's first attempt
    used (``state``, a resumed run), else what was measured before on this
    host for the same network, size, batch and threads (a small cache, so
    runs on one host are reproducible), else measures (every rank at once, the
    load training puts on the host) and rank 0's result, broadcast, decides.
    """
    if check_precision(tcfg.precision) != "auto":
        return {"precision": tcfg.precision, "chosen_by": "configuration"}
    if state.get("precision") in PRECISIONS[1:]:
        return {"precision": state["precision"], "chosen_by": "resumed run"}
    path, key = precision_cache_file(tcfg), precision_key(size, tcfg, threads)
    known = broadcast(_cached_precision(path, key) if rank == 0 else None, "precision_cached")
    if known is None:
        known = broadcast(measure_precision(size, tcfg), "precision_measured")
        if rank == 0:
            _cache_precision(path, key, known)
    return known


def weights_digest(model) -> str:
    """SHA-256 of all weights in order: equal digests mean identical models."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(weight.tobytes())
    return digest.hexdigest()


def _average_non_trainable():
    """A callback that averages non-trainable variables across ranks at each epoch end.

    BatchNormalization's moving mean and variance are not gradients, so the
    DistributedOptimizer never averages them: without this, every rank keeps
    the statistics of its own shard and the ranks' models differ.
    """
    import horovod.tensorflow as hvd_tf
    import tensorflow as tf

    class AverageNonTrainable(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            for i, variable in enumerate(self.model.non_trainable_variables):
                variable.assign(hvd_tf.allreduce(variable, op=hvd_tf.Average, name=f"non_trainable_{i}"))

    return AverageNonTrainable()


def _train_clock():
    """A callback that times each epoch's training steps: not validation, not epoch-end callbacks."""
    import tensorflow as tf

    class TrainClock(tf.keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []
            self._start = self._last = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._start = self._last = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self._last = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(self._last - self._start)

    return TrainClock()


def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One Horovod rank. Runs inside a Spark task; returns its history and digest.

    Rank 0 also returns the model's bytes (``.keras``, the selected epoch's
    weights), which the driver registers in the lake.
    """
    import horovod.tensorflow as hvd_tf
    import horovod.tensorflow.keras as hvd
    import tensorflow as tf

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tcfg = TrainConfig(**spec["train"])
    # Keras writes checkpoints to local scratch; rank 0 copies them to the run
    # folder in the lake (local disk or HDFS) after every epoch.
    fs, run_path = lake.python_fs(spec["run_uri"], spec["hdfs"])
    state = json.loads(fs.cat_file(f"{run_path}/state.json")) if spec["resume"] else {}
    chosen = choose_precision(spec["size"], tcfg, spec["threads"], state, rank,
                              lambda obj, name: hvd_tf.broadcast_object(obj, root_rank=0, name=name))
    tcfg = dataclasses.replace(tcfg, precision=chosen["precision"])
    if rank == 0:  # Horovod relays a rank's stdout to the job's log
        print(f"training in {tcfg.precision} ({chosen['chosen_by']}"
              + (f", steps/s {chosen['steps_per_s']}" if chosen.get("steps_per_s") else "") + ")", flush=True)
    tf.keras.backend.clear_session()  # the measurement's models: names and seeds start afresh
    tf.keras.utils.set_random_seed(tcfg.seed)
    scratch = _local_scratch(rank)
    try:
        model = build_model(spec["size"], spec["mean"], spec["std"], tcfg)
        aux_classes = spec.get("aux_classes", 0)
        fitted = compiled(model, tcfg, hvd.DistributedOptimizer(tf.keras.optimizers.Adam(tcfg.learning_rate * size)),
                          aux_classes)
        filesystem = lake.petastorm_filesystem(spec["train_url"], spec["hdfs"])
        # Each rank scores its own shard of the validation split; the scores are gathered.
        _, val_images, val_labels = evaluation.read_split(spec["val_url"], filesystem, shard=(rank, size))
        bn_images = None
        if tcfg.bn_images:
            # a sample of this rank's training shard, on which BatchNormalization's statistics are recomputed
            _, bn_images, _ = evaluation.read_split(spec["train_url"], filesystem, shard=(rank, size),
                                                    limit=-(-tcfg.bn_images // size), seed=tcfg.seed)
        initial_epoch, best = 0, None
        if spec["resume"]:
            # Weights only: the optimizer's moment estimates start afresh after a resume.
            initial_epoch = state["epochs_done"]
            if state.get("best_epoch"):
                fs.get(f"{run_path}/{BEST}", str(scratch / BEST))
                model.load_weights(scratch / BEST)
                best = {"epoch": state["best_epoch"], "val_auc": state["best_val_auc"],
                        "weights": model.get_weights()}
            fs.get(f"{run_path}/{CHECKPOINT}", str(scratch / CHECKPOINT))
            fitted.load_weights(scratch / CHECKPOINT)
        clock = _train_clock()
        chooser = selection.callback(
            val_images, val_labels, ema_decay=tcfg.ema_decay, batch_size=spec["batch_size"] * 2,
            gather=lambda t: hvd_tf.allgather(t, name="val_gather"),
            average=lambda t: hvd_tf.allreduce(t, op=hvd_tf.Average, name="ema_average"),
            save_best=(lambda m: m.save_weights(scratch / BEST)) if rank == 0 else None, best=best,
            bn_images=bn_images, scored_model=model if fitted is not model else None)
        callbacks = [
            clock,
            hvd.callbacks.BroadcastGlobalVariablesCallback(0),
            _average_non_trainable(),  # before anything that reads or saves the weights
            hvd.callbacks.MetricAverageCallback(),
            chooser,  # puts the exact val_auc in the logs for the callbacks after it
            _learning_rate_schedule(tcfg, tcfg.learning_rate * size),
            tf.keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=tcfg.patience),
        ]
        if rank == 0:
            fs.makedirs(run_path, exist_ok=True)
            callbacks += [
                tf.keras.callbacks.ModelCheckpoint(str(scratch / CHECKPOINT), save_weights_only=True),
                tf.keras.callbacks.LambdaCallback(
                    on_epoch_end=lambda epoch, _logs: _save_progress(
                        fs, run_path, scratch, {"epochs_done": epoch + 1, "best_epoch": chooser.best_epoch,
                                                "best_val_auc": chooser.best_val_auc,
                                                "precision": tcfg.precision})),
                tf.keras.callbacks.TensorBoard(str(scratch / "tensorboard"),
                                               profile_batch=_profiled_steps(tcfg.profile_steps,
                                                                             spec["steps_per_epoch"])),
            ]

        start = time.perf_counter()
        with training_batches(spec, rank, size, tcfg.seed, tcfg.cache_mb, filesystem,
                              mixup=tcfg.mixup, aux=bool(aux_classes)) as train:
            # mixed batches, and batches for two heads, carry their class weights as sample weights
            history = fitted.fit(train, steps_per_epoch=spec["steps_per_epoch"], epochs=spec["epochs"],
                                 initial_epoch=initial_epoch,
                                 class_weight=None if tcfg.mixup or aux_classes else spec["class_weight"],
                                 callbacks=callbacks, verbose=2 if rank == 0 else 0)
        seconds = time.perf_counter() - start
        result = {"rank": rank, "size": size, "digest": weights_digest(model), "seconds": seconds,
                  "epoch_train_seconds": clock.seconds,
                  "initial_epoch": initial_epoch,
                  "best_epoch": chooser.best_epoch, "best_val_auc": chooser.best_val_auc,
                  "precision": tcfg.precision, "precision_choice": chosen,
                  # where the rank ran: a standalone worker starts each executor in its own folder
                  "placement": f"{socket.gethostname()}:{os.getcwd()}",
                  "history": {k: [float(v) for v in vals] for k, vals in history.history.items()},
                  "epochs_run": len(history.history.get("loss", []))}
        if rank == 0:
            if tcfg.profile_steps:
                try:
                    result["profile"] = profiling.trace_breakdown(str(scratch / "tensorboard"))
                    result["profile"]["steps"] = tcfg.profile_steps
                except FileNotFoundError:  # training ended before the traced steps (epoch 2)
                    result["profile"] = {"error": "no trace: training ended before epoch 2's traced steps"}
            final = scratch / "model.keras"
            model.save(final)
            result["model"] = final.read_bytes()
            if (scratch / "tensorboard").is_dir():
                fs.put(str(scratch / "tensorboard"), f"{run_path}/tensorboard", recursive=True)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def training_batches(spec: dict[str, Any], rank: int, size: int, seed: int, cache_mb: int, filesystem=None,
                     repeat: bool = True, mixup: float = 0.0, aux: bool = False):
    """This rank's endless stream of shuffled (uint8 images, float32 labels) batches.

    Each rank reads its own shard of the training split through Petastorm
    (row groups dealt by ``rank``/``size``). A shard up to ``cache_mb`` is read
    once and kept in memory: later epochs then cost no Python per image and
    each pass is a full shuffle of the shard; a larger shard is streamed with
    a 512-image shuffle buffer. Only image and label are read: group_id may be
    null (no lesion or patient ids), which TensorFlow refuses. ``repeat=False``
    gives one pass over the shard.

    ``mixup`` > 0: each batch is mixed with itself in a shuffled order
    (:func:`mix_batch`), and batches are (images, labels, sample weights).

    ``aux``: the tensors' aux class is read too, and batches are (images,
    {malignant: labels, aux: classes}, {malignant: class weights, aux: 1, or
    0 for an image without an aux class}).
    """
    import tensorflow as tf
    from petastorm import make_reader
    from petastorm.tf_utils import make_petastorm_dataset

    cached = spec["shard_bytes"] <= cache_mb * 2 ** 20
    with make_reader(spec["train_url"], schema_fields=["image", "label", *(["aux"] if aux else [])],
                     num_epochs=1 if cached or not repeat else None,
                     cur_shard=rank, shard_count=size, shuffle_row_groups=True, seed=seed + rank,
                     reader_pool_type="dummy", filesystem=filesystem) as reader:
        if aux:
            weights = spec.get("class_weight") or {0: 1.0, 1: 1.0}
            batches = make_petastorm_dataset(reader).map(partial(_two_heads, class_weight=(weights[0], weights[1])))
        else:
            batches = make_petastorm_dataset(reader).map(lambda row: (row.image, tf.cast(row.label, tf.float32)))
        if cached:
            batches = batches.cache().shuffle(spec["shard_rows"], seed=seed + rank)
            batches = batches.repeat() if repeat else batches
        else:
            batches = batches.shuffle(512, seed=seed + rank)
        batches = batches.batch(spec["batch_size"])
        if mixup:
            weights = spec.get("class_weight") or {0: 1.0, 1: 1.0}
            mix = partial(mix_batch, alpha=mixup, seed=seed * 1000 + rank, class_weight=(weights[0], weights[1]))
            batches = batches.enumerate().map(lambda step, batch: mix(step, *batch))
        yield batches.prefetch(2)


def _two_heads(row, *, class_weight: tuple[float, float]):
    """One tensor row as (image, targets, sample weights) for a model with an aux head."""
    import tensorflow as tf
    label = tf.cast(row.label, tf.float32)
    known = row.aux >= 0
    return (row.image, {"malignant": label, "aux": tf.maximum(row.aux, 0)},
            {"malignant": tf.where(label > 0.5, class_weight[1], class_weight[0]),
             "aux": tf.cast(known, tf.float32)})


def mix_batch(step, images, labels, *, alpha: float, seed: int, class_weight: tuple[float, float]):
    """Mixup (Zhang et al., 2018) of one batch with itself in a shuffled order.

    Each image i becomes ``lam_i * x_i + (1 - lam_i) * x_p(i)`` with ``lam_i``
    drawn from Beta(alpha, alpha), rounded back to uint8 (the model's input);
    its label and its class weight are mixed with the same ``lam_i``. Draws
    are stateless, from (seed, step): the same seed mixes the same way.
    Returns (images, labels, sample weights).
    """
    import tensorflow as tf
    n = tf.shape(images)[0]
    seed, step = tf.constant(seed, tf.int64), tf.cast(step, tf.int64)
    a = tf.random.stateless_gamma([n], seed=tf.stack([seed, step * 3]), alpha=alpha)
    b = tf.random.stateless_gamma([n], seed=tf.stack([seed, step * 3 + 1]), alpha=alpha)
    lam = a / tf.maximum(a + b, 1e-12)
    order = tf.argsort(tf.random.stateless_uniform([n], seed=tf.stack([seed, step * 3 + 2])))
    pixels = tf.cast(images, tf.float32)
    share = tf.reshape(lam, [-1, 1, 1, 1])
    mixed = tf.cast(tf.round(share * pixels + (1.0 - share) * tf.gather(pixels, order)), tf.uint8)
    weight = tf.where(labels > 0.5, class_weight[1], class_weight[0])
    return (mixed, lam * labels + (1.0 - lam) * tf.gather(labels, order),
            lam * weight + (1.0 - lam) * tf.gather(weight, order))


def _profiled_steps(count: int, steps_per_epoch: int) -> tuple[int, int] | int:
    """TensorBoard's ``profile_batch``: ``count`` steps of the second epoch (warm), or none.

    Keras counts batches from the start of training, 1-based.
    """
    if count <= 0:
        return 0
    start = steps_per_epoch + 2
    return (start, start + count - 1)


def _save_progress(fs, run_path: str, scratch: Path, state: dict[str, Any]) -> None:
    """Copy this epoch's checkpoints to the lake, the state file last.

    ``state.json`` names the epochs its checkpoints hold (and the best epoch
    so far, for ``--resume``), so it is written only once the weights it
    describes are in place.
    """
    for name in (CHECKPOINT, BEST):
        if (scratch / name).exists():
            fs.put_file(str(scratch / name), f"{run_path}/{name}")
    (scratch / "state.json").write_text(json.dumps(state))
    fs.put_file(str(scratch / "state.json"), f"{run_path}/state.json")


#: Train settings that change how fast a model trains, not which model: left out of its key.
_SPEED_ONLY = ("profile_steps", "cache_mb", "precision_cache")
#: Train settings added since the first models, with the value every model had before:
#: at that value they are left out of the key, so those models are found again.
_ADDED = {"mixup": 0.0, "label_smoothing": 0.0, "rotation": 0.1, "zoom": 0.1, "brightness": 0.1, "contrast": 0.1,
          "aux_weight": 0.0, "lr_schedule": "plateau", "stem": 0}


def training_key(dataset: str, tensors_version: int, manifest: dict[str, Any], tcfg: TrainConfig,
                 num_proc: int) -> str:
    """What a model is trained from: the tensor version (its manifest, less when and where it was
    built), the train settings and the number of processes. The SHA-256 of those, as JSON."""
    # settings added since, at the value every model had before them, leave those models' keys as they were
    settings = {k: v for k, v in dataclasses.asdict(tcfg).items()
                if k not in _SPEED_ONLY and not (k in _ADDED and v == _ADDED[k])}
    what = {"dataset": dataset, "tensors_version": tensors_version, "num_proc": num_proc, "train": settings,
            "manifest": {k: v for k, v in manifest.items() if k not in ("created_at", "source_table")}}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def run(spark: SparkSession, cfg: Config, dataset: str, tensors_version: int | None = None,
        resume: bool = False, again: bool = False) -> dict[str, Any]:
    """Train on a tensor dataset version and register the model as the next version.

    A model already registered from the same tensors with the same settings
    (:func:`training_key`) is the answer to a rerun: nothing is trained, and
    the run folders that killed attempts at it left are deleted. ``again``
    trains and registers another one anyway.
    """
    tcfg = cfg.train
    if tcfg.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {tcfg.lr_schedule!r}")
    if tcfg.stem < 0:
        raise ConfigError(f"train.stem must be 0 (none) or a number of filters, got {tcfg.stem}")
    lake_uri = lake.qualify(spark, cfg.lake)
    versions = preprocess.published_versions(spark, lake_uri, dataset)
    if not versions:
        raise DataQualityError(f"no tensor dataset for {dataset}: run preprocess first")
    manifest = preprocess.read_manifest(spark, lake_uri, dataset, tensors_version or versions[-1])
    if tensors_version is None:
        tensors_version = versions[-1]
        _warn_if_made_otherwise(spark, lake_uri, dataset, versions, manifest, cfg.preprocess)
    tensors = lake.tensors_uri(lake_uri, dataset, tensors_version)
    if tcfg.calibration not in calibration.METHODS:
        raise ConfigError(f"train.calibration must be one of {calibration.METHODS}, got {tcfg.calibration!r}")
    check_precision(tcfg.precision)
    if not 0.0 <= tcfg.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {tcfg.ema_decay}")
    if tcfg.mixup < 0:
        raise ConfigError(f"train.mixup must be >= 0 (0: off), got {tcfg.mixup}")
    if not 0.0 <= tcfg.label_smoothing < 1.0:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {tcfg.label_smoothing}")
    if tcfg.bn_images < 0:
        raise ConfigError(f"train.bn_images must be >= 0, got {tcfg.bn_images}")
    check_augmentation(tcfg)
    aux_classes = check_aux(tcfg, manifest)
    slots = spark.sparkContext.defaultParallelism
    num_proc = tcfg.num_proc or slots
    if num_proc > slots:
        raise ConfigError(f"train.num_proc={num_proc} but Spark has only {slots} task slots")
    train_rows = manifest["balancing"]["after"]
    n_train = sum(int(v) for v in train_rows.values())
    key = training_key(dataset, tensors_version, manifest, tcfg, num_proc)
    runs_uri = f"{lake.models_root(lake_uri, dataset)}/_runs"
    found = None if again else registry.find(spark, lake_uri, dataset, key)
    if found:
        version, model_dir = found
        log.info("model v%d was trained from tensors v%d with these settings: nothing to train "
                 "(--again trains another)", version, tensors_version)
        _sweep_runs(spark, runs_uri, key)
        return _summary(registry.read_record(spark, model_dir), version, model_dir, already_registered=True)
    run_uri = _run_uri(spark, runs_uri, resume)
    lake.write_text(spark, f"{run_uri}/{KEY}", key)
    spec = {
        "train_url": registry.petastorm_url(f"{tensors}/split=train"),
        "val_url": registry.petastorm_url(f"{tensors}/split=val"),
        "size": manifest["size"], "mean": manifest["normalisation"]["mean"],
        "std": manifest["normalisation"]["std"], "train": dataclasses.asdict(tcfg),
        "epochs": tcfg.epochs, "batch_size": tcfg.batch_size,
        # An "epoch" is at least min_steps_per_epoch updates: on a few hundred
        # images one pass is a handful of steps, and early stopping would judge
        # the model before it has trained (the reader repeats the data).
        "steps_per_epoch": max(tcfg.min_steps_per_epoch, math.ceil(n_train / (tcfg.batch_size * num_proc))),
        "class_weight": ({int(k): float(v) for k, v in manifest["balancing"]["class_weight"].items()}
                         if "class_weight" in manifest["balancing"] else None),
        "threads": max(1, int(spark.conf.get("spark.task.cpus", "1"))),
        # a rank's share of the training split, about (row groups are dealt to ranks whole);
        # a shuffle buffer of the whole split holds any shard entirely
        "shard_rows": n_train,
        "shard_bytes": math.ceil(n_train / num_proc) * manifest["size"] ** 2 * 3,
        "aux_classes": aux_classes,
        "run_uri": run_uri, "resume": resume,
        "hdfs": cfg.hdfs,
    }
    log.info("training %s on tensors v%d with %d processes, %d steps per epoch", dataset, tensors_version,
             num_proc, spec["steps_per_epoch"])
    start = time.perf_counter()
    results = _run_horovod(train_worker, spec, num_proc)
    seconds = time.perf_counter() - start
    chief = next(r for r in results if r["rank"] == 0)
    history = chief["history"]
    best_auc, best_epoch = chief["best_val_auc"], chief["best_epoch"]
    # Throughput of the training steps once warm: the first epoch also traces
    # the graph, and validation is not training.
    timed = chief["epoch_train_seconds"][1:] or chief["epoch_train_seconds"]
    images_timed = len(timed) * spec["steps_per_epoch"] * tcfg.batch_size * num_proc
    record = {
        "dataset": dataset, "architecture": tcfg.architecture,
        "hyperparameters": dataclasses.asdict(tcfg), "tensors_version": tensors_version,
        "tensors_uri": tensors, "source_table_version": manifest["source_table_version"],
        "size": manifest["size"], "resize": manifest["resize"], "normalisation": manifest["normalisation"],
        "pixels": manifest.get("pixels", {}),
        "modalities": manifest.get("modalities") or [cfg.ingest.modality(dataset)],
        "history": history, "epochs_run": chief["epochs_run"], "best_val_auc": best_auc,
        "best_epoch": best_epoch, "precision": chief["precision"], "precision_choice": chief["precision_choice"],
        "selection": {"criterion": "exact validation ROC AUC, inference mode", "ema_decay": tcfg.ema_decay,
                      "weights": "moving average" if tcfg.ema_decay > 0 else "as trained",
                      "batch_norm": ("statistics recomputed on training images (no augmentation) before each "
                                     "validation" if tcfg.bn_images else "moving averages from training"),
                      "bn_images": tcfg.bn_images},
        "num_proc": num_proc, "training_key": key, "steps_per_epoch": spec["steps_per_epoch"],
        "duration_s": round(seconds, 2), "resumed_from_epoch": chief["initial_epoch"],
        "images_per_sec": round(images_timed / max(sum(timed), 1e-9), 2),
        "fit_seconds": round(chief["seconds"], 2),
        "epoch_train_seconds": [round(x, 2) for x in chief["epoch_train_seconds"]],
        "weights_digests": sorted({r["digest"] for r in results}),
        "placement": {str(r["rank"]): r["placement"] for r in results},
        **({"profile": chief["profile"]} if "profile" in chief else {}),
        **({"aux": {"attribute": manifest["aux"]["attribute"], "classes": manifest["aux"]["classes"],
                    "weight": tcfg.aux_weight}} if aux_classes else {}),
    }
    model_file = chief["model"]
    if tcfg.calibration != "none":
        model_file, record["calibration"] = _calibrate(cfg, model_file, spec["val_url"])
    record["mlflow_run_id"] = tracking.log_run(
        cfg, lake_uri, f"train-{dataset}", params={**dataclasses.asdict(tcfg), "tensors_version": tensors_version,
                                                   "num_proc": num_proc, "dataset": dataset},
        metrics={"best_val_auc": best_auc, "best_epoch": best_epoch, "images_per_sec": record["images_per_sec"],
                 "epochs_run": chief["epochs_run"]},
        history=history, artifacts={"model.json": json.dumps(record, indent=2).encode()})
    version, model_dir = registry.register(
        spark, lake_uri, dataset, {"model.keras": model_file,
                                   "model.json": json.dumps(record, indent=2, sort_keys=True).encode()},
        {"tensorboard": f"{run_uri}/tensorboard"})
    lake.write_text(spark, f"{run_uri}/registered", model_dir)
    _sweep_runs(spark, runs_uri, key)
    return _summary(record, version, model_dir, already_registered=False)


def _warn_if_made_otherwise(spark: SparkSession, lake_uri: str, dataset: str, versions: list[int],
                            newest_manifest: dict[str, Any], pcfg: PreprocessConfig) -> None:
    """Say so when the newest tensors (what train takes by default) were made otherwise than the settings say.

    Preprocess run with the settings finds or makes the version they describe,
    but train takes the newest: after one run with other settings, those.
    """
    newest = preprocess.differences(newest_manifest, pcfg)
    if not newest:
        return
    matching = [v for v in versions[:-1]
                if not preprocess.differences(preprocess.read_manifest(spark, lake_uri, dataset, v), pcfg)]
    log.warning("training on the newest tensors, v%d, made with %s; the preprocess settings say %s%s", versions[-1],
                ", ".join(f"{k} {made}" for k, (made, _) in newest.items()),
                ", ".join(f"{k} {now}" for k, (_, now) in newest.items()),
                f" (v{matching[-1]} was made so: --tensors-version {matching[-1]} trains on it)" if matching else "")


def _summary(record: dict[str, Any], version: int, model_dir: str, already_registered: bool) -> dict[str, Any]:
    """The job's summary line, from the model's record (the same for a rerun that trains nothing)."""
    return {"job": "train", "dataset": record["dataset"], "model_version": version, "model_uri": model_dir,
            "already_registered": already_registered,
            "epochs_run": record["epochs_run"], "best_epoch": record["best_epoch"],
            "best_val_auc": record["best_val_auc"], "num_proc": record["num_proc"],
            "images_per_sec": record["images_per_sec"], "fit_seconds": record["fit_seconds"],
            "epoch_train_seconds": record["epoch_train_seconds"], "tensors_version": record["tensors_version"],
            "ranks_identical": len(record["weights_digests"]) == 1,
            "resumed_from_epoch": record["resumed_from_epoch"], "steps_per_epoch": record["steps_per_epoch"],
            "placement": record["placement"], "precision": record.get("precision"),
            "precision_chosen_by": record.get("precision_choice", {}).get("chosen_by"),
            **({"profile": record["profile"]} if "profile" in record else {})}


def _calibrate(cfg: Config, model_file: bytes, val_url: str) -> tuple[bytes, dict[str, Any]]:
    """Fit ``train.calibration`` on the validation split; the model file with it built in."""
    model = registry.load_model_bytes(model_file)
    _, images, labels = evaluation.read_split(val_url, lake.petastorm_filesystem(val_url, cfg.hdfs))
    raw = model.predict(images, batch_size=cfg.score.batch_size, verbose=0).ravel()
    fitted = calibration.choose(labels, raw, cfg.train.calibration)
    log.info("calibration (%s, fitted on %d validation images): a=%.4f b=%.4f, ECE %.4f -> %.4f",
             fitted["method"], len(labels), fitted["a"], fitted["b"], fitted["val_ece_before"],
             fitted["val_ece_after"])
    if fitted["method"] == "none":
        return model_file, fitted
    return registry.model_bytes(calibration.calibrated_model(model, fitted["a"], fitted["b"])), fitted


def _run_horovod(fn, spec: dict[str, Any], num_proc: int) -> list[dict[str, Any]]:
    """horovod.spark.run with oncolake's code shipped inside the pickled function.

    Horovod starts each rank in a new Python process that sees neither the
    --py-files zip nor the driver's paths, so the package is pickled by value
    (cloudpickle, as Horovod uses) rather than by reference to a module.
    """
    import cloudpickle
    import horovod.spark

    import oncolake
    cloudpickle.register_pickle_by_value(oncolake)
    try:
        return horovod.spark.run(fn, args=(spec,), num_proc=num_proc, use_gloo=True, verbose=0)
    finally:
        cloudpickle.unregister_pickle_by_value(oncolake)


def _run_uri(spark: SparkSession, runs_uri: str, resume: bool) -> str:
    """A new run folder, or with ``resume`` the newest run with a checkpoint and no registered model."""
    if resume:
        unfinished = [name for name in lake.list_dir(spark, runs_uri) if name.startswith("run-")
                      and lake.exists(spark, f"{runs_uri}/{name}/{CHECKPOINT}")
                      and not lake.exists(spark, f"{runs_uri}/{name}/registered")]
        if not unfinished:
            raise ConfigError(f"--resume: no unfinished run under {runs_uri}")
        return f"{runs_uri}/{unfinished[-1]}"
    # the driver's pid and host: a killed run's folder is known by them (lake.owner_gone)
    return f"{runs_uri}/run-{time.strftime('%Y%m%dT%H%M%S')}-{lake.owner_tag()}"


def _sweep_runs(spark: SparkSession, runs_uri: str, key: str) -> None:
    """Delete the run folders of killed attempts at the model of ``key``, once it is registered.

    Their checkpoints could only resume a model that now exists; a run still
    going, or one of other settings (``--resume`` may want it), is kept.
    """
    for name in lake.list_dir(spark, runs_uri):
        run_uri = f"{runs_uri}/{name}"
        if (name.startswith("run-") and lake.owner_gone(name) and not lake.exists(spark, f"{run_uri}/registered")
                and lake.exists(spark, f"{run_uri}/{KEY}") and lake.read_text(spark, f"{run_uri}/{KEY}") == key):
            log.info("deleting %s, a killed attempt at a model now registered", run_uri)
            lake.delete(spark, run_uri)


def cosine_rate(epoch: int, epochs: int, peak: float) -> float:
    """The learning rate of ``epoch`` (from 0) of ``epochs``: ``peak`` at the first, half a cosine down
    towards 0 at the last (the last epoch's is ``peak`` x (1 - cos(pi / epochs)) / 2, not 0)."""
    return peak * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def _learning_rate_schedule(tcfg: TrainConfig, peak: float):
    """``plateau``: the rate halves after ``patience // 2`` epochs without a better validation AUC.
    ``cosine``: :func:`cosine_rate`, set at each epoch's start from the epoch's number, so a resumed
    run goes on where the killed one was."""
    import tensorflow as tf
    if tcfg.lr_schedule == "cosine":
        return tf.keras.callbacks.LearningRateScheduler(lambda epoch, _rate: cosine_rate(epoch, tcfg.epochs, peak))
    return tf.keras.callbacks.ReduceLROnPlateau(monitor="val_auc", mode="max", factor=0.5,
                                                patience=max(1, tcfg.patience // 2), verbose=0)


def _local_scratch(rank: int) -> Path:
    """A rank's local scratch folder; first deletes those of ranks on this host that were killed."""
    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob(f"{lake.SCRATCH}train-*"):
        if lake.owner_gone(old.name):
            shutil.rmtree(old, ignore_errors=True)
    scratch = tmp / lake.scratch_name(f"train-rank{rank}")
    scratch.mkdir()
    return scratch
