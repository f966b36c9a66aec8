"""Training: the model, and Horovod on Spark with two ranks (slow)."""
import json
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from jobs import ingest as ingest_job
from jobs import preprocess as preprocess_job
from oncolake import config, synthetic, training
from tests.conftest import ROOT, last_json


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


@pytest.mark.slow
def test_horovod_two_ranks_train_one_epoch_with_identical_weights(spark, tmp_path, capsys):
    import tensorflow as tf
    folder, lake = tmp_path / "in", str(tmp_path / "lake")
    # no patient column: group_id is null, as in BUSI
    synthetic.write_dataset(folder, groups=30, per_group=2, seed=3, malignant_every=2, with_groups=False)
    run(ingest_job, capsys, "--lake", lake, "--dataset", "syn", "--input", str(folder),
        "--labels", str(folder / "labels.csv"))
    run(preprocess_job, capsys, "--lake", lake, "--dataset", "syn", "--size", "16")
    summary = submit("train", "--master", "local[2]", "--lake", lake, "--dataset", "syn", "--epochs", "1",
                     "--num-proc", "2", "--batch-size", "8", "--set", "train.filters=[4, 8]",
                     "--set", "train.dense_units=8", "--set", "train.min_steps_per_epoch=5")
    assert (summary["num_proc"], summary["epochs_run"], summary["model_version"]) == (2, 1, 1)
    # about 42 training images in batches of 8 on 2 ranks make 3 steps; the floor makes 5
    assert summary["steps_per_epoch"] == 5
    assert summary["ranks_identical"] is True
    # throughput comes from the training steps alone, timed inside the whole fit
    assert len(summary["epoch_train_seconds"]) == 1 and summary["images_per_sec"] > 0
    assert 0 < summary["epoch_train_seconds"][0] < summary["fit_seconds"]
    model_dir = Path(summary["model_uri"].removeprefix("file:"))
    record = json.loads((model_dir / "model.json").read_text())
    assert len(record["weights_digests"]) == 1 and record["tensors_version"] == 1
    model = tf.keras.models.load_model(model_dir / "model.keras", safe_mode=True, compile=False)
    assert training.weights_digest(model) == record["weights_digests"][0]
    assert (model_dir / "tensorboard").is_dir()

    # evaluation writes its report beside the model
    result = submit("evaluate", "--master", "local[2]", "--lake", lake, "--dataset", "syn")
    assert result["model_version"] == 1 and 0.0 <= result["auc"] <= 1.0
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["threshold"] == result["threshold"]
    for name in ("roc.png", "pr.png", "confusion.png", "calibration.png"):
        image = cv2.imread(str(model_dir / name))
        assert image is not None and image.shape[0] > 100, name
    assert "data:image/png;base64," in (model_dir / "report.html").read_text()

    # a run killed after its first epoch's checkpoint resumes from there
    run_dir = next((model_dir.parent / "_runs").glob("run-*"))
    assert json.loads((run_dir / "state.json").read_text()) == {"epochs_done": 1}
    assert (run_dir / "last.weights.h5").stat().st_size > 0 and (run_dir / "best.weights.h5").exists()
    assert (run_dir / "registered").read_text() == summary["model_uri"]
    (run_dir / "registered").unlink()
    resumed = submit("train", "--master", "local[2]", "--lake", lake, "--dataset", "syn", "--epochs", "2",
                     "--num-proc", "2", "--batch-size", "8", "--set", "train.filters=[4, 8]",
                     "--set", "train.dense_units=8", "--resume")
    assert (resumed["resumed_from_epoch"], resumed["epochs_run"], resumed["model_version"]) == (1, 1, 2)
    assert resumed["ranks_identical"] is True
    assert json.loads((run_dir / "state.json").read_text()) == {"epochs_done": 2}
