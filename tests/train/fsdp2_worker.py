"""One process of the FSDP2 checkpoint test (tests/train/test_fsdp2.py); run alone or under torchrun (gloo).

    python fsdp2_worker.py MODEL META OUT --steps 4 --save-at 2 [--fsdp] [--resume CHECKPOINT]

Trains the tiny InternVL for ``--steps`` optimizer steps on fixed micro-batches of 2 pairs (every rank gets the
same one, so that a step under FSDP2, which averages the ranks' gradients, equals a one-process step), writes an
mpo checkpoint after step ``--save-at`` with ``mpo.train.checkpoint``, and the final full weights to
``OUT/final.pt`` (and those after step ``--save-at`` to ``OUT/step<N>.pt``). ``--fsdp``: shard the model with torch's ``fully_shard`` over the units ``configs/fsdp2.yaml``
names (each decoder layer and vision layer, then the root), as accelerate's FSDP2 path does on GPUs.
``--resume``: start from that checkpoint with ``load_full_weights`` + ``load_training_state``.
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
    args = parser.parse_args()

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import get_scheduler

    from mpo.data.encode import PairEncoder
    from mpo.data.meta import read_meta
    from mpo.data.mixture import PreferenceMixture
    from mpo.models import load_model, load_processor
    from mpo.train import checkpoint as ckpt
    from mpo.train.data import Collator, EncodedPairs
    from mpo.train.forward import PairScorer

    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if multi:
        dist.init_process_group("gloo")
    rank0 = not multi or dist.get_rank() == 0
    torch.manual_seed(0)
    model = load_model(args.model, attn_implementation="sdpa")
    scorer = PairScorer(model)
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
    dataset = EncodedPairs(PreferenceMixture(read_meta(args.meta), seed=0, max_dynamic_patch=1),
                           PairEncoder(processor, max_length=512))
    collate = Collator(processor.tokenizer.pad_token_id, "shared", attn_implementation="sdpa", dtype=torch.float32)
    full = StateDictOptions(full_state_dict=True, cpu_offload=multi)
    args.out.mkdir(parents=True, exist_ok=True)
    for step in range(start + 1, args.steps + 1):
        batch, errors = collate([dataset[2 * step], dataset[2 * step + 1]])
        assert batch is not None and not errors, errors
        scores = scorer(batch)
        margin = 0.1 * (scores.chosen_logps - scores.rejected_logps)
        loss = -0.8 * torch.nn.functional.logsigmoid(margin).mean() + scores.chosen_nll
        loss.backward()
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
