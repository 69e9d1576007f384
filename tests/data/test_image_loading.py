"""Image loading: containment in the dataset root, broken files, the pixel limit, EXIF, conversion to RGB."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from PIL import Image

from mpo.data import ImageError, image_size, load_image, resolve_image_path
from mpo.data.images import pixel_limit


def _load(root, rel, **kw) -> Image.Image:
    return load_image(root, rel, dataset="ds", line=3, **kw)


def _error(root, rel, **kw) -> ImageError:
    with pytest.raises(ImageError) as err:
        _load(root, rel, **kw)
    assert (err.value.dataset, err.value.line, err.value.kind) == ("ds", 3, "image")
    return err.value


@pytest.fixture
def layout(tmp_path, write_png):
    """root/ holds in.png and link.png -> ../outside/out.png; outside/ holds out.png."""
    root = tmp_path / "root"
    write_png(root / "in.png")
    write_png(tmp_path / "outside" / "out.png", colour=(0, 0, 255))
    os.symlink(tmp_path / "outside" / "out.png", root / "link.png")
    return root


def test_plain_load(layout):
    img = _load(layout, "in.png")
    assert (img.mode, img.size, img.getpixel((0, 0))) == ("RGB", (8, 8), (255, 0, 0))


@pytest.mark.parametrize("rel", ["../outside/out.png", "link.png", "sub/../../outside/out.png"])
def test_paths_escaping_the_root_are_refused(layout, rel):
    out = os.path.realpath(layout.parent / "outside" / "out.png")
    err = _error(layout, rel, field="image[1]")
    assert str(err) == (f"ds:3: image[1]: {rel!r} resolves to {out}, outside the dataset root "
                        f"{os.path.realpath(layout)} (set allow_outside_root: true to allow)")


def test_absolute_path_is_refused(layout):
    rel = str(layout / "in.png")  # even one that points inside the root: rows must be portable
    assert _error(layout, rel).message == (f"{rel!r} is an absolute path; paths must be relative to the dataset "
                                           "root (or set allow_outside_root: true)")


@pytest.mark.parametrize("rel", ["../outside/out.png", "link.png", "ABS"])
def test_allow_outside_root(layout, rel):
    rel = str(layout.parent / "outside" / "out.png") if rel == "ABS" else rel
    assert _load(layout, rel, allow_outside_root=True).getpixel((0, 0)) == (0, 0, 255)


def test_inside_paths_through_symlinked_root_and_dotdot(tmp_path, write_png):
    write_png(tmp_path / "real" / "a.png")
    (tmp_path / "real" / "sub").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    assert resolve_image_path(tmp_path / "alias", "sub/../a.png", dataset="ds", line=1) == (
        tmp_path / "real" / "a.png").resolve()


def test_remote_path(layout):
    assert _error(layout, "s3://bucket/a.png").message == "remote paths are not supported: 's3://bucket/a.png'"


def test_missing_empty_directory_and_not_an_image(layout):
    root = os.path.realpath(layout)
    assert _error(layout, "nope.png").message == f"file not found: {root}/nope.png"
    (layout / "empty.png").write_bytes(b"")
    assert _error(layout, "empty.png").message == f"{root}/empty.png is empty (0 bytes)"
    (layout / "dir.png").mkdir()
    assert _error(layout, "dir.png").message == f"{root}/dir.png is a directory, not an image"
    (layout / "text.png").write_text("hello, not a PNG")
    assert _error(layout, "text.png").message == f"{root}/text.png is not an image PIL can read"


def test_truncated_file_fails_to_load_but_its_header_is_readable(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert image_size(tmp_path, "cut.png", dataset="ds", line=3) == (64, 64)
    err = _error(tmp_path, "cut.png")
    assert err.message.startswith(f"{os.path.realpath(tmp_path)}/cut.png is truncated or corrupt: ")


BOMB_ADVICE = ("(decompression-bomb guard; if the image is genuine, raise data.max_image_pixels for training, "
               "precompute and eval, or mpo data check --max-image-pixels; 0 = no limit)")


def test_pixel_limit(tmp_path, write_png):
    """The message names the settings that exist: the config key and the check's flag."""
    write_png(tmp_path / "big.png", size=(100, 50))
    err = _error(tmp_path, "big.png", max_pixels=4999)
    assert err.message == (f"{os.path.realpath(tmp_path)}/big.png has 100x50 = 5,000 pixels, over max_image_pixels "
                           f"4,999 {BOMB_ADVICE}")
    with pytest.raises(ImageError, match="over max_image_pixels 4,999"):
        image_size(tmp_path, "big.png", dataset="ds", line=3, max_pixels=4999)
    assert _load(tmp_path, "big.png", max_pixels=5000).size == (100, 50)
    assert _load(tmp_path, "big.png", max_pixels=0).size == (100, 50)  # 0: no limit, as the settings say


@pytest.mark.parametrize("value, limit", [(None, None), (0, None), (1, 1), (178_956_970, 178_956_970)])
def test_pixel_limit_of_a_setting(value, limit):
    assert pixel_limit(value) == limit


@pytest.mark.parametrize("value", [-1, 2.5, "100", True])
def test_pixel_limit_refuses_what_is_no_count(value):
    with pytest.raises(ValueError, match=r"max_image_pixels must be an integer >= 0 \(0 or None: no limit\), got "):
        pixel_limit(value)


def test_pil_decompression_bomb_error_and_warning_become_ours(tmp_path, write_png, monkeypatch):
    """PIL warns above MAX_IMAGE_PIXELS and raises above twice that; neither may escape as PIL's own type."""
    write_png(tmp_path / "big.png", size=(100, 50))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 5,000 > 2 x 2,000: PIL raises
    assert _error(tmp_path, "big.png", max_pixels=3000).message == (
        f"{os.path.realpath(tmp_path)}/big.png has 5,000 pixels, over max_image_pixels 3,000 {BOMB_ADVICE}")
    assert _load(tmp_path, "big.png", max_pixels=None).size == (100, 50)  # our looser limit wins
    assert Image.MAX_IMAGE_PIXELS == 2000  # and PIL's global is restored
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 5,000 > 4,000: PIL only warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _load(tmp_path, "big.png", max_pixels=10_000).size == (100, 50)


def test_exif_orientation_is_applied(tmp_path):
    """Stored 40x20, left half red, right half blue, EXIF orientation 6 (rotate 90 degrees clockwise to display):
    shown 20x40 with red on top and blue below."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.png", exif=exif.tobytes())
    loaded = _load(tmp_path, "rot.png")
    assert loaded.size == (20, 40)
    assert (loaded.getpixel((10, 5)), loaded.getpixel((10, 35))) == ((255, 0, 0), (0, 0, 255))
    assert image_size(tmp_path, "rot.png", dataset="ds", line=3) == (20, 40)


def test_modes_are_converted_to_rgb(tmp_path):
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.tiff")
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 200, 0])
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "pal.png", transparency=0)
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (0, 255))
    la.save(tmp_path / "la.png")
    Image.new("RGBA", (1, 1), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    Image.new("L", (1, 1), 77).save(tmp_path / "grey.png")

    def pixels(name):
        img = _load(tmp_path, name)
        assert img.mode == "RGB"
        return [img.getpixel((x, y)) for y in range(img.height) for x in range(img.width)]

    assert pixels("cmyk.tiff") == [(255, 0, 0)] * 4
    assert pixels("pal.png") == [(255, 255, 255), (0, 200, 0)]  # transparent index 0 -> white
    assert pixels("la.png") == [(255, 255, 255), (0, 0, 0)]
    assert pixels("rgba.png") == [(255, 127, 127)]  # 128/255 red over white: 255*(127/255) = 127 in G and B
    assert pixels("grey.png") == [(77, 77, 77)]
