"""Errors of the data layer. Each names the dataset, the 1-based line and the field at fault."""

from __future__ import annotations

__all__ = ["DataError", "MetaError", "RowError", "ImageError", "TooLongError"]


class DataError(ValueError):
    """Base class of every data problem."""


class MetaError(DataError):
    """The meta file itself (or one dataset entry in it) is unusable."""


class RowError(DataError):
    """One annotation row cannot be used. ``str(err)`` is ``DATASET:LINE: FIELD: MESSAGE``."""

    kind = "row"

    def __init__(self, dataset: str, line: int, field: str | None, message: str, severity: str = "error"):
        self.dataset, self.line, self.field, self.message, self.severity = dataset, line, field, message, severity
        super().__init__(f"{dataset}:{line}: {field or '-'}: {message}")

    def __reduce__(self):
        # DataLoader workers hand row errors to the main process by pickling them; the default (``cls(*args)``,
        # args being the one formatted message) cannot rebuild an error that takes its fields apart
        return type(self), (self.dataset, self.line, self.field, self.message, self.severity)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "line": self.line, "field": self.field, "message": self.message,
                "severity": self.severity, "kind": self.kind}


class ImageError(RowError):
    """An image of a row is missing, unreadable, outside the dataset root, or too large."""

    kind = "image"


class TooLongError(RowError):
    """The encoded pair is longer than ``max_length``; it is dropped, never truncated through an image."""

    kind = "too_long"
