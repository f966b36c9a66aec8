"""Training: the model, and Horovod on Spark with two ranks (slow)."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from jobs import ingest as ingest_job
from jobs import preprocess as preprocess_job
from oncolake import config, imaging, lake, registry, synthetic, training
from oncolake.errors import ConfigError
from tests.conftest import ROOT, killed_three_times_then_rerun, last_json, no_leftovers, with_column


def test_model_takes_uint8_and_normalises_inside():
    import tensorflow as tf
    tcfg = config.TrainConfig(filters=(4, 8), dense_units=8)
    model = training.build_model(16, [100.0, 110.0, 120.0], [10.0, 20.0, 30.0], tcfg)
    assert model.input.dtype == tf.uint8 and model.output.shape[-1] == 1
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (4, 1) and ((probabilities > 0) & (probabilities < 1)).all()
    # augmentation is off at inference: the same input gives the same output
    np.testing.assert_allclose(model.predict(images, verbose=0), probabilities)
    normalise = model.get_layer("normalise")
    out = normalise(tf.constant(np.full((1, 2, 2, 3), [110, 150, 60], np.uint8))).numpy()[0, 0, 0]
    np.testing.assert_allclose(out, [1.0, 2.0, -2.0], rtol=1e-5)


def test_augmentation_keeps_below_mean_pixels_in_training():
    """Training and inference see the same normalised range.

    Regression: with the photometric augmentation after normalisation, Keras'
    RandomContrast clipped the normalised values to [0, 255], so in training
    every pixel darker than the dataset mean became 0 while inference kept it
    negative (BUSI then scored below chance).
    """
    import tensorflow as tf
    tcfg = config.TrainConfig(filters=(4,), dense_units=4)
    model = training.build_model(16, [128.0] * 3, [32.0] * 3, tcfg)
    first_conv = next(layer for layer in model.layers if isinstance(layer, tf.keras.layers.Conv2D))
    network_input = tf.keras.Model(model.input, first_conv.input)  # after augmentation and normalisation
    dark = np.full((8, 16, 16, 3), 40, np.uint8)  # (40 - 128) / 32 = -2.75 at inference
    np.testing.assert_allclose(network_input(dark, training=False).numpy(), -2.75, rtol=1e-5)
    trained = network_input(dark, training=True).numpy()
    # brightness moves by at most 10 % of 255, contrast around the image's own mean
    assert trained.max() < 0 and abs(trained.mean() + 2.75) < 0.9


@pytest.mark.parametrize("name,bad", [("rotation", 0.6), ("zoom", -0.1), ("brightness", 1.5), ("contrast", 1.0)])
def test_an_augmentation_factor_its_layer_cannot_take_is_refused_by_name(name, bad):
    import dataclasses
    with pytest.raises(ConfigError, match=f"train.{name} must be in"):
        training.build_model(8, [0.0] * 3, [1.0] * 3, dataclasses.replace(config.TrainConfig(), **{name: bad}))


def test_auto_precision_is_measured_once_per_host_and_network_then_kept_and_a_resumed_run_keeps_its_own(tmp_path):
    import dataclasses
    tcfg = config.TrainConfig(filters=(4,), dense_units=4, batch_size=8, precision_cache=str(tmp_path / "p.json"))
    measured = training.measure_precision(16, tcfg, steps=2, rounds=1)
    rates = measured["steps_per_s"]
    assert set(rates) == {"float32", "mixed_bfloat16"} and min(rates.values()) > 0
    assert measured["precision"] == max(rates, key=rates.get)
    # a precision slower than float32 by more than give_up on the warm-up is timed no further
    assert "given_up" not in training.measure_precision(16, tcfg, steps=2, rounds=1, give_up=float("inf"))
    hopeless = training.measure_precision(16, tcfg, steps=2, rounds=1, give_up=0.0)
    assert hopeless["precision"] == "float32" and set(hopeless["given_up"]) == {"mixed_bfloat16"}
    assert hopeless["given_up"]["mixed_bfloat16"].startswith("1 warm-up call(s) took ")
    assert 0 < hopeless["steps_per_s"]["mixed_bfloat16"] and hopeless["steps_per_s"]["float32"] > 0

    calls = []

    def broadcast(obj, name):  # one rank: what rank 0 holds is what everyone gets
        calls.append(name)
        return obj

    first = training.choose_precision(16, tcfg, 1, {}, 0, broadcast)
    assert first["chosen_by"] == "measurement" and calls == ["precision_cached", "precision_measured"]
    cached = json.loads((tmp_path / "p.json").read_text())
    assert list(cached.values()) == [{k: v for k, v in first.items() if k != "chosen_by"}]
    # the same host, network, size, batch and threads: the measurement is reused, nothing is timed
    again = training.choose_precision(16, tcfg, 1, {}, 0, broadcast)
    assert again == {**first, "chosen_by": "cache"} and calls[2:] == ["precision_cached"]
    # what the cache says is what a run uses
    key = next(iter(cached))
    other = "float32" if first["precision"] == "mixed_bfloat16" else "mixed_bfloat16"
    (tmp_path / "p.json").write_text(json.dumps({key: {**cached[key], "precision": other}}))
    assert training.choose_precision(16, tcfg, 1, {}, 0, broadcast)["precision"] == other
    # another size, batch or thread count is measured afresh
    assert training.choose_precision(16, tcfg, 2, {}, 0, broadcast)["chosen_by"] == "measurement"
    assert training.choose_precision(16, dataclasses.replace(tcfg, batch_size=4), 1, {}, 0, broadcast)[
        "chosen_by"] == "measurement"
    assert len(json.loads((tmp_path / "p.json").read_text())) == 3
    # a resumed run keeps the precision its first attempt trained in; a configured one stands
    assert training.choose_precision(16, tcfg, 1, {"precision": first["precision"]}, 0, broadcast) == {
        "precision": first["precision"], "chosen_by": "resumed run"}
    fixed = dataclasses.replace(tcfg, precision="float32")
    assert training.choose_precision(16, fixed, 1, {"precision": "mixed_bfloat16"}, 0, broadcast) == {
        "precision": "float32", "chosen_by": "configuration"}
    # a damaged cache is measured over, not trusted
    (tmp_path / "p.json").write_text("{not json")
    assert training.choose_precision(16, tcfg, 1, {}, 0, broadcast)["chosen_by"] == "measurement"
    with pytest.raises(config.ConfigError, match="train.precision"):
        training.choose_precision(16, dataclasses.replace(tcfg, precision="fp16"), 1, {}, 0, broadcast)


def _split_from_parquet(folder: Path) -> tuple[list[bytes], list[int]]:
    """The split's images (as bytes) and labels, read with pyarrow, not Petastorm."""
    import io

    import pyarrow.parquet as pq
    table = pq.read_table(folder, columns=["image", "label"]).to_pydict()
    return [np.load(io.BytesIO(b)).tobytes() for b in table["image"]], [int(v) for v in table["label"]]


@pytest.mark.parametrize("balance, cache_mb", [("oversample", 64), ("class_weight", 0)])
def test_input_pipeline_feeds_every_training_image_in_uint8_batches(spark, tmp_path, capsys, balance, cache_mb):
    """Two ranks' shards together are the training split as written (balancing included),
    in uint8 batches of the configured size, cached in memory or streamed."""
    folder, lake = tmp_path / "in", str(tmp_path / "lake")
    synthetic.write_dataset(folder, groups=40, per_group=2, seed=5, malignant_every=4)
    run(ingest_job, capsys, "--lake", lake, "--dataset", "syn", "--input", str(folder),
        "--labels", str(folder / "labels.csv"))
    pre = run(preprocess_job, capsys, "--lake", lake, "--dataset", "syn", "--size", "16",
              "--set", f"preprocess.balance={balance}", "--set", "preprocess.rows_per_row_group=8")
    split = Path(pre["output"].removeprefix("file:")) / "split=train"
    images, labels = _split_from_parquet(split)
    positives = sum(labels)
    if balance == "oversample":
        assert positives == len(labels) - positives  # the minority class written again until equal
    else:
        assert positives < len(labels) / 3  # one patient in four is malignant; weights do the balancing
    spec = {"train_url": f"file://{split}", "batch_size": 8, "shard_rows": len(labels),
            "shard_bytes": len(labels) * 16 * 16 * 3 // 2}
    seen_images, seen_labels = [], []
    for rank in (0, 1):
        with training.training_batches(spec, rank, 2, seed=1, cache_mb=cache_mb, repeat=False) as batches:
            for x, y in batches.as_numpy_iterator():
                assert x.dtype == np.uint8 and x.shape[1:] == (16, 16, 3) and 1 <= len(x) <= 8
                assert y.dtype == np.float32 and y.shape == (len(x),)
                seen_images += [image.tobytes() for image in x]
                seen_labels += [int(v) for v in y]
    assert sorted(zip(seen_images, seen_labels)) == sorted(zip(images, labels))
    # an endless stream for training: full batches, more of them than one pass holds
    with training.training_batches(spec, 0, 1, seed=1, cache_mb=cache_mb) as batches:
        taken = list(batches.take(len(labels) // 8 + 3).as_numpy_iterator())
    assert all(len(x) == 8 for x, _ in taken)
    if balance == "class_weight":
        weights = json.loads((split.parent / "manifest.json").read_text())["balancing"]["class_weight"]
        # each class weighs half of the whole: n / (2 n_class)
        assert weights["1"] == pytest.approx(len(labels) / (2 * positives), rel=1e-5)
        assert weights["0"] == pytest.approx(len(labels) / (2 * (len(labels) - positives)), rel=1e-5)
        # with mixup the class weights travel as sample weights, mixed like the labels
        cw = {0: weights["0"], 1: weights["1"]}
        with training.training_batches({**spec, "class_weight": cw}, 0, 1, seed=1, cache_mb=cache_mb,
                                       mixup=0.4) as batches:
            mixed = list(batches.take(6).as_numpy_iterator())
            assert any(np.any((y > 0.01) & (y < 0.99)) for _, y, _ in mixed)  # labels of two classes mixed
            for x, y, w in mixed:
                assert x.dtype == np.uint8 and x.shape == (8, 16, 16, 3)
                assert np.all((y >= 0) & (y <= 1)) and np.all((w >= min(cw.values()) - 1e-6)
                                                               & (w <= max(cw.values()) + 1e-6))
                assert np.allclose(w, cw[0] + y * (cw[1] - cw[0]), atol=1e-5)  # both linear in the one share


def test_an_aux_head_learns_the_tensors_aux_class_beside_malignant_and_only_malignant_is_kept(
        spark, tmp_path, capsys):
    import tensorflow as tf
    folder, lake_dir = tmp_path / "in", str(tmp_path / "lake")
    synthetic.write_dataset(folder, groups=24, per_group=2, seed=6, malignant_every=3)
    # three kinds; one image in seven without one
    with_column(folder / "labels.csv", "dx", lambda i, _: "" if i % 7 == 2 else ("mel", "nv", "bkl")[i % 3])
    run(ingest_job, capsys, "--lake", lake_dir, "--dataset", "syn", "--input", str(folder),
        "--labels", str(folder / "labels.csv"))
    pre = run(preprocess_job, capsys, "--lake", lake_dir, "--dataset", "syn", "--size", "16",
              "--set", "preprocess.aux_attribute=dx", "--set", "preprocess.rows_per_row_group=8")
    split = Path(pre["output"].removeprefix("file:")) / "split=train"
    manifest = json.loads((split.parent / "manifest.json").read_text())
    table = pq.read_table(split, columns=["image", "label", "aux"]).to_pydict()
    written = sorted(zip([bytes(b) for b in table["image"]], table["label"], table["aux"]))
    cw = {int(k): v for k, v in manifest["balancing"]["class_weight"].items()}
    spec = {"train_url": f"file://{split}", "batch_size": 8, "shard_rows": len(written),
            "shard_bytes": len(written) * 16 * 16 * 3, "class_weight": cw}

    # every training row once: its label and class weight for one head, its aux class (weight 0 without) for the other
    seen = []
    for rank in (0, 1):
        with training.training_batches(spec, rank, 2, seed=1, cache_mb=64, repeat=False, aux=True) as batches:
            for x, y, w in batches.as_numpy_iterator():
                assert set(y) == set(w) == {"malignant", "aux"} and x.dtype == np.uint8
                assert np.allclose(w["malignant"], np.where(y["malignant"] > 0.5, cw[1], cw[0]))
                for image, label, aux, weight in zip(x, y["malignant"], y["aux"], w["aux"]):
                    seen.append((image, int(label), int(aux) if weight else -1))
                    assert weight in (0.0, 1.0) and (weight or aux == 0)
    import io
    assert sorted((np.load(io.BytesIO(b)).tobytes(), label, aux) for b, label, aux in written) == sorted(
        (image.tobytes(), label, aux) for image, label, aux in seen)
    assert -1 in {aux for *_, aux in seen}

    # the worker's model: two heads trained together, the malignant one alone kept
    tcfg = config.TrainConfig(filters=(4,), dense_units=8, aux_weight=0.5)
    assert training.check_aux(tcfg, manifest) == 3
    tf.keras.utils.set_random_seed(1)
    model = training.build_model(16, manifest["normalisation"]["mean"], manifest["normalisation"]["std"], tcfg)
    fitted = training.compiled(model, tcfg, tf.keras.optimizers.Adam(0.01), 3)
    assert [o.shape[-1] for o in fitted.outputs] == [1, 3] and len(model.outputs) == 1
    before = training.weights_digest(model)
    with training.training_batches(spec, 0, 1, seed=1, cache_mb=64, aux=True) as batches:
        history = fitted.fit(batches, steps_per_epoch=4, epochs=2, verbose=0).history
    assert {"loss", "malignant_loss", "aux_loss"} <= set(history)
    # the total is the malignant loss plus aux_weight times the aux loss
    assert history["loss"][-1] == pytest.approx(history["malignant_loss"][-1] + 0.5 * history["aux_loss"][-1],
                                                rel=1e-4)
    assert training.weights_digest(model) != before  # the kept model's layers were the ones trained
    saved = tmp_path / "model.keras"
    model.save(saved)
    loaded = tf.keras.models.load_model(saved, safe_mode=True, compile=False)
    assert len(loaded.outputs) == 1 and "aux" not in [layer.name for layer in loaded.layers]

    # refused clearly: tensors without aux classes, a negative weight, mixup beside it
    with pytest.raises(ConfigError, match="needs tensors made with preprocess.aux_attribute"):
        training.check_aux(tcfg, {**manifest, "aux": None})
    with pytest.raises(ConfigError, match="aux_weight must be >= 0"):
        training.check_aux(config.TrainConfig(aux_weight=-1.0), manifest)
    with pytest.raises(ConfigError, match="cannot both be on"):
        training.check_aux(config.TrainConfig(aux_weight=0.5, mixup=0.2), manifest)
    assert training.check_aux(config.TrainConfig(), {}) == 0


def _numbers(value):
    """Every number inside nested dicts and lists."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)


def run(job, capsys, *args):
    code = job.main(list(args))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return last_json(captured.out)


def submit(*args):
    """Run a job through scripts/submit.sh, as users do. Horovod, MLflow and
    TensorFlow then run outside the test process: in it, something they do closes
    pytest's capture stream (the run fails with "I/O operation on closed file")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK", "SPARK_"))}
    result = subprocess.run([str(ROOT / "scripts" / "submit.sh"), *args], capture_output=True, text=True,
                            env=env, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return last_json(result.stdout)


def test_the_training_key_names_what_a_model_is_trained_from_and_not_how_fast():
    import dataclasses
    manifest = {"size": 16, "source_table_version": 3, "created_at": "2026-12-01T00:00:00Z",
                "source_table": "file:/a/lake/bronze/images"}
    tcfg = config.TrainConfig()
    key = training.training_key("syn", 1, manifest, tcfg, 2)
    # when and where the tensors were built, and the speed-only settings, do not change it
    moved = {**manifest, "created_at": "2026-12-02T00:00:00Z", "source_table": "hdfs://nn/b/bronze/images"}
    assert training.training_key("syn", 1, moved, dataclasses.replace(tcfg, cache_mb=0, profile_steps=10), 2) == key
    # what the model learns from, and how, does
    others = [("syn", 2, manifest, tcfg, 2), ("syn", 1, {**manifest, "source_table_version": 4}, tcfg, 2),
              ("syn", 1, manifest, dataclasses.replace(tcfg, seed=7), 2),
              ("syn", 1, manifest, dataclasses.replace(tcfg, epochs=3), 2), ("syn", 1, manifest, tcfg, 1),
              ("other", 1, manifest, tcfg, 2)]
    assert len({training.training_key(*args) for args in others} | {key}) == len(others) + 1
    # settings added later, at the value models had before them, leave those models' keys as they were
    added = ("mixup", "label_smoothing", "rotation", "zoom", "brightness", "contrast", "aux_weight", "lr_schedule",
             "stem")
    before = dataclasses.make_dataclass("TrainConfig", [
        (f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(tcfg)
        if f.name not in added])()
    assert training.training_key("syn", 1, manifest, before, 2) == key
    changes = ({"mixup": 0.2}, {"label_smoothing": 0.1}, {"rotation": 0.5}, {"zoom": 0.0}, {"brightness": 0.2},
               {"contrast": 0.3}, {"aux_weight": 0.5}, {"lr_schedule": "cosine"}, {"stem": 32})
    on = {training.training_key("syn", 1, manifest, dataclasses.replace(tcfg, **change), 2) for change in changes}
    assert len(on | {key}) == len(changes) + 1


def test_cosine_schedule_falls_by_half_a_cosine_from_the_peak_over_the_epochs():
    peak, epochs = 0.002, 45
    rates = [training.cosine_rate(epoch, epochs, peak) for epoch in range(epochs)]
    assert rates[0] == peak
    # the middle epoch of an even count sits at half the peak: cos(pi / 2) = 0
    assert training.cosine_rate(5, 10, peak) == pytest.approx(peak / 2)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    # the last epoch: (1 + cos(44 pi / 45)) / 2 = sin(pi / 90) ** 2, about 0.12 % of the peak
    assert rates[-1] == pytest.approx(peak * np.sin(np.pi / 90) ** 2)


def test_an_unknown_learning_rate_schedule_is_refused_before_any_work(spark, tmp_path):
    cfg = config.load("local", overrides=[f"lake={tmp_path / 'lake'}", "train.lr_schedule=step"])
    with pytest.raises(ConfigError, match="train.lr_schedule must be one of"):  # not "no tensor dataset"
        training.run(spark, cfg, "syn")


def test_a_negative_stem_is_refused_before_any_work(spark, tmp_path):
    cfg = config.load("local", overrides=[f"lake={tmp_path / 'lake'}", "train.stem=-8"])
    with pytest.raises(ConfigError, match="train.stem must be 0"):  # not "no tensor dataset"
        training.run(spark, cfg, "syn")


def test_a_stem_halves_the_image_before_the_blocks_and_the_model_still_gives_one_probability():
    import tensorflow as tf
    layers = tf.keras.layers
    size, mean, std = 24, [120.0, 110.0, 100.0], [50.0, 45.0, 40.0]
    plain = training.build_model(size, mean, std, config.TrainConfig(filters=(4, 8), dense_units=8))
    stemmed = training.build_model(size, mean, std, config.TrainConfig(filters=(4, 8), dense_units=8, stem=6))

    def convs(model):
        return [(layer.filters, layer.strides, layer.output.shape[1]) for layer in model.layers
                if isinstance(layer, layers.Conv2D)]
    # 24 px: the stem's stride 2 gives 12, each block's pooling halves it again
    assert convs(plain) == [(4, (1, 1), 24), (4, (1, 1), 24), (8, (1, 1), 12), (8, (1, 1), 12)]
    assert convs(stemmed) == [(6, (2, 2), 12), (4, (1, 1), 12), (4, (1, 1), 12), (8, (1, 1), 6), (8, (1, 1), 6)]
    # counted by hand: the stem's 3x3x3x6 weights and its normalisation's 4 x 6; the first block's first
    # convolution then reads 6 channels instead of 3
    assert stemmed.count_params() - plain.count_params() == 3 * 3 * 3 * 6 + 4 * 6 + 3 * 3 * (6 - 3) * 4
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    out = stemmed.predict(images, verbose=0)
    assert out.shape == (2, 1) and np.all((out > 0) & (out < 1))


def test_mixup_mixes_each_image_label_and_class_weight_with_one_draw():
    import tensorflow as tf
    values = np.array([0, 40, 80, 120, 160, 200, 240, 250], np.float64)
    labels = np.array([0, 1, 0, 0, 1, 1, 0, 1], np.float32)
    images = np.stack([np.full((3, 3, 3), v, np.uint8) for v in values])
    weights = {0: 0.6, 1: 2.5}

    def mix(step):  # a seed past int32
        return [t.numpy() for t in training.mix_batch(tf.constant(step, tf.int64), tf.constant(images),
                                                      tf.constant(labels), alpha=0.4, seed=2**40 + 9,
                                                      class_weight=(weights[0], weights[1]))]
    mixed, mixed_labels, sample_weights = mix(4)
    assert mixed.dtype == np.uint8 and mixed.shape == images.shape
    assert not np.array_equal(mixed, images)
    shares = np.linspace(0, 1, 2001)
    for i, (pixel, label, weight) in enumerate(zip(mixed[:, 0, 0, 0], mixed_labels, sample_weights)):
        # image i with some partner j, one share lam in [0, 1] explaining all three at once
        assert any(np.any((np.abs(shares * values[i] + (1 - shares) * values[j] - pixel) <= 0.5)
                          & (np.abs(shares * labels[i] + (1 - shares) * labels[j] - label) < 1e-3)
                          & (np.abs(shares * weights[labels[i]] + (1 - shares) * weights[labels[j]] - weight) < 1e-3))
                   for j in range(len(values))), (i, pixel, label, weight)
    # stateless: the same seed and step mix the same way; another step does not
    assert np.array_equal(mix(4)[0], mixed)
    assert not np.array_equal(mix(5)[0], mixed)


@pytest.mark.slow
def test_horovod_two_ranks_train_one_epoch_with_identical_weights(spark, tmp_path, capsys):
    import tensorflow as tf
    folder, lake = tmp_path / "in", str(tmp_path / "lake")
    # no patient column: group_id is null, as in BUSI
    synthetic.write_dataset(folder, groups=30, per_group=2, seed=3, malignant_every=2, with_groups=False)
    run(ingest_job, capsys, "--lake", lake, "--dataset", "syn", "--input", str(folder),
        "--labels", str(folder / "labels.csv"))
    run(preprocess_job, capsys, "--lake", lake, "--dataset", "syn", "--size", "16",
        "--set", "preprocess.shades_of_grey=6")
    # auto precision: this host's earlier measurement (a cache seeded here) says bfloat16 is faster
    cache = tmp_path / "precision.json"
    key = training.precision_key(16, config.TrainConfig(filters=(4, 8), dense_units=8, batch_size=8, stem=4),
                                 threads=1)
    cache.write_text(json.dumps({key: {"precision": "mixed_bfloat16", "steps_per_s": {}}}))
    summary = submit("train", "--master", "local[2]", "--lake", lake, "--dataset", "syn", "--epochs", "3",
                     "--num-proc", "2", "--batch-size", "8", "--set", "train.filters=[4, 8]",
                     "--set", "train.dense_units=8", "--set", "train.min_steps_per_epoch=5",
                     "--set", "train.patience=10", "--set", f"train.precision_cache={cache}",
                     "--set", "train.mixup=0.2", "--set", "train.label_smoothing=0.05",
                     "--set", "train.rotation=0.5", "--set", "train.contrast=0", "--set", "train.lr_schedule=cosine",
                     "--set", "train.stem=4")
    assert (summary["num_proc"], summary["epochs_run"], summary["model_version"]) == (2, 3, 1)
    assert (summary["precision"], summary["precision_chosen_by"]) == ("mixed_bfloat16", "cache")
    assert summary["already_registered"] is False
    # about 42 training images in batches of 8 on 2 ranks make 3 steps; the floor makes 5
    assert summary["steps_per_epoch"] == 5
    assert summary["ranks_identical"] is True
    # throughput comes from the training steps alone, timed inside the whole fit
    assert len(summary["epoch_train_seconds"]) == 3 and summary["images_per_sec"] > 0
    assert 0 < sum(summary["epoch_train_seconds"]) < summary["fit_seconds"]
    model_dir = Path(summary["model_uri"].removeprefix("file:"))
    record = json.loads((model_dir / "model.json").read_text())
    assert len(record["weights_digests"]) == 1 and record["tensors_version"] == 1
    assert (record["hyperparameters"]["mixup"], record["hyperparameters"]["label_smoothing"]) == (0.2, 0.05)
    # cosine: 0.001 x 2 ranks, then x (1 + cos(pi / 3)) / 2 = 0.75 and x (1 + cos(2 pi / 3)) / 2 = 0.25
    assert record["history"]["lr"] == pytest.approx([0.002, 0.0015, 0.0005])
    # what the guard in scoring checks: the tensors' modalities (synthetic PNGs: the default)
    assert record["modalities"] == ["unspecified"] and record["pixels"]["mammo_crop"] is True
    assert record["pixels"]["shades_of_grey"] == 6  # the tensors' colour constancy, replayed wherever it scores
    model = tf.keras.models.load_model(model_dir / "model.keras", safe_mode=True, compile=False)
    assert training.weights_digest(model) == record["weights_digests"][0]
    # the augmentation asked for: any angle, no contrast layer, the other two as before
    augmenting = {type(layer).__name__: layer for layer in model.layers if type(layer).__name__.startswith("Random")}
    assert sorted(augmenting) == ["RandomBrightness", "RandomFlip", "RandomRotation", "RandomZoom"]
    assert augmenting["RandomRotation"].factor == 0.5 and augmenting["RandomZoom"].height_factor == 0.1
    policies = {layer.dtype_policy.name for layer in model.submodules if isinstance(layer, tf.keras.layers.Conv2D)}
    assert policies == {"mixed_bfloat16"} and record["precision"] == "mixed_bfloat16"
    assert (model_dir / "tensorboard").is_dir()

    # the registered weights are the best validation epoch's, as checkpointed in the run folder
    aucs = record["history"]["val_auc"]
    assert len(aucs) == 3 and record["best_epoch"] == summary["best_epoch"] == int(np.argmax(aucs)) + 1
    assert record["best_val_auc"] == summary["best_val_auc"] == max(aucs)
    run_dir = next((model_dir.parent / "_runs").glob("run-*"))
    best = training.build_model(16, record["normalisation"]["mean"], record["normalisation"]["std"],
                                config.TrainConfig(filters=(4, 8), dense_units=8, stem=4))
    best.load_weights(run_dir / "best.weights.h5")
    assert training.weights_digest(best) == training.weights_digest(model)

    # evaluation writes its report beside the model, and re-scores validation to the selected AUC
    result = submit("evaluate", "--master", "local[2]", "--lake", lake, "--dataset", "syn")
    assert result["model_version"] == 1 and result["best_epoch"] == record["best_epoch"]
    assert abs(result["val_auc"] - record["best_val_auc"]) < 1e-4
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["threshold"] == result["threshold"]
    assert metrics["selection"]["val_auc_rescored"] == result["val_auc"]
    # the drift reference: the training and validation images once each, the validation probabilities
    reference = json.loads((model_dir / "reference.json").read_text())
    splits = model_dir.parents[2] / "silver" / "tensors" / "syn" / "v1"
    ids = {split: pq.read_table(splits / f"split={split}", columns=["image_id"]).column(0).to_pylist()
           for split in ("train", "val")}
    assert reference["images"] == len(set(ids["train"]) | set(ids["val"]))
    assert len(reference["values"]["probability"]) == len(ids["val"])
    assert len(reference["values"]["brightness"]) == len(reference["values"]["megapixels"]) == reference["images"]
    for name in ("roc.png", "pr.png", "confusion.png", "calibration.png"):
        image = cv2.imread(str(model_dir / name))
        assert image is not None and image.shape[0] > 100, name
    page = (model_dir / "report.html").read_text()
    assert "data:image/png;base64," in page and f"epoch {record['best_epoch']}, the best validation epoch" in page

    # calibration: fitted on validation, built into the registered model, reported on test
    fitted = record["calibration"]
    assert fitted["method"] in ("platt", "none") and fitted["fitted_on"] == "val"
    assert set(metrics["calibration_fit"]) >= {"test_ece_before", "test_ece_after"} or fitted["method"] == "none"
    assert "expected calibration error" in page and "expected at this threshold" in page

    # external validation: every labelled image of another dataset, those seen in training left out
    other = tmp_path / "other"
    synthetic.write_dataset(other, groups=12, per_group=2, seed=11, malignant_every=3)
    shutil.copy(folder / "p000_0.png", other / "seen.png")
    with open(other / "labels.csv", "a") as handle:
        handle.write("seen.png,malignant,P900\n")
    run(ingest_job, capsys, "--lake", lake, "--dataset", "other", "--input", str(other),
        "--labels", str(other / "labels.csv"))
    external = submit("evaluate", "--master", "local[2]", "--lake", lake, "--dataset", "syn", "--on", "other")
    assert (external["on"], external["images"], external["left_out_as_seen"]) == ("other", 24, 1)
    names = [line.split(",")[:2] for line in (other / "labels.csv").read_text().splitlines()[1:-1]]
    tensors = np.stack([imaging.prepare((other / name).read_bytes(), 16, record["resize"], shades_of_grey=6)
                        for name, _ in names])
    expected = roc_auc_score([label == "malignant" for _, label in names], model.predict(tensors, verbose=0).ravel())
    assert external["auc"] == pytest.approx(expected, abs=1e-6)
    assert external["internal_test_auc"] == result["auc"] and (model_dir / "report-external-other.html").is_file()

    # the model card: every number in it is one of the records' (three decimals, or a count)
    card = (model_dir / "model_card.md").read_text()
    records = [record, json.loads((model_dir / "metrics.json").read_text()),
               json.loads((model_dir / "external-other.json").read_text()),
               json.loads((model_dir.parents[2] / "silver" / "tensors" / "syn" / "v1" / "manifest.json").read_text())]
    allowed = {95, 1}  # "95 % CI", "v1"
    for value in map(abs, _numbers(records)):  # the pattern below reads "-2.620" as "2.620"
        allowed |= {f"{value:.3f}", str(int(value))} if float(value).is_integer() else {f"{value:.3f}"}
    found = re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", card)
    assert found and all(token in {str(a) for a in allowed} for token in found), set(found) - {str(a) for a in allowed}
    assert f"ROC AUC {result['auc']:.3f}" in card and f"ROC AUC {external['auc']:.3f}" in card
    assert f"epoch {record['best_epoch']} (validation ROC AUC {record['best_val_auc']:.3f})" in card
    assert "no substitute for a clinician" in card
    assert "regularisation: mixup, shares drawn from Beta(0.200, 0.200), label smoothing 0.050" in card
    assert "- optimiser: Adam, learning rate 0.001 per Horovod process, half a cosine down to near 0 over 3 epochs\n" in card
    assert "colour constancy: shades of grey (Minkowski p = 6)" in card
    assert ("- network: a stem convolution of 4 filters at stride two, then blocks of 4 and 8 filters (two 3x3 "
            "convolutions, then max pooling), global average pooling, a dense layer of 8 units, dropout 0.300 before "
            "the output (half of it after each block)\n") in card
    assert ("augmentation (training only): random flips, rotation up to 0.500 of a turn, zoom up to 0.100, "
            "brightness up to 0.100\n") in card

    # a run killed after its third epoch's checkpoint resumes from there, best epoch remembered
    state = json.loads((run_dir / "state.json").read_text())
    assert state == {"epochs_done": 3, "best_epoch": record["best_epoch"], "best_val_auc": record["best_val_auc"],
                     "precision": "mixed_bfloat16"}
    assert (run_dir / "last.weights.h5").stat().st_size > 0
    assert (run_dir / "registered").read_text() == summary["model_uri"]
    (run_dir / "registered").unlink()
    # the host now measures float32 faster: the resumed run still finishes in the precision it began in
    cache.write_text(json.dumps({key: {"precision": "float32", "steps_per_s": {}}}))
    resumed = submit("train", "--master", "local[2]", "--lake", lake, "--dataset", "syn", "--epochs", "4",
                     "--num-proc", "2", "--batch-size", "8", "--set", "train.filters=[4, 8]",
                     "--set", "train.dense_units=8", "--set", "train.patience=10", "--resume",
                     "--set", f"train.precision_cache={cache}", "--set", "train.mixup=0.2",
                     "--set", "train.label_smoothing=0.05", "--set", "train.lr_schedule=cosine",
                     "--set", "train.stem=4")
    assert (resumed["resumed_from_epoch"], resumed["epochs_run"], resumed["model_version"]) == (3, 1, 2)
    # the resumed epoch's rate is the fourth of four: 0.002 x (1 + cos(3 pi / 4)) / 2
    resumed_record = json.loads((Path(resumed["model_uri"].removeprefix("file:")) / "model.json").read_text())
    assert resumed_record["history"]["lr"] == pytest.approx([0.002 * (1 - 2 ** -0.5) / 2])
    assert (resumed["precision"], resumed["precision_chosen_by"]) == ("mixed_bfloat16", "resumed run")
    assert resumed["ranks_identical"] is True
    assert resumed["best_val_auc"] >= record["best_val_auc"]
    assert resumed["best_epoch"] in (record["best_epoch"], 4)
    assert json.loads((run_dir / "state.json").read_text())["epochs_done"] == 4


@pytest.mark.slow
@pytest.mark.faults
def test_train_killed_at_three_seeded_moments_then_rerun_registers_the_one_model_an_uninterrupted_run_does(
        spark, tmp_path, capsys):
    folder, lake_dir = tmp_path / "in", tmp_path / "lake"
    synthetic.write_dataset(folder, groups=20, per_group=2, seed=5, malignant_every=2)
    # with an auxiliary task (a dx column, as HAM10000's): two heads trained by Horovod, one registered
    with_column(folder / "labels.csv", "dx", lambda i, _: ("nv", "mel", "bkl")[i % 3])
    run(ingest_job, capsys, "--lake", str(lake_dir), "--dataset", "syn", "--input", str(folder),
        "--labels", str(folder / "labels.csv"))
    run(preprocess_job, capsys, "--lake", str(lake_dir), "--dataset", "syn", "--size", "16",
        "--set", "preprocess.aux_attribute=dx")
    twin = tmp_path / "twin" / "lake"
    shutil.copytree(lake_dir, twin)
    settings = ["--master", "local[2]", "--dataset", "syn", "--epochs", "3", "--num-proc", "2", "--batch-size", "8",
                "--set", "train.filters=[4, 8]", "--set", "train.dense_units=8",
                "--set", "train.min_steps_per_epoch=5", "--set", "train.patience=10", "--set", "train.aux_weight=0.5",
                # auto precision: measured by the first attempt that gets there, then the same for all
                "--set", f"train.precision_cache={tmp_path / 'precision.json'}"]
    args = ["--lake", str(lake_dir), *settings]

    reached, rerun_started, rerun = killed_three_times_then_rerun("train", args, ["--lake", str(twin), *settings], 18)

    def versions(root):
        return sorted(p.name for p in (root / "models" / "syn").iterdir() if not p.name.startswith("_"))
    assert versions(lake_dir) == versions(twin) == ["v1"], reached
    model_dir = lake_dir / "models" / "syn" / "v1"
    mine, theirs = (json.loads((root / "models" / "syn" / "v1" / "model.json").read_text())
                    for root in (lake_dir, twin))
    for field in ("training_key", "tensors_version", "source_table_version", "hyperparameters", "num_proc",
                  "steps_per_epoch", "size", "normalisation", "modalities", "precision"):
        assert mine[field] == theirs[field], (field, reached)
    assert (rerun["model_version"], rerun["best_val_auc"]) == (1, mine["best_val_auc"]), reached
    # the model file is whole: its checksum (recorded at registration) holds, and Keras loads it
    checksums = json.loads((model_dir / "checksums.json").read_text())
    assert hashlib.sha256((model_dir / "model.keras").read_bytes()).hexdigest() == checksums["model.keras"]
    assert mine["aux"] == {"attribute": "dx", "classes": ["bkl", "mel", "nv"], "weight": 0.5}
    assert {"malignant_loss", "aux_loss"} <= set(mine["history"]), reached
    assert len(registry.load_model(spark, lake.qualify(spark, str(model_dir))).outputs) == 1
    # the model card says so, from the record
    from oncolake import modelcard
    result = {"auc": 0.5, "auc_ci95": [0.1, 0.9], "n": 9, "positives": 4, "sensitivity": 0.5,
              "sensitivity_ci95": [0.1, 0.9], "specificity": 0.5, "specificity_ci95": [0.1, 0.9],
              "balanced_accuracy": 0.5, "ece": 0.1, "brier": 0.25}
    manifest = json.loads((lake_dir / "silver" / "tensors" / "syn" / "v1" / "manifest.json").read_text())
    card = modelcard.render("syn", 1, mine, manifest, {"threshold": 0.5, "threshold_rule": "youden", "test": result})
    assert ("- auxiliary task (training only): a second head learned `dx` (3 classes: bkl, mel, nv), its loss "
            "weighted 0.500; the registered model has the malignant output only\n") in card
    assert "- optimiser: Adam, learning rate 0.001 per Horovod process, halved whenever the validation AUC stalled" in card
    assert ("- network: blocks of 4 and 8 filters (two 3x3 convolutions, then max pooling), global average pooling, "
            "a dense layer of 8 units, dropout 0.300 before the output (half of it after each block)\n") in card
    # one run folder, the one that registered: the killed attempts' are deleted, and no scratch is left,
    # in the lake or in the ranks' local temporary folders
    runs = sorted((lake_dir / "models" / "syn" / "_runs").iterdir())
    assert [(run_dir / "registered").read_text() for run_dir in runs] == [rerun["model_uri"]], (runs, reached)
    assert no_leftovers(lake_dir, rerun_started) == [], reached
    scratch = Path(tempfile.gettempdir()).glob(f"{lake.SCRATCH}train-*")
    assert [p for p in scratch if lake.owner_gone(p.name)] == [], reached

    # and a rerun now trains nothing: it answers with the registered model
    again = submit("train", *args)
    assert (again["already_registered"], again["model_version"], again["best_val_auc"]) == (
        True, 1, mine["best_val_auc"])
    assert versions(lake_dir) == ["v1"]
