"""Per-step wall times in a job's log, so an operator can see where a run spends its time."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def step(log: logging.Logger, job: str, name: str) -> Iterator[None]:
    """Log ``<job> step <name> took N s`` when the block ends (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        log.info("%s step %s took %.2f s", job, name, time.perf_counter() - start)
