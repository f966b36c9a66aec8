"""The API's models: each dataset's newest evaluated version, loaded once, swapped when a newer one appears.

Loading goes through :func:`oncolake.predict.load` (checksum-verified, Keras
safe mode), so the API predicts with exactly what ``scripts/predict.sh`` and
the scoring job use. Requests arriving together are predicted as one batch
(up to ``serve.batch_max``, waiting at most ``serve.batch_wait_ms`` for
company): one TensorFlow call for several uploads is what keeps up with the
bare ``model.predict`` rate under concurrent clients.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future

import numpy as np

from oncolake import predict
from oncolake.config import Config

log = logging.getLogger(__name__)


class Batcher:
    """One thread that predicts queued tensors in batches for one loaded model."""

    def __init__(self, model, batch_max: int, wait_seconds: float):
        self.model, self.batch_max, self.wait = model, max(1, batch_max), max(0.0, wait_seconds)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="oncolake-batcher", daemon=True)
        self._thread.start()
        self.batches = self.items = 0

    def predict(self, tensor: np.ndarray, timeout: float = 120.0) -> float:
        done: Future = Future()
        self._queue.put((tensor, done))
        return done.result(timeout=timeout)

    def close(self) -> None:
        self._queue.put(None)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            deadline = time.monotonic() + self.wait
            while len(group) < self.batch_max:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                group.append(item)
            try:
                batch = np.stack([t for t, _ in group])
                # a direct call: model.predict's per-call set-up costs more than a small batch
                scores = np.asarray(self.model(batch, training=False)).reshape(len(group), -1)[:, 0]
                for (_, done), score in zip(group, scores):
                    done.set_result(float(score))
                self.batches += 1
                self.items += len(group)
            except Exception as err:  # the requests fail, the thread lives on
                for _, done in group:
                    if not done.done():
                        done.set_exception(err)


class Models:
    """Per dataset: the newest evaluated model and its batcher; re-checked every ``serve.reload_seconds``."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._loaded: dict[str, tuple[predict.Registered, Batcher, float]] = {}
        self._lock = threading.Lock()

    def get(self, dataset: str) -> tuple[predict.Registered, Batcher]:
        now = time.monotonic()
        with self._lock:
            current = self._loaded.get(dataset)
            if current and now - current[2] < self.cfg.serve.reload_seconds:
                return current[0], current[1]
            newest = predict.newest_evaluated(self.cfg, dataset)
            if current and current[0].version == newest:
                self._loaded[dataset] = (current[0], current[1], now)
                return current[0], current[1]
            loaded = predict.load(self.cfg, dataset, newest)
            batcher = Batcher(loaded.model, self.cfg.serve.batch_max, self.cfg.serve.batch_wait_ms / 1000)
            if current:
                log.info("model for %s: v%d replaces v%d", dataset, loaded.version, current[0].version)
                current[1].close()
            else:
                log.info("model for %s: v%d loaded from %s", dataset, loaded.version, loaded.model_dir)
            self._loaded[dataset] = (loaded, batcher, now)
            return loaded, batcher

    def loaded(self) -> dict[str, int]:
        with self._lock:
            return {d: v[0].version for d, v in self._loaded.items()}
