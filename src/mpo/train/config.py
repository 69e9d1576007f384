"""The configuration of an MPO run: ``mpo train CONFIG.yaml [key.sub=value ...]``.

Defaults are those of InternVL's MPO scripts (seed_training.md §10): beta 0.1, loss 0.8·sigmoid + 0.2·bco_pair
+ 1.0·sft, lr 2e-7, cosine with 3 % warm-up, weight decay 0.05, one epoch, gradient clipping 1.0. Anything new
(the shared pair layout, the reference cache) is documented where it differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mpo.config import ConfigError, field
from mpo.data.images import DEFAULT_MAX_PIXELS
from mpo.data.system import SYSTEM_PROMPT_HELP
from mpo.losses.mixed import check_loss_types

__all__ = ["ModelConfig", "LoraConfig", "DataConfig", "LossConfig", "TrainConfig", "RunConfig"]


@dataclass
class LoraConfig:
    r: int = field(0, help="LoRA rank; 0 = full fine-tuning. With LoRA the reference is the model with adapters off.", ge=0)
    alpha: int | None = field(None, help="LoRA alpha; default 2·r (InternVL's choice).", gt=0)
    dropout: float = field(0.0, help="LoRA dropout.", ge=0.0, lt=1.0)
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="Module names (in the language model) that get adapters.")


@dataclass
class ModelConfig:
    path: str = field("", help="Hugging Face model folder or hub id (an -HF InternVL checkpoint, Qwen2.5-VL, a causal LM).")
    trust_remote_code: bool = field(False, help="Allow the checkpoint's own Python code. Off unless you ask.")
    dtype: Literal["float32", "bfloat16"] = field("float32", help="Weights and compute dtype; log-probs are summed in fp32 either way.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = field("sdpa", help="Attention kernel.")
    freeze_backbone: bool = field(False, help="Freeze the vision tower (seed flag).")
    freeze_mlp: bool = field(False, help="Freeze the vision-to-language projector (seed flag).")
    freeze_llm: bool = field(False, help="Freeze the language model incl. lm_head (seed flag).")
    drop_path_rate: float = field(0.0, help="Vision stochastic depth (seed: 0.1 for 8B/14B, 0.4 for 38B+).", ge=0.0, lt=1.0)
    gradient_checkpointing: bool = field(False, help="Recompute activations in backward to save memory.")
    lora: LoraConfig = field(default_factory=LoraConfig, help="LoRA adapters (PEFT).")


@dataclass
class DataConfig:
    meta_path: str = field("", help="MMPR-style meta.json listing the datasets.")
    max_length: int = field(16384, help="Longest pair (prompt + longer answer, image tokens included); longer pairs are dropped, never truncated.", gt=0)
    max_dynamic_patch: int = field(12, help="Tile budget per row; a meta entry's max_dynamic_patch overrides it.", ge=1)
    on_bad_row: Literal["skip", "error"] = field("skip", help="skip: count it and write it to rejected_rows.jsonl; error: stop.")
    num_workers: int = field(0, help="DataLoader worker processes (image decoding, tiling, tokenizing).", ge=0)
    prefetch_batches: int = field(1, help="Micro-batches prepared ahead in a background thread (at the lowest OS "
                                  "priority on Linux) while the model computes (0: none); works with or without "
                                  "num_workers.", ge=0)
    seed: int = field(42, help="Seed of repeat_time subsampling and of the epoch order (the same on every rank).",
                      ge=0)
    system_prompt: str = field("auto", help=SYSTEM_PROMPT_HELP)
    max_image_pixels: int = field(DEFAULT_MAX_PIXELS, help="Decompression-bomb guard: a larger image is a bad row "
                                  "(PIL's default; 0: no limit, as in InternVL's scripts).", ge=0)

    def __post_init__(self) -> None:
        if not self.system_prompt.strip():
            raise ConfigError("data.system_prompt: empty; give the text, 'none' (no system turn) or 'auto' (InternVL: "
                              "its identity line)")


@dataclass
class LossConfig:
    beta: float = field(0.1, help="DPO/BCO temperature β.", gt=0.0)
    loss_types: list[str] = field(default_factory=lambda: ["sigmoid", "bco_pair", "sft"], help="Terms of the mixture (mpo.losses registry).")
    loss_weights: list[float] = field(default_factory=lambda: [0.8, 0.2, 1.0], help="One weight per term.")

    def __post_init__(self) -> None:
        if len(self.loss_types) != len(self.loss_weights):
            raise ConfigError(f"loss.loss_weights: {len(self.loss_weights)} weights for {len(self.loss_types)} "
                              f"loss_types {self.loss_types}; give one weight per loss type")
        try:  # unknown names, repeats, negative or non-finite weights: at load time, not at the first step
            check_loss_types(self.loss_types, self.loss_weights)
        except ValueError as exc:
            raise ConfigError(f"loss.loss_types / loss.loss_weights: {exc}") from None


@dataclass
class TrainConfig:
    output_dir: str = field("runs/mpo", help="Checkpoints, metrics.jsonl, rejected_rows.jsonl and config.yaml go here.")
    learning_rate: float = field(2e-7, help="Peak learning rate (seed: 2e-7 for InternVL3.5).", gt=0.0)
    weight_decay: float = field(0.05, help="AdamW weight decay.", ge=0.0)
    adam_beta1: float = field(0.9, help="AdamW beta1.", ge=0.0, lt=1.0)
    adam_beta2: float = field(0.999, help="AdamW beta2.", ge=0.0, lt=1.0)
    adam_epsilon: float = field(1e-8, help="AdamW epsilon.", gt=0.0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = field("cosine", help="Schedule after warm-up.")
    warmup_ratio: float = field(0.03, help="Share of the optimizer steps spent in linear warm-up.", ge=0.0, le=1.0)
    warmup_steps: int = field(0, help="Warm-up steps; overrides warmup_ratio when > 0.", ge=0)
    num_train_epochs: float = field(1.0, help="Epochs over the mixture (after repeat_time).", gt=0.0)
    max_steps: int = field(-1, help="Optimizer steps; > 0 overrides num_train_epochs.")
    per_device_batch_size: int = field(1, help="Pairs per micro-batch per process.", ge=1)
    gradient_accumulation_steps: int = field(1, help="Micro-batches per optimizer step.", ge=1)
    global_batch_size: int = field(0, help="Pairs per optimizer step over all processes; > 0 derives "
                                   "gradient_accumulation_steps = global / (per_device × processes) (seed: 256).", ge=0)
    max_grad_norm: float = field(1.0, help="Gradient clipping; 0 turns it off.", ge=0.0)
    logging_steps: int = field(10, help="Log every N optimizer steps: the mean over those steps' pairs (grad_norm, lr: the last step's).", ge=1)
    save_steps: int = field(200, help="Checkpoint every N optimizer steps (0: only at the end).", ge=0)
    save_total_limit: int = field(3, help="Keep at most this many checkpoints (0: keep all).", ge=0)
    report_to: list[str] = field(default_factory=list, help="Extra loggers: tensorboard, wandb.")
    seed: int = field(42, help="Seed of weights init of new parts, dropout, and LoRA.")
    pair_layout: Literal["naive", "shared"] = field("shared", help="shared: prompt and images once per pair (exact, "
                                                    "faster); naive: two sequences per pair, for debugging.")
    pack_length: int = field(0, help="shared layout with eager attention: pack pairs into rows of up to this many "
                             "tokens, never splitting a pair (0: one pair per row). With sdpa (the default) every "
                             "micro-batch is one unpadded row and the pair attention keeps pairs apart, so this "
                             "does not apply.", ge=0)
    ref_cache: str = field("", help="Folder of precomputed reference log-probs (mpo precompute-ref); empty = reference in the loop.")
    deepspeed: str = field("", help="DeepSpeed JSON (configs/deepspeed/); its \"auto\" batch, accumulation and "
                           "clipping values are filled from train.*. Needs a launcher (torchrun or accelerate "
                           "launch), also for one process.")

    def __post_init__(self) -> None:
        if not self.output_dir.strip():  # "" would write checkpoints and final/ into the current folder
            raise ConfigError("train.output_dir: empty; name the run's folder")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig, help="What to train.")
    data: DataConfig = field(default_factory=DataConfig, help="What to train on.")
    loss: LossConfig = field(default_factory=LossConfig, help="The MPO mixture.")
    train: TrainConfig = field(default_factory=TrainConfig, help="Optimisation, logging, checkpoints.")

    def require_paths(self) -> None:
        """Checked when a run starts, not when a preset is loaded (presets leave data.meta_path to the user)."""
        if not self.model.path:
            raise ConfigError("model.path: required (a model folder or hub id)")
        if not self.data.meta_path:
            raise ConfigError("data.meta_path: required (an MMPR-style meta.json), e.g. data.meta_path=MMPR/meta.json")
