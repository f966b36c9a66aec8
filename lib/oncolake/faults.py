"""Named crash points and meeting points, for tests that kill a job, or make two collide, at a chosen moment.

``ONCOLAKE_FAULTS=export.before_commit`` (comma-separated names) makes the
process that reaches :func:`point` with that name kill itself with SIGKILL:
no ``finally``, no flush, no goodbye to the database, exactly as the kernel's
OOM killer or a lost machine would end it. ``NAME@N`` fires on the N-th
arrival (1-based). Unset, a point costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

_seen: dict[str, int] = {}


def point(name: str) -> None:
    """Die here if ``ONCOLAKE_FAULTS`` names this point (and this arrival)."""
    wanted = os.environ.get("ONCOLAKE_FAULTS")
    if not wanted:
        return
    _seen[name] = _seen.get(name, 0) + 1
    for item in wanted.split(","):
        target, _, nth = item.strip().partition("@")
        if target == name and (not nth or int(nth) == _seen[name]):
            print(f"faults: killing process {os.getpid()} at {name} (arrival {_seen[name]})",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def barrier(name: str, timeout_s: float = 300.0) -> None:
    """Wait here until N processes have arrived, if ``ONCOLAKE_BARRIER`` is ``NAME:N:FOLDER``.

    Each arriving process leaves a file in FOLDER and waits for N of them:
    two jobs then start the same step (a Delta commit) together, and the
    race a scheduler makes now and then happens every time.
    """
    wanted = os.environ.get("ONCOLAKE_BARRIER")
    if not wanted:
        return
    target, count, folder = wanted.split(":", 2)
    if target != name:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout_s
    while len(os.listdir(folder)) < int(count):
        if time.monotonic() > deadline:
            raise TimeoutError(f"faults: barrier {name} waited {timeout_s:g} s for {count} processes")
        time.sleep(0.05)
    print(f"faults: process {os.getpid()} passed barrier {name}", file=sys.stderr, flush=True)
