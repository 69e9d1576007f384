"""Feeding pairs to the loop: a map-style dataset of encoded pairs, an O(1)-resumable order, and collation.

Order. The data order of epoch ``e`` is ``randperm(len(mixture), seed + e)``, identical on every rank. Optimizer
step ``s`` of an epoch consumes the global slice ``[s·G, (s+1)·G)`` of that order (G = per-device batch ×
accumulation × world size); the slice is cut into ``accumulation × world`` micro-batches of ``per_device`` pairs, and
rank ``r`` takes micro-batches ``m·world + r`` for m < accumulation. One process with ``accumulation × world``
micro-batches per step therefore sees exactly the same micro-batches as ``world`` processes do. The position
in the data is therefore just ``(epoch, step)``: a resumed run jumps there in O(1) instead of replaying a
loader for hours (InternVL #1224). A trailing partial global batch of an epoch is dropped, as HF's
``dataloader_drop_last`` would, so that every optimizer step sees the same number of pairs.

Bad rows. A row that cannot be used (bad JSON, a missing image, longer than ``max_length``) comes out of the
dataset as its :class:`~mpo.data.errors.RowError` instead of raising, so a worker process never dies on bad data;
the loop logs it to ``rejected_rows.jsonl`` and trains on the rest of the micro-batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from mpo.data.augment import augment_refusal, jpeg_degrade_tiles
from mpo.data.encode import EncodedPair, PairEncoder
from mpo.data.errors import MetaError, RowError
from mpo.data.mixture import PreferenceMixture
from mpo.train.batch import PairBatch, collate_naive
from mpo.train.shared import collate_shared

log = logging.getLogger("mpo.train")

__all__ = ["EncodedPairs", "ResumableOrder", "DataPosition", "Collator", "Prefetched", "prefetch", "vision_filler", "first_usable",
           "question_key"]


class EncodedPairs(Dataset):
    """Item ``i`` of the mixture, encoded: an :class:`EncodedPair`, or the :class:`RowError` that stopped it."""

    def __init__(self, mixture: PreferenceMixture, encoder: PairEncoder, *, blank_images: bool = False,
                 augment_seed: int | None = None):
        """``augment_seed``: apply ``data_augment`` (:mod:`mpo.data.augment`) with this seed, as training and the
        reference precompute do; None (evaluation) never augments."""
        self.mixture, self.encoder, self.blank_images = mixture, encoder, blank_images
        augmented = [s.name for s in mixture.specs if s.data_augment and s.repeat_time > 0]
        self.augment_seed = augment_seed if augmented else None  # None: no per-item dataset lookup at all
        refusal = augment_refusal(encoder.processor)
        if augment_seed is not None and augmented and refusal:
            raise MetaError(f"{', '.join(augmented)}: {refusal}")

    def __len__(self) -> int:
        return len(self.mixture)

    def __getitem__(self, i: int) -> EncodedPair | RowError:
        try:
            record = self.mixture.record(i)
            images = self.mixture.images(record)
            if self.blank_images:  # eval ablation: same tiling, no visual information
                from PIL import Image

                images = [Image.new("RGB", im.size, (255, 255, 255)) for im in images]
            pair = self.encoder.encode(record, images, max_patches=self.mixture.tile_budget(record))
            pair.index = i
            if pair.n_images and self._augments(i):
                pair.image_inputs["pixel_values"] = jpeg_degrade_tiles(
                    pair.image_inputs["pixel_values"], self.encoder.processor.image_processor,
                    np.random.default_rng([self.augment_seed, zlib.crc32(pair.dataset.encode()), pair.line]))
            return pair
        except RowError as err:
            return err

    def question(self, indices: list[int]) -> list[EncodedPair | RowError]:
        """Items ``indices`` — pairs of one question (:func:`question_key` equal) — encoded with their images
        decoded and tiled once: the first usable pair is encoded whole, the others get its prompt and image tensors
        (:meth:`~mpo.data.encode.PairEncoder.encode_answers`). Row errors stay per pair, as ``self[i]`` gives them."""
        if indices and self._augments(indices[0]):  # each pair's tiles get their own JPEG qualities
            return [self[i] for i in indices]
        out: list[EncodedPair | RowError] = []
        like = None
        for i in indices:
            if like is None:
                item = self[i]
                if not isinstance(item, RowError):
                    like, item.group = item, i  # a mixture index: unique across datasets
                out.append(item)
                continue
            try:
                pair = self.encoder.encode_answers(self.mixture.record(i), like)
                pair.index = i
                out.append(pair)
            except RowError as err:
                out.append(err)
        return out


    def _augments(self, i: int) -> bool:
        return self.augment_seed is not None and self.mixture.spec(self.mixture.locate(i)[0]).data_augment


def first_usable(dataset: EncodedPairs) -> EncodedPair:
    """The first item of ``dataset`` that is not a row error (a stand-in for ranks that must keep step)."""
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, RowError):
            return item
    raise MetaError("no usable pair in the data")


def question_key(record) -> bytes:
    """Pairs with equal keys have the same prompt and images: a digest of dataset (its tile budget), image paths,
    question and system prompt (16 bytes a row: millions of rows fit in memory)."""
    key = json.dumps([record.dataset, list(record.images), record.question, record.system_prompt])
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


@dataclass
class DataPosition:
    """Where the loop is in the data: epoch and optimizer step within it (saved in checkpoints)."""

    epoch: int = 0
    step_in_epoch: int = 0


class ResumableOrder(Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of dataset indices), starting at a :class:`DataPosition`."""

    def __init__(self, n_items: int, *, per_device: int, accumulation: int, world_size: int = 1, rank: int = 0,
                 seed: int = 42, start: DataPosition | None = None, shuffle: bool = True):
        self.n_items, self.per_device, self.accumulation = n_items, per_device, accumulation
        self.world_size, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.start = start or DataPosition()
        self.global_batch = per_device * accumulation * world_size
        if n_items < self.global_batch:
            raise ValueError(f"the data has {n_items} usable pairs but one optimizer step needs {self.global_batch} "
                             f"(per_device_batch_size × gradient_accumulation_steps × processes); lower them")

    @property
    def steps_per_epoch(self) -> int:
        return self.n_items // self.global_batch

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n_items)
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n_items, generator=gen)

    def micro_batches(self, epoch: int, first_step: int = 0) -> Iterator[list[int]]:
        order = self.order(epoch)
        for step in range(first_step, self.steps_per_epoch):
            chunk = order[step * self.global_batch:(step + 1) * self.global_batch]
            for m in range(self.accumulation):
                k = m * self.world_size + self.rank
                yield chunk[k * self.per_device:(k + 1) * self.per_device].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.start.epoch
        yield from self.micro_batches(epoch, self.start.step_in_epoch)
        while True:  # the loop stops at max_steps; further epochs reshuffle
            epoch += 1
            yield from self.micro_batches(epoch)

    def __len__(self) -> int:  # pragma: no cover - infinite by design
        raise TypeError("ResumableOrder is infinite; the loop counts steps")


class Collator:
    """list of (EncodedPair | RowError) → (PairBatch | None, errors). Picklable for DataLoader workers.

    ``vision_filler`` (:func:`vision_filler`; several processes only): attached to every micro-batch without
    images. Under DDP, FSDP2 and ZeRO-3 each rank's forward takes part in collectives per module (gradient
    buckets, parameter all-gathers); a rank whose micro-batch has no image would skip the vision modules that
    another rank runs, and the collectives would pair up wrongly (gloo aborts with "Received data size doesn't
    match expected size"; NCCL hangs). The scorer runs the filler through the same vision modules with weight 0,
    which changes no loss and no gradient value. InternVL's own trainer feeds a dummy image to text rows for the
    same reason.
    """

    def __init__(self, pad_id: int, layout: str = "naive", *, pack_length: int | None = None,
                 attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                 vision_filler: dict[str, torch.Tensor] | None = None, group_prompts: bool = False):
        self.pad_id, self.layout, self.pack_length = pad_id, layout, pack_length
        self.group_prompts = group_prompts  # the precompute: a question's pairs in one span (shared layout)
        self.attn_implementation, self.dtype = attn_implementation, dtype
        self.vision_filler = vision_filler

    def __call__(self, items: list[EncodedPair | RowError]) -> tuple[PairBatch | None, list[RowError]]:
        errors = [x for x in items if isinstance(x, RowError)]
        pairs = [x for x in items if not isinstance(x, RowError)]
        if not pairs:
            return None, errors
        if self.layout == "shared":
            batch = collate_shared(pairs, self.pad_id, pack_length=self.pack_length,
                                   attn_implementation=self.attn_implementation, dtype=self.dtype,
                                   group_prompts=self.group_prompts)
        else:
            batch = collate_naive(pairs, self.pad_id)
        batch.pair_ids = [getattr(p, "index", -1) for p in pairs]
        if self.vision_filler is not None and not any(k in batch.model_inputs for k in self.vision_filler):
            batch.vision_filler = self.vision_filler
        return batch, errors


def vision_filler(encoder: PairEncoder) -> dict[str, torch.Tensor]:
    """The image inputs (pixel_values, image_grid_thw, ...) of one small blank image, as ``encoder``'s processor
    makes them for a one-tile row: what :class:`Collator` attaches to micro-batches without images."""
    from PIL import Image

    from mpo.data.encode import TOKEN_ALIGNED_KEYS
    from mpo.data.records import PreferenceRecord

    record = PreferenceRecord(dataset="<vision filler>", line=0, question="<image>\n.", chosen=".", rejected=".",
                              images=("<blank>",))
    pair = encoder.encode(record, [Image.new("RGB", (64, 64), (255, 255, 255))], max_patches=1)
    return {k: v for k, v in pair.image_inputs.items() if k not in TOKEN_ALIGNED_KEYS}


_END = object()


class Prefetched(Iterator):
    """Iterates ``source`` in a background thread, ``depth`` items ahead of the consumer.

    Image decoding (PIL), tiling (torchvision) and tokenizing (tokenizers) mostly release the GIL, so the next
    micro-batch gets ready while the model computes, without the process start-up, pickling and shared-memory
    copies of a DataLoader worker process. The items and their order are exactly those of ``source``: the data
    has no randomness of its own (the order is a seeded permutation), so prefetching changes no result. An
    exception in the thread is raised by the ``next()`` that reaches it.
    """

    def __init__(self, source, depth: int):
        import queue

        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        # the thread holds the queue and the event, not this object: dropping the iterator stops it (__del__)
        self._thread = threading.Thread(target=_fill, args=(source, self._queue, self._stop), name="mpo-prefetch",
                                        daemon=True)
        self._thread.start()

    def __next__(self):
        item, err = self._queue.get()
        if err is not None:
            self.close()
            raise err
        if item is _END:
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the thread (it finishes the item it is preparing) and drop what it had prepared."""
        import queue

        self._stop.set()  # the thread sees it within 0.1 s, also while it waits to queue an item
        self._thread.join()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def __del__(self) -> None:
        self._stop.set()


def _fill(source, out, stop) -> None:
    """The prefetch thread: ``(item, None)`` per item of ``source``, then ``(_END, None)`` or ``(None, error)``.

    ``stop`` is checked before each item is fetched, so a closed prefetch reads nothing more than the item it
    was preparing (a resumed run reads only what it trains on plus this look-ahead)."""
    import queue

    # torch's intra-op thread count is per thread: one here, so that tiling and normalising do not start a second
    # team of compute threads beside the model's (on 2 cores that stalled every parallel region: steps +20 %)
    torch.set_num_threads(1)
    _lowest_priority()
    try:
        items = iter(source)
        while not stop.is_set():
            item = next(items, _END)
            while not stop.is_set():
                try:
                    out.put((item, None), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item is _END:
                return
    except BaseException as err:  # noqa: BLE001 - handed to the consumer, who raises it
        out.put((None, err))


def _lowest_priority() -> None:
    """Linux: the calling thread (only it: Linux keeps a nice value per thread) at nice 19.

    It then runs on what the model's threads leave idle (Python between kernels, small ops, the single-threaded
    parts of a step) instead of taking a core from them. At normal priority, on 2 cores, the thread slowed the
    steps by more than the decoding it hid; at nice 19 the cached internvl448 step fell from 1.08-1.20x its bound
    to 0.97x (docs/benchmarks.md, runs final8 and final9)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError as exc:  # a sandbox that forbids it: the thread still works, at normal priority
        log.debug("prefetch thread keeps its priority: %s", exc)


def prefetch(source, depth: int) -> Iterator:
    """``iter(source)``, prepared ``depth`` items ahead in a thread (:class:`Prefetched`); depth 0: no thread."""
    return Prefetched(source, depth) if depth > 0 else iter(source)
