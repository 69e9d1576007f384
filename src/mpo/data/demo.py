"""``mpo data demo``: a small synthetic visual preference dataset in the MMPR layout, deterministic for a seed.

Every image-dependent pair can only be told apart by looking at the image: the colour of a shape decides which
answer is right, chosen and rejected have the same words except the colour, and the wrong colour is drawn uniformly
from the other five, so a model that ignores the image stays at 50 %. Colour is a whole-image property that a tiny
random InternVL (64 px, 16 image tokens) learns in about 100 steps on 2 CPU cores; counting and spatial tasks take
hundreds to thousands (measured; /work/shared/reference/demo-notes.md).

Layout written under OUT::

    meta.json                  shape_colour (single image), pair_colour (two images), text_arith (text only)
    meta_heldout.json          the same subsets with new images and new arithmetic questions
    annotations/*.jsonl        training rows; annotations/heldout/*.jsonl: held-out rows
    images/{train,heldout,prompts}/*.png   64x64 RGB, one tile; no image appears twice (pixel-identical included)
    prompts/correctness.jsonl  {image?, question, answer} for the correctness pipeline
    prompts/dropout_ntp.jsonl  {image?, question, chosen} for the dropout next-token-prediction pipeline
    .mpo-demo                  marker: only a folder holding it (or an empty one) is ever replaced

Image paths in every JSONL file, prompts included, are relative to ``OUT/images``. Rows carry two metadata fields,
``task`` and ``answer``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mpo.fsio import replaceable_dir, staged_dir

__all__ = ["COLOURS", "write_demo", "demo_corpus"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 140, 30),
}
_BACKGROUNDS = ((255, 255, 255), (222, 222, 222))
_SHAPES = ("circle", "square", "triangle", "diamond")
_SIZE = 64
_MARKER = ".mpo-demo"
_SUBSETS = ("shape_colour", "pair_colour", "text_arith")

SHAPE_QUESTION = "<image>\nWhat colour is the shape?"
SHAPE_ANSWER = "Looking at the image, the shape is {}."
PAIR_QUESTION = "Image-1: <image>\nImage-2: <image>\nBoth images show shapes of one colour. What colour are they?"
PAIR_ANSWER = "Looking at both images, the shapes are {}."
ARITH_QUESTION = "What is {} plus {}?"
ARITH_ANSWER = "Adding {} and {} gives {}."


@dataclass
class _Writer:
    """Draws images into ``root/images`` and remembers every drawn one, so no image is reused across splits."""

    root: Path
    seen: set = field(default_factory=set)

    def shape(self, rng: np.random.Generator, colour: str, rel: str) -> str:
        while True:
            kind = _SHAPES[rng.integers(len(_SHAPES))]
            half = int(rng.integers(8, 20))
            cx, cy = (int(v) for v in rng.integers(half + 2, _SIZE - half - 2, size=2))
            background = _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))]
            key = (kind, half, cx, cy, background, colour)
            if key not in self.seen:
                break
        self.seen.add(key)
        img = Image.new("RGB", (_SIZE, _SIZE), background)
        _draw_shape(ImageDraw.Draw(img), kind, cx, cy, half, COLOURS[colour])
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=6)
        path = self.root / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
        return rel


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: int, cy: int, half: int, fill: tuple) -> None:
    box = (cx - half, cy - half, cx + half, cy + half)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=fill)


def _colour_pair(rng: np.random.Generator) -> tuple[str, str]:
    """(right, wrong): the wrong colour is uniform over the other five, so the text alone predicts nothing."""
    names = list(COLOURS)
    right = names[rng.integers(len(names))]
    others = [c for c in names if c != right]
    return right, others[rng.integers(len(others))]


def _shape_rows(w: _Writer, rng: np.random.Generator, n: int, split: str) -> list[dict]:
    rows = []
    for k in range(n):
        right, wrong = _colour_pair(rng)
        image = w.shape(rng, right, f"{split}/shape_{k:05d}.png")
        rows.append({"image": image, "question": SHAPE_QUESTION, "chosen": SHAPE_ANSWER.format(right),
                     "rejected": SHAPE_ANSWER.format(wrong), "task": "shape_colour", "answer": right})
    return rows


def _pair_rows(w: _Writer, rng: np.random.Generator, n: int, split: str) -> list[dict]:
    rows = []
    for k in range(n):
        right, wrong = _colour_pair(rng)
        images = [w.shape(rng, right, f"{split}/pair_{k:05d}_{side}.png") for side in "ab"]
        rows.append({"image": images, "question": PAIR_QUESTION, "chosen": PAIR_ANSWER.format(right),
                     "rejected": PAIR_ANSWER.format(wrong), "task": "pair_colour", "answer": right})
    return rows


def _arith_rows(rng: np.random.Generator, n: int, combos: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for _ in range(n):
        a, b = combos[rng.integers(len(combos))]
        offsets = [d for d in (-3, -2, -1, 1, 2, 3) if a + b + d >= 0]
        wrong = a + b + offsets[rng.integers(len(offsets))]
        rows.append({"question": ARITH_QUESTION.format(a, b), "chosen": ARITH_ANSWER.format(a, b, a + b),
                     "rejected": ARITH_ANSWER.format(a, b, wrong), "task": "text_arith", "answer": str(a + b)})
    return rows


def _split_arith(rng: np.random.Generator, n_train: int) -> tuple[list, list]:
    """Training combos, and held-out combos never used in training (all combos if training used them all)."""
    combos = [(a, b) for a in range(20) for b in range(20)]
    train = [combos[i] for i in rng.integers(len(combos), size=max(n_train, 1))]
    unused = sorted(set(combos) - set(train))
    return train, unused or combos


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _meta(annotations: dict[str, str], sizes: dict[str, int]) -> dict:
    return {name: {"root": "images", "annotation": annotations[name], "data_augment": False,
                   "max_dynamic_patch": 1, "repeat_time": 1, "length": sizes[name]} for name in annotations}


def _prompts(w: _Writer, rng: np.random.Generator, n: int, combos: list) -> list[dict]:
    n_shape, n_pair = n // 2, n // 4
    rows = _shape_rows(w, rng, n_shape, "prompts") + _pair_rows(w, rng, n_pair, "prompts")
    rows += _arith_rows(rng, n - n_shape - n_pair, combos)
    return rows


def write_demo(out_dir: str | Path, *, n: int = 2000, n_heldout: int = 200, n_prompts: int = 32,
               seed: int = 0) -> dict[str, Path]:
    """Write the demo dataset (layout in the module docstring) and return its main paths.

    ``n`` training pairs are split 60 % shape_colour, 25 % pair_colour, 15 % text_arith; the held-out meta has
    ``n_heldout`` pairs per subset. ``out_dir`` must be new, empty, or an earlier demo (it is replaced whole; a
    symbolic link to one keeps pointing at it, replaced); a file or the current folder is refused
    (:func:`mpo.fsio.replaceable_dir`).
    """
    out = Path(out_dir)
    real = replaceable_dir(out)
    if real.exists() and any(real.iterdir()) and not (real / _MARKER).exists():
        raise FileExistsError(f"{out} exists and is not an mpo demo folder (no {_MARKER}); choose a new path")
    with staged_dir(real) as tmp:
        _write_all(tmp, n, n_heldout, n_prompts, seed)
    return {"root": out, "meta": out / "meta.json", "meta_heldout": out / "meta_heldout.json",
            "images": out / "images", "correctness_prompts": out / "prompts" / "correctness.jsonl",
            "dropout_ntp_prompts": out / "prompts" / "dropout_ntp.jsonl"}


def _write_all(root: Path, n: int, n_heldout: int, n_prompts: int, seed: int) -> None:
    w = _Writer(root)
    rng = {split: np.random.default_rng([seed, k]) for k, split in enumerate(("train", "heldout", "prompts"))}
    n_shape, n_pair = n * 60 // 100, n * 25 // 100
    train_combos, heldout_combos = _split_arith(rng["train"], n - n_shape - n_pair)
    splits = {
        "train": [_shape_rows(w, rng["train"], n_shape, "train"), _pair_rows(w, rng["train"], n_pair, "train"),
                  _arith_rows(rng["train"], n - n_shape - n_pair, train_combos)],
        "heldout": [_shape_rows(w, rng["heldout"], n_heldout, "heldout"),
                    _pair_rows(w, rng["heldout"], n_heldout, "heldout"),
                    _arith_rows(rng["heldout"], n_heldout, heldout_combos)],
    }
    for split, meta_name, folder in (("train", "meta.json", "annotations"),
                                     ("heldout", "meta_heldout.json", "annotations/heldout")):
        annotations = {name: f"{folder}/{name}.jsonl" for name in _SUBSETS}
        for name, rows in zip(_SUBSETS, splits[split], strict=True):
            _write_jsonl(root / annotations[name], rows)
        sizes = {name: len(rows) for name, rows in zip(_SUBSETS, splits[split], strict=True)}
        (root / meta_name).write_text(json.dumps(_meta(annotations, sizes), indent=2) + "\n", encoding="utf-8")
    prompts = _prompts(w, rng["prompts"], n_prompts, heldout_combos)
    _write_jsonl(root / "prompts" / "correctness.jsonl",
                 [_keep(r, "image", "question", "answer") for r in prompts])
    _write_jsonl(root / "prompts" / "dropout_ntp.jsonl",
                 [{**_keep(r, "image", "question"), "chosen": r["chosen"]} for r in prompts])
    (root / _MARKER).write_text("written by `mpo data demo`; this folder is replaced by the next run\n")


def _keep(row: dict, *keys: str) -> dict:
    return {k: row[k] for k in keys if k in row}


def demo_corpus(out_dir: str | Path) -> list[str]:
    """Every text of the demo rows and prompts (questions without ``<image>``, answers), in a fixed order.

    Meant for training the tiny model's tokenizer: every colour word and number then gets its own token, so chosen
    and rejected tokenise to the same length (a tokenizer trained without them splits colour words unevenly, which
    biases summed log-probs).
    """
    out = Path(out_dir)
    files = sorted(out.glob("annotations/**/*.jsonl")) + sorted(out.glob("prompts/*.jsonl"))
    texts: list[str] = []
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for key in ("question", "chosen", "rejected", "answer"):
                if isinstance(row.get(key), str):
                    texts.append(row[key].replace("<image>", "").strip())
    return texts
