"""Test hook for the crash tests, imported at start-up only by processes whose PYTHONPATH names this folder.

It pins *where* the test's SIGKILL lands, so that the test is deterministic; it changes nothing else. Each variable
makes the process write the file ``MPO_TEST_HANG_MARKER`` and then sleep until it is killed:

* ``MPO_TEST_HANG_AFTER_STEP=N``: right after step N is logged to ``metrics.jsonl`` (a kill between checkpoints);
* ``MPO_TEST_HANG_IN_SAVE=N``: while ``checkpoint-N`` is being saved, once ``.tmp-checkpoint-N`` holds the model,
  optimizer, scheduler, RNG and config, just before ``trainer_state.json`` (a kill in the middle of a save);
* ``MPO_TEST_TEAR_APPEND=N``: at the N-th batch a generator appends to its part file, write its first line and
  10 characters of the next one, flushed to disk (a kill in the middle of a write).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _hang() -> None:
    Path(os.environ["MPO_TEST_HANG_MARKER"]).write_text(str(os.getpid()), encoding="utf-8")
    time.sleep(600)  # the test kills us long before; the limit only bounds an orphan


def _install() -> None:
    after_step = os.environ.get("MPO_TEST_HANG_AFTER_STEP")
    in_save = os.environ.get("MPO_TEST_HANG_IN_SAVE")
    if after_step:
        from mpo.train import metrics

        log = metrics.MetricsLogger.log

        def log_then_hang(self, step, values):
            log(self, step, values)
            if step == int(after_step):
                _hang()

        metrics.MetricsLogger.log = log_then_hang
    if in_save:
        # mpo.train.checkpoint binds atomic_write_json at import, which has not happened yet: patch the source.
        from mpo import fsio

        write = fsio.atomic_write_json

        def hang_before_state(path, obj, indent=2):
            path = Path(path)
            if path.name == "trainer_state.json" and path.parent.name == f".tmp-checkpoint-{in_save}":
                _hang()
            write(path, obj, indent)

        fsio.atomic_write_json = hang_before_state

    tear_at = os.environ.get("MPO_TEST_TEAR_APPEND")
    if tear_at:
        from mpo.generate import sharding

        append, calls = sharding.PartWriter.append, [0]

        def tear(self, records):
            calls[0] += 1
            records = list(records)
            if calls[0] == int(tear_at):
                text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                self._fh.write(text[: text.index("\n") + 11])
                self._fh.flush()
                os.fsync(self._fh.fileno())
                _hang()
            append(self, records)

        sharding.PartWriter.append = tear


_install()
