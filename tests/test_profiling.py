"""Training profile helpers: FLOPs from layers, op kinds, trace breakdown; peak memory."""
import numpy as np
import pytest

from oncolake import profiling


def _tiny():
    import tensorflow as tf
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = tf.keras.layers.Conv2D(5, 3, padding="same")(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(2)(x))


def test_training_flops_are_counted_per_layer():
    flops = profiling.training_flops(_tiny())
    conv1, conv2, dense = 2 * 64 * 9 * 3 * 4, 2 * 64 * 9 * 4 * 5, 2 * 5 * 2
    assert flops["forward"] == conv1 + conv2 + dense
    # weight gradients for every layer, input gradients for all but the first
    assert flops["training"] == 2 * (conv1 + conv2 + dense) + conv2 + dense


@pytest.mark.parametrize("name, kind", [
    ("gradient_tape/m/conv2d_1/Conv2D/Conv2DBackpropFilter:_MklNativeConv2DBackpropFilter",
     "conv backward (weights)"),
    ("gradient_tape/m/conv2d/Conv2D/Conv2DBackpropInput:Conv2DBackpropInput", "conv backward (input)"),
    ("m/conv2d/Conv2D:_MklNativeConv2D", "conv forward"),
    ("m/random_rotation/transform/ImageProjectiveTransformV3:ImageProjectiveTransformV3", "augmentation"),
    ("m/batch_normalization/FusedBatchNormV3:_MklFusedBatchNormV3", "batch norm forward"),
    ("gradient_tape/m/batch_normalization/FusedBatchNormGradV3:FusedBatchNormGradV3", "batch norm backward"),
    ("DistributedAdam/Adam/update/ResourceApplyAdam:ResourceApplyAdam", "optimizer"),
    ("DistributedAdam/HorovodAllreduce_grads_0:HorovodAllreduce", "allreduce"),
    ("m/max_pooling2d/MaxPool:MaxPool", "pooling forward"),
])
def test_op_kinds(name, kind):
    assert profiling.op_kind(name) == kind


def test_trace_breakdown_of_a_real_profile(tmp_path):
    import tensorflow as tf
    model = _tiny()
    model.compile(optimizer="adam", loss=tf.keras.losses.MeanSquaredError())
    x, y = np.random.default_rng(0).normal(size=(64, 8, 8, 3)), np.zeros((64, 2))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    tf.profiler.experimental.start(str(tmp_path))
    try:
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    finally:
        tf.profiler.experimental.stop()
    out = profiling.trace_breakdown(str(tmp_path))
    assert {"conv forward", "conv backward (weights)", "optimizer"} <= set(out["seconds"])
    assert sum(out["fraction"].values()) == pytest.approx(1.0, abs=1e-3)
    assert 0 < out["op_seconds"] and 0 < out["busy"] <= 1.5
    with pytest.raises(FileNotFoundError):
        profiling.trace_breakdown(str(tmp_path / "none"))


def test_peak_rss_sees_a_child_that_held_200_mb_and_let_go():
    import subprocess
    import sys
    hold = ("import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
            "print('held', flush=True); time.sleep(1.5)")
    # a shell stands in for the JVM: its one descendant is the Python process holding 200 MB
    # (this test's own process has the session's Spark JVM and workers below it)
    parent = subprocess.Popen(["sh", "-c", '"$0" -c "$1"; :', sys.executable, hold], stdout=subprocess.PIPE, text=True)
    try:
        with profiling.PeakRss(parent.pid, interval=0.05) as peak:
            assert parent.stdout.readline().strip() == "held"
            parent.wait(timeout=30)
    finally:
        if parent.poll() is None:
            parent.kill()
    measured = peak.result()
    assert 200 <= measured["python_mb"] < 400 and measured["max_python_mb"] >= 200, measured
    assert measured["jvm_mb"] < 50 and measured["total_mb"] >= measured["python_mb"], measured
