"""One process of the FSDP2 checkpoint test (tests/train/test_fsdp2.py); run alone or under torchrun (gloo).

    python fsdp2_worker.py MODEL META OUT --steps 4 --save-at 2 [--fsdp] [--resume CHECKPOINT]

Trains the tiny InternVL for ``--steps`` optimizer steps on fixed micro-batches of 2 pairs (every rank gets the
same one, so that a step under FSDP2, which averages the ranks' gradients, equals a one-process step), writes an
mpo checkpoint after step ``--save-at`` with ``mpo.train.checkpoint``, and the final full weights to
``OUT/final.pt`` (and those after step ``--save-at`` to ``OUT/step<N>.pt``). ``--fsdp``: shard the model with torch's ``fully_shard`` over the units ``configs/fsdp2.yaml``
names (each decoder layer and vision layer, then the root), as accelerate's FSDP2 path does on GPUs.
``--resume``: start from that checkpoint with ``load_full_weights`` + ``load_training_state``. ``--mixed``: at each
step one pair with an image and one text-only pair, one per rank (the text rank runs mpo's vision filler), or both
accumulated in one process.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("meta")
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-at", type=int, default=2)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--mixed", action="store_true")
    args = parser.parse_args()

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import get_scheduler

    from mpo.data.encode import PairEncoder
    from mpo.data.meta import read_meta
    from mpo.data.mixture import PreferenceMixture
    from mpo.models import load_model, load_processor
    from mpo.train import checkpoint as ckpt
    from mpo.train.data import Collator, EncodedPairs, vision_filler
    from mpo.train.forward import PairScorer

    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if multi:
        dist.init_process_group("gloo")
    rank0 = not multi or dist.get_rank() == 0
    torch.manual_seed(0)
    model = load_model(args.model, attn_implementation="sdpa")
    scorer = PairScorer(model, vision_first=multi)  # as mpo's setup does with several processes
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for module in scorer.modules():
            if type(module).__name__ in ("Qwen2DecoderLayer", "Qwen3DecoderLayer", "InternVLVisionLayer"):
                fully_shard(module)
        fully_shard(scorer)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, eps=1e-6, fused=True)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=args.steps)

    start = 0
    if args.resume:
        saved = None
        if rank0:
            saved = type(model).from_pretrained(args.resume / "model").state_dict()
        ckpt.load_full_weights(model, saved)
        start = ckpt.load_training_state(args.resume, model=model, optimizer=optimizer, scheduler=scheduler)["step"]

    processor = load_processor(args.model)
    mixture = PreferenceMixture(read_meta(args.meta), seed=0, max_dynamic_patch=1)
    dataset = EncodedPairs(mixture, PairEncoder(processor, max_length=512))
    collate = Collator(processor.tokenizer.pad_token_id, "shared", attn_implementation="sdpa", dtype=torch.float32,
                       vision_filler=vision_filler(dataset.encoder) if multi else None)
    text = [i for i in range(len(mixture)) if mixture.source(i)[0] == "text_arith"]
    image = [i for i in range(len(mixture)) if mixture.source(i)[0] != "text_arith"]
    full = StateDictOptions(full_state_dict=True, cpu_offload=multi)
    args.out.mkdir(parents=True, exist_ok=True)
    for step in range(start + 1, args.steps + 1):
        if args.mixed:  # one image pair and one text-only pair: one per rank, or both accumulated in one process
            micro = [[image[step]], [text[step]]]
            micro = [micro[dist.get_rank()]] if multi else micro
        else:
            micro = [[2 * step, 2 * step + 1]]
        for ids in micro:
            batch, errors = collate([dataset[i] for i in ids])
            assert batch is not None and not errors, errors
            scores = scorer(batch)
            margin = 0.1 * (scores.chosen_logps - scores.rejected_logps)
            loss = -0.8 * torch.nn.functional.logsigmoid(margin).mean() + scores.chosen_nll
            (loss / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step == args.save_at:
            weights = ckpt.full_weights(model) if args.fsdp else None  # what mpo's save does under FSDP2
            optimizer_state = ckpt.full_optimizer_state(model, optimizer)  # collective
            at_save = get_model_state_dict(model, options=full)
            if rank0:
                torch.save(at_save, args.out / f"step{step}.pt")
                ckpt.save_checkpoint(args.out, step, model=model, optimizer_state=optimizer_state,
                                     scheduler=scheduler, trainer_state={}, config_text="",
                                     state_dict=weights)
    weights = get_model_state_dict(model, options=full)
    if rank0:
        torch.save(weights, args.out / "final.pt")
    if multi:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
