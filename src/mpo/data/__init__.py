"""mpo.data: MMPR-style preference data: meta file, rows, lazy index, images, mixture, check, demo.

``data`` knows nothing about training: it turns a meta file into validated ``PreferenceRecord`` rows and RGB images.
Token encoding lives in ``mpo.data.encode`` (``PairEncoder``, ``EncodedPair``; re-exported lazily below).
"""

from mpo.data.check import CheckReport, DatasetReport, Problem, run_check
from mpo.data.demo import COLOURS, demo_corpus, write_demo
from mpo.data.errors import DataError, ImageError, MetaError, RowError, TooLongError
from mpo.data.images import DEFAULT_MAX_PIXELS, image_size, load_image, resolve_image_path, to_rgb
from mpo.data.index import AnnotationIndex, default_cache_dir
from mpo.data.meta import DatasetSpec, MetaEntry, read_meta, read_meta_entries
from mpo.data.mixture import PreferenceMixture, RowSelection, select_rows
from mpo.data.records import IMAGE_PLACEHOLDER, PreferenceRecord, normalise_question, parse_row, tile_budget
from mpo.data.rejects import BAD_ROW_POLICIES, RejectedRowLog, handle_bad_row

__all__ = [
    # errors
    "DataError", "MetaError", "RowError", "ImageError", "TooLongError",
    # meta file
    "DatasetSpec", "MetaEntry", "read_meta", "read_meta_entries",
    # rows
    "IMAGE_PLACEHOLDER", "PreferenceRecord", "parse_row", "normalise_question", "tile_budget",
    # index, images, mixture
    "AnnotationIndex", "default_cache_dir",
    "DEFAULT_MAX_PIXELS", "load_image", "image_size", "resolve_image_path", "to_rgb",
    "PreferenceMixture", "RowSelection", "select_rows",
    # bad rows during training
    "BAD_ROW_POLICIES", "RejectedRowLog", "handle_bad_row",
    # tools
    "CheckReport", "DatasetReport", "Problem", "run_check",
    "COLOURS", "write_demo", "demo_corpus",
]

# Encoding imports torch (seconds); it loads on first use so that `mpo data check` and its pool workers,
# which need only rows and images, start fast. `from mpo.data import PairEncoder` still works.
_LAZY = {"EncodedPair": "mpo.data.encode", "PairEncoder": "mpo.data.encode"}
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mpo.data' has no attribute {name!r}")
