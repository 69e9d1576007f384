"""Checks on output paths, made before anything is written or any model is loaded.

Both stages write under a folder the user names (``--out-dir``, ``--save-dir``) and name their files after their
input (the prompt file's basename, the dataset's stem). Two mistakes used to cost data or a traceback:

* an output path that *is* an input file: ``mpo generate dropout-ntp --checkpoint .`` named its output after the
  prompt file alone, so with ``--out-dir`` the prompt's folder the merge replaced the prompts; ``mpo postprocess
  correctness --data-dir S/pos_items --save-dir S`` replaced its input ``S/pos_items/<ds>.jsonl`` by its positives;
* a regular file where a folder must be (``--out-dir afile``): ``mkdir`` raised ``NotADirectoryError`` from deep
  inside the writer.

``check_outputs`` refuses both with one ``OutputPathError`` line that names the flag and the paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["OutputPathError", "check_outputs", "same_file"]


class OutputPathError(ValueError):
    """An output cannot be written where asked; the message names the flag and the paths."""


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same resolved path (symlinks, ``.``, ``..``) or, both existing,
    the same inode (a hard link, a bind mount)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: then they are not one file
        return False


def check_outputs(outputs: Iterable[Path], inputs: Mapping[Path, str], flag: str, root: str | Path) -> None:
    """Raise ``OutputPathError`` for the first output that would replace an input, that is an existing folder, or
    whose folder cannot be made because a regular file stands in its path.

    Args:
        outputs: every file the run may write.
        inputs: the run's input files, each with what names it in the message (``"--prompt-path"``).
        flag, root: the flag the outputs are placed by and its value (``"--out-dir"``, ``"out"``).
    """
    for out in outputs:
        for path, label in inputs.items():
            if same_file(out, path):
                raise OutputPathError(f"{flag} {root}: the output {out} is the input file {path} ({label}); writing "
                                      f"it would replace the input: use another {flag}")
        blocker = _file_in_the_way(out)
        if blocker is not None:
            raise OutputPathError(f"{flag} {root}: {blocker} is a file, not a folder, so {out} cannot be written; "
                                  f"use another {flag}")
        if out.is_dir():
            raise OutputPathError(f"{flag} {root}: {out} is a folder, where an output file must go; move it away "
                                  f"or use another {flag}")


def _file_in_the_way(path: Path) -> Path | None:
    """The closest existing ancestor of ``path`` when it is not a folder (``mkdir`` would fail there), else None."""
    for parent in path.parents:
        if parent.is_dir():
            return None
        if parent.exists() or parent.is_symlink():  # a file, or a link to nothing
            return parent
    return None
