"""data_augment: InternVL's per-tile JPEG re-encode (quality 75..100), applied through the real processor."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mpo.data import MetaError, read_meta
from mpo.data.augment import jpeg_degrade_tiles
from mpo.data.encode import PairEncoder
from mpo.data.mixture import PreferenceMixture
from mpo.models import load_processor
from mpo.train.data import EncodedPairs


def _noise(size, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_each_tile_is_what_internvls_transform_gives(tiny_internvl_dir):
    """A 2x1 image at the tile size is cut without resizing: its two tiles after our augmentation equal InternVL's
    train transform of the PIL crops (JPEG at the drawn quality, ToTensor, Normalize) to float rounding."""
    ip = load_processor(tiny_internvl_dir).image_processor
    side = ip.size["height"]
    img = _noise((2 * side, side))
    pv = ip(images=[img], crop_to_patches=True, max_patches=2, return_tensors="pt")["pixel_values"]
    assert pv.shape[0] == 3  # two tiles and the thumbnail
    out = jpeg_degrade_tiles(pv, ip, np.random.default_rng(7))
    qualities = np.random.default_rng(7).integers(75, 101, size=3)
    mean, std = torch.tensor(ip.image_mean).view(3, 1, 1), torch.tensor(ip.image_std).view(3, 1, 1)
    for t, box in enumerate([(0, 0, side, side), (side, 0, 2 * side, side)]):
        buf = io.BytesIO()
        img.crop(box).save(buf, format="JPEG", quality=int(qualities[t]))
        tile = torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()).permute(2, 0, 1) / 255
        torch.testing.assert_close(out[t], (tile - mean) / std, atol=1e-5, rtol=0)
    assert out.shape == pv.shape and out.dtype == pv.dtype
    assert not torch.equal(out[2], pv[2])  # the thumbnail is re-encoded too


def _dataset(tmp_path, processor, augment: bool, seed: int | None = 3):
    (tmp_path / "images").mkdir(exist_ok=True)
    _noise((96, 64), seed=1).save(tmp_path / "images" / "a.png")
    rows = [{"image": "a.png", "question": "<image>\nWhat is it?", "chosen": "Noise.", "rejected": "A cat."}] * 2
    (tmp_path / "ds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "meta.json").write_text(json.dumps(
        {"ds": {"root": "images", "annotation": "ds.jsonl", "repeat_time": 2, "data_augment": augment}}))
    mixture = PreferenceMixture(read_meta(tmp_path / "meta.json"), max_dynamic_patch=4)
    return EncodedPairs(mixture, PairEncoder(processor), augment_seed=seed)


def test_a_row_is_augmented_the_same_at_every_read_and_rows_differ(tiny_internvl_dir, tmp_path):
    processor = load_processor(tiny_internvl_dir)
    augmented, plain = _dataset(tmp_path, processor, True), _dataset(tmp_path, processor, False)
    pv = [augmented[i].image_inputs["pixel_values"] for i in range(4)]  # rows 1, 2, then their repeat copies
    assert not torch.equal(pv[0], plain[0].image_inputs["pixel_values"])
    assert torch.equal(pv[0], pv[2]) and torch.equal(pv[1], pv[3])  # (seed, dataset, line): copies and epochs alike
    assert not torch.equal(pv[0], pv[1])  # the same image on two lines gets its own qualities
    assert torch.equal(augmented.question([0, 1])[1].image_inputs["pixel_values"], pv[1])  # no sharing of tiles
    evaluation = _dataset(tmp_path, processor, True, seed=None)  # eval never augments
    assert torch.equal(evaluation[0].image_inputs["pixel_values"], plain[0].image_inputs["pixel_values"])


def test_data_augment_without_tiles_is_refused(tiny_qwen25vl_dir, tmp_path):
    with pytest.raises(MetaError, match=r"^ds: data_augment re-encodes InternVL's image tiles as JPEG; "
                                        r"Qwen2_5_VLProcessor does not tile images \(set data_augment: false\)$"):
        _dataset(tmp_path, load_processor(tiny_qwen25vl_dir), True)


def test_data_check_with_the_model_reports_what_training_refuses(tiny_qwen25vl_dir, tiny_internvl_dir, tmp_path):
    """`mpo data check --model` passed the dataset, and `mpo train` then refused it."""
    from mpo.data.check import run_check

    _dataset(tmp_path, load_processor(tiny_internvl_dir), False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["ds"]["data_augment"] = True
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    report = run_check(tmp_path / "meta.json", processor=load_processor(tiny_qwen25vl_dir), progress=False)
    (ds,) = report.datasets
    assert ds.error == ("data_augment re-encodes InternVL's image tiles as JPEG; Qwen2_5_VLProcessor does not tile "
                        "images (set data_augment: false)")
    assert report.exit_code == 1
    assert run_check(tmp_path / "meta.json", processor=load_processor(tiny_internvl_dir), progress=False).exit_code == 0
