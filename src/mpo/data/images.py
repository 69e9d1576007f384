"""Safe image loading for preference rows: path containment, a pixel limit, EXIF orientation, RGB.

Every failure is an ``ImageError`` that names dataset, line and field (``image`` or ``image[k]``), so a bad file
drops one row with a reason instead of crashing a worker or silently swapping in another row (InternVL does both).

* Paths are relative to the dataset root and must stay inside it once ``..`` and symlinks are resolved;
  absolute paths are refused too. ``allow_outside_root: true`` on the dataset lifts both rules.
* ``max_pixels`` (default 178,956,970, PIL's own default) guards against decompression bombs; PIL's
  ``DecompressionBombWarning``/``Error`` become our ``ImageError``. ``None`` or 0 turns the limit off. Users set it
  as ``data.max_image_pixels`` (training, precompute, eval: ``PreferenceMixture(max_image_pixels=...)``) and
  ``mpo data check --max-image-pixels``. InternVL sets ``Image.MAX_IMAGE_PIXELS = None`` (no limit); we keep PIL's,
  because a meta file may list rows from anywhere: a PNG header of a few dozen bytes can declare 20,000 x 20,000
  pixels, and decoding it takes 1.2 GB of RAM in every DataLoader worker that meets it, enough to get a run
  killed. The limit is ~13,000 x 13,000 pixels, far above what a tile budget uses (12 tiles of 448 px are 2.4 M
  pixels), so a genuine image over it is rare; it is one row error (reported, not a crash), and the setting lifts it.
* Orientation: ``ImageOps.exif_transpose``. Colour: converted to RGB; an alpha channel is composited onto white
  (as the Hugging Face image processors do; InternVL drops alpha, which shows whatever colour the
  transparent pixels happen to store); 16-bit grey keeps its top 8 bits (PIL would clip it at 255).
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mpo.data.errors import ImageError

__all__ = ["DEFAULT_MAX_PIXELS", "pixel_limit", "resolve_image_path", "load_image", "image_size", "to_rgb"]

DEFAULT_MAX_PIXELS = 178_956_970
_PIL_LOCK = threading.Lock()
_ROTATES = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_ORIENTATION = 0x0112
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def pixel_limit(value: int | None) -> int | None:
    """The decompression-bomb limit a ``max_image_pixels`` setting asks for: the value, or None (no limit) for
    None or 0. Raises ``ValueError`` for anything but an integer >= 0."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value or None
    raise ValueError(f"max_image_pixels must be an integer >= 0 (0 or None: no limit), got {value!r}")


def resolve_image_path(root: str | Path, rel: str, *, dataset: str, line: int, field: str = "image",
                       allow_outside_root: bool = False) -> Path:
    """The real (symlink-free) path of ``rel`` under ``root``; raises ``ImageError`` if it escapes ``root``."""
    if "://" in rel:
        raise ImageError(dataset, line, field, f"remote paths are not supported: {rel!r}")
    if "\x00" in rel:
        raise ImageError(dataset, line, field, f"{rel!r} contains a NUL character, which no file name can hold")
    rel_path = Path(rel)
    if rel_path.is_absolute() and not allow_outside_root:
        raise ImageError(dataset, line, field, f"{rel!r} is an absolute path; paths must be relative to the "
                                               f"dataset root (or set allow_outside_root: true)")
    try:
        real = Path(os.path.realpath(Path(root) / rel_path))
    except UnicodeEncodeError:  # a lone surrogate: no file name on disk can match it
        raise ImageError(dataset, line, field, f"{rel!r} is not valid Unicode (lone surrogate)") from None
    if not allow_outside_root:
        real_root = Path(os.path.realpath(root))
        if not real.is_relative_to(real_root):
            raise ImageError(dataset, line, field, f"{rel!r} resolves to {real}, outside the dataset root "
                                                   f"{real_root} (set allow_outside_root: true to allow)")
    return real


def load_image(root: str | Path, rel: str, *, dataset: str, line: int, field: str = "image",
               allow_outside_root: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, fully decode, orient and convert one image to RGB. Raises ``ImageError`` for any problem."""
    path = resolve_image_path(root, rel, dataset=dataset, line=line, field=field,
                              allow_outside_root=allow_outside_root)
    with _open(path, dataset, line, field, max_pixels) as img:
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken data
            raise ImageError(dataset, line, field, f"{path} is truncated or corrupt: {exc}") from None
        return to_rgb(img)


def image_size(root: str | Path, rel: str, *, dataset: str, line: int, field: str = "image",
               allow_outside_root: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` after EXIF orientation, from the file header only (no pixel decode)."""
    path = resolve_image_path(root, rel, dataset=dataset, line=line, field=field,
                              allow_outside_root=allow_outside_root)
    with _open(path, dataset, line, field, max_pixels) as img:
        width, height = img.size
        try:
            orientation = img.getexif().get(_ORIENTATION)
        except Exception:  # a broken EXIF block does not stop length planning; load_image reports real damage
            orientation = None
    return (height, width) if orientation in _ROTATES else (width, height)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become white; 16-bit grey is scaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        # PIL's own conversion clips at 255, which turns a 16-bit grey image (PNG, TIFF) almost all white.
        grey = np.asarray(img, dtype=np.uint16) >> 8
        return Image.fromarray(grey.astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("I", "F"):  # 32-bit int or float grey: 16-bit PGM/PNM, 32-bit TIFF; PIL would clip at 255 too
        return Image.fromarray(_grey_to_8_bits(np.asarray(img)), mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _grey_to_8_bits(values: np.ndarray) -> np.ndarray:
    """(H, W) int32 or float32 grey → uint8, by the range the values imply (the file's bit depth is not kept in
    these modes): floats in [0, 1] are fractions; values in [0, 255] are 8-bit; in [0, 65535], 16-bit (÷ 257, so
    65535 → 255); anything else (negative, larger, a float range) is stretched from its minimum to its maximum."""
    a = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if values.dtype.kind == "f" and lo >= 0 and hi <= 1:
        a = a * 255
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535:
        a = a / 257
    elif hi > lo:
        a = (a - lo) * (255 / (hi - lo))
    else:
        a = np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------


def _open(path: Path, dataset: str, line: int, field: str, max_pixels: int | None) -> Image.Image:
    """Lazy-open (header only) with our pixel limit in place of PIL's global one."""
    max_pixels = max_pixels or None
    try:
        if os.path.getsize(path) == 0:
            raise ImageError(dataset, line, field, f"{path} is empty (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(path)
            except Image.DecompressionBombError as exc:
                if max_pixels is not None and max_pixels <= 2 * (Image.MAX_IMAGE_PIXELS or 0):
                    raise ImageError(dataset, line, field, _bomb_message(path, _pixels_in(exc), max_pixels)) from None
                img = _open_without_pil_limit(path)
    except FileNotFoundError:
        raise ImageError(dataset, line, field, f"file not found: {path}") from None
    except IsADirectoryError:
        raise ImageError(dataset, line, field, f"{path} is a directory, not an image") from None
    except PermissionError:
        raise ImageError(dataset, line, field, f"cannot read {path}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(dataset, line, field, f"{path} is not an image PIL can read") from None
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(dataset, line, field, f"cannot open {path}: {exc}") from None
    pixels = img.size[0] * img.size[1]
    if max_pixels is not None and pixels > max_pixels:
        img.close()
        raise ImageError(dataset, line, field, _bomb_message(path, pixels, max_pixels, img.size))
    return img


def _open_without_pil_limit(path: Path) -> Image.Image:
    # Only reached when the caller's max_pixels is looser than twice PIL's global limit; we check it ourselves after.
    with _PIL_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _pixels_in(exc: Exception) -> int | None:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    return int(match.group(1)) if match else None


def _bomb_message(path: Path, pixels: int | None, max_pixels: int, size: tuple[int, int] | None = None) -> str:
    dims = f"{size[0]}x{size[1]} = " if size else ""
    count = f"{dims}{pixels:,} pixels" if pixels is not None else "too many pixels"
    return (f"{path} has {count}, over max_image_pixels {max_pixels:,} (decompression-bomb guard; if the image is "
            "genuine, raise data.max_image_pixels for training, precompute and eval, or mpo data check "
            "--max-image-pixels; 0 = no limit)")
