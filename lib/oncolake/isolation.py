"""Run a decoder on untrusted bytes in a child process, under a time limit.

Decoders are C code. A hostile file can keep one busy for minutes (a huge
JPEG 2000 mammogram, a progressive JPEG of thousands of scans) or crash it (a
codec bug). In a Spark task the first stalls the job and the second kills
the Python worker, so Spark retries the task until the whole job fails. An
:class:`Isolated` function runs in a forked child instead: a call that
overruns its limit has the child killed and replaced, a child that dies is
replaced, and the caller gets an :class:`Overrun` whose ``reason`` becomes a
quarantine reason (``timeout`` or ``decoder_crash``). The other files of the
task go on.

The cost is one fork per task and a pipe round trip per call (the bytes are
copied once): measured in docs/benchmarks.md, "Isolated validation".
"""
from __future__ import annotations

import faulthandler
import multiprocessing
import signal
from typing import Any, Callable

TIMEOUT = "timeout"
CRASH = "decoder_crash"
REASONS = (TIMEOUT, CRASH)


class Overrun(Exception):
    """A call that did not come back: it ran out of time, or its process died."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class Isolated:
    """``func`` called in a child process, each call limited to ``timeout_s`` seconds.

    ``timeout_s`` <= 0 calls ``func`` in this process (no limit, no isolation).
    An exception ``func`` raises is raised here again (it must pickle). Use as
    a context manager, or call :meth:`close`.
    """

    def __init__(self, func: Callable[..., Any], timeout_s: float):
        self._func, self._timeout = func, float(timeout_s)
        self._process = self._conn = None

    def __enter__(self) -> "Isolated":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, *args: Any) -> Any:
        if self._timeout <= 0:
            return self._func(*args)
        if self._process is None:
            self._start()
        try:
            self._conn.send(args)
        except (BrokenPipeError, ConnectionResetError):  # died after its last answer
            self._stop()
            self._start()
            self._conn.send(args)
        if not self._conn.poll(self._timeout):
            self._stop()
            raise Overrun(TIMEOUT, f"decoding took longer than {self._timeout:g} s "
                                   "(ingest.decode_timeout_s); the decoder was stopped")
        try:
            ok, value = self._conn.recv()
        except (EOFError, ConnectionResetError):
            code = self._stop()
            how = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit code {code}"
            raise Overrun(CRASH, f"the decoder process died ({how}) on this file") from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Stop the child (if one was started)."""
        if self._process is not None:
            self._conn.close()  # the child sees end-of-file and exits
            self._process.join(5)
            self._stop()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("fork")  # the function and its state are inherited, not pickled
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(self._func, child, self._conn), daemon=True,
                                    name="oncolake-isolated")
        self._process.start()
        child.close()

    def _stop(self) -> int | None:
        process, self._process = self._process, None
        if process is None:
            return None
        if process.is_alive():
            process.kill()
        process.join()
        self._conn.close()
        return process.exitcode


def _serve(func: Callable[..., Any], conn, parent_end) -> None:
    """The child: answer calls until the parent closes the pipe."""
    parent_end.close()  # else this process holds the pipe open, and never sees the parent close it
    faulthandler.disable()  # a crash here is the parent's to report, as decoder_crash
    while True:
        try:
            args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            answer = (True, func(*args))
        except Exception as err:  # handed back to the caller, who decides
            answer = (False, err)
        try:
            conn.send(answer)
        except Exception as err:  # an answer that does not pickle
            conn.send((False, RuntimeError(f"unpicklable answer: {type(err).__name__}: {err}")))
