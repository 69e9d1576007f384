"""``data_augment: true`` in a meta entry: InternVL's training transform, a JPEG re-encode of every tile.

InternVL's loader builds its "train" transform for a dataset whose ``data_augment`` is set: each 448 px tile (the
thumbnail too) is saved as JPEG with a quality drawn uniformly from 75..100 and decoded again before
``ToTensor`` and ``Normalize``. The transformers processor tiles and normalises in one call, so here the
normalised tiles are mapped back to their 8-bit pixels (exact: the processor resizes in 8 bits, and
``(x·std + mean) / rescale`` lands within 1e-4 of an integer), re-encoded, and normalised again.

What differs from InternVL: the qualities of a row's tiles are drawn from a generator seeded by ``(data.seed,
dataset, line)``, not from the loader's global random state, so a row looks the same every time it is read (each
epoch, each ``repeat_time`` copy, after a resume), and the reference cache of ``mpo precompute-ref``, one entry per
row, holds exactly what training sees (InternVL draws anew at every read).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

__all__ = ["JPEG_QUALITIES", "jpeg_degrade_tiles", "augment_refusal"]

JPEG_QUALITIES = (75, 100)  # inclusive, as InternVL's qualities = list(range(75, 101))


def jpeg_degrade_tiles(pixel_values: torch.Tensor, image_processor, rng: np.random.Generator) -> torch.Tensor:
    """pixel_values (T, 3, S, S) float, normalised by ``image_processor`` → the same tiles, each JPEG re-encoded at
    its own quality from ``rng``; the same dtype and shape."""
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float64).view(1, 3, 1, 1)
    scale = float(image_processor.rescale_factor)
    pixels = ((pixel_values.double() * std + mean) / scale).round().clamp(0, 255).to(torch.uint8)
    out = torch.empty_like(pixels)
    for t in range(pixels.shape[0]):
        buf = io.BytesIO()
        quality = int(rng.integers(JPEG_QUALITIES[0], JPEG_QUALITIES[1] + 1))
        Image.fromarray(pixels[t].permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as jpeg:
            out[t] = torch.from_numpy(np.asarray(jpeg.convert("RGB")).copy()).permute(2, 0, 1)
    return ((out.double() * scale - mean) / std).to(pixel_values.dtype)


def augment_refusal(processor) -> str | None:
    """Why ``data_augment`` cannot apply with ``processor`` (it does not cut images into tiles), or None. One
    message for ``mpo data check --model`` and training, which refuse such a dataset alike."""
    from mpo.data.encode import processor_tiles

    if processor_tiles(processor):
        return None
    return (f"data_augment re-encodes InternVL's image tiles as JPEG; {type(processor).__name__} does not tile "
            "images (set data_augment: false)")
