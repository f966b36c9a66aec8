"""Where training time goes: FLOPs counted from the model's layers, the
machine's compute ceiling, and TensorFlow profiler traces summed by op kind.

Used by the training job (``train.profile_steps``: rank 0 traces a few steps
and the summary carries the split) and by ``scripts/bench.sh train``; the
benchmarks also sample peak memory with :class:`PeakRss`.
"""
from __future__ import annotations

import collections
import glob
import os
import threading
import time
from typing import Any

# TensorFlow op types (as the profiler names them, with oneDNN's _Mkl/_MklNative
# prefixes stripped) -> what they are in a training step.
_KINDS = (
    ("Conv2DBackpropFilter", "conv backward (weights)"),
    ("Conv2DBackpropInput", "conv backward (input)"),
    ("DepthwiseConv2dNativeBackprop", "conv backward (weights)"),
    ("Conv2D", "conv forward"),
    ("DepthwiseConv2dNative", "conv forward"),
    ("FusedBatchNormGrad", "batch norm backward"),
    ("FusedBatchNorm", "batch norm forward"),
    ("MaxPoolGrad", "pooling backward"),
    ("MaxPool", "pooling forward"),
    ("ReluGrad", "activation backward"),
    ("Relu", "activation forward"),
    ("MatMul", "dense"),
    ("ResourceApplyAdam", "optimizer"),
    ("Horovod", "allreduce"),
)


def op_kind(name: str) -> str:
    """The kind of one profiler op event named ``op_name:op_type``."""
    op_name, _, op_type = name.rpartition(":")
    if "/random_" in op_name or op_name.startswith("random_"):
        return "augmentation"
    if "/normalise/" in op_name:
        return "normalisation"
    bare = op_type.replace("_MklNative", "").replace("_Mkl", "").lstrip("_")
    if bare.startswith("Fused") and "Conv2D" in bare:
        return "conv forward"
    for prefix, kind in _KINDS:
        if bare.startswith(prefix):
            return kind
    if "Adam" in op_name or op_name.startswith(("Adam/", "DistributedAdam")):
        return "optimizer"
    return "other backward" if op_name.startswith("gradient_tape/") else "other"


def trace_breakdown(logdir: str) -> dict[str, Any]:
    """Seconds of op execution by kind in the newest profiler trace under ``logdir``.

    Sums the op events (``name:type``) on the host's compute threads of the
    newest ``*.xplane.pb`` file, so nested framework events are not counted
    twice; ``fraction`` gives each kind's share of the op time, ``busy`` the
    op time over the traced span (below 1: the compute threads waited).
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no profiler trace under {logdir}")
    space = xplane_pb2.XSpace()
    with open(files[-1], "rb") as f:
        space.ParseFromString(f.read())
    seconds: collections.Counter = collections.Counter()
    first, last = float("inf"), 0.0
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if line.name.startswith("python"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name and "::" not in name:
                    seconds[op_kind(name)] += event.duration_ps / 1e12
                    begin = line.timestamp_ns * 1e3 + event.offset_ps
                    first, last = min(first, begin), max(last, begin + event.duration_ps)
    total = sum(seconds.values())
    # op time over the traced span: below 1, the compute threads waited (input, allreduce, Python)
    wall = (last - first) / 1e12 if last else 0.0
    return {"op_seconds": round(total, 4), "wall_seconds": round(wall, 4),
            "busy": round(total / wall, 4) if wall else None,
            "seconds": {k: round(v, 4) for k, v in seconds.most_common()},
            "fraction": {k: round(v / total, 4) for k, v in seconds.most_common()} if total else {}}


def training_flops(model) -> dict[str, float]:
    """Floating-point operations per image, counted from the model's layers.

    A multiply-add is 2 FLOPs. Forward: convolutions (dense, separable,
    depthwise) and dense layers. Training adds the gradient with respect to
    the weights (as many FLOPs as the forward pass) and with respect to the
    layer's input (the same again, except for the first layer, whose input
    needs no gradient). Batch norm, activations and pooling are a few FLOPs
    per value and are left out.
    """
    import tensorflow as tf
    layers = tf.keras.layers
    forward = weights_grad = input_grad = 0.0
    first = True
    for layer in model.layers:
        if isinstance(layer, (layers.Conv2D, layers.SeparableConv2D, layers.DepthwiseConv2D, layers.Dense)):
            out = layer.output.shape
            spatial = float(out[1] * out[2]) if len(out) == 4 else 1.0
            if isinstance(layer, layers.SeparableConv2D):
                k = layer.kernel_size[0] * layer.kernel_size[1]
                c_in = layer.input.shape[-1]
                flops = 2 * spatial * (k * c_in * layer.depth_multiplier + c_in * layer.depth_multiplier * out[-1])
            elif isinstance(layer, layers.DepthwiseConv2D):
                k = layer.kernel_size[0] * layer.kernel_size[1]
                flops = 2 * spatial * k * out[-1]
            elif isinstance(layer, layers.Conv2D):
                k = layer.kernel_size[0] * layer.kernel_size[1]
                flops = 2 * spatial * k * layer.input.shape[-1] * out[-1] / layer.groups
            else:
                flops = 2.0 * layer.input.shape[-1] * out[-1]
            forward += flops
            weights_grad += flops
            input_grad += 0.0 if first else flops
            first = False
    return {"forward": forward, "training": forward + weights_grad + input_grad}


def compute_ceiling(seconds: float = 3.0, threads: int | None = None) -> dict[str, float]:
    """GFLOP/s of a large fp32 matmul and of a large 3x3 convolution, in this process.

    Each runs for about ``seconds`` after a warm-up; the larger of the two is
    ``ceiling_gflops``, what the cores compute at best with TensorFlow in
    float32. ``bf16_matmul_gflops`` is the same matmul in bfloat16.
    """
    import tensorflow as tf
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    a = tf.random.normal((2048, 2048))
    b = tf.random.normal((2048, 2048))
    x = tf.random.normal((32, 56, 56, 64))
    kernel = tf.random.normal((3, 3, 64, 64))
    runs = {"matmul_gflops": (lambda: tf.linalg.matmul(a, b), 2.0 * 2048 ** 3),
            "conv3x3_gflops": (lambda: tf.nn.conv2d(x, kernel, 1, "SAME"), 2.0 * 32 * 56 * 56 * 9 * 64 * 64)}
    out = {}
    for name, (fn, flops) in runs.items():
        fn().numpy()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn().numpy()
            count += 1
        out[name] = round(count * flops / (time.perf_counter() - start) / 1e9, 1)
    out["ceiling_gflops"] = max(out["matmul_gflops"], out["conv3x3_gflops"])
    # for reference: what the same matmul reaches in bfloat16 (a model in mixed
    # bfloat16 can exceed the float32 ceiling)
    a16, b16 = tf.cast(a, tf.bfloat16), tf.cast(b, tf.bfloat16)
    tf.linalg.matmul(a16, b16).numpy()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tf.linalg.matmul(a16, b16).numpy()
        count += 1
    out["bf16_matmul_gflops"] = round(count * 2.0 * 2048 ** 3 / (time.perf_counter() - start) / 1e9, 1)
    return out


class PeakRss:
    """Peak resident memory of a JVM (Spark's driver; in local mode also the executor) and its Python processes.

    Sampled from /proc every ``interval`` s while the block runs: ``jvm_mb``
    is the JVM's peak; ``python_mb`` the peak of its descendants' sum (under
    spark-submit, the driver's Python process and the Python workers);
    ``max_python_mb`` the largest single one; ``total_mb`` the peak of all
    of them together.
    """

    def __init__(self, jvm_pid: int, interval: float = 0.2):
        self.pid, self.interval = jvm_pid, interval
        self.jvm = self.workers = self.worker = self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, int]:
        return {"jvm_mb": self.jvm >> 20, "python_mb": self.workers >> 20,
                "max_python_mb": self.worker >> 20, "total_mb": self.total >> 20}

    def _run(self) -> None:
        while not self._stop.is_set():
            jvm = _rss(self.pid)
            workers = [_rss(p) for p in _descendants(self.pid, _process_tree())]
            self.jvm, self.workers = max(self.jvm, jvm), max(self.workers, sum(workers))
            self.worker, self.total = max([self.worker, *workers]), max(self.total, jvm + sum(workers))
            self._stop.wait(self.interval)


def _process_tree() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # gone since listed
            tree.setdefault(parent, []).append(int(entry))
    return tree


def _descendants(pid: int, tree: dict[int, list[int]]) -> list[int]:
    found, todo = [], list(tree.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += tree.get(child, [])
    return found


def _rss(pid: int) -> int:
    """Resident bytes of ``pid`` (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0
