"""math-verify behind a process guard: ``_MATH.equal(pred, gt, timeout)``, used by ``check_answer``.

What lives here, and why it is its own module: the one part of answer judging that is not a plain
function of its arguments in the same process. math-verify (sympy underneath) runs in a long-lived child
process that is killed when a comparison overruns ``timeout``: sympy can spend minutes in C code on
strings such as ``10^{10^{10}}``, where a signal-based alarm never fires. The verdicts still depend only
on the inputs; the process handling (start, kill on overrun, stop at exit, forget after a fork) is what
``mpo.generate.answers`` keeps out of its rules: it imports ``_MATH`` and calls ``_MATH.equal`` only when
both sides look mathematical. Nothing here is public API.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import threading
from typing import Any


def _serve_math(conn: Any) -> None:
    """Child loop: answer ``(pred, gt)`` requests with math-verify's verdict until the pipe closes."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" notice: we time it
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    conn.send("ready")
    while True:
        try:
            pred, gt = conn.recv()
        except (EOFError, OSError):
            return
        try:
            gold = parse(f"${gt.strip('$')}$", extraction_config=configs, parsing_timeout=None)
            target = parse(f"${pred.strip('$')}$", extraction_config=configs, parsing_timeout=None)
            verdict = bool(gold and target and verify(gold, target, timeout_seconds=None))
        except Exception:  # any parser/sympy failure means "not shown equal"
            verdict = False
        conn.send(verdict)


class _MathGuard:
    """A long-lived child process running math-verify, replaced whenever a call overruns its limit.

    A process (not ``signal.alarm``) because sympy's big-integer arithmetic runs in C and ignores
    signals: ``2^{2^{30}}`` takes 10 s under a 1 s alarm. It also works from any thread. On fork
    platforms math-verify is imported before forking, so a restarted child is ready in milliseconds.
    """

    START_TIMEOUT = 120.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None

    def equal(self, pred: str, gt: str, timeout: float) -> bool:
        with self._lock:
            if self._proc is None and not self._start():
                return False
            try:
                self._conn.send((pred, gt))
                if self._conn.poll(timeout):
                    return bool(self._conn.recv())
            except (EOFError, OSError):
                pass
            self.stop()  # overran or died: the next call gets a fresh child
            return False

    def _start(self) -> bool:
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        if ctx.get_start_method() == "fork":
            import math_verify  # noqa: F401  (loaded once here, inherited by every forked child)
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_math, args=(child,), daemon=True, name="mpo-math-verify")
        self._proc.start()
        child.close()
        try:
            if self._conn.poll(self.START_TIMEOUT) and self._conn.recv() == "ready":
                return True
        except (EOFError, OSError):
            pass
        self.stop()
        return False

    def stop(self) -> None:
        """Kill the child (if any); called on overrun and at interpreter exit."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
            self._conn.close()
        self._proc = self._conn = None

    def forget(self) -> None:
        """In a forked process: drop the parent's child (it is not ours to use or kill) and start afresh,
        so two processes never share one pipe (a process pool forks after the parent judged inline)."""
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
        self._lock = threading.Lock()


_MATH = _MathGuard()
atexit.register(_MATH.stop)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_MATH.forget)
