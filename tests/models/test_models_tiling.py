"""InternVL tile counts from the stock transformers image processor equal the seed's ``dynamic_preprocess`` rule.

The reference below is written from the rule's description (seed_training.md 3.4), not from any code:
candidate grids (cols i, rows j) with ``min_num <= i*j <= max_num`` sorted by area (i-major within one area);
the grid whose i/j is closest to width/height wins; on an exact tie a later (larger) grid wins only if the
image area exceeds ``0.5 * image_size**2 * i * j``; more than one tile adds a thumbnail.
"""

from __future__ import annotations

import itertools

import pytest
from PIL import Image

from mpo.models import load_processor


def seed_tile_count(width: int, height: int, max_num: int, image_size: int = 448, min_num: int = 1) -> int:
    grids = sorted(((i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1)
                    if min_num <= i * j <= max_num), key=lambda g: g[0] * g[1])
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for i, j in grids:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * i * j:
            best = (i, j)
    tiles = best[0] * best[1]
    return tiles + 1 if tiles > 1 else tiles


@pytest.mark.parametrize(("width", "height", "max_num", "expected"), [
    (448, 448, 12, 1),     # square, area 1x tile: (1,1); (2,2) ties but 448² ≤ 0.5·448²·4
    (896, 448, 12, 3),     # 2x1 grid + thumbnail
    (1000, 1000, 12, 10),  # ties (1,1)→(2,2): 1e6 > 401,408; →(3,3): 1e6 > 903,168; (4,4) is over 12 → 9 + 1
    (192, 64, 6, 4),       # aspect 3 → 3x1 + thumbnail
    (100, 1000, 12, 11),   # aspect 0.1: (1,10) is closest → 10 + 1
    (5000, 10, 2, 3),      # max_num 2 caps a very wide image at 2x1 + thumbnail
    (5000, 10, 1, 1),      # max_num 1: one tile, no thumbnail
])
def test_reference_rule_worked_by_hand(width, height, max_num, expected):
    assert seed_tile_count(width, height, max_num) == expected


SIDES = (1, 7, 37, 64, 100, 224, 300, 448, 500, 671, 896, 1000, 1344, 2000, 4480)
MAX_NUMS = (1, 2, 3, 4, 6, 8, 12, 24)


@pytest.mark.parametrize("image_size", [448, 64])
def test_stock_image_processor_matches_seed_rule(tiny_internvl_dir, image_size):
    """15 x 15 sizes x 8 budgets = 1,800 cases per tile size; every count must agree."""
    image_processor = load_processor(tiny_internvl_dir).image_processor
    mismatches = []
    for width, height, max_num in itertools.product(SIDES, SIDES, MAX_NUMS):
        kwargs = {"crop_to_patches": True, "min_patches": 1, "max_patches": max_num,
                  "patch_size": {"height": image_size, "width": image_size}}
        got = image_processor.get_number_of_image_patches(height, width, kwargs)
        want = seed_tile_count(width, height, max_num, image_size=image_size)
        if got != want:
            mismatches.append((width, height, max_num, got, want))
    assert mismatches == []


@pytest.mark.parametrize(("size", "max_num"), [((192, 64), 6), ((64, 64), 12), ((300, 500), 12), ((130, 20), 4),
                                                ((20, 130), 12), ((640, 640), 12)])
def test_processed_tiles_match_seed_rule(tiny_internvl_dir, size, max_num):
    """The pixels actually produced (not just the count helper) have the seed's number of 64x64 tiles."""
    processor = load_processor(tiny_internvl_dir)
    out = processor.image_processor([Image.new("RGB", size)], crop_to_patches=True, max_patches=max_num,
                                    return_tensors="pt")
    n = seed_tile_count(*size, max_num, image_size=64)
    assert tuple(out["pixel_values"].shape) == (n, 3, 64, 64)
