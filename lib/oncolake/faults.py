"""Named crash points, for tests that kill a job at a chosen moment.

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
