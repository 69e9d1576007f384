"""Odd and broken images: each is accepted correctly (right size, orientation and colours, and it encodes through
the tiny InternVL's processor) or refused as one clear row error that names dataset, line and field."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mpo.data.encode import PairEncoder
from mpo.data.errors import ImageError
from mpo.data.images import image_size, load_image
from mpo.data.records import parse_row

RED, BLUE, WHITE = (220, 30, 30), (30, 30, 220), (255, 255, 255)


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _halves(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", size, RED)
    img.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return img


def _palette(transparent: bool) -> bytes:
    img = Image.new("P", (6, 4), 0)
    img.putpalette([*RED, *BLUE] + [0] * (256 - 2) * 3)
    img.paste(1, (3, 0, 6, 4))
    return _png(img, transparency=0) if transparent else _png(img)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    """Stored 40x20 (red left, blue right) with orientation 6: shown rotated 90° clockwise, 20x40, red on top."""
    img = _halves()
    exif = img.getexif()
    exif[0x0112] = 6
    return _encoded(img, "JPEG", quality=95, exif=exif)


def _noise() -> Image.Image:
    """Incompressible pixels: the scan data is large, so cutting a file in half cuts the pixels, not the header."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _close(a: tuple, b: tuple, tol: int) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# name -> (file bytes, size after orientation, {(x, y): colour}, colour tolerance)
ACCEPTED: dict[str, tuple[Callable[[], bytes], tuple[int, int], dict, int]] = {
    "rgb_png": (lambda: _png(_halves()), (40, 20), {(0, 0): RED, (39, 19): BLUE}, 0),
    "one_by_one": (lambda: _png(Image.new("RGB", (1, 1), RED)), (1, 1), {(0, 0): RED}, 0),
    "100000x1": (lambda: _png(Image.new("RGB", (100_000, 1), BLUE)), (100_000, 1), {(99_999, 0): BLUE}, 0),
    "1x100000": (lambda: _png(Image.new("RGB", (1, 100_000), BLUE)), (1, 100_000), {(0, 99_999): BLUE}, 0),
    "cmyk_jpeg": (lambda: _encoded(_halves().convert("CMYK"), "JPEG", quality=95), (40, 20),
                  {(2, 10): RED, (37, 10): BLUE}, 40),
    "palette": (lambda: _palette(False), (6, 4), {(0, 0): RED, (5, 3): BLUE}, 0),
    "palette_transparent": (lambda: _palette(True), (6, 4), {(0, 0): WHITE, (5, 3): BLUE}, 0),
    # 40000 of 65535 is 61 % grey: 156 of 255 (PIL's own conversion clips it to 255, white)
    "grey_16bit": (lambda: _png(Image.fromarray(np.full((5, 7), 40_000, dtype=np.uint16))), (7, 5),
                   {(3, 2): (156, 156, 156)}, 0),
    "la_transparent": (lambda: _png(Image.new("LA", (5, 5), (40, 0))), (5, 5), {(2, 2): WHITE}, 0),
    "la_opaque": (lambda: _png(Image.new("LA", (5, 5), (40, 255))), (5, 5), {(2, 2): (40, 40, 40)}, 0),
    "animated_gif_first_frame": (_animated_gif, (8, 8), {(4, 4): RED}, 0),
    "webp_lossless": (lambda: _encoded(_halves(), "WEBP", lossless=True), (40, 20), {(0, 0): RED, (39, 0): BLUE}, 0),
    "exif_rotated_jpeg": (_exif_rotated, (20, 40), {(10, 2): RED, (10, 37): BLUE}, 40),
    "bilevel": (lambda: _png(Image.new("1", (9, 3), 1)), (9, 3), {(8, 2): WHITE}, 0),
}

REFUSED: dict[str, tuple[Callable[[], bytes], str]] = {
    "truncated_png": (lambda: _truncated(_png(Image.new("RGB", (64, 64), RED), compress_level=0)),
                      "is truncated or corrupt: image file is truncated"),
    "truncated_jpeg": (lambda: _truncated(_encoded(_noise(), "JPEG", quality=95)),
                       "is truncated or corrupt: image file is truncated"),
    "jpeg_cut_in_header": (lambda: _encoded(_noise(), "JPEG", quality=95)[:300], ": Truncated File Read"),
    "png_signature_only": (lambda: b"\x89PNG\r\n\x1a\n", "is not an image PIL can read"),
    "empty_file": (lambda: b"", "is empty (0 bytes)"),
    "text_named_png": (lambda: b"not an image at all\n", "is not an image PIL can read"),
}


@pytest.fixture(scope="module")
def encoder(rel_model) -> PairEncoder:
    from mpo.models import load_processor

    return PairEncoder(load_processor(rel_model))


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_odd_image_is_loaded_correctly_and_encodes(name, tmp_path, encoder):
    make, size, pixels, tol = ACCEPTED[name]
    (tmp_path / "img").write_bytes(make())
    img = load_image(tmp_path, "img", dataset="ds", line=7)
    assert img.mode == "RGB" and img.size == size
    assert image_size(tmp_path, "img", dataset="ds", line=7) == size  # length planning agrees, from the header
    for xy, colour in pixels.items():
        assert _close(img.getpixel(xy), colour, tol), (xy, img.getpixel(xy), colour)

    record, _ = parse_row('{"image": "img", "question": "What colour?", "chosen": "red", "rejected": "blue"}',
                          "ds", 7)
    pair = encoder.encode(record, [img], max_patches=4)
    tiles = pair.image_inputs["pixel_values"].shape[0]
    assert pair.image_inputs["pixel_values"].shape[1:] == (3, 64, 64)
    assert 1 <= tiles <= 5  # at most 4 tiles, plus a thumbnail when there are several
    assert pair.n_image_tokens == 16 * tiles
    assert encoder.plan_length(record, [img.size], max_patches=4) == pair.length


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_broken_image_is_one_row_error(name, tmp_path):
    make, message = REFUSED[name]
    (tmp_path / "img.png").write_bytes(make())
    with pytest.raises(ImageError) as err:
        load_image(tmp_path, "img.png", dataset="ds", line=7, field="image[1]")
    assert str(err.value).startswith("ds:7: image[1]: ")
    assert f"{tmp_path / 'img.png'}" in str(err.value) and message in str(err.value)
    assert err.value.to_dict()["kind"] == "image"


def test_sixteen_bit_grey_keeps_its_gradient(tmp_path):
    """The whole 16-bit range maps onto 0-255 in order (PIL alone gives 255 for everything above 255)."""
    ramp = np.linspace(0, 65535, 256).astype(np.uint16).reshape(1, 256)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode == "I;16"
    grey = np.asarray(load_image(tmp_path, "ramp.png", dataset="ds", line=1))[0, :, 0]
    assert grey[0] == 0 and grey[-1] == 255
    assert np.all(np.diff(grey.astype(int)) >= 0) and len(set(grey.tolist())) > 200


def test_32_bit_and_16_bit_pgm_grey_are_scaled_not_clipped(tmp_path):
    """Pillow opens a 16-bit PGM and a 32-bit TIFF as mode "I" and floats as "F"; its conversion clips at 255, so
    a mid-grey 16-bit PGM came out pure white. The values are scaled by the range they imply."""
    (tmp_path / "g16.pgm").write_bytes(b"P5\n4 1\n65535\n" + np.array([0, 32768, 65535, 1000], ">u2").tobytes())
    Image.fromarray(np.array([[0, 100, 255, 7]], np.int32)).save(tmp_path / "g8.tif")  # 8-bit values in "I"
    Image.fromarray(np.array([[-5, 0, 5, 15]], np.int32)).save(tmp_path / "signed.tif")  # stretched min..max
    Image.fromarray(np.array([[0, 0.5, 1, 0.25]], np.float32)).save(tmp_path / "frac.tif")  # fractions
    expected = {"g16.pgm": [0, 128, 255, 4], "g8.tif": [0, 100, 255, 7], "signed.tif": [0, 64, 128, 255],
                "frac.tif": [0, 128, 255, 64]}
    for name, grey in expected.items():
        assert Image.open(tmp_path / name).mode in ("I", "F"), name
        assert np.asarray(load_image(tmp_path, name, dataset="ds", line=1))[0, :, 0].tolist() == grey, name


def test_images_are_fully_decoded_inside_the_call(tmp_path: Path):
    """A truncated file fails in ``load_image`` (one row error), not later inside the processor of a worker."""
    data = _png(Image.new("RGB", (64, 64), RED), compress_level=0)
    (tmp_path / "late.png").write_bytes(data[: len(data) - 200])
    with pytest.raises(ImageError, match="truncated"):
        load_image(tmp_path, "late.png", dataset="ds", line=1)
